//! HTTP/2 without TLS (h2c, prior knowledge): every stream a client opens is one request,
//! with its method and status class, answered once by the server's response headers, timed
//! from request headers to response headers; many streams multiplexed on one connection;
//! nothing in flight when idle, nothing aborted by a clean close; streams a client abandons
//! are aborted. Compared with what the h2 client (Python's `h2`, hypercorn's own library)
//! saw and, for nginx, with its own stub_status. Every hook set walks the frames (the
//! syscall set here, the fentry set in the kernel matrix's guests).

use std::time::Duration;

use flyprobe_tests::{
    eventually,
    flyprobe::{Flyprobe, Metrics},
    py_clients::{
        REQUESTS, assert_streams, grpc_calls, h2_client, h2_requests, settled, stub_requests,
    },
    require_root,
    servers::{self, Server},
};

const SETTLE: Duration = Duration::from_secs(20);

/// No h2 connection of `server` was counted by exchanges: every byte was walked.
fn assert_no_exchanges(m: &Metrics, server: &str) {
    assert_eq!(
        m.total(
            "server_exchanges_total",
            &[("server", server), ("protocol", "h2")]
        ),
        0,
        "{server}: h2 is streams, never exchanges\n{}",
        m.text
    );
}

fn multiplexed(server: &Server, label: &str) {
    let fp = Flyprobe::watch(server.pid());
    // 3 connections, 20 rounds of the mix each, 16 streams open at once.
    let seen = h2_client(server.port, &REQUESTS, 20, 3, &["--window", "16"]);
    let m = settled(&fp, label, seen.requests, seen.connections);
    assert_streams(&m, label, &seen);
    assert_no_exchanges(&m, label);
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
    // Sent at once; the client leaves (with a reset) before any answer.
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
/// minimal client (`client::h2c_gets`), which this runs here against the same nginx: 8
/// GET / streams on one connection, then 8 GETs of a static file nginx sends with
/// sendfile on another (DATA frames the walk passes over unseen).
#[test]
fn the_guests_h2c_client_counts_streams_and_static_pages() {
    require_root();
    let (server, _) = servers::nginx_h2c();
    let fp = Flyprobe::watch(server.pid());
    for path in ["/", "/static/page.bin"] {
        let statuses = flyprobe_tests::client::h2c_gets(server.port, path, 8).expect("h2c");
        assert_eq!(statuses, vec![200; 8], "{path}");
    }
    let of = [("server", "nginx"), ("protocol", "h2")];
    let m = eventually("the connections closed", SETTLE, || {
        let m = fp.scrape();
        match m.total("server_connections_closed_total", &[("server", "nginx")]) {
            2 => Ok(m),
            n => Err(n),
        }
    });
    let get_2xx = [of[0], of[1], ("method", "GET"), ("status", "2xx")];
    assert_eq!(
        (
            m.total("server_requests_total", &get_2xx),
            m.total("server_requests_total", &of),
            m.total("server_in_flight_requests", &[("server", "nginx")]),
        ),
        (16, 16, 0),
        "GET streams\n{}",
        m.text
    );
    assert_no_exchanges(&m, "nginx");
    fp.stop();
}

#[test]
fn grpc_calls_are_post_requests() {
    require_root();
    let server = servers::grpc_echo();
    let fp = Flyprobe::watch(server.pid());
    // 300 unary calls on one channel (one connection), 32 at once; 30 of them fail with
    // INVALID_ARGUMENT, which gRPC sends in the trailers of an HTTP 200.
    assert_eq!(grpc_calls(server.port, 300, 30, 32, None), (270, 30));
    let label = "python";
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
