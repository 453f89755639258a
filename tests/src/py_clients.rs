//! The Python clients of the HTTP/2 and HTTPS tests (tests/python: `h2`, `http.client`),
//! what they saw, and the checks of flyprobe's counts against it.

use std::{collections::BTreeMap, process::Command, time::Duration};

use crate::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    servers, workspace,
};

const SETTLE: Duration = Duration::from_secs(20);

/// The requests of every connection: GET and POST (static-table methods), PUT and DELETE
/// (literal methods), with 2xx, 4xx and 5xx answers.
pub const REQUESTS: [&str; 6] = [
    "GET /",
    "POST /echo",
    "GET /error",
    "PUT /",
    "DELETE /missing",
    "GET /missing",
];

/// What the h2 client saw: (method, status class) -> responses.
#[derive(Debug, Default)]
pub struct Seen {
    pub by_label: BTreeMap<(String, String), u64>,
    pub requests: u64,
    pub connections: u64,
}

/// Runs tests/python/h2_client.py: `requests` `repeat` times on each of `connections`
/// connections, at most `window` streams open at once.
pub fn h2_client(
    port: u16,
    requests: &[&str],
    repeat: u32,
    connections: u32,
    extra: &[&str],
) -> Seen {
    run("h2_client.py", port, requests, repeat, connections, extra)
}

/// Runs tests/python/https_client.py: HTTP/1.1 over TLS, `requests` `repeat` times on each
/// of `connections` keep-alive connections (more where the server closes them).
pub fn https_client(
    port: u16,
    requests: &[&str],
    repeat: u32,
    connections: u32,
    extra: &[&str],
) -> Seen {
    run(
        "https_client.py",
        port,
        requests,
        repeat,
        connections,
        extra,
    )
}

/// Runs tests/apps/grpc_echo.py's client: `calls` unary calls on one channel (one
/// connection), `threads` at once, the first `fail` of them failing with INVALID_ARGUMENT
/// (in the trailers of an HTTP 200); over TLS when given the certificate to trust. What it
/// saw: (answered, failed).
pub fn grpc_calls(
    port: u16,
    calls: u32,
    fail: u32,
    threads: u32,
    cert: Option<&std::path::Path>,
) -> (u64, u64) {
    let mut cmd = Command::new(servers::python());
    cmd.arg(workspace().join("tests/apps/grpc_echo.py"))
        .args(["call", &port.to_string(), &calls.to_string()])
        .args([
            "--fail",
            &fail.to_string(),
            "--threads",
            &threads.to_string(),
        ]);
    if let Some(cert) = cert {
        cmd.arg("--tls").arg(cert);
    }
    let out = cmd.output().expect("run the gRPC client");
    assert!(
        out.status.success(),
        "gRPC client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    (
        report["ok"].as_u64().expect("ok"),
        report["failed"].as_u64().expect("failed"),
    )
}

