//! Connections followed as kernel sockets, not as (process, fd) pairs: wherever a connection
//! goes — opened before flyprobe started, accepted by a call already blocked when it
//! attached, handed to another process, dropped by an fd trick, driven through io_uring —
//! flyprobe counts it for the process that serves it, exactly, and counts nothing that is
//! not a served connection (a reused fd number, the server's own outbound connections).
//!
//! Every test compares flyprobe's whole per-process view of the server (accepted, closed,
//! active, requests, in flight, bytes each way; processes with all zeros left out; and
//! nothing queued) with what the client did and what the server says served it
//! (`x-worker-pid`).

use std::{collections::BTreeMap, time::Duration};

use flyprobe_tests::{
    client::{Conn, Response},
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, children},
};

const SERVER: &str = "sockets-under-test";
const SETTLE: Duration = Duration::from_secs(15);

/// One process's share of a server, as flyprobe should report it.
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    accepted: u64,
    closed: u64,
    requests: u64,
    /// Bytes the server read (what the client sent), and wrote (what the client received).
    received: u64,
    sent: u64,
    active: u64,
    in_flight: u64,
}

impl std::ops::AddAssign for Row {
    fn add_assign(&mut self, o: Self) {
        self.accepted += o.accepted;
        self.closed += o.closed;
        self.requests += o.requests;
        self.received += o.received;
        self.sent += o.sent;
        self.active += o.active;
        self.in_flight += o.in_flight;
    }
}

/// A server's metrics by process: each metric as {pid: value}, zero values left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct View {
    accepted: BTreeMap<u32, u64>,
    closed: BTreeMap<u32, u64>,
    requests: BTreeMap<u32, u64>,
    received: BTreeMap<u32, u64>,
    sent: BTreeMap<u32, u64>,
    active: BTreeMap<u32, u64>,
    in_flight: BTreeMap<u32, u64>,
    /// Connections established on the server's port that no process has touched yet
    /// (`server_queued_connections`, per server): 0 in every expected view, as each test's
    /// connections carry requests.
    queued: u64,
}

impl View {
    fn of(m: &Metrics) -> Self {
        let by_pid = |name: &str| {
            let mut map = m.by_pid(name, SERVER);
            map.retain(|_, v| *v > 0);
            map
        };
        Self {
            accepted: by_pid("server_connections_accepted_total"),
            closed: by_pid("server_connections_closed_total"),
            requests: by_pid("server_requests_total"),
            received: by_pid("server_received_bytes_total"),
            sent: by_pid("server_sent_bytes_total"),
            active: by_pid("server_active_connections"),
            in_flight: by_pid("server_in_flight_requests"),
            queued: m.total("server_queued_connections", &[("server", SERVER)]),
        }
    }

    /// This view plus `row` for `pid`.
    fn with(mut self, pid: u32, row: Row) -> Self {
        let fields = [
            (&mut self.accepted, row.accepted),
            (&mut self.closed, row.closed),
            (&mut self.requests, row.requests),
            (&mut self.received, row.received),
            (&mut self.sent, row.sent),
            (&mut self.active, row.active),
            (&mut self.in_flight, row.in_flight),
        ];
        for (map, v) in fields {
            if v > 0 {
                *map.entry(pid).or_default() += v;
            }
        }
        self
    }
}

/// Only `pid` has anything, and it has exactly `row`.
fn only(pid: u32, row: Row) -> View {
    View::default().with(pid, row)
}

/// Wait until flyprobe's view of the server is exactly `want`; the last view on failure.
/// Every test makes the server finish its work before the client sees the last response or
/// the close, so a view that reaches `want` has nothing more coming.
fn settle(fp: &Flyprobe, want: &View) -> Metrics {
    eventually(
        &format!("flyprobe to report exactly {want:?}"),
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = View::of(&m);
            if seen == *want {
                Ok(m)
            } else {
                Err(Box::new(seen))
            }
        },
    )
}

/// `server_requests_total` by (method, status, protocol), zeros left out.
fn request_labels(m: &Metrics) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.series("server_requests_total", &[("server", SERVER)]) {
        if v > 0.0 {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            *out.entry((label("method"), label("status"), label("protocol")))
                .or_default() += v as u64;
        }
    }
    out
}

/// `n` requests, all `GET`, `2xx`, `http1`.
fn gets(n: u64) -> BTreeMap<(String, String, String), u64> {
    BTreeMap::from([(("GET".into(), "2xx".into(), "http1".into()), n)])
}

