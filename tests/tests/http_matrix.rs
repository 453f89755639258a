//! HTTP semantics across the real server matrix: every (method, status) count, the latency
//! histogram and the byte counters must equal what the client sent and received.

use std::{collections::BTreeMap, time::Duration};

use flyprobe_tests::{
    client::{Conn, Response},
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, Server},
};

const SETTLE: Duration = Duration::from_secs(15);
const SLOW_MS: u64 = 300;

/// What the client sent and got back.
#[derive(Default, Debug)]
struct Ledger {
    /// (method, status class) -> requests.
    by_label: BTreeMap<(String, String), u64>,
    requests: u64,
    sent: u64,
    received: u64,
}

impl Ledger {
    fn record(&mut self, method: &str, resp: &Response) {
        let class = format!("{}xx", resp.status / 100);
        *self.by_label.entry((method.into(), class)).or_default() += 1;
        self.requests += 1;
    }

    fn close(&mut self, conn: Conn) {
        let (sent, received) = conn.close();
        self.sent += sent;
        self.received += received;
    }

    /// One request per method/status the app offers, over one keep-alive connection.
    fn mix(&mut self, port: u16) {
        let body = vec![b'b'; 200_000]; // spans many reads
        let plan: &[(&str, &str, &[u8], usize)] = &[
            ("GET", "/", b"", 10),
            ("POST", "/echo", &body, 3),
            ("PUT", "/", b"put", 2),
            ("DELETE", "/", b"", 2),
            ("PATCH", "/", b"patch", 2),
            ("OPTIONS", "/", b"", 2),
            ("HEAD", "/", b"", 3),
            ("GET", "/redirect", b"", 4),
            ("GET", "/missing", b"", 5),
            ("GET", "/error", b"", 3),
            ("GET", "/big?kb=512", b"", 2), // spans many writes
        ];
        let mut conn = Conn::connect(port).unwrap();
        for (method, path, body, times) in plan {
            for _ in 0..*times {
                let resp = conn
                    .send(method, path, body)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                self.record(method, &resp);
                if resp.close {
                    // nginx ends keep-alive after a 500, as a client would see.
                    self.close(std::mem::replace(&mut conn, Conn::connect(port).unwrap()));
                }
            }
        }
        // One slow request, on a fresh connection, for the histogram.
        let mut slow = Conn::connect(port).unwrap();
        let resp = slow.get(&format!("/slow?ms={SLOW_MS}")).unwrap();
        self.record("GET", &resp);
        self.close(slow);
        self.close(conn);
    }
}

fn settled(fp: &Flyprobe, server: &str, requests: u64) -> Metrics {
    eventually(
        &format!("{server}: {requests} requests, none open"),
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = (
                m.total("server_requests_total", &[("server", server)]),
                m.total("server_active_connections", &[("server", server)]),
            );
            if seen == (requests, 0) {
                Ok(m)
            } else {
                Err(seen)
            }
        },
    )
}

fn bucket(m: &Metrics, server: &str, le: f64) -> u64 {
    m.bucket(
        "server_request_duration_seconds",
        &[("server", server), ("method", "GET"), ("status", "2xx")],
        le,
    )
}

fn assert_matches(m: &Metrics, server: &str, ledger: &Ledger) {
    let mut counted: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (labels, v) in m.series("server_requests_total", &[("server", server)]) {
        assert_eq!(labels["protocol"], "http1", "{labels:?}");
        let key = (labels["method"].clone(), labels["status"].clone());
        *counted.entry(key).or_default() += v as u64;
    }
    counted.retain(|_, n| *n > 0);
    assert_eq!(
        counted, ledger.by_label,
        "requests by method and status\n{}",
        m.text
    );
    let timed = m.total(
        "server_request_duration_seconds_count",
        &[("server", server)],
    );
    assert_eq!(timed, ledger.requests, "every request is in the histogram");
    // The slow request is the only GET 2xx slower than 250 ms, and faster than 500 ms.
    let get_ok = m.total(
        "server_request_duration_seconds_count",
        &[("server", server), ("method", "GET"), ("status", "2xx")],
    );
    assert_eq!(
        bucket(m, server, 0.25),
        get_ok - 1,
        "slow request above 0.25 s\n{}",
        m.text
    );
    assert_eq!(bucket(m, server, 0.5), get_ok, "slow request within 0.5 s");
    assert_eq!(
        m.total("server_received_bytes_total", &[("server", server)]),
        ledger.sent
    );
    assert_eq!(
        m.total("server_sent_bytes_total", &[("server", server)]),
        ledger.received
    );
}

