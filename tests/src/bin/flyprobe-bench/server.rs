//! The servers the benchmark loads, started here rather than through the test harness so
//! each can be pinned (`taskset`) and sized: nginx from a minimal config, the workspace's
//! axum server, and uvicorn serving tests/apps/bench_app.py. Also the CPU clocks the
//! primary figure is read from.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use flyprobe_tests::{
    client::Conn,
    free_port,
    procs::Guard,
    servers::{self, python},
    workspace,
};

use crate::artifact;

/// A running server (killed with its process group on drop), the port and path it serves.
pub struct Server {
    pub guard: Guard,
    pub port: u16,
    /// The path wrk requests (a static file for nginx, `/` for the apps).
    pub path: &'static str,
    /// Served over TLS (https).
    pub tls: bool,
    scratch: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{}", self.port, self.path)
    }

    /// The server's processes: its root and every descendant, from /proc.
    pub fn tree(&self) -> Vec<u32> {
        let mut out = vec![self.pid()];
        let mut i = 0;
        while i < out.len() {
            out.extend(servers::children(out[i]));
            i += 1;
        }
        out
    }
}

/// `taskset -c CPU` in front of `program`, or `program` alone.
fn pinned(cpu: Option<u32>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Poll GET `path` until it answers 200, or fail after 30 s (or when the server exits).
fn ready(mut guard: Guard, port: u16, path: &'static str, name: &str) -> Result<Server> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = guard.child.try_wait() {
            bail!("{name} exited before answering ({status})");
        }
        let last = match Conn::connect(port).and_then(|mut c| c.get(path)) {
            Ok(resp) if resp.status == 200 => break,
            Ok(resp) => format!("status {}", resp.status),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!("{name} did not answer GET {path} within 30 s: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Server {
        guard,
        port,
        path,
        tls: false,
        scratch: None,
    })
}

/// Debian's nginx with `workers` worker processes, keep-alive, serving a small static file.
pub fn nginx(workers: u32, cpu: Option<u32>) -> Result<Server> {
    nginx_with(workers, cpu, false)
}

/// The same nginx serving the file over TLS 1.3 (a self-signed certificate), keep-alive: one
/// handshake per connection, the requests' bytes through OpenSSL.
pub fn nginx_tls(workers: u32, cpu: Option<u32>) -> Result<Server> {
    nginx_with(workers, cpu, true)
}

fn nginx_with(workers: u32, cpu: Option<u32>, tls: bool) -> Result<Server> {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("flyprobe-bench-nginx-{port}"));
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/ok.txt"), "ok\n")?;
    let d = dir.display();
    // Over TLS, the plain port answers the readiness check and the TLS one the load.
    let tls_port = free_port();
    let listen = if tls {
        let (cert, key) = servers::self_signed(&dir);
        format!(
            "listen 127.0.0.1:{port};\n    listen 127.0.0.1:{tls_port} ssl;\n    \
             ssl_certificate {};\n    ssl_certificate_key {};",
            cert.display(),
            key.display()
        )
    } else {
        format!("listen 127.0.0.1:{port};")
    };
    fs::write(
        dir.join("nginx.conf"),
        servers::nginx_conf(
            &dir,
            workers,
            "keepalive_requests 1000000;\n  keepalive_timeout 75s;",
            &format!("{listen}\n    root {d}/www;"),
        ),
    )?;
    let bin = servers::nginx_bin().context("nginx is not installed: run `cargo xtask setup`")?;
    let guard = Guard::spawn(
        "nginx",
        pinned(cpu, bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir),
    );
    let mut server = ready(guard, port, "/ok.txt", "nginx")?;
    server.scratch = Some(dir);
    if tls {
        server.port = tls_port;
        server.tls = true;
    }
    // The master forks its workers before it answers; make sure all are there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.tree().len() < 1 + workers as usize {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nginx did not fork {workers} workers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// The workspace's axum server (one process; tokio with 2 worker threads, so pinned to one
/// CPU it uses that CPU alone).
pub fn axum(cpu: Option<u32>) -> Result<Server> {
    let port = free_port();
    let bin = std::env::var_os("FLYPROBE_TEST_SERVER")
        .map_or_else(|| artifact("flyprobe-test-server"), PathBuf::from);
    let guard = Guard::spawn(
        "flyprobe-test-server",
        pinned(cpu, bin).args(["--port", &port.to_string()]),
    );
    ready(guard, port, "/", "flyprobe-test-server")
}

/// uvicorn serving tests/apps/bench_app.py with ONE worker: a single process, no
/// supervisor (uvicorn runs the server in-process when --workers is 1).
pub fn uvicorn_single(cpu: Option<u32>) -> Result<Server> {
    let port = free_port();
    let guard = Guard::spawn(
        "uvicorn",
        pinned(cpu, python())
            .args(["-m", "uvicorn", "bench_app:app", "--app-dir"])
            .arg(workspace().join("tests/apps"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--workers",
                "1",
                "--log-level",
                "warning",
                "--no-access-log",
            ]),
    );
    ready(guard, port, "/", "uvicorn")
}

/// CPU time (user + system) of process `pid`, all its threads, living and exited, in ns:
/// its process CPU clock (clock_getcpuclockid), the same sum /proc/PID/stat reports as
/// utime + stime, without the clock-tick rounding.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    use nix::libc;
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write the out-parameters we pass, which are valid.
    unsafe {
        if libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) != 0
            || libc::clock_gettime(clock, &mut ts) != 0
        {
            return None;
        }
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// utime + stime of process `pid` from /proc/PID/stat, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.utime + s.stime)
}

/// sysconf(_SC_CLK_TCK).
pub fn ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

/// One CPU's counters from /proc/stat, in clock ticks: (user + nice + system,
/// irq + softirq, steal).
pub fn cpu_stat(cpu: u32) -> (u64, u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{cpu} ");
    let f: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (at(0) + at(1) + at(2), at(5) + at(6), at(7))
}

/// The ids of the BPF programs process `pid` holds (program fds and links), from
/// /proc/PID/fdinfo: which loaded programs are that flyprobe's.
pub fn owned_prog_ids(pid: u32) -> std::collections::BTreeSet<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    fds.filter_map(|fd| {
        let fd = fd.ok()?;
        let target = fs::read_link(fd.path()).ok()?;
        let target = target.to_string_lossy();
        if !(target.contains("bpf-prog") || target.contains("bpf_link")) {
            return None;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
    })
    .collect()
}

/// The ids of the tracing programs (tracepoint, raw tracepoint, fentry, kprobe, perf)
/// loaded right now, from bpftool.
pub fn tracing_prog_ids() -> std::collections::BTreeSet<u64> {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return Default::default();
    };
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            matches!(
                p["type"].as_str(),
                Some(
                    "tracepoint"
                        | "raw_tracepoint"
                        | "raw_tracepoint_writable"
                        | "tracing"
                        | "kprobe"
                        | "perf_event"
                )
            )
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}