/// The row of `conn` while open: one connection accepted and active, `requests` requests,
/// its bytes each way so far.
fn open(conn: &Conn, requests: u64) -> Row {
    Row {
        accepted: 1,
        requests,
        received: conn.sent,
        sent: conn.received,
        active: 1,
        ..Row::default()
    }
}

/// Close `conn` (waiting for the server's side to go) and return the row it adds: one
/// connection accepted and closed, `requests` requests, its bytes each way.
fn finished(conn: Conn, requests: u64) -> Row {
    let (sent, received) = conn.close();
    Row {
        accepted: 1,
        closed: 1,
        requests,
        received: sent,
        sent: received,
        ..Row::default()
    }
}

fn watch(pid: u32) -> Flyprobe {
    Flyprobe::start(&["--pid-tree", &pid.to_string(), "--server-name", SERVER])
}

/// `n` GETs of `/` on `conn`, each answered 200 by `pid` (when given); returns who served.
fn get_n(conn: &mut Conn, n: u64, pid: Option<u32>) -> u32 {
    let mut served = None;
    for _ in 0..n {
        let resp = conn.get("/").expect("GET /");
        served = Some(check(&resp, pid));
    }
    served.expect("at least one request")
}

fn check(resp: &Response, pid: Option<u32>) -> u32 {
    assert_eq!(resp.status, 200, "unexpected response {resp:?}");
    let served = resp.worker_pid.expect("every response names its process");
    if let Some(pid) = pid {
        assert_eq!(served, pid, "served by the expected process");
    }
    served
}

/// Server-side connections of `port` that are open in the application (ESTABLISHED or
/// CLOSE_WAIT in /proc/net/tcp{,6}, local port `port`).
fn open_server_sockets(port: u16) -> usize {
    let tables =
        ["/proc/net/tcp", "/proc/net/tcp6"].map(|f| std::fs::read_to_string(f).unwrap_or_default());
    tables
        .iter()
        .flat_map(|table| table.lines().skip(1))
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && matches!(fields.get(3), Some(&"01" | &"08"))
        })
        .count()
}

/// Before flyprobe starts: the server holds exactly `count` connections (the readiness
/// probe's is gone), so nothing but what the test does next can reach flyprobe.
fn quiet(port: u16, count: usize) {
    eventually(
        &format!("the server on {port} to hold exactly {count} connections"),
        SETTLE,
        || match open_server_sockets(port) {
            n if n == count => Ok(()),
            n => Err(n),
        },
    );
}

/// The system call `pid`'s (only) thread is blocked in, from /proc/PID/syscall.
fn in_syscall(pid: u32) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn in_accept(pid: u32) -> bool {
    matches!(in_syscall(pid), Some(n) if n == libc::SYS_accept4 || n == libc::SYS_accept)
}

/// One connection with 3 requests, then another with 2, each counted for `pid` exactly while
/// open and after the client closes it; all of them `GET`/`2xx`/`http1`.
fn two_connections_served_by(fp: &Flyprobe, port: u16, pid: u32) {
    let mut first = Conn::connect(port).expect("connecting");
    get_n(&mut first, 3, Some(pid));
    settle(fp, &only(pid, open(&first, 3)));
    let mut want = finished(first, 3);
    settle(fp, &only(pid, want));

    let mut second = Conn::connect(port).expect("connecting");
    get_n(&mut second, 2, Some(pid));
    want += finished(second, 2);
    let m = settle(fp, &only(pid, want));
    assert_eq!(request_labels(&m), gets(5), "labels\n{}", m.text);
}

/// Case 1. A keep-alive connection opened, and used for a request, before flyprobe started
/// is counted from its next request on, for the worker that serves it: accepted once (when
/// flyprobe first sees it), active while open, every later request and byte each way, and
/// closed when the client closes it. (uvicorn with two workers; the idle timeout is raised
/// so the connection outlives flyprobe's start-up.)
#[test]
fn sockets_kept_alive_from_before_the_start_count_from_their_next_request() {
    require_root();
    let server = servers::uvicorn_with(2, &["--timeout-keep-alive", "120"]);
    let mut conn = Conn::connect(server.port).expect("connecting");
    let worker = get_n(&mut conn, 1, None);
    quiet(server.port, 1);
    let (sent_before, received_before) = (conn.sent, conn.received);

    let fp = watch(server.pid());
    get_n(&mut conn, 5, Some(worker)); // keep-alive: the same worker serves them all
    let in_use = Row {
        accepted: 1,
        requests: 5,
        received: conn.sent - sent_before,
        sent: conn.received - received_before,
        active: 1,
        ..Row::default()
    };
    let m = settle(&fp, &only(worker, in_use));
    assert_eq!(request_labels(&m), gets(5), "labels\n{}", m.text);

    let (sent, received) = conn.close();
    let closed = Row {
        closed: 1,
        active: 0,
        received: sent - sent_before,
        sent: received - received_before,
        ..in_use
    };
    settle(&fp, &only(worker, closed));
    fp.stop();
}