fn matrix(server: &Server, label: &str) -> (Flyprobe, Ledger) {
    let fp = Flyprobe::watch(server.pid());
    let mut ledger = Ledger::default();
    ledger.mix(server.port);
    let m = settled(&fp, label, ledger.requests);
    assert_matches(&m, label, &ledger);
    eprintln!(
        "{label}: {} requests {:?}, {} B in, {} B out: exact",
        ledger.requests, ledger.by_label, ledger.sent, ledger.received
    );
    (fp, ledger)
}

/// Keep-alive already ran in the mix; add HTTP/1.0 close, Expect: 100-continue and
/// pipelining, and check the counts again.
fn edge_cases(fp: &Flyprobe, port: u16, label: &str, ledger: &mut Ledger) {
    let mut conn = Conn::connect(port).unwrap();
    let resp = conn.http10("/").unwrap();
    ledger.record("GET", &resp);
    ledger.close(conn);

    let mut conn = Conn::connect(port).unwrap();
    let (interim, resp) = conn.expect_continue("/echo", &[b'c'; 5000]).unwrap();
    assert_eq!(interim, Some(100), "the server asked for the body");
    ledger.record("POST", &resp);
    let resps = conn.pipeline(&["/", "/missing", "/"]).unwrap();
    for resp in &resps {
        ledger.record("GET", resp);
    }
    ledger.close(conn);
    let m = settled(fp, label, ledger.requests);
    assert_matches(&m, label, ledger);
}

#[test]
fn uvicorn_h11_asyncio() {
    require_root();
    let server = servers::uvicorn_with(2, &["--loop", "asyncio", "--http", "h11"]);
    let (fp, mut ledger) = matrix(&server, "uvicorn");
    edge_cases(&fp, server.port, "uvicorn", &mut ledger);
    fp.stop();
}

#[test]
fn uvicorn_uvloop_httptools() {
    require_root();
    let server = servers::uvicorn_with(2, &["--loop", "uvloop", "--http", "httptools"]);
    matrix(&server, "uvicorn").0.stop();
}

#[test]
fn gunicorn_three_uvicorn_workers() {
    require_root();
    let server = servers::gunicorn(3);
    matrix(&server, "gunicorn").0.stop();
}

#[test]
fn granian_two_workers() {
    require_root();
    let server = servers::granian(2);
    matrix(&server, "granian").0.stop();
}

#[test]
fn hypercorn_two_workers() {
    require_root();
    let server = servers::hypercorn(2);
    matrix(&server, "hypercorn").0.stop();
}

#[test]
fn rust_axum() {
    require_root();
    let server = servers::rust_server();
    let (fp, mut ledger) = matrix(&server, "flyprobe-test-server");
    edge_cases(&fp, server.port, "flyprobe-test-server", &mut ledger);
    fp.stop();
}

#[test]
fn nginx_two_workers_with_sendfile() {
    require_root();
    let upstream = servers::rust_server();
    let server = servers::nginx(upstream.port);
    let (fp, mut ledger) = matrix(&server, "nginx");
    // A static file goes out with sendfile(2).
    let mut conn = Conn::connect(server.port).unwrap();
    for _ in 0..3 {
        let resp = conn.get("/static/big.bin").unwrap();
        assert_eq!(resp.body.len(), 1 << 20);
        ledger.record("GET", &resp);
    }
    ledger.close(conn);
    let m = settled(&fp, "nginx", ledger.requests);
    assert_matches(&m, "nginx", &ledger);
    fp.stop();
}

