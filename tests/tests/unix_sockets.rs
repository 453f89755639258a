//! Unix-domain stream servers are counted like TCP ones: uvicorn `--uds`, and gunicorn
//! `--bind unix:` behind nginx (the common production layout). Connections, requests by
//! method and status, bytes, active and in-flight equal what the client did, with
//! `transport="unix"` on the requests; nginx's own connections to the app socket are
//! outbound and count nothing for nginx; nginx's counts also equal its stub_status.
//! No kernel event marks a unix socket's close: these tests prove the connection still ends
//! exactly once, whoever closes first, even when the next connection reuses the socket's
//! memory at once (hundreds of connections one after another).

use std::{collections::BTreeMap, path::Path, time::Duration};

use flyprobe_tests::{
    client::{Conn, Response},
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root, servers,
};

const SETTLE: Duration = Duration::from_secs(15);

/// What the client sent and got back.
#[derive(Default, Debug)]
struct Ledger {
    /// (method, status class) -> requests.
    by_label: BTreeMap<(String, String), u64>,
    requests: u64,
    connections: u64,
    sent: u64,
    received: u64,
}

impl Ledger {
    fn record(&mut self, method: &str, resp: &Response) {
        let class = format!("{}xx", resp.status / 100);
        *self.by_label.entry((method.into(), class)).or_default() += 1;
        self.requests += 1;
    }

    fn open(&mut self, conn: std::io::Result<Conn>) -> Conn {
        self.connections += 1;
        conn.expect("connect")
    }

    fn close(&mut self, conn: Conn) {
        let (sent, received) = conn.close();
        self.sent += sent;
        self.received += received;
    }

    /// Requests of every status class the app has, on `conn`.
    fn mix(&mut self, conn: &mut Conn) {
        let body = vec![b'b'; 100_000];
        let plan: &[(&str, &str, &[u8], usize)] = &[
            ("GET", "/", b"", 10),
            ("POST", "/echo", &body, 2),
            ("GET", "/redirect", b"", 2),
            ("GET", "/missing", b"", 3),
            ("GET", "/big?kb=256", b"", 2),
        ];
        for (method, path, body, times) in plan {
            for _ in 0..*times {
                let resp = conn
                    .send(method, path, body)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                self.record(method, &resp);
            }
        }
    }
}

/// A server's totals as flyprobe reports them.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Totals {
    accepted: u64,
    closed: u64,
    active: u64,
    requests: u64,
    in_flight: u64,
}

impl Totals {
    fn of(m: &Metrics, server: &str) -> Self {
        let sum = |name: &str| m.total(name, &[("server", server)]);
        Self {
            accepted: sum("server_connections_accepted_total"),
            closed: sum("server_connections_closed_total"),
            active: sum("server_active_connections"),
            requests: sum("server_requests_total"),
            in_flight: sum("server_in_flight_requests"),
        }
    }
}

fn settle(fp: &Flyprobe, server: &str, want: Totals) -> Metrics {
    eventually(&format!("{server}: exactly {want:?}"), SETTLE, || {
        let m = fp.scrape();
        let seen = Totals::of(&m, server);
        if seen == want { Ok(m) } else { Err(seen) }
    })
}

/// `server_requests_total` of `server` by (method, status), every series on `transport`.
fn by_label(m: &Metrics, server: &str, transport: &str) -> BTreeMap<(String, String), u64> {
    let mut counted: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (labels, v) in m.series("server_requests_total", &[("server", server)]) {
        if v == 0.0 {
            continue;
        }
        assert_eq!(labels["transport"], transport, "{labels:?}\n{}", m.text);
        assert_eq!(labels["protocol"], "http1", "{labels:?}");
        let key = (labels["method"].clone(), labels["status"].clone());
        *counted.entry(key).or_default() += v as u64;
    }
    counted
}

fn watch(pid: u32, name: &str) -> Flyprobe {
    Flyprobe::start(&["--pid-tree", &pid.to_string(), "--server-name", name])
}

#[test]
fn uvicorn_on_a_unix_socket_counts_every_connection_and_request_exactly() {
    require_root();
    let (server, path) = servers::uvicorn_uds(2);
    counts_exactly(server.pid(), &path, 2, "uvicorn --uds");
}

#[test]
fn rust_axum_on_a_unix_socket_counts_every_connection_and_request_exactly() {
    require_root();
    let (server, path) = servers::rust_server_uds();
    counts_exactly(server.pid(), &path, 1, "axum on a unix socket");
}