/// Case 2. A single-process server already blocked in accept() when flyprobe attaches: the
/// connection that accept returns, and its requests, are counted, and so is the next one.
#[test]
fn sockets_from_an_accept_already_blocked_when_flyprobe_attaches_count() {
    require_root();
    let (server, _) = servers::socket_app("blocking", &[]);
    let pid = server.pid();
    quiet(server.port, 0);
    eventually("the server to block in accept()", SETTLE, || {
        if in_accept(pid) {
            Ok(())
        } else {
            Err(in_syscall(pid))
        }
    });
    let fp = watch(pid);
    assert!(
        in_accept(pid),
        "the accept() entered before flyprobe attached is still the one waiting"
    );

    two_connections_served_by(&fp, server.port, pid);
    fp.stop();
}

/// Case 3a. The parent accepts and hands each connection to a worker child over a unix
/// socketpair (SCM_RIGHTS), then closes its copy; the child serves (Node's cluster does
/// this). The connections and requests are the child's, exactly; the parent, which only
/// accepted and passed them on, has none, and the unix socket carrying the fds is no
/// connection and its bytes are no request bytes.
#[test]
fn sockets_handed_over_with_scm_rights_count_for_the_process_that_serves_them() {
    require_root();
    let (server, _) = servers::socket_app("pass-fd", &[]);
    let parent = server.pid();
    let worker = eventually("the worker child", SETTLE, || match children(parent)[..] {
        [child] => Ok(child),
        ref other => Err(other.to_vec()),
    });
    quiet(server.port, 0);
    let fp = watch(parent);

    two_connections_served_by(&fp, server.port, worker);
    fp.stop();
}

/// A fork-per-connection server with nothing open and no child left from its readiness
/// probe; returns it and its (parent) pid.
fn fork_server() -> (servers::Server, u32) {
    let (server, _) = servers::socket_app("fork", &[]);
    let parent = server.pid();
    quiet(server.port, 0);
    eventually("the readiness probe's child to exit", SETTLE, || {
        let left = children(parent);
        if left.is_empty() { Ok(()) } else { Err(left) }
    });
    (server, parent)
}

/// Case 3b. Fork per connection: the parent accepts, forks a child that serves the
/// connection and exits, and closes its own copy. Each connection and its requests are
/// counted for the child that served it (and kept after it exits); the parent has none.
#[test]
fn sockets_served_by_a_child_forked_per_connection_count_for_that_child() {
    require_root();
    let (server, parent) = fork_server();
    let fp = watch(parent);

    let mut first = Conn::connect(server.port).expect("connecting");
    let first_child = get_n(&mut first, 1, None);
    assert_ne!(first_child, parent, "a child serves");
    get_n(&mut first, 2, Some(first_child)); // keep-alive: the same child
    settle(&fp, &only(first_child, open(&first, 3)));
    let first_row = finished(first, 3);
    settle(&fp, &only(first_child, first_row));

    let mut second = Conn::connect(server.port).expect("connecting");
    let second_child = get_n(&mut second, 2, None);
    assert!(
        ![parent, first_child].contains(&second_child),
        "a new child serves the second connection"
    );
    let second_row = finished(second, 2);
    let want = only(first_child, first_row).with(second_child, second_row);
    let m = settle(&fp, &want);
    assert_eq!(request_labels(&m), gets(5), "labels\n{}", m.text);
    fp.stop();
}

/// Case 3b, the race in it made certain: a child forked for a connection can serve it and
/// exit before the daemon has read the child's fork event (the kernel counts on; the daemon
/// is merely behind, as on a busy node — here it is held with SIGSTOP until the child is
/// gone). Its connection and requests still count for it, once, and are kept.
#[test]
fn sockets_of_a_forked_child_gone_before_the_daemon_saw_it_still_count() {
    require_root();
    let (server, parent) = fork_server();
    let fp = watch(parent);

    // SAFETY: kill(2) on the flyprobe this test started (SIGKILLed on drop, stopped or not).
    unsafe { libc::kill(fp.pid() as i32, libc::SIGSTOP) };
    let mut conn = Conn::connect(server.port).expect("connecting");
    let child = get_n(&mut conn, 1, None);
    assert_ne!(child, parent, "a child serves");
    get_n(&mut conn, 1, Some(child));
    let row = finished(conn, 2);
    eventually(
        "the child to exit and be reaped",
        SETTLE,
        || match std::path::Path::new(&format!("/proc/{child}")).exists() {
            false => Ok(()),
            true => Err(child),
        },
    );
    // SAFETY: as above.
    unsafe { libc::kill(fp.pid() as i32, libc::SIGCONT) };

    let m = settle(&fp, &only(child, row));
    assert_eq!(request_labels(&m), gets(2), "labels\n{}", m.text);
    fp.stop();
}