#[test]
fn non_http_traffic_is_exchanges_by_protocol_never_requests() {
    require_root();
    let server = servers::echo_server();
    let fp = Flyprobe::watch(server.pid());
    let echo = |first: &[u8], turns: usize| {
        let mut conn = Conn::connect(server.port).unwrap();
        for i in 0..turns {
            let msg: Vec<u8> = if i == 0 {
                first.to_vec()
            } else {
                format!("turn {i}\n").into_bytes()
            };
            conn.write(&msg).unwrap();
            let mut got = 0;
            while got < msg.len() {
                got += conn.read_some().unwrap();
            }
        }
        conn.close()
    };
    let (mut sent, mut received) = (0, 0);
    for (first, turns) in [
        (&b"hello echo\n"[..], 5),
        (&b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..], 2), // a TLS ClientHello
    ] {
        let (s, r) = echo(first, turns);
        sent += s;
        received += r;
    }
    // One more exchange on a connection held open: active, nothing in flight.
    let mut conn = Conn::connect(server.port).unwrap();
    conn.write(b"ping").unwrap();
    let mut got = 0;
    while got < 4 {
        got += conn.read_some().unwrap();
    }
    let label = "flyprobe-echo-server";
    let exchanges = |m: &Metrics, p: &str| {
        m.total(
            "server_exchanges_total",
            &[("server", label), ("protocol", p)],
        )
    };
    let m = eventually("7 + 1 exchanges, none open", SETTLE, || {
        let m = fp.scrape();
        let seen = (
            exchanges(&m, "other"),
            exchanges(&m, "tls"),
            m.total("server_active_connections", &[("server", label)]),
        );
        if seen == (6, 2, 1) { Ok(m) } else { Err(seen) }
    });
    let (s, r) = conn.close();
    sent += s;
    received += r;
    assert_eq!(
        (
            m.total("server_requests_total", &[("server", label)]),
            m.total("server_in_flight_requests", &[("server", label)]),
            m.get(
                "server_request_duration_seconds_count",
                &[("server", label)]
            ),
        ),
        (0, 0, None),
        "no request, none in flight, none timed\n{}",
        m.text
    );
    let m = eventually("the last connection closed", SETTLE, || {
        let m = fp.scrape();
        match m.total("server_active_connections", &[("server", label)]) {
            0 => Ok(m),
            n => Err(n),
        }
    });
    assert_eq!(
        m.total("server_requests_total", &[("server", label)]),
        0,
        "a closed exchange is not an aborted request\n{}",
        m.text
    );
    assert_eq!(
        m.total("server_received_bytes_total", &[("server", label)]),
        sent
    );
    assert_eq!(
        m.total("server_sent_bytes_total", &[("server", label)]),
        received
    );
    fp.stop();
}

#[test]
fn access_log_has_one_record_per_request_and_no_payload() {
    require_root();
    let server = servers::rust_server();
    let log = flyprobe_tests::flyprobe::log_path("access");
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--access-log",
        log.to_str().unwrap(),
    ]);
    // A secret in the target, a header and the body: none of it may leave the kernel.
    let secret = "s3cr3t-Tok3n-8d1f";
    let requests: [(&str, String, Vec<u8>, u16); 4] = [
        ("GET", format!("/?token={secret}"), vec![], 200),
        (
            "POST",
            "/echo".into(),
            format!("password={secret}").into_bytes(),
            200,
        ),
        ("GET", "/missing".into(), vec![], 404),
        ("GET", "/error".into(), vec![], 500),
    ];
    let mut expected = Vec::new();
    for (method, path, body, status) in &requests {
        let mut conn = Conn::connect(server.port).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write(head.as_bytes()).unwrap();
        conn.write(body).unwrap();
        assert_eq!(conn.read_response(false).unwrap().status, *status);
        let (sent, received) = conn.close();
        expected.push((method.to_string(), *status, sent, received));
    }
    let lines: Vec<serde_json::Value> = eventually("4 access-log lines", SETTLE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() == 4 {
            Ok(lines)
        } else {
            Err(lines.len())
        }
    });
    let got: Vec<(String, u16, u64, u64)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["pid"], server.pid());
            assert_eq!(l["protocol"], "http1");
            assert!(l["ts"].as_str().unwrap().ends_with('Z'));
            let n = |k: &str| l[k].as_u64().unwrap();
            (
                l["method"].as_str().unwrap().to_string(),
                n("status") as u16,
                n("bytes_in"),
                n("bytes_out"),
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "one record per request: method, status, bytes in/out"
    );
    let metrics = fp.scrape().text;
    let flyprobe_log = fp.stop();
    let access = std::fs::read_to_string(&log).unwrap();
    for (what, text) in [
        ("access log", &access),
        ("metrics", &metrics),
        ("flyprobe log", &flyprobe_log),
    ] {
        assert!(
            !text.contains(secret) && !text.contains("Bearer"),
            "payload leaked into the {what}"
        );
    }
    let _ = std::fs::remove_file(log);
}
