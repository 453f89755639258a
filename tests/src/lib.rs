//! Harness for flyprobe's end-to-end tests: real servers started as child processes, a real
//! HTTP/1.1 client over plain sockets, and the real `flyprobe` binary on the real kernel.
//!
//! Nothing here skips: a missing privilege or dependency fails the test with the fix.

pub mod browser;
pub mod client;
pub mod flyprobe;
pub mod netns;
pub mod procs;
pub mod py_clients;
pub mod servers;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Whether the running kernel is at least `major.minor` (/proc/sys/kernel/osrelease).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// End-to-end tests load eBPF programs: they need root, and fail (never skip) without it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test`"
    );
}

/// A path from an environment variable set by `cargo xtask test`, else its default; it must
/// exist.
pub fn artifact(var: &str, default: PathBuf) -> PathBuf {
    let path = std::env::var_os(var).map_or(default, PathBuf::from);
    assert!(
        path.exists(),
        "{} not found ({var}): run the tests with `cargo xtask test`, which builds and installs it",
        path.display()
    );
    path
}

/// Poll `check` until it returns `Some`, or fail after `timeout` with the last observation.
pub fn eventually<T, O: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, O>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
        .port()
}