fn run(
    script: &str,
    port: u16,
    requests: &[&str],
    repeat: u32,
    connections: u32,
    extra: &[&str],
) -> Seen {
    let mut cmd = Command::new(servers::python());
    cmd.arg(workspace().join("tests/python").join(script))
        .args(["127.0.0.1", &port.to_string()])
        .args(["--repeat", &repeat.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(extra);
    for r in requests {
        cmd.args(["--request", r]);
    }
    let out = cmd.output().expect("run the client");
    assert!(
        out.status.success(),
        "{script}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the client's JSON report");
    let mut seen = Seen {
        connections: report["connections"].as_u64().expect("connections"),
        ..Seen::default()
    };
    for (label, n) in report["seen"].as_object().expect("seen") {
        let (method, status) = label.split_once(' ').expect("METHOD STATUS");
        let class = match status.parse::<u16>() {
            Ok(code) => format!("{}xx", code / 100),
            Err(_) => status.to_string(),
        };
        let n = n.as_u64().expect("a count");
        *seen.by_label.entry((method.into(), class)).or_default() += n;
        seen.requests += n;
    }
    seen
}

/// h2 requests of `server` by (method, status class).
pub fn h2_requests(m: &Metrics, server: &str) -> BTreeMap<(String, String), u64> {
    requests(m, server, "h2")
}

/// `protocol`'s requests of `server` by (method, status class).
pub fn requests(m: &Metrics, server: &str, protocol: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.series(
        "server_requests_total",
        &[("server", server), ("protocol", protocol)],
    ) {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((get("method"), get("status"))).or_default() += v as u64;
    }
    out
}

/// Waits for `server`'s counts to settle: `requests` h2 requests, every connection closed.
pub fn settled(fp: &Flyprobe, server: &str, requests: u64, connections: u64) -> Metrics {
    settle(fp, server, "h2", requests, connections)
}

/// Waits until `server` counted `n` requests of `protocol` and `closed` closed connections,
/// with nothing in flight.
pub fn settle(fp: &Flyprobe, server: &str, protocol: &str, n: u64, closed: u64) -> Metrics {
    eventually(
        &format!("{server}: {n} {protocol} requests, {closed} connections closed"),
        SETTLE,
        || {
            let m = fp.scrape();
            let of = [("server", server)];
            let seen = (
                requests(&m, server, protocol).values().sum::<u64>(),
                m.total("server_connections_closed_total", &of),
                m.total("server_in_flight_requests", &of),
            );
            if seen == (n, closed, 0) {
                Ok(m)
            } else {
                Err(seen)
            }
        },
    )
}

/// The server's counts equal the client's: totals and status classes exactly; GET and POST
/// (static-table methods) exactly; each other method named once per connection and counted
/// as `OTHER` after that (the client's encoder sends it as a literal the first time, then
/// as an index into the connection's dynamic table, which cannot be known without the whole
/// table); every request timed, none aborted.
pub fn assert_streams(m: &Metrics, server: &str, seen: &Seen) {
    let got = h2_requests(m, server);
    let mut by_class: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for ((method, class), n) in &seen.by_label {
        by_class.entry(class.as_str()).or_default().0 += n;
        if method == "GET" || method == "POST" {
            assert_eq!(
                got.get(&(method.clone(), class.clone()))
                    .copied()
                    .unwrap_or(0),
                *n,
                "{server}: {method} {class}\n{got:?}\n{}",
                m.text
            );
        }
    }
    for ((_, class), n) in &got {
        by_class.entry(class.as_str()).or_default().1 += n;
    }
    for (class, (want, have)) in &by_class {
        assert_eq!(want, have, "{server}: {class} responses\n{got:?}");
    }
    let other_methods: BTreeMap<&str, u64> = seen
        .by_label
        .iter()
        .filter(|((m, _), _)| m != "GET" && m != "POST")
        .fold(BTreeMap::new(), |mut acc, ((m, _), n)| {
            *acc.entry(m.as_str()).or_default() += n;
            acc
        });
    let named = |method: &str| -> u64 {
        got.iter()
            .filter(|((m, _), _)| m == method)
            .map(|(_, n)| n)
            .sum()
    };
    let mut literal = 0;
    for (method, sent) in &other_methods {
        let once = seen.connections.min(*sent);
        assert_eq!(
            named(method),
            once,
            "{server}: {method} named on each connection once\n{got:?}"
        );
        literal += sent - once;
    }
    assert_eq!(
        named("OTHER"),
        literal,
        "{server}: the rest are OTHER\n{got:?}"
    );
    assert_eq!(
        m.total(
            "server_request_duration_seconds_count",
            &[("server", server)]
        ),
        seen.requests,
        "{server}: every stream timed"
    );
    assert_eq!(
        m.total(
            "server_requests_total",
            &[("server", server), ("status", "aborted")]
        ),
        0,
        "{server}: a clean close aborts nothing"
    );
    let of = [("server", server)];
    assert_eq!(
        (
            m.total("server_connections_accepted_total", &of),
            m.total("server_active_connections", &of),
        ),
        (seen.connections, 0),
        "{server}: connections"
    );
    eprintln!(
        "{server}: {} streams on {} connections {:?}: exact",
        seen.requests, seen.connections, seen.by_label
    );
}

/// nginx's own request count (stub_status), read over HTTP/1.1.
pub fn stub_requests(port: u16) -> u64 {
    let mut conn = Conn::connect(port).expect("connect");
    let resp = conn.get("/stub").expect("GET /stub");
    conn.close();
    let text = String::from_utf8_lossy(&resp.body).to_string();
    // "Active connections: 1 \nserver accepts handled requests\n 5 5 9 \n..."
    text.lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected stub_status: {text}"))
}