/// `workers` processes hold the listening socket without handing it on: flyprobe's workers
/// before any request. Then a keep-alive connection with every status class, one left open
/// and idle, and 200 connections one after another: flyprobe's totals, labels and bytes
/// equal the client's.
fn counts_exactly(pid: u32, path: &Path, workers: u64, what: &str) {
    let fp = watch(pid, "uds-app");
    eventually(
        &format!("{workers} workers holding the unix listener"),
        SETTLE,
        || {
            let seen = fp
                .scrape()
                .total("server_workers", &[("server", "uds-app")]);
            if seen == workers { Ok(()) } else { Err(seen) }
        },
    );
    let mut ledger = Ledger::default();

    let mut conn = ledger.open(Conn::connect_unix(path));
    ledger.mix(&mut conn);
    // Left open and idle: active until it closes.
    let mut idle = ledger.open(Conn::connect_unix(path));
    let resp = idle.get("/").expect("GET /");
    ledger.record("GET", &resp);
    ledger.close(conn);
    // One after another: each closed socket's memory is there for the next one to reuse.
    for _ in 0..200 {
        let mut c = ledger.open(Conn::connect_unix(path));
        let resp = c.get("/").expect("GET /");
        ledger.record("GET", &resp);
        ledger.close(c);
    }
    settle(
        &fp,
        "uds-app",
        Totals {
            accepted: ledger.connections,
            closed: ledger.connections - 1,
            active: 1,
            requests: ledger.requests,
            in_flight: 0,
        },
    );
    ledger.close(idle);
    let m = settle(
        &fp,
        "uds-app",
        Totals {
            accepted: ledger.connections,
            closed: ledger.connections,
            active: 0,
            requests: ledger.requests,
            in_flight: 0,
        },
    );
    assert_eq!(
        by_label(&m, "uds-app", "unix"),
        ledger.by_label,
        "{}",
        m.text
    );
    let bytes = |name: &str| m.total(name, &[("server", "uds-app")]);
    assert_eq!(bytes("server_received_bytes_total"), ledger.sent);
    assert_eq!(bytes("server_sent_bytes_total"), ledger.received);
    eprintln!(
        "{what}: {} connections, {} requests {:?}: exact",
        ledger.connections, ledger.requests, ledger.by_label
    );
}

/// nginx's stub_status: (accepts, requests).
fn stub_status(port: u16) -> (u64, u64) {
    let mut conn = Conn::connect(port).expect("connect");
    let resp = conn.get("/stub").expect("GET /stub");
    conn.close();
    let text = String::from_utf8_lossy(&resp.body).to_string();
    // "Active connections: 1 \nserver accepts handled requests\n 5 5 9 \n..."
    let numbers: Vec<u64> = text
        .lines()
        .nth(2)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers.as_slice() {
        [accepts, _handled, requests] => (*accepts, *requests),
        _ => panic!("unexpected stub_status: {text}"),
    }
}

#[test]
fn gunicorn_behind_nginx_over_a_unix_socket_counts_both_hops_and_no_outbound_connection() {
    require_root();
    let (app, path) = servers::gunicorn_uds(2);
    behind_nginx(app.pid(), &path, "gunicorn");
}

#[test]
fn rust_axum_behind_nginx_over_a_unix_socket_counts_both_hops_and_no_outbound_connection() {
    require_root();
    let (app, path) = servers::rust_server_uds();
    behind_nginx(app.pid(), &path, "axum");
}

/// nginx in front of the app on unix socket `path`: each hop counts what the client sent,
/// nginx's upstream connections count for the app and not for nginx.
fn behind_nginx(app: u32, path: &Path, what: &str) {
    let proxy = servers::nginx_to_unix(path);
    let fp_app = watch(app, "uds-app");
    let fp_proxy = watch(proxy.pid(), "proxy");
    let mut ledger = Ledger::default();

    let mut conn = ledger.open(Conn::connect(proxy.port));
    ledger.mix(&mut conn);
    ledger.close(conn);
    for _ in 0..20 {
        let mut c = ledger.open(Conn::connect(proxy.port));
        let resp = c.get("/missing").expect("GET /missing");
        ledger.record("GET", &resp);
        ledger.close(c);
    }
    // nginx opens an upstream connection per request (HTTP/1.0 to the app), and the app
    // closes it after the response.
    let m = settle(
        &fp_app,
        "uds-app",
        Totals {
            accepted: ledger.requests,
            closed: ledger.requests,
            active: 0,
            requests: ledger.requests,
            in_flight: 0,
        },
    );
    assert_eq!(
        by_label(&m, "uds-app", "unix"),
        ledger.by_label,
        "{}",
        m.text
    );

    // nginx: the client's TCP connections only, its upstream connections are outbound.
    let m = settle(
        &fp_proxy,
        "proxy",
        Totals {
            accepted: ledger.connections,
            closed: ledger.connections,
            active: 0,
            requests: ledger.requests,
            in_flight: 0,
        },
    );
    assert_eq!(by_label(&m, "proxy", "tcp"), ledger.by_label, "{}", m.text);
    let bytes = |name: &str| m.total(name, &[("server", "proxy")]);
    assert_eq!(bytes("server_received_bytes_total"), ledger.sent);
    assert_eq!(bytes("server_sent_bytes_total"), ledger.received);

    // nginx's own counters, which also hold the readiness probe made before flyprobe
    // started (1 connection, 1 request) and count the /stub request itself.
    let (accepts, requests) = stub_status(proxy.port);
    let m = settle(
        &fp_proxy,
        "proxy",
        Totals {
            accepted: ledger.connections + 1,
            closed: ledger.connections + 1,
            active: 0,
            requests: ledger.requests + 1,
            in_flight: 0,
        },
    );
    let t = Totals::of(&m, "proxy");
    assert_eq!(
        (t.accepted, t.requests),
        (accepts - 1, requests - 1),
        "flyprobe against nginx's stub_status"
    );
    eprintln!(
        "nginx -> {what} over {}: {} client connections, {} requests {:?}: exact on both hops",
        path.display(),
        ledger.connections,
        ledger.requests,
        ledger.by_label
    );
}
