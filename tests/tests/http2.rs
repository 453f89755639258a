//! HTTP/2 without TLS (h2c, prior knowledge): every stream a client opens is one request,
//! with its method and status class, answered once by the server's response headers, timed
//! from request headers to response headers; many streams multiplexed on one connection;
//! nothing in flight when idle, nothing aborted by a clean close; streams a client abandons
//! are aborted. Compared with what the h2 client (Python's `h2`, hypercorn's own library)
//! saw and, for nginx, with its own stub_status. With the fentry and syscall hooks, which
//! do not walk frames, an h2 connection is read/write exchanges, never requests.

use std::{collections::BTreeMap, process::Command, time::Duration};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, Server},
    workspace,
};

const SETTLE: Duration = Duration::from_secs(20);

/// The requests of every connection: GET and POST (static-table methods), PUT and DELETE
/// (literal methods), with 2xx, 4xx and 5xx answers.
const REQUESTS: [&str; 6] = [
    "GET /",
    "POST /echo",
    "GET /error",
    "PUT /",
    "DELETE /missing",
    "GET /missing",
];

/// What the h2 client saw: (method, status class) -> responses.
#[derive(Debug, Default)]
struct Seen {
    by_label: BTreeMap<(String, String), u64>,
    requests: u64,
    connections: u64,
}

