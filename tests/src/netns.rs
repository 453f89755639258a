//! Network namespaces for a test: made with `ip netns` (loopback up), entered by a server
//! before it execs or by a client thread, removed after the test.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::Command,
};

/// `ip netns` namespaces made for one test, removed after it.
pub struct Netns(Vec<String>);

impl Netns {
    pub fn create(names: &[&str]) -> Self {
        for name in names {
            // A namespace a killed run left behind (none, usually: say nothing then).
            let _ = Command::new("ip")
                .args(["netns", "delete", name])
                .stderr(std::process::Stdio::null())
                .status();
            let ok = Command::new("ip")
                .args(["netns", "add", name])
                .status()
                .is_ok_and(|s| s.success())
                && Command::new("ip")
                    .args(["-n", name, "link", "set", "lo", "up"])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(
                ok,
                "`ip netns add {name}` failed: the test needs iproute2 and root"
            );
        }
        Self(names.iter().map(|s| s.to_string()).collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

fn path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// Run `f` on a thread that entered network namespace `name`.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = path(name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
    })
}

/// `cmd` runs in network namespace `name`, entered between fork and exec.
pub fn enter(cmd: &mut Command, name: &str) {
    let path = CString::new(path(name)).unwrap();
    // SAFETY: open + setns + close only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

/// Whether a TCP socket listens on `port` in the calling thread's network namespace.
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .any(|t| {
            fs::read_to_string(t).is_ok_and(|text| {
                text.lines()
                    .any(|l| l.contains(&want) && l.split_whitespace().nth(3) == Some("0A"))
            })
        })
}
