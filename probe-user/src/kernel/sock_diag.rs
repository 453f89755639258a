//! Listening TCP sockets as the kernel's sock_diag netlink interface reports them (what
//! `ss -ltnm` shows): for each, its port, inode, accept queue and its limit, and drop
//! counter (`sk_drops`: connections the listener dropped, its accept queue full
//! (`ListenOverflows`) or its SYN queue full).
//! No kernel event marks such a drop (the SYN is consumed, not freed with a reason), so
//! the counter is read here. sock_diag answers for the daemon's own network namespace
//! only: entering another needs CAP_SYS_ADMIN, which flyprobe does not keep.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// One listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub inode: u64,
    pub stats: ListenerStats,
}

/// What the kernel reports of a listening socket (here, or from a borrowed copy of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections in its accept queue right now (`sk_ack_backlog`).
    pub queue: u64,
    /// The queue's limit (`sk_max_ack_backlog`: the backlog given to listen(), capped by
    /// `net.core.somaxconn`), which /proc/net/tcp does not show.
    pub limit: u64,
    /// `sk_drops`: SYNs and handshakes the listener dropped (a dropped handshake twice).
    pub drops: u64,
}

impl ListenerStats {
    /// Sum over the sockets of one port (IPv4 and IPv6, SO_REUSEPORT groups).
    pub fn add(&mut self, other: &Self) {
        self.queue += other.queue;
        self.limit += other.limit;
        self.drops += other.drops;
    }
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// `INET_DIAG_SKMEMINFO`, and `SK_MEMINFO_DROPS` in its array of u32.
const INET_DIAG_SKMEMINFO: u16 = 7;
const SK_MEMINFO_DROPS: usize = 8;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`.
const DIAG_MSG: usize = 72;

/// Every listening TCP socket (IPv4 and IPv6) in the daemon's network namespace.
pub fn listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut Vec<Listener>) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr + inet_diag_req_v2 { family, protocol, ext, pad, states, inet_diag_sockid }
    let mut req = [0u8; NLMSG_HDR + 56];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    req[18] = 1 << (INET_DIAG_SKMEMINFO - 1);
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: sending our own buffer on our own socket (to the kernel: address unspecified).
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(()); // the kernel ended the dump without NLMSG_DONE
        }
        if parse(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// The messages of one datagram, appended to `out`; true at the end of the dump.
fn parse(mut data: &[u8], out: &mut Vec<Listener>) -> io::Result<bool> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag message");
    while data.len() >= NLMSG_HDR {
        let len = u32_at(data, 0) as usize;
        if len < NLMSG_HDR || len > data.len() {
            return Err(bad());
        }
        let msg = &data[..len];
        match u16_at(msg, 4) {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if len >= NLMSG_HDR + 4 {
                    -(u32_at(msg, NLMSG_HDR) as i32)
                } else {
                    libc::EINVAL
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            _ if len >= NLMSG_HDR + DIAG_MSG => {
                let diag = &msg[NLMSG_HDR..];
                // inet_diag_sockid.sport is big-endian, at 4.
                let port = u16::from_be_bytes([diag[4], diag[5]]);
                // expires, rqueue, wqueue, uid, inode follow the 4 bytes and the sockid.
                let queue = u64::from(u32_at(diag, 56));
                let limit = u64::from(u32_at(diag, 60));
                let inode = u64::from(u32_at(diag, 68));
                let mut drops = 0;
                let mut attrs = &diag[DIAG_MSG..];
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0) as usize;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    if u16_at(attrs, 2) == INET_DIAG_SKMEMINFO
                        && alen >= 4 + 4 * (SK_MEMINFO_DROPS + 1)
                    {
                        drops = u64::from(u32_at(attrs, 4 + 4 * SK_MEMINFO_DROPS));
                    }
                    attrs = &attrs[(alen.div_ceil(4) * 4).min(attrs.len())..];
                }
                out.push(Listener {
                    port,
                    inode,
                    stats: ListenerStats {
                        queue,
                        limit,
                        drops,
                    },
                });
            }
            _ => return Err(bad()),
        }
        let next = len.div_ceil(4) * 4;
        data = &data[next.min(data.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_in_this_namespace_is_reported_with_its_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = listeners().expect("sock_diag dump");
        let mine = found
            .iter()
            .find(|l| l.port == port)
            .unwrap_or_else(|| panic!("port {port} not in {found:?}"));
        assert!(mine.inode > 0);
        // std listens with a backlog of 128 (capped by net.core.somaxconn).
        assert_eq!((mine.stats.queue, mine.stats.drops), (0, 0));
        assert!(mine.stats.limit > 0 && mine.stats.limit <= 128, "{mine:?}");
    }
}
