//! A listening TCP socket of another process, borrowed for a moment to ask the kernel about
//! it: its accept queue, the queue's limit and its drop counter, what sock_diag reports in
//! flyprobe's own network namespace. sock_diag cannot reach another namespace (entering one
//! needs CAP_SYS_ADMIN); a socket answers wherever it lives. `pidfd_getfd` (Linux 5.6;
//! CAP_SYS_PTRACE, which flyprobe keeps to read other users' fd links) copies the server's
//! descriptor into flyprobe, `TCP_INFO` and `SO_MEMINFO` read the socket without locking
//! it, and the copy is closed at once: flyprobe never holds a server's listener open.
//!
//! Receiving a socket re-tags it with the receiver's cgroup v1 `net_cls` class and
//! `net_prio` index (the kernel's `__receive_sock`, as for SCM_RIGHTS). Where either
//! controller is mounted that would move a server's traffic class, so flyprobe does not
//! borrow there ([`refused_here`]).

use std::{
    fs, io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
};

pub use crate::kernel::sock_diag::ListenerStats;

/// Why listeners are not borrowed on this host, if they are not: a cgroup v1 controller
/// that receiving a socket would re-tag it for (or no way to tell).
pub fn refused_here() -> Option<String> {
    let cgroups = match fs::read_to_string("/proc/cgroups") {
        Ok(text) => text,
        // A kernel without cgroups has neither controller.
        Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
        Err(err) => return Some(format!("/proc/cgroups: {err}")),
    };
    let mounted = v1_retagging(&cgroups);
    (!mounted.is_empty()).then(|| {
        format!(
            "cgroup v1 {} mounted: a borrowed socket would take flyprobe's class",
            mounted.join(" and ")
        )
    })
}

/// Set once the kernel or a security policy refused a borrow: flyprobe stops asking (an LSM
/// would log a denial at every scrape, a kernel before 5.6 has no pidfd_getfd).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether a borrow was refused, so that none is tried any more.
pub fn refused() -> bool {
    REFUSED.load(Ordering::Relaxed)
}

/// Log a failed borrow of `pid`'s `fd` (a listener on `port`). A refusal (EPERM, EACCES,
/// ENOSYS) is warned about once and ends borrowing; a race with the server (it exited, closed
/// or replaced the descriptor) is only a debug line.
pub fn failed(pid: u32, fd: i32, port: u16, err: &io::Error) {
    let message = format!("reading the listener on port {port} of pid {pid} (fd {fd}): {err}");
    let refusal = matches!(
        err.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::ENOSYS)
    );
    if refusal && !REFUSED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "{message}; listeners in other network namespaces are not read from here on (no \
             accept queue limit there; queues from /proc)"
        );
    } else {
        log::debug!("{message}");
    }
}

/// The controllers of /proc/cgroups ("subsys_name hierarchy num_cgroups enabled") that
/// `__receive_sock` re-tags a socket for, where mounted on a v1 hierarchy (hierarchy 0:
/// not mounted, or only under cgroup v2, which has neither).
fn v1_retagging(cgroups: &str) -> Vec<&str> {
    cgroups
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let name = cols.next()?;
            let hierarchy = cols.next()?;
            (matches!(name, "net_cls" | "net_prio") && hierarchy != "0").then_some(name)
        })
        .collect()
}

/// The listening socket `pid` holds as descriptor `fd`, if it is still the socket with
/// inode `inode` (the fd may have been closed and reused since /proc was read).
pub fn listener(pid: u32, fd: i32, inode: u64) -> io::Result<ListenerStats> {
    let pidfd = owned(unsafe {
        // SAFETY: pidfd_open(2) takes a PID and flags; it returns a new descriptor.
        libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0)
    })?;
    let socket = owned(unsafe {
        // SAFETY: pidfd_getfd(2) takes a pidfd, a descriptor number in that process and
        // flags; it returns a new descriptor in this one.
        libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0)
    })?;
    let stat = nix::sys::stat::fstat(&socket)?;
    if stat.st_ino != inode {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the descriptor names another file now",
        ));
    }
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    // SAFETY: tcp_info is integers only.
    unsafe { get(&socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info) }?;
    const TCP_LISTEN: u8 = 10;
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not listening"));
    }
    let mut meminfo = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    // SAFETY: an array of u32.
    unsafe { get(&socket, libc::SOL_SOCKET, libc::SO_MEMINFO, &mut meminfo) }?;
    // A listener's tcp_info holds its accept queue in unacked and the limit in sacked.
    Ok(ListenerStats {
        queue: info.tcpi_unacked.into(),
        limit: info.tcpi_sacked.into(),
        drops: meminfo[libc::SK_MEMINFO_DROPS as usize].into(),
    })
}

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to this process, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// getsockopt(2) into `value`, which the kernel fills as far as it knows the option.
///
/// # Safety
/// `T` must be plain integers (any bytes the kernel writes are a valid `T`).
unsafe fn get<T>(socket: &OwnedFd, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for `len` bytes; the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
        os::unix::fs::MetadataExt as _,
    };

    use super::*;

    #[test]
    fn only_mounted_v1_net_cls_and_net_prio_refuse() {
        let v2 = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\n\
                  net_cls\t0\t3\t1\nnet_prio\t0\t3\t1\n";
        assert!(v1_retagging(v2).is_empty());
        let v1 = "#subsys_name\thierarchy\tnum_cgroups\tenabled\nnet_cls\t5\t1\t1\n\
                  net_prio\t0\t3\t1\n";
        assert_eq!(v1_retagging(v1), ["net_cls"]);
        assert!(v1_retagging("").is_empty());
    }

    /// This process's own listener, borrowed through its pidfd: the kernel's numbers, the
    /// same that `ss` reads (needs CAP_SYS_PTRACE or the same user, which a test has).
    #[test]
    fn a_borrowed_listener_reports_its_queue_and_limit() {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        // std listens with a backlog of 128 (capped by somaxconn).
        let somaxconn: u64 = fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _queued: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let inode = fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
            .unwrap()
            .ino();
        let stats = listener_retry(inode, socket.as_raw_fd());
        assert_eq!(stats.queue, 3, "three connections wait in the accept queue");
        assert_eq!(stats.limit, 128.min(somaxconn));
        assert_eq!(stats.drops, 0);
        let wrong = listener(std::process::id(), socket.as_raw_fd(), inode + 1);
        assert_eq!(wrong.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// The handshakes complete in softirq right after connect returns; wait for them.
    fn listener_retry(inode: u64, fd: i32) -> ListenerStats {
        for _ in 0..100 {
            let stats = listener(std::process::id(), fd, inode).unwrap();
            if stats.queue == 3 {
                return stats;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        listener(std::process::id(), fd, inode).unwrap()
    }
}