/// Case 4. A connection whose fd is released by dup2(), dup3() or close_range() — never
/// close(2) — and whose fd number a regular file then takes over, which the server writes
/// and reads (an HTTP request and response, byte for byte): the connection ends there
/// (closed, not active), and the file I/O on the reused number is no request and no bytes.
#[test]
fn sockets_dropped_by_dup2_dup3_or_close_range_end_and_their_reused_fd_counts_nothing() {
    require_root();
    let (mut server, lines) = servers::socket_app("serial", &[]);
    let pid = server.pid();
    quiet(server.port, 0);
    let fp = watch(pid);

    let mut want = Row::default();
    for how in ["dup2", "dup3", "close_range"] {
        let mut conn = Conn::connect(server.port).expect("connecting");
        get_n(&mut conn, 2, Some(pid));
        let resp = conn
            .get(&format!("/retire?how={how}"))
            .expect("GET /retire");
        check(&resp, Some(pid));
        // Returns once the server's side is gone: the fd swap closed the socket.
        want += finished(conn, 3);
        let line = lines.next(SETTLE);
        assert!(
            line.starts_with(&format!("retired {how} fd=")),
            "the server reports the file I/O on the reused fd done: {line:?}"
        );
        settle(&fp, &only(pid, want));
    }
    let m = settle(&fp, &only(pid, want));
    assert_eq!(request_labels(&m), gets(9), "labels\n{}", m.text);
    assert!(
        server.guard.child.try_wait().is_ok_and(|s| s.is_none()),
        "the server survived its fd tricks"
    );
    fp.stop();
}

