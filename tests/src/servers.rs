//! The servers the tests watch: the ASGI app in tests/apps under uvicorn, and the
//! workspace's own axum server. Both answer `GET /` and `GET /slow?ms=N`, and name the
//! process that served each request in an `x-worker-pid` header.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{artifact, client::Conn, eventually, free_port, procs::Guard, workspace};

pub struct Server {
    pub guard: Guard,
    pub port: u16,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

pub fn python() -> PathBuf {
    artifact(
        "FLYPROBE_PYTHON",
        workspace().join("target/venv/bin/python"),
    )
}

pub fn apps_dir() -> PathBuf {
    workspace().join("tests/apps")
}

/// `uvicorn app:app --workers N` on a free loopback port, answering before this returns.
pub fn uvicorn(workers: u32) -> Server {
    let port = free_port();
    let guard = Guard::spawn(
        "uvicorn",
        Command::new(python())
            .args(["-m", "uvicorn", "app:app", "--app-dir"])
            .arg(apps_dir())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", &workers.to_string(), "--log-level", "warning"]),
    );
    let server = ready(guard, port);
    // Workers are spawned (fork + exec of `spawn_main`) beside a resource tracker.
    all_forked(&server, workers, "spawn_main");
    server
}

/// `gunicorn -k uvicorn_worker.UvicornWorker -w N`: a forking supervisor.
pub fn gunicorn(workers: u32) -> Server {
    let port = free_port();
    let guard = Guard::spawn(
        "gunicorn",
        Command::new(python())
            .args(["-m", "gunicorn", "app:app", "--chdir"])
            .arg(apps_dir())
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--workers", &workers.to_string()])
            .args(["--worker-class", "uvicorn_worker.UvicornWorker"])
            .args(["--graceful-timeout", "5", "--log-level", "warning"]),
    );
    let server = ready(guard, port);
    all_forked(&server, workers, "");
    server
}

/// Wait until the supervisor has forked all `n` workers (children whose command line
/// contains `marker`), so none of them is born after a test attaches flyprobe.
fn all_forked(server: &Server, n: u32, marker: &str) {
    let pid = server.pid();
    eventually(
        &format!("{n} workers forked by {pid}"),
        Duration::from_secs(30),
        || {
            let workers = children(pid)
                .into_iter()
                .filter(|c| {
                    std::fs::read(format!("/proc/{c}/cmdline"))
                        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(marker))
                })
                .count();
            if workers == n as usize {
                Ok(())
            } else {
                Err(workers)
            }
        },
    );
}

/// The direct children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The axum server built from tests/src/bin (tokio, 2 threads, one process).
pub fn rust_server() -> Server {
    let port = free_port();
    let bin = artifact(
        "FLYPROBE_TEST_SERVER",
        workspace().join("target/release/flyprobe-test-server"),
    );
    let guard = Guard::spawn(
        "flyprobe-test-server",
        Command::new(bin).args(["--port", &port.to_string()]),
    );
    ready(guard, port)
}

fn ready(guard: Guard, port: u16) -> Server {
    eventually(
        "the server to answer GET /",
        Duration::from_secs(30),
        || {
            let resp = Conn::connect(port)
                .and_then(|mut c| c.get("/"))
                .map_err(|e| e.to_string())?;
            (resp.status == 200)
                .then_some(())
                .ok_or(resp.status.to_string())
        },
    );
    Server { guard, port }
}
