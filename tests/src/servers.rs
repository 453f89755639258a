//! The servers the tests watch: the ASGI app in tests/apps under uvicorn (and gunicorn,
//! granian, hypercorn), nginx, the workspace's own axum and io_uring servers, and the plain
//! socket servers of tests/apps/socket_server.py. The HTTP ones answer `GET /` and name the
//! process that served each request in an `x-worker-pid` header.

use std::{
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{artifact, client::Conn, eventually, free_port, procs::Guard, workspace};

pub struct Server {
    pub guard: Guard,
    pub port: u16,
    /// A scratch directory removed with the server.
    scratch: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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
    uvicorn_with(workers, &[])
}

/// uvicorn with extra options (`--loop uvloop --http httptools`).
pub fn uvicorn_with(workers: u32, extra: &[&str]) -> Server {
    uvicorn_app(workers, "app:app", &[], extra)
}

/// uvicorn serving `app` (a module in tests/apps) with environment `env`.
pub fn uvicorn_app(workers: u32, app: &str, env: &[(&str, &str)], extra: &[&str]) -> Server {
    let port = free_port();
    let guard = Guard::spawn(
        "uvicorn",
        uvicorn_command(app, port, workers)
            .args(extra)
            .envs(env.iter().copied()),
    );
    let server = ready(guard, port);
    // Workers are spawned (fork + exec of `spawn_main`) beside a resource tracker.
    all_forked(&server, workers, "spawn_main");
    server
}

/// `uvicorn APP --workers N` on 127.0.0.1:`port`, its options to follow.
fn uvicorn_command(app: &str, port: u16, workers: u32) -> Command {
    let mut cmd = Command::new(python());
    cmd.args(["-m", "uvicorn", app, "--app-dir"])
        .arg(apps_dir())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--workers", &workers.to_string(), "--log-level", "warning"]);
    cmd
}

/// A unix-domain socket path in a scratch directory of its own (removed with the server).
fn unix_socket(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("flyprobe-{name}-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    let path = dir.join(format!("{name}.sock"));
    (dir, path)
}

/// Wait until the server on unix socket `path` answers GET /.
fn ready_unix(guard: Guard, path: &std::path::Path, dir: PathBuf) -> Server {
    answers("on its unix socket", || Conn::connect_unix(path));
    Server {
        guard,
        port: 0,
        scratch: Some(dir),
    }
}

/// `uvicorn app:app --uds PATH --workers N`: the server and its socket's path.
pub fn uvicorn_uds(workers: u32) -> (Server, PathBuf) {
    let (dir, path) = unix_socket("uvicorn");
    let guard = Guard::spawn(
        "uvicorn",
        Command::new(python())
            .args(["-m", "uvicorn", "app:app", "--app-dir"])
            .arg(apps_dir())
            .arg("--uds")
            .arg(&path)
            .args(["--workers", &workers.to_string(), "--log-level", "warning"]),
    );
    let server = ready_unix(guard, &path, dir);
    all_forked(&server, workers, "spawn_main");
    (server, path)
}

/// The axum server on a unix socket (one process, 2 threads): the server and its path.
pub fn rust_server_uds() -> (Server, PathBuf) {
    let (dir, path) = unix_socket("axum");
    let bin = artifact(
        "FLYPROBE_TEST_SERVER",
        workspace().join("target/release/flyprobe-test-server"),
    );
    let guard = Guard::spawn(
        "flyprobe-test-server",
        Command::new(bin).arg("--unix").arg(&path),
    );
    (ready_unix(guard, &path, dir), path)
}

/// `gunicorn --bind unix:PATH -k uvicorn_worker.UvicornWorker -w N`: the server and its
/// socket's path.
pub fn gunicorn_uds(workers: u32) -> (Server, PathBuf) {
    let (dir, path) = unix_socket("gunicorn");
    let guard = Guard::spawn(
        "gunicorn",
        Command::new(python())
            .args(["-m", "gunicorn", "app:app", "--chdir"])
            .arg(apps_dir())
            .args(["--bind", &format!("unix:{}", path.display())])
            .args(["--workers", &workers.to_string()])
            .args(["--worker-class", "uvicorn_worker.UvicornWorker"])
            .args(["--graceful-timeout", "5", "--log-level", "warning"]),
    );
    let server = ready_unix(guard, &path, dir);
    all_forked(&server, workers, "");
    (server, path)
}

/// nginx with 1 worker in front of the unix socket `upstream` (proxy_pass, nginx's default
/// HTTP/1.0 upstream connection per request), and its own counters at `/stub`
/// (stub_status).
pub fn nginx_to_unix(upstream: &std::path::Path) -> Server {
    let port = free_port();
    let dir = nginx_dir(port);
    let conf = nginx_conf(
        &dir,
        1,
        "keepalive_requests 100000;",
        &format!(
            "listen 127.0.0.1:{port};
    location = /stub {{ stub_status; }}
    location / {{ proxy_pass http://unix:{}:; }}",
            upstream.display()
        ),
    );
    start_nginx(dir, port, &conf, 1)
}

/// `gunicorn -k uvicorn_worker.UvicornWorker -w N`: a forking supervisor.
pub fn gunicorn(workers: u32) -> Server {
    gunicorn_with(workers, &[])
}

/// The same with extra arguments (`--max-requests N`).
pub fn gunicorn_with(workers: u32, extra: &[&str]) -> Server {
    let port = free_port();
    let guard = Guard::spawn(
        "gunicorn",
        Command::new(python())
            .args(["-m", "gunicorn", "app:app", "--chdir"])
            .arg(apps_dir())
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--workers", &workers.to_string()])
            .args(["--worker-class", "uvicorn_worker.UvicornWorker"])
            .args(extra)
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

/// `gunicorn wsgi_app:app` with sync workers (one connection at a time each) and
/// `--backlog N`: a pool that can be too small.
pub fn gunicorn_sync(workers: u32, backlog: u32) -> Server {
    gunicorn_sync_with(workers, &["--backlog", &backlog.to_string()])
}

/// gunicorn sync workers that each exit after `max_requests` requests, the arbiter forking
/// a new one each time (`--max-requests`, as deployments use against leaks).
pub fn gunicorn_recycling(workers: u32, max_requests: u32) -> Server {
    // A worker forking thousands of children (/spawn) on a busy machine can take longer than
    // gunicorn's default 30 s worker timeout, and would be aborted mid-request.
    gunicorn_sync_with(
        workers,
        &[
            "--max-requests",
            &max_requests.to_string(),
            "--timeout",
            "150",
        ],
    )
}

/// `gunicorn_sync` in the `ip netns` namespace `name` (as a pod's server), once it listens
/// there.
pub fn gunicorn_sync_in_netns(name: &str, workers: u32, backlog: u32) -> Server {
    let server = gunicorn_sync_prepared(workers, backlog, |c| crate::netns::enter(c, name));
    let port = server.port;
    crate::netns::in_netns(name, || {
        crate::eventually(
            "gunicorn listening in its namespace",
            Duration::from_secs(20),
            || crate::netns::listening(port).then_some(()).ok_or(()),
        )
    });
    server
}

/// `gunicorn_sync(workers, backlog)` with `prepare` applied to its command (a network
/// namespace to enter), not probed for readiness from here: the caller asks where it runs.
pub fn gunicorn_sync_prepared(
    workers: u32,
    backlog: u32,
    prepare: impl FnOnce(&mut Command),
) -> Server {
    let port = free_port();
    let mut cmd = gunicorn_sync_command(port, workers);
    cmd.args(["--backlog", &backlog.to_string()]);
    prepare(&mut cmd);
    let server = Server {
        guard: Guard::spawn("gunicorn", &mut cmd),
        port,
        scratch: None,
    };
    all_forked(&server, workers, "");
    server
}

fn gunicorn_sync_with(workers: u32, extra: &[&str]) -> Server {
    let port = free_port();
    let guard = Guard::spawn("gunicorn", gunicorn_sync_command(port, workers).args(extra));
    let server = ready(guard, port);
    all_forked(&server, workers, "");
    server
}

/// `gunicorn wsgi_app:app` with `workers` sync workers on 127.0.0.1:`port`, its options to
/// follow.
fn gunicorn_sync_command(port: u16, workers: u32) -> Command {
    let mut cmd = Command::new(python());
    cmd.args(["-m", "gunicorn", "wsgi_app:app", "--chdir"])
        .arg(apps_dir())
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--workers", &workers.to_string(), "--worker-class", "sync"])
        .args(["--graceful-timeout", "5", "--log-level", "warning"]);
    cmd
}

/// `granian --interface asgi --workers N` (Rust server, Python workers).
pub fn granian(workers: u32) -> Server {
    let port = free_port();
    let guard = Guard::spawn(
        "granian",
        Command::new(python())
            .args([
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--host",
                "127.0.0.1",
            ])
            .args([
                "--port",
                &port.to_string(),
                "--workers",
                &workers.to_string(),
            ])
            .args(["--log-level", "warning", "app:app"])
            .current_dir(apps_dir()),
    );
    ready(guard, port)
}

/// `hypercorn --workers N`.
pub fn hypercorn(workers: u32) -> Server {
    let port = free_port();
    let guard = Guard::spawn("hypercorn", hypercorn_command(port, workers).arg("app:app"));
    ready(guard, port)
}

/// `hypercorn --workers N` on 127.0.0.1:`port`, its options and the app to follow.
fn hypercorn_command(port: u16, workers: u32) -> Command {
    let mut cmd = Command::new(python());
    cmd.args(["-m", "hypercorn", "--workers", &workers.to_string()])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .current_dir(apps_dir());
    cmd
}

/// Debian's nginx binary, if installed.
pub fn nginx_bin() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// An nginx configuration for a test or benchmark server: everything it writes goes under
/// `dir`, it runs in the foreground as root with `workers` workers and no access log;
/// `keepalive` is the http block's keep-alive setting, `server` the server block's body.
pub fn nginx_conf(dir: &std::path::Path, workers: u32, keepalive: &str, server: &str) -> String {
    let d = dir.display();
    format!(
        "user root;
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  {keepalive}
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    {server}
  }}
}}
"
    )
}

/// nginx (Debian package) with 2 worker processes, configured like the apps: `return` for
/// the fixed routes, a 1 MiB static file served with sendfile, and /slow proxied to
/// `upstream` (the axum server, which is not watched).
pub fn nginx(upstream: u16) -> Server {
    let port = free_port();
    let dir = nginx_dir(port);
    std::fs::create_dir_all(dir.join("static")).expect("nginx static dir");
    std::fs::write(dir.join("static/big.bin"), vec![b'x'; 1 << 20]).expect("static file");
    let d = dir.display();
    let conf = nginx_conf(
        &dir,
        2,
        "keepalive_requests 100000;",
        &format!(
            "listen 127.0.0.1:{port};
    add_header x-worker-pid $pid always;
    location = / {{ return 200 'ok'; }}
    location = /echo {{ return 200 'received'; }}
    location = /redirect {{ return 302 /; }}
    location = /error {{ return 500; }}
    location = /slow {{ proxy_pass http://127.0.0.1:{upstream}; }}
    location = /big {{ proxy_pass http://127.0.0.1:{upstream}; }}
    location /static/ {{ root {d}; }}"
        ),
    );
    start_nginx(dir, port, &conf, 2)
}

/// nginx (1 worker) whose listener defers accepting a connection until its first data
/// (`listen ... deferred`: TCP_DEFER_ACCEPT), answering `/` with 200.
pub fn nginx_deferred() -> Server {
    let port = free_port();
    let dir = nginx_dir(port);
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let conf = nginx_conf(
        &dir,
        1,
        "keepalive_requests 100000;",
        &format!(
            "listen 127.0.0.1:{port} deferred;
    location = / {{ return 200 'ok'; }}"
        ),
    );
    start_nginx(dir, port, &conf, 1)
}

/// The size of `nginx_h2c`'s `/static/page.bin`: eight of them fit the client's initial
/// HTTP/2 connection window (65,535 bytes), so a client needs no WINDOW_UPDATE.
pub const H2C_PAGE: usize = 6000;

/// nginx (1 worker) speaking HTTP/2 without TLS (prior knowledge, `listen ... http2`) on
/// its port, with its own counters (stub_status) at `/stub` over HTTP/1.1 on the second
/// port returned.
pub fn nginx_h2c() -> (Server, u16) {
    let port = free_port();
    let stub = free_port();
    let dir = nginx_dir(port);
    // A static file, sent with sendfile: DATA frames the walk passes over unseen.
    std::fs::create_dir_all(dir.join("static")).expect("nginx static dir");
    std::fs::write(dir.join("static/page.bin"), vec![b'x'; H2C_PAGE]).expect("static file");
    let d = dir.display();
    let conf = nginx_conf(
        &dir,
        1,
        "keepalive_requests 100000;",
        &format!(
            "listen 127.0.0.1:{port} http2;
    listen 127.0.0.1:{stub};
    location /static/ {{ root {d}; }}
    location = / {{ return 200 'ok'; }}
    location = /echo {{ return 200 'received'; }}
    location = /error {{ return 500; }}
    location = /stub {{ stub_status; }}"
        ),
    );
    // Ready once it answers GET / over HTTP/1.1, which the h2 port does not speak.
    let mut server = start_nginx(dir, stub, &conf, 1);
    server.port = port;
    (server, stub)
}

/// A scratch directory for the nginx on `port`.
fn nginx_dir(port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flyprobe-nginx-{port}"));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    dir
}

/// nginx with configuration `conf` written under `dir` (the server's scratch directory),
/// answering on `port` with all its `workers` forked before this returns.
fn start_nginx(dir: PathBuf, port: u16, conf: &str, workers: u32) -> Server {
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let nginx = nginx_bin().expect("nginx is not installed: run `cargo xtask setup`");
    let guard = Guard::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir),
    );
    let mut server = ready(guard, port);
    server.scratch = Some(dir);
    all_forked(&server, workers, "");
    server
}

/// The plain TCP echo server built from tests/src/bin.
pub fn echo_server() -> Server {
    let (guard, port) = workspace_bin("FLYPROBE_ECHO_SERVER", "flyprobe-echo-server", &[]);
    eventually("the echo server to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
    Server {
        guard,
        port,
        scratch: None,
    }
}

/// A Python process that maps OpenSSL's libssl (it made an SSL context) until a line on its
/// stdin (`exec_echo`) makes it exec the echo server (Rust, no TLS library) in its place: the
/// same PID, another program. Returns once the first program is ready; its port is the echo
/// server's, listening only after the exec.
pub fn python_then_echo() -> Server {
    let port = free_port();
    let echo = artifact(
        "FLYPROBE_ECHO_SERVER",
        workspace().join("target/release/flyprobe-echo-server"),
    );
    let script = "import os, ssl, sys\n\
                  ssl.create_default_context()\n\
                  print('ready', flush=True)\n\
                  sys.stdin.readline()\n\
                  os.execv(sys.argv[1], [sys.argv[1], '--port', sys.argv[2]])\n";
    let mut guard = Guard::spawn(
        "python-then-echo",
        Command::new(python())
            .args(["-c", script])
            .arg(echo)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    let stdout = guard.child.stdout.take().expect("piped stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the Python process's stdout");
    assert_eq!(line.trim(), "ready", "the Python process did not start");
    Server {
        guard,
        port,
        scratch: None,
    }
}

/// Tells `python_then_echo`'s process to exec the echo server, and waits until it listens.
pub fn exec_echo(server: &mut Server) {
    use std::io::Write as _;
    let stdin = server.guard.child.stdin.as_mut().expect("piped stdin");
    stdin
        .write_all(b"exec\n")
        .expect("writing to the Python process");
    let port = server.port;
    eventually("the echo server to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
}

/// The io_uring server built from tests/src/bin (one thread, accept/recv/send/close through
/// the ring).
pub fn uring_server() -> Server {
    let (guard, port) = workspace_bin("FLYPROBE_URING_SERVER", "flyprobe-uring-server", &[]);
    ready(guard, port)
}

/// tests/apps/socket_server.py in `mode` (`blocking`, `serial`, `pass-fd`, `fork`) with `extra`
/// options, answering before this returns, and the lines it prints on stdout.
pub fn socket_app(mode: &str, extra: &[&str]) -> (Server, Lines) {
    let port = free_port();
    let mut guard = Guard::spawn(
        "socket_server.py",
        Command::new(python())
            .arg("-u")
            .arg(apps_dir().join("socket_server.py"))
            .args([mode, "--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped()),
    );
    let stdout = guard.child.stdout.take().expect("piped stdout");
    (ready(guard, port), Lines::read(stdout))
}

/// A child's stdout, line by line, read on a thread of its own so a wait can time out.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub fn read(out: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    /// The next line, or a failure after `timeout` (or when the child closed its stdout).
    pub fn next(&self, timeout: Duration) -> String {
        self.0
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no line from the server within {timeout:?}: {e}"))
    }
}

/// The direct children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(list) => list
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        // A kernel without CONFIG_PROC_CHILDREN: every process's parent, from /proc.
        Err(_) => procfs::process::all_processes()
            .into_iter()
            .flatten()
            .filter_map(|p| p.ok()?.stat().ok())
            .filter(|s| s.ppid == pid as i32)
            .map(|s| s.pid as u32)
            .collect(),
    }
}

/// The children of `pid` that have not exited (a zombie not yet reaped has), oldest first.
pub fn live_children(pid: u32) -> Vec<u32> {
    let mut live: Vec<(u64, u32)> = children(pid)
        .into_iter()
        .filter_map(|c| procfs::process::Process::new(c as i32).ok()?.stat().ok())
        .filter(|s| s.state != 'Z')
        .map(|s| (s.starttime, s.pid as u32))
        .collect();
    live.sort();
    live.into_iter().map(|(_, pid)| pid).collect()
}

/// The axum server built from tests/src/bin (tokio, 2 threads, one process).
pub fn rust_server() -> Server {
    let (guard, port) = workspace_bin("FLYPROBE_TEST_SERVER", "flyprobe-test-server", &[]);
    ready(guard, port)
}

/// The axum server with extra arguments (`--workers N`: a pre-fork parent and N workers,
/// all of them forked before this returns).
pub fn rust_server_with(extra: &[&str], workers: u32) -> Server {
    let (guard, port) = workspace_bin("FLYPROBE_TEST_SERVER", "flyprobe-test-server", extra);
    let server = ready(guard, port);
    if workers > 0 {
        all_forked(&server, workers, "");
    }
    server
}

/// The axum server on `port`, with `prepare` applied to its command (a cgroup, a netns), not
/// probed for readiness: a node-wide test must not send requests it does not count.
pub fn rust_server_unprobed(port: u16, prepare: impl FnOnce(&mut Command)) -> Server {
    let bin = artifact(
        "FLYPROBE_TEST_SERVER",
        workspace().join("target/release/flyprobe-test-server"),
    );
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string()]);
    prepare(&mut cmd);
    Server {
        guard: Guard::spawn("flyprobe-test-server", &mut cmd),
        port,
        scratch: None,
    }
}

/// A server binary built from tests/src/bin (path from `var`), on a free port.
fn workspace_bin(var: &str, name: &str, extra: &[&str]) -> (Guard, u16) {
    let port = free_port();
    let bin = artifact(var, workspace().join("target/release").join(name));
    let guard = Guard::spawn(
        name,
        Command::new(bin)
            .args(["--port", &port.to_string()])
            .args(extra),
    );
    (guard, port)
}

fn ready(guard: Guard, port: u16) -> Server {
    answers("", || Conn::connect(port));
    Server {
        guard,
        port,
        scratch: None,
    }
}

/// Wait until a server reached by `connect` answers GET / with 200.
fn answers(how: &str, connect: impl Fn() -> std::io::Result<Conn>) {
    eventually(
        &format!("the server to answer GET / {how}"),
        Duration::from_secs(30),
        || {
            let resp = connect()
                .and_then(|mut c| c.get("/"))
                .map_err(|e| e.to_string())?;
            (resp.status == 200)
                .then_some(())
                .ok_or(resp.status.to_string())
        },
    );
}

/// A gRPC server (Python's grpcio: gRPC's C core, its own HTTP/2): tests/apps/grpc_echo.py,
/// one unary echo method, on a free loopback port.
pub fn grpc_echo() -> Server {
    grpc_echo_with(None)
}

/// The gRPC echo server over TLS (grpcio's own: BoringSSL linked into its extension, no
/// OpenSSL call), with a self-signed certificate for `localhost`: the server and the
/// certificate its client is to trust.
pub fn grpc_echo_tls() -> (Server, PathBuf) {
    let port = free_port();
    let (dir, cert, key) = tls_dir("grpc", port);
    let server = grpc_echo_with(Some((port, dir, &key, &cert)));
    (server, cert)
}

fn grpc_echo_with(tls: Option<(u16, PathBuf, &Path, &Path)>) -> Server {
    let port = tls.as_ref().map_or_else(free_port, |t| t.0);
    let mut cmd = Command::new(python());
    cmd.args(["grpc_echo.py", "serve", &port.to_string()])
        .current_dir(apps_dir());
    if let Some((_, _, key, cert)) = &tls {
        cmd.arg("--tls").arg(cert).arg(key);
    }
    let guard = Guard::spawn("grpc", &mut cmd);
    eventually("the gRPC server to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ())
    });
    Server {
        guard,
        port,
        scratch: tls.map(|t| t.1),
    }
}

/// A self-signed certificate and its key for `localhost` (made with the `openssl` command,
/// which `cargo xtask setup` installs), in scratch directory `dir`: (cert, key).
pub fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is not installed: run `cargo xtask setup`");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A scratch directory with a self-signed certificate, for the TLS server on `port`.
fn tls_dir(name: &str, port: u16) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("flyprobe-{name}-tls-{port}"));
    let (cert, key) = self_signed(&dir);
    (dir, cert, key)
}

/// Wait until the server answers GET / with 200 over TLS (curl, certificate not verified):
/// its workers have set up TLS, so they map OpenSSL before flyprobe looks for it.
fn ready_tls(guard: Guard, port: u16, dir: PathBuf) -> Server {
    eventually(
        "the server to answer GET / over TLS",
        Duration::from_secs(30),
        || {
            let out = Command::new("curl")
                .args(["-sk", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("https://127.0.0.1:{port}/"))
                .output()
                .map_err(|e| format!("curl: {e} (run `cargo xtask setup`)"))?;
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            (code == "200").then_some(()).ok_or(code)
        },
    );
    Server {
        guard,
        port,
        scratch: Some(dir),
    }
}

/// nginx (2 workers) serving HTTP/1.1 and HTTP/2 over TLS (`listen ... ssl http2`, ALPN)
/// with a self-signed certificate, and its own counters (stub_status) at `/stub` over plain
/// HTTP/1.1 on the second port returned.
pub fn nginx_tls() -> (Server, u16) {
    let port = free_port();
    let stub = free_port();
    let dir = nginx_dir(port);
    let (cert, key) = self_signed(&dir);
    let conf = nginx_conf(
        &dir,
        2,
        "keepalive_requests 100000;",
        &format!(
            "listen 127.0.0.1:{port} ssl http2;
    listen 127.0.0.1:{stub};
    ssl_certificate {};
    ssl_certificate_key {};
    location = / {{ return 200 'ok'; }}
    location = /echo {{ return 200 'received'; }}
    location = /error {{ return 500; }}
    location = /stub {{ stub_status; }}",
            cert.display(),
            key.display()
        ),
    );
    let mut server = start_nginx(dir, stub, &conf, 2);
    server.port = port;
    (server, stub)
}

/// `uvicorn app:app --workers N --ssl-certfile --ssl-keyfile` (asyncio's TLS: OpenSSL on
/// memory buffers, the socket read and written apart from it).
pub fn uvicorn_tls(workers: u32) -> Server {
    let port = free_port();
    let (dir, cert, key) = tls_dir("uvicorn", port);
    let guard = Guard::spawn(
        "uvicorn",
        uvicorn_command("app:app", port, workers)
            .arg("--ssl-certfile")
            .arg(&cert)
            .arg("--ssl-keyfile")
            .arg(&key),
    );
    let server = ready_tls(guard, port, dir);
    all_forked(&server, workers, "spawn_main");
    server
}

/// `gunicorn wsgi_app:app` with sync workers over TLS (`--certfile --keyfile`: Python's
/// `ssl` on the socket itself, one connection per request).
pub fn gunicorn_tls(workers: u32) -> Server {
    let port = free_port();
    let (dir, cert, key) = tls_dir("gunicorn", port);
    let guard = Guard::spawn(
        "gunicorn",
        gunicorn_sync_command(port, workers)
            .arg("--certfile")
            .arg(&cert)
            .arg("--keyfile")
            .arg(&key),
    );
    let server = ready_tls(guard, port, dir);
    all_forked(&server, workers, "");
    server
}

/// `hypercorn --workers N --certfile --keyfile`: HTTP/1.1 and HTTP/2 (ALPN) over TLS.
pub fn hypercorn_tls(workers: u32) -> Server {
    let port = free_port();
    let (dir, cert, key) = tls_dir("hypercorn", port);
    let guard = Guard::spawn(
        "hypercorn",
        hypercorn_command(port, workers)
            .arg("--certfile")
            .arg(&cert)
            .arg("--keyfile")
            .arg(&key)
            .arg("app:app"),
    );
    ready_tls(guard, port, dir)
}