/// Case 5. A server whose accept, recv, send and close all go through io_uring (so no
/// read/write/close system call names the connection): connections, requests, in-flight
/// requests and bytes are counted exactly as for system calls. The request buffers are not
/// in the task's registers there, so a request's method and status may be `""` (and its
/// protocol `unknown`); if present they must be the right ones.
#[test]
fn sockets_driven_through_io_uring_count_exactly() {
    require_root();
    let server = servers::uring_server();
    let pid = server.pid();
    quiet(server.port, 0);
    let fp = watch(pid);
    let port = server.port;
    let mut done = Row::default();
    // Fresh connections with one request each, then keep-alive ones with several.
    for _ in 0..10 {
        let mut conn = Conn::connect(port).expect("connecting");
        get_n(&mut conn, 1, Some(pid));
        done += finished(conn, 1);
    }
    for _ in 0..3 {
        let mut conn = Conn::connect(port).expect("connecting");
        get_n(&mut conn, 5, Some(pid));
        done += finished(conn, 5);
    }
    settle(&fp, &only(pid, done));

    // Connections held open after a request: active while held.
    let mut held: Vec<Conn> = (0..3)
        .map(|_| {
            let mut conn = Conn::connect(port).expect("connecting");
            get_n(&mut conn, 1, Some(pid));
            conn
        })
        .collect();
    let with_held = |held: &[Conn]| {
        held.iter().fold(done, |mut row, conn| {
            row += open(conn, 1);
            row
        })
    };
    settle(&fp, &only(pid, with_held(&held)));

    // Slow requests on two of them: in flight while the server's io_uring timeouts run.
    for conn in &mut held[..2] {
        conn.write(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("sending");
    }
    let slow = Row {
        in_flight: 2,
        ..with_held(&held)
    };
    settle(&fp, &only(pid, slow));
    for conn in &mut held[..2] {
        check(
            &conn.read_response(false).expect("slow response"),
            Some(pid),
        );
    }
    for (i, conn) in held.into_iter().enumerate() {
        done += finished(conn, if i < 2 { 2 } else { 1 });
    }
    let m = settle(&fp, &only(pid, done));

    let labels = request_labels(&m);
    assert_eq!(
        labels.values().sum::<u64>(),
        done.requests,
        "every request counted once\n{}",
        m.text
    );
    for (method, status, protocol) in labels.keys() {
        assert!(
            ["GET", ""].contains(&method.as_str())
                && ["2xx", ""].contains(&status.as_str())
                && ["http1", "unknown"].contains(&protocol.as_str()),
            "labels are the right ones or empty: {method:?} {status:?} {protocol:?}\n{}",
            m.text
        );
    }
    fp.stop();
}

/// Case 6. The server's own outbound connections — each request makes the handler call a
/// second local server, on a keep-alive connection opened at start-up (before flyprobe)
/// and on a fresh one it then closes — are not served connections: the counts are exactly
/// what the client sent to the server, nothing of the upstream traffic.
#[test]
fn sockets_of_the_servers_own_outbound_connections_count_as_nothing() {
    require_root();
    let upstream = servers::rust_server(); // not watched: its own process tree
    let upstream_port = upstream.port.to_string();
    let (server, _) = servers::socket_app("serial", &["--upstream", &upstream_port]);
    let pid = server.pid();
    quiet(server.port, 0);
    let fp = watch(pid);

    let mut first = Conn::connect(server.port).expect("connecting");
    get_n(&mut first, 4, Some(pid));
    settle(&fp, &only(pid, open(&first, 4)));
    let mut want = finished(first, 4);
    settle(&fp, &only(pid, want));

    let mut second = Conn::connect(server.port).expect("connecting");
    get_n(&mut second, 3, Some(pid));
    want += finished(second, 3);
    let m = settle(&fp, &only(pid, want));
    assert_eq!(request_labels(&m), gets(7), "labels\n{}", m.text);
    fp.stop();
}

#[test]
fn sockets_a_process_still_held_untouched_when_it_exited_count_for_it() {
    require_root();
    let (server, _) = servers::socket_app("blocking", &[]);
    let pid = server.pid();
    quiet(server.port, 0);
    let fp = watch(pid);
    // The first connection's request makes the server take the next connection off its
    // listener and exit without touching it, as a recycled worker may exit holding
    // connections it accepted. Its descriptors close after it left the target set; the
    // second connection's request, unread, makes that close a reset.
    let mut first = Conn::connect(server.port).expect("connecting");
    first
        .write(b"GET /exit-holding HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("writing");
    let mut second = Conn::connect(server.port).expect("connecting");
    second
        .write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("writing");
    eventually("the server to exit", SETTLE, || {
        let state = procfs::process::Process::new(pid as i32).and_then(|p| p.stat());
        match state {
            Ok(s) if s.state != 'Z' => Err(s.state),
            _ => Ok(()),
        }
    });
    // Both accepted and closed; the first one's request read and never answered.
    let want = Row {
        accepted: 2,
        closed: 2,
        requests: 1,
        received: first.sent,
        ..Row::default()
    };
    settle(&fp, &only(pid, want));
    fp.stop();
}

/// The benchmark's switch (`--bench-toggle`, section 1w): SIGUSR1 detaches the programs on
/// the socket events, so requests then are not seen at all; SIGUSR2 attaches them again and
/// the same keep-alive connection counts from its next request.
#[test]
fn bench_toggle_detaches_and_attaches_the_socket_programs() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::start(&[
        "--hooks",
        "socket",
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        SERVER,
        "--bench-toggle",
    ]);
    let mut conn = Conn::connect(server.port).expect("connecting");
    let pid = get_n(&mut conn, 3, None);
    let m = settle(&fp, &only(pid, open(&conn, 3)));
    assert_eq!(request_labels(&m), gets(3), "labels\n{}", m.text);
    let (sent, received) = (conn.sent, conn.received);

    let toggled = |sig: i32, now: &str| {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(fp.pid() as i32, sig) };
        let line = format!("programs on the socket events {now} (3 links)");
        eventually(&format!("flyprobe's log to say {line:?}"), SETTLE, || {
            let log = fp.log();
            if log.contains(&line) {
                Ok(())
            } else {
                Err(Box::new(log))
            }
        });
    };
    toggled(libc::SIGUSR1, "detached");
    get_n(&mut conn, 4, Some(pid));
    // Nothing of those 4 was seen: the view is still the one before them.
    let before = Row {
        received: sent,
        sent: received,
        ..open(&conn, 3)
    };
    // The counters are the kernel's, read at the scrape: what was seen is there at once.
    // The wait is for the daemon's sweep, which would show anything else it learned.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(View::of(&fp.scrape()), only(pid, before));

    toggled(libc::SIGUSR2, "attached");
    let (sent_detached, received_detached) = (conn.sent - sent, conn.received - received);
    get_n(&mut conn, 2, Some(pid));
    let again = Row {
        requests: 5,
        received: conn.sent - sent_detached,
        sent: conn.received - received_detached,
        ..open(&conn, 5)
    };
    let m = settle(&fp, &only(pid, again));
    assert_eq!(request_labels(&m), gets(5), "labels\n{}", m.text);
    fp.stop();
}
