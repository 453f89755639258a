//! Which processes hold a listening socket (TCP, or unix-domain stream), from /proc: the
//! basis of "worker". /proc/<pid>/net/{tcp,tcp6,unix} are read once per network namespace
//! per call.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io::{BufRead as _, BufReader},
};

use procfs::{
    net::UnixState,
    process::{FDTarget, Process},
};

use crate::processes::{containers, tree};

/// Listening-socket inodes each of `pids` holds (processes holding none are left out).
pub fn listening(pids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, BTreeSet<u64>> {
    let mut by_netns: HashMap<u64, BTreeSet<u64>> = HashMap::new();
    let mut out = BTreeMap::new();
    for pid in pids {
        let Ok(process) = Process::new(pid as i32) else {
            continue;
        };
        let Some(netns) = containers::netns_id(process.pid) else {
            continue;
        };
        let listeners = by_netns.entry(netns).or_insert_with(|| {
            let mut inodes: BTreeSet<u64> = listening_inodes(process.pid).into_keys().collect();
            inodes.extend(unix_listening_inodes(process.pid));
            inodes
        });
        let Ok(fds) = process.fd() else {
            continue;
        };
        let held: BTreeSet<u64> = fds
            .filter_map(Result::ok)
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) if listeners.contains(&inode) => Some(inode),
                _ => None,
            })
            .collect();
        if !held.is_empty() {
            out.insert(pid, held);
        }
    }
    out
}

/// Who holds a watched listening port: the root of its tree, and a process of it (in the
/// port's network namespace, so its /proc/PID/net shows the port's queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub root: u32,
    pub pid: u32,
}

/// The (network namespace inode, port) of every listening TCP socket of `pids` (pairs of
/// PID and the root of its tree), with who holds it: the kernel's socket hooks count
/// connections established on them as served ones.
pub fn listen_keys(pids: impl IntoIterator<Item = (u32, u32)>) -> BTreeMap<(u32, u16), Holder> {
    let mut cache = ListenerCache::default();
    let mut out = BTreeMap::new();
    for (pid, root) in pids {
        let Some(netns) = containers::netns_id(pid as i32) else {
            continue;
        };
        for port in listening_ports(pid, &mut cache) {
            out.entry((netns as u32, port))
                .or_insert(Holder { root, pid });
        }
    }
    out
}

/// Listening sockets per network namespace, for a walk over many processes: each
/// namespace's tables are read once.
#[derive(Debug, Default)]
pub struct ListenerCache(HashMap<u64, BTreeMap<u64, u16>>);

/// Local ports of the listening TCP sockets `pid` holds (in its own network namespace).
pub fn listening_ports(pid: u32, cache: &mut ListenerCache) -> BTreeSet<u16> {
    let Ok(process) = Process::new(pid as i32) else {
        return BTreeSet::new();
    };
    let Some(netns) = containers::netns_id(process.pid) else {
        return BTreeSet::new();
    };
    let listeners = cache
        .0
        .entry(netns)
        .or_insert_with(|| listening_inodes(process.pid));
    if listeners.is_empty() {
        return BTreeSet::new();
    }
    let Ok(fds) = process.fd() else {
        return BTreeSet::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => listeners.get(&inode).copied(),
            _ => None,
        })
        .collect()
}

/// The listening TCP sockets in `pid`'s network namespace: inode to local port.
fn listening_inodes(pid: i32) -> BTreeMap<u64, u16> {
    tcp_listeners(pid)
        .into_iter()
        .map(|l| (l.inode, l.port))
        .collect()
}

/// A listening TCP socket as /proc/net/tcp{,6} shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpListener {
    inode: u64,
    port: u16,
    /// Connections in its accept queue (`rx_queue` of a listener: `sk_ack_backlog`; the
    /// queue's limit is not in the file, sock_diag has it).
    queue: u64,
}

/// The listening TCP sockets in `pid`'s network namespace. The kernel lists listening
/// sockets first in /proc/net/tcp{,6} (it walks the listening hash before the established
/// one), so reading stops at the first line in another state: a busy node's tens of
/// thousands of connections and TIME_WAITs are never formatted, which a full parse
/// (procfs's `tcp()`) would pay for at every sweep.
fn tcp_listeners(pid: i32) -> Vec<TcpListener> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(file) = File::open(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in BufReader::new(file).lines().skip(1).map_while(Result::ok) {
            match parse_listener(&line) {
                Some(listener) => out.push(listener),
                None => break,
            }
        }
    }
    out
}