/// Runs tests/python/h2_client.py: `requests` `repeat` times on each of `connections`
/// connections, at most `window` streams open at once.
fn h2_client(port: u16, requests: &[&str], repeat: u32, connections: u32, extra: &[&str]) -> Seen {
    let mut cmd = Command::new(servers::python());
    cmd.arg(workspace().join("tests/python/h2_client.py"))
        .args(["127.0.0.1", &port.to_string()])
        .args(["--repeat", &repeat.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(extra);
    for r in requests {
        cmd.args(["--request", r]);
    }
    let out = cmd.output().expect("run the h2 client");
    assert!(
        out.status.success(),
        "h2 client: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the h2 client's JSON report");
    let mut seen = Seen {
        connections: u64::from(connections),
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

/// Whether this flyprobe walks HTTP/2 frames: the socket hooks do; the fentry hooks (where
/// `auto` finds them) and the syscall hooks count h2 by exchanges.
fn walks_frames(fp: &Flyprobe) -> bool {
    fp.scrape()
        .get("flyprobe_build_info", &[("hooks", "socket")])
        .is_some()
}

/// h2 requests of `server` by (method, status class).
fn h2_requests(m: &Metrics, server: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.series(
        "server_requests_total",
        &[("server", server), ("protocol", "h2")],
    ) {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((get("method"), get("status"))).or_default() += v as u64;
    }
    out
}

/// Waits for `server`'s counts to settle: `requests` h2 requests, every connection closed.
fn settled(fp: &Flyprobe, server: &str, requests: u64, connections: u64) -> Metrics {
    eventually(
        &format!("{server}: {requests} h2 requests on {connections} closed connections"),
        SETTLE,
        || {
            let m = fp.scrape();
            let of = [("server", server)];
            let seen = (
                h2_requests(&m, server).values().sum::<u64>(),
                m.total("server_connections_closed_total", &of),
                m.total("server_in_flight_requests", &of),
            );
            if seen == (requests, connections, 0) {
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
fn assert_streams(m: &Metrics, server: &str, seen: &Seen) {
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

/// With the syscall hooks: the same traffic is h2 exchanges, no request.
fn assert_exchanges_only(m: &Metrics, server: &str) {
    assert_eq!(
        m.total("server_requests_total", &[("server", server)]),
        0,
        "{server}: no request without the frame walk\n{}",
        m.text
    );
    assert!(
        m.total(
            "server_exchanges_total",
            &[("server", server), ("protocol", "h2")]
        ) > 0,
        "{server}: h2 exchanges\n{}",
        m.text
    );
}

fn multiplexed(server: &Server, label: &str) {
    let fp = Flyprobe::watch(server.pid());
    // 3 connections, 20 rounds of the mix each, 16 streams open at once.
    let seen = h2_client(server.port, &REQUESTS, 20, 3, &["--window", "16"]);
    if !walks_frames(&fp) {
        let m = eventually("h2 exchanges", SETTLE, || {
            let m = fp.scrape();
            match m.total("server_connections_closed_total", &[("server", label)]) {
                3 => Ok(m),
                n => Err(n),
            }
        });
        assert_exchanges_only(&m, label);
        fp.stop();
        return;
    }
    let m = settled(&fp, label, seen.requests, seen.connections);
    assert_streams(&m, label, &seen);
    assert_eq!(
        m.total(
            "flyprobe_dropped_events_total",
            &[("reason", "h2_frames_lost")]
        ),
        0
    );
    fp.stop();
}

#[test]
fn hypercorn_h2c_streams_are_requests() {
    require_root();
    multiplexed(&servers::hypercorn(2), "hypercorn");
}

#[test]
fn granian_h2c_streams_are_requests() {
    require_root();
    multiplexed(&servers::granian(2), "granian");
}

#[test]
fn nginx_h2c_streams_match_its_stub_status() {
    require_root();
    let (server, stub_port) = servers::nginx_h2c();
    let fp = Flyprobe::watch(server.pid());
    let stub_before = stub_requests(stub_port);
    let seen = h2_client(server.port, &REQUESTS, 25, 2, &["--window", "10"]);
    let stub_after = stub_requests(stub_port);
    // nginx counts each stub_status request itself; flyprobe counts both reads of it too.
    assert_eq!(
        stub_after - stub_before - 1,
        seen.requests,
        "nginx served what the client sent"
    );
    if !walks_frames(&fp) {
        let m = eventually("the stub reads", SETTLE, || {
            let m = fp.scrape();
            match m.total("server_connections_closed_total", &[("server", "nginx")]) {
                4 => Ok(m),
                n => Err(n),
            }
        });
        let http1 = m.total(
            "server_requests_total",
            &[("server", "nginx"), ("protocol", "http1")],
        );
        assert_eq!(http1, 2, "the stub reads\n{}", m.text);
        assert_eq!(
            m.total(
                "server_requests_total",
                &[("server", "nginx"), ("protocol", "h2")]
            ),
            0
        );
        fp.stop();
        return;
    }
    let m = eventually("nginx settled", SETTLE, || {
        let m = fp.scrape();
        let of = [("server", "nginx")];
        let seen_now = (
            m.total("server_requests_total", &of),
            m.total("server_connections_closed_total", &of),
        );
        if seen_now == (stub_after - stub_before + 1, 4) {
            Ok(m)
        } else {
            Err(seen_now)
        }
    });
    // The two stub reads are the HTTP/1.1 requests; every other one is a stream.
    assert_eq!(
        m.total(
            "server_requests_total",
            &[("server", "nginx"), ("protocol", "http1")]
        ),
        2
    );
    let of = [("server", "nginx")];
    let accepted = m.total("server_connections_accepted_total", &of);
    assert_eq!(accepted, 4, "2 h2 connections and 2 stub reads");
    let h2_total: u64 = h2_requests(&m, "nginx").values().sum();
    assert_eq!(h2_total, seen.requests);
    fp.stop();
}

/// nginx's own request count (stub_status), read over HTTP/1.1.
fn stub_requests(port: u16) -> u64 {
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

/// Four slow streams (GET, GET, POST, GET) on one hypercorn connection that the client
/// ends early as `how` says (h2_client.py's options): each is aborted with its method;
/// `answered` requests follow on the same connection. Nothing is in flight after.
fn slow_streams_ended_early(how: &[&str], answered: (u64, u64)) {
    let server = servers::hypercorn(1);
    let fp = Flyprobe::watch(server.pid());
    let slow = "/slow?ms=3000";
    let requests = [
        format!("GET {slow}"),
        format!("GET {slow}"),
        format!("POST {slow}"),
        format!("GET {slow}"),
    ];
    let requests: Vec<&str> = requests.iter().map(String::as_str).collect();
    let seen = h2_client(server.port, &requests, 1, 1, how);
    assert_eq!(seen.requests, 4 + answered.0 + answered.1, "{seen:?}");
    let label = "hypercorn";
    let m = eventually("the connection closed", SETTLE, || {
        let m = fp.scrape();
        match m.total("server_connections_closed_total", &[("server", label)]) {
            1 => Ok(m),
            n => Err(n),
        }
    });
    if !walks_frames(&fp) {
        assert_exchanges_only(&m, label);
        fp.stop();
        return;
    }
    let count = |method: &str, status: &str| {
        m.total(
            "server_requests_total",
            &[("server", label), ("method", method), ("status", status)],
        )
    };
    assert_eq!(
        (
            count("GET", "aborted"),
            count("POST", "aborted"),
            count("GET", "2xx"),
            count("POST", "2xx"),
            m.total("server_in_flight_requests", &[("server", label)]),
        ),
        (3, 1, answered.0, answered.1, 0),
        "each stream ended early aborted with its method, the others answered\n{}",
        m.text
    );
    fp.stop();
}

#[test]
fn streams_a_client_abandons_are_aborted_with_their_methods() {
    require_root();
    // Sent at once; the client leaves before any answer.
    slow_streams_ended_early(&["--abandon", "--window", "10"], (0, 0));
}

#[test]
fn streams_the_client_cancels_are_aborted_and_leave_nothing_in_flight() {
    require_root();
    // Cancelled with RST_STREAM on a connection that stays open, then two answered ones.
    slow_streams_ended_early(
        &["--cancel", "--then", "GET /", "--then", "POST /echo"],
        (1, 1),
    );
}

/// The kernel matrix's guests have no Python: they check HTTP/2 with the workspace's own
/// minimal client (`client::h2c_gets`), which this runs here against the same nginx.
#[test]
fn the_guests_h2c_client_counts_eight_streams_on_one_connection() {
    require_root();
    let (server, _) = servers::nginx_h2c();
    let fp = Flyprobe::watch(server.pid());
    let statuses = flyprobe_tests::client::h2c_gets(server.port, 8).expect("h2c");
    assert_eq!(statuses, vec![200; 8]);
    let of = [("server", "nginx"), ("protocol", "h2")];
    let want = if !walks_frames(&fp) { 0 } else { 8 };
    let m = eventually("the connection closed", SETTLE, || {
        let m = fp.scrape();
        match m.total("server_connections_closed_total", &[("server", "nginx")]) {
            1 => Ok(m),
            n => Err(n),
        }
    });
    assert_eq!(
        m.total("server_requests_total", &of),
        want,
        "GET streams\n{}",
        m.text
    );
    fp.stop();
}

#[test]
fn grpc_calls_are_post_requests() {
    require_root();
    let server = servers::grpc_echo();
    let fp = Flyprobe::watch(server.pid());
    // 300 unary calls on one channel (one connection), 32 at once; 30 of them fail with
    // INVALID_ARGUMENT, which gRPC sends in the trailers of an HTTP 200.
    let out = Command::new(servers::python())
        .arg(workspace().join("tests/apps/grpc_echo.py"))
        .args(["call", &server.port.to_string(), "300"])
        .args(["--fail", "30", "--threads", "32"])
        .output()
        .expect("run the gRPC client");
    assert!(
        out.status.success(),
        "gRPC client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(270), Some(30))
    );
    let label = "python";
    if !walks_frames(&fp) {
        let m = eventually("h2 exchanges", SETTLE, || {
            let m = fp.scrape();
            match m.total(
                "server_exchanges_total",
                &[("server", label), ("protocol", "h2")],
            ) {
                0 => Err(0),
                n => Ok((n, m)),
            }
        })
        .1;
        assert_exchanges_only(&m, label);
        fp.stop();
        return;
    }
    let m = eventually("300 POST streams", SETTLE, || {
        let m = fp.scrape();
        let got = h2_requests(&m, label);
        let post = got
            .get(&("POST".into(), "2xx".into()))
            .copied()
            .unwrap_or(0);
        if post == 300 && got.values().sum::<u64>() == 300 {
            Ok(m)
        } else {
            Err(got)
        }
    });
    assert_eq!(
        (
            m.total("server_in_flight_requests", &[("server", label)]),
            m.total(
                "server_requests_total",
                &[("server", label), ("status", "aborted")]
            ),
            m.total(
                "flyprobe_dropped_events_total",
                &[("reason", "h2_frames_lost")]
            ),
        ),
        (0, 0, 0),
        "nothing in flight, aborted or lost\n{}",
        m.text
    );
    assert_eq!(
        m.total(
            "server_request_duration_seconds_count",
            &[("server", label)]
        ),
        300
    );
    fp.stop();
}
