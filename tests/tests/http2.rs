//! HTTP/2 without TLS (h2c, prior knowledge): every stream a client opens is one request,
//! with its method and status class, answered once by the server's response headers, timed
//! from request headers to response headers; many streams multiplexed on one connection;
//! nothing in flight when idle, nothing aborted by a clean close; streams a client abandons
//! are aborted. Compared with what the h2 client (Python's `h2`, hypercorn's own library)
//! saw and, for nginx, with its own stub_status. With the fentry and syscall hooks, which
//! do not walk frames, an h2 connection is read/write exchanges, never requests.

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

/// Whether this flyprobe walks HTTP/2 frames: the socket hooks do; the fentry hooks (where
/// `auto` finds them) and the syscall hooks count h2 by exchanges.
fn walks_frames(fp: &Flyprobe) -> bool {
    fp.scrape()
        .get("flyprobe_build_info", &[("hooks", "socket")])
        .is_some()
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
    assert_eq!(grpc_calls(server.port, 300, 30, 32, None), (270, 30));
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