/// One line of /proc/net/tcp{,6}, if it is a listener's:
/// "sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode".
fn parse_listener(line: &str) -> Option<TcpListener> {
    const LISTEN: &str = "0A";
    let cols: Vec<&str> = line.split_whitespace().collect();
    if cols.get(3) != Some(&LISTEN) {
        return None;
    }
    // local_address is "0100007F:1F90" (address:port in hex).
    let port = u16::from_str_radix(cols.get(1)?.rsplit_once(':')?.1, 16).ok()?;
    let (_, queue) = cols.get(4)?.split_once(':')?;
    Some(TcpListener {
        inode: cols.get(9)?.parse().ok()?,
        port,
        queue: u64::from_str_radix(queue, 16).ok()?,
    })
}

/// Accept queues right now, per listening port of `pid`'s network namespace, summed over
/// the sockets on one port (IPv4 and IPv6, SO_REUSEPORT groups).
pub fn listen_queues(pid: u32) -> BTreeMap<u16, u64> {
    let mut out: BTreeMap<u16, u64> = BTreeMap::new();
    for l in tcp_listeners(pid as i32) {
        *out.entry(l.port).or_default() += l.queue;
    }
    out
}

/// A TCP listener of a network namespace: its port, and the descriptor a process holds it
/// as, if that process holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldListener {
    pub port: u16,
    pub inode: u64,
    pub fd: Option<i32>,
}

/// Every TCP listener of `pid`'s network namespace, each with the descriptor `pid` holds
/// it as (none for sockets `pid` does not hold: another process's port, or a member of a
/// SO_REUSEPORT group that another worker opened).
pub fn held_listeners(pid: u32) -> Vec<HeldListener> {
    let listeners = tcp_listeners(pid as i32);
    let mut fds: HashMap<u64, i32> = HashMap::new();
    if let Ok(held) = Process::new(pid as i32).and_then(|p| p.fd()) {
        for fd in held.filter_map(Result::ok) {
            if let FDTarget::Socket(inode) = fd.target {
                fds.entry(inode).or_insert(fd.fd);
            }
        }
    }
    listeners
        .into_iter()
        .map(|l| HeldListener {
            port: l.port,
            inode: l.inode,
            fd: fds.get(&l.inode).copied(),
        })
        .collect()
}

/// The listening unix-domain stream sockets in `pid`'s network namespace, by inode: bound
/// (a path, or an abstract name) and not connected. (The sockets accepted from them show
/// the same path, connected; procfs does not parse the `__SO_ACCEPTCON` flag.)
fn unix_listening_inodes(pid: i32) -> BTreeSet<u64> {
    let Ok(sockets) = Process::new(pid).and_then(|p| p.unix()) else {
        return BTreeSet::new();
    };
    sockets
        .into_iter()
        .filter(|s| {
            s.socket_type == libc::SOCK_STREAM as u16
                && s.state == UnixState::UNCONNECTED
                && s.path.is_some()
        })
        .map(|s| s.inode)
        .collect()
}

/// Holders of listening sockets split into supervisors and workers: a holder with a
/// descendant that also holds one is a supervisor (uvicorn, gunicorn, nginx masters keep
/// the socket they hand down). `parents` maps each watched PID to its parent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Roles {
    pub workers: BTreeSet<u32>,
    pub supervisors: BTreeSet<u32>,
}

pub fn roles(holders: &BTreeMap<u32, BTreeSet<u64>>, parents: &BTreeMap<u32, u32>) -> Roles {
    let supervisors: BTreeSet<u32> = holders
        .keys()
        .flat_map(|&pid| tree::ancestors(pid, parents))
        .filter(|a| holders.contains_key(a))
        .collect();
    let workers = holders
        .keys()
        .copied()
        .filter(|pid| !supervisors.contains(pid))
        .collect();
    Roles {
        workers,
        supervisors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_that_hands_its_socket_down_is_not_a_worker() {
        let holders = BTreeMap::from([
            (10, BTreeSet::from([7])),
            (11, BTreeSet::from([7])),
            (12, BTreeSet::from([7])),
        ]);
        let parents = BTreeMap::from([(10, 1), (11, 10), (12, 10), (13, 10)]);
        let r = roles(&holders, &parents);
        assert_eq!(r.workers, BTreeSet::from([11, 12]));
        assert_eq!(r.supervisors, BTreeSet::from([10]));
    }

    #[test]
    fn listener_lines_give_port_and_queue() {
        let line = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listener(line),
            Some(TcpListener {
                inode: 123456,
                port: 8080,
                queue: 5,
            })
        );
        let established = "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 123457 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(parse_listener(established), None);
    }

    #[test]
    fn a_single_process_server_is_its_own_worker() {
        let holders = BTreeMap::from([(10, BTreeSet::from([7]))]);
        let parents = BTreeMap::from([(10, 1)]);
        assert_eq!(roles(&holders, &parents).workers, BTreeSet::from([10]));
    }
}
