//! HTTPS through OpenSSL (`--tls`): uprobes on the libssl a server maps give its TLS
//! connections' plaintext, so HTTP/1.1 over TLS is requests (`protocol="https"`) with their
//! methods, status classes and durations, and HTTP/2 over TLS is streams (`protocol="h2"`),
//! whatever the hook set. Compared with what the client sent and saw and, for nginx, with
//! its own stub_status: nothing in flight when idle, nothing aborted by a clean close, no
//! handshake counted as anything. Without `--tls` the same traffic is `tls` exchanges only.
//!
//! The servers: nginx (OpenSSL on the socket), uvicorn and hypercorn (asyncio's TLS: OpenSSL
//! on memory buffers, the socket read and written apart from it), gunicorn's sync workers
//! (Python's `ssl` on the socket, a connection per request); and grpcio, whose TLS is not
//! OpenSSL's: connections and bytes only.

use std::{collections::BTreeMap, time::Duration};

use flyprobe_tests::{
    eventually,
    flyprobe::{Flyprobe, Metrics},
    procs::Guard,
    py_clients::{
        self, REQUESTS, Seen, assert_streams, h2_client, https_client, requests, settle, settled,
        stub_requests,
    },
    require_root, servers,
};

const SETTLE: Duration = Duration::from_secs(20);

/// grpcio over TLS: its TLS is BoringSSL linked into grpcio's extension (stripped, nothing to
/// attach to), while the process maps OpenSSL's libssl (Python's `ssl`), which flyprobe
/// attaches to. A server not on OpenSSL stays counted by connection and bytes: its one
/// connection accepted and closed, its bytes, and nothing else: no request, no exchange (the
/// process is an OpenSSL one, whose TLS handshakes are not exchanges), no untied plaintext.
#[test]
fn grpc_over_its_own_tls_is_connections_and_bytes_only() {
    require_root();
    let (server, cert) = servers::grpc_echo_tls();
    let fp = watch_tls(server.pid());
    assert_eq!(
        py_clients::grpc_calls(server.port, 40, 4, 8, Some(&cert)),
        (36, 4)
    );
    let of = [("server", "python")];
    let m = eventually("one connection accepted and closed", SETTLE, || {
        let m = fp.scrape();
        let seen = (
            m.total("server_connections_accepted_total", &of),
            m.total("server_connections_closed_total", &of),
        );
        if seen == (1, 1) { Ok(m) } else { Err(seen) }
    });
    let bytes = (
        m.total("server_received_bytes_total", &of),
        m.total("server_sent_bytes_total", &of),
    );
    assert!(
        bytes.0 > 40 * 20 && bytes.1 > 40 * 20,
        "40 calls' ciphertext both ways: {bytes:?}"
    );
    assert_eq!(
        (
            m.total("server_requests_total", &of),
            m.total("server_exchanges_total", &of),
        ),
        (0, 0),
        "no request, no exchange\n{}",
        m.text
    );
    assert_no_tls_noise(&m, "python");
    fp.stop();
}

/// The OpenSSL mark goes with the program, not the PID: a process that mapped libssl (its
/// TLS handshakes are then no exchanges) and exec's a program without it (the echo server:
/// Rust, no TLS library) has TLS records counted as `tls` exchanges again once flyprobe
/// reads its maps anew (every 10 s). With the mark kept, they would never be.
#[test]
fn a_process_that_execs_a_program_without_openssl_loses_its_mark() {
    require_root();
    let mut server = servers::python_then_echo();
    let fp = tls_named(server.pid(), "execd");
    watch_attached(&fp);
    servers::exec_echo(&mut server);
    // A TLS record (a handshake's header and a few bytes), echoed back: one read/write turn.
    let record = [0x16, 0x03, 0x01, 0x00, 0x04, 1, 0, 0, 0];
    let of = [("server", "execd"), ("protocol", "tls")];
    let exchanges = eventually(
        "tls exchanges counted after the exec",
        Duration::from_secs(25),
        || {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port))
                .map_err(|e| e.to_string())?;
            use std::io::{Read as _, Write as _};
            conn.write_all(&record).map_err(|e| e.to_string())?;
            let mut back = [0u8; 9];
            conn.read_exact(&mut back).map_err(|e| e.to_string())?;
            drop(conn);
            std::thread::sleep(Duration::from_millis(200));
            let m = fp.scrape();
            match m.total("server_exchanges_total", &of) {
                0 => Err("no tls exchange yet".to_string()),
                n => Ok(n),
            }
        },
    );
    eprintln!("{exchanges} tls exchanges after the exec");
    fp.stop();
}

/// flyprobe with `--tls` on `pid`'s tree, its server named `name` (`--server-name`).
fn tls_named(pid: u32, name: &str) -> Flyprobe {
    Flyprobe::start(&[
        "--pid-tree",
        &pid.to_string(),
        "--tls",
        "--server-name",
        name,
    ])
}

/// flyprobe with `--tls` on `pid`'s tree, once it has attached to the server's libssl.
fn watch_tls(pid: u32) -> Flyprobe {
    let fp = Flyprobe::start(&["--pid-tree", &pid.to_string(), "--tls"]);
    watch_attached(&fp);
    fp
}

/// Nothing of TLS itself is counted: no handshake exchange, no plaintext without its
/// connection, nothing aborted.
fn assert_no_tls_noise(m: &Metrics, server: &str) {
    assert_eq!(
        (
            m.total(
                "server_exchanges_total",
                &[("server", server), ("protocol", "tls")]
            ),
            m.total("flyprobe_dropped_events_total", &[("reason", "tls_untied")]),
            m.total(
                "server_requests_total",
                &[("server", server), ("status", "aborted")]
            ),
        ),
        (0, 0, 0),
        "{server}: no tls exchanges, untied plaintext or aborted requests\n{}",
        m.text
    );
}

/// HTTP/1.1 over TLS from `seen`'s client, alone on `server`: every request with its method
/// and status class, timed; every connection accepted and closed.
fn assert_https(m: &Metrics, server: &str, seen: &Seen) {
    assert_eq!(
        requests(m, server, "https"),
        seen.by_label,
        "{server}: https requests by (method, status class)\n{}",
        m.text
    );
    let of = [("server", server)];
    assert_eq!(
        (
            m.total("server_request_duration_seconds_count", &of),
            m.total("server_connections_accepted_total", &of),
            m.total("server_active_connections", &of),
            m.total(
                "server_requests_total",
                &[("server", server), ("protocol", "http1")]
            ),
        ),
        (seen.requests, seen.connections, 0, 0),
        "{server}: timed requests, connections, none called plain http1\n{}",
        m.text
    );
    assert_no_tls_noise(m, server);
    eprintln!(
        "{server}: {} https requests on {} connections {:?}: exact",
        seen.requests, seen.connections, seen.by_label
    );
}

#[test]
fn nginx_https_requests_match_its_stub_status() {
    require_root();
    let (server, stub_port) = servers::nginx_tls();
    let fp = watch_tls(server.pid());
    let stub_before = stub_requests(stub_port);
    let seen = https_client(server.port, &REQUESTS, 10, 3, &[]);
    let stub_after = stub_requests(stub_port);
    // nginx counts each stub_status request itself.
    assert_eq!(
        stub_after - stub_before - 1,
        seen.requests,
        "nginx served them"
    );
    // nginx closes a keep-alive connection after some error responses: the client reopens.
    assert_eq!(seen.requests, 180, "{seen:?}");
    // The two stub reads are plain HTTP/1.1 requests on connections of their own.
    let m = settle(&fp, "nginx", "https", seen.requests, seen.connections + 2);
    let plain = m.total(
        "server_requests_total",
        &[("server", "nginx"), ("protocol", "http1")],
    );
    assert_eq!(plain, 2, "the stub reads\n{}", m.text);
    assert_eq!(requests(&m, "nginx", "https"), seen.by_label, "{}", m.text);
    assert_eq!(
        m.total(
            "server_request_duration_seconds_count",
            &[("server", "nginx")]
        ),
        seen.requests + 2
    );
    assert_no_tls_noise(&m, "nginx");
    fp.stop();
}

#[test]
fn nginx_h2_over_tls_streams_match_its_stub_status() {
    require_root();
    let (server, stub_port) = servers::nginx_tls();
    let fp = watch_tls(server.pid());
    let stub_before = stub_requests(stub_port);
    let seen = h2_client(server.port, &REQUESTS, 20, 2, &["--tls", "--window", "10"]);
    let stub_after = stub_requests(stub_port);
    assert_eq!(
        stub_after - stub_before - 1,
        seen.requests,
        "nginx served them"
    );
    let m = settle(&fp, "nginx", "h2", seen.requests, seen.connections + 2);
    // By status class exactly (methods beyond GET and POST go by the HPACK dynamic table
    // after their first use on a connection: the h2c tests check those).
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, class), n) in &seen.by_label {
        *want.entry(class.clone()).or_default() += n;
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, class), n) in requests(&m, "nginx", "h2") {
        *got.entry(class).or_default() += n;
    }
    assert_eq!(got, want, "h2 streams by status class\n{}", m.text);
    assert_eq!(
        m.total(
            "server_requests_total",
            &[("server", "nginx"), ("protocol", "https")]
        ),
        0,
        "ALPN h2: no HTTP/1.1 over TLS"
    );
    assert_eq!(
        m.total(
            "flyprobe_dropped_events_total",
            &[("reason", "h2_frames_lost")]
        ),
        0
    );
    assert_no_tls_noise(&m, "nginx");
    fp.stop();
}

#[test]
fn uvicorn_https_requests_are_counted_with_methods_and_statuses() {
    require_root();
    let server = servers::uvicorn_tls(2);
    let fp = watch_tls(server.pid());
    // Six connections at once: uvloop reads their sockets in any order between a
    // connection's handshake and its first request, and each `SSL *` is tied to its
    // connection at its handshake (a guess at the first `SSL_read` mixed them up, and a
    // connection that closed took the plaintext of another's last requests with it).
    let seen = https_client(server.port, &REQUESTS, 10, 6, &["--parallel"]);
    assert_eq!((seen.requests, seen.connections), (360, 6), "{seen:?}");
    let m = settle(&fp, "uvicorn", "https", seen.requests, seen.connections);
    assert_https(&m, "uvicorn", &seen);
    fp.stop();
}

#[test]
fn gunicorn_sync_https_requests_are_counted() {
    require_root();
    let server = servers::gunicorn_tls(2);
    let fp = watch_tls(server.pid());
    // The sync workers close every connection after its response.
    let seen = https_client(
        server.port,
        &["GET /", "POST /form", "PUT /x", "DELETE /y"],
        10,
        1,
        &[],
    );
    assert_eq!((seen.requests, seen.connections), (40, 40), "{seen:?}");
    let m = settle(&fp, "gunicorn", "https", seen.requests, seen.connections);
    assert_https(&m, "gunicorn", &seen);
    fp.stop();
}

#[test]
fn hypercorn_h2_over_tls_streams_are_requests() {
    require_root();
    let server = servers::hypercorn_tls(2);
    let fp = watch_tls(server.pid());
    // Three connections at once, 16 streams open on each.
    let seen = h2_client(
        server.port,
        &REQUESTS,
        20,
        3,
        &["--tls", "--window", "16", "--parallel"],
    );
    let m = settled(&fp, "hypercorn", seen.requests, seen.connections);
    assert_streams(&m, "hypercorn", &seen);
    assert_no_tls_noise(&m, "hypercorn");
    fp.stop();
}

#[test]
fn without_the_tls_flag_https_is_tls_exchanges_never_requests() {
    require_root();
    let server = servers::uvicorn_tls(2);
    let fp = Flyprobe::watch(server.pid());
    let seen = https_client(server.port, &REQUESTS, 5, 2, &[]);
    let m = eventually("the connections closed", SETTLE, || {
        let m = fp.scrape();
        match m.total("server_connections_closed_total", &[("server", "uvicorn")]) {
            2 => Ok(m),
            n => Err(n),
        }
    });
    assert_eq!(seen.requests, 60);
    let of = [("server", "uvicorn")];
    assert_eq!(
        (
            m.total("server_requests_total", &of),
            m.total("server_in_flight_requests", &of),
            m.get("flyprobe_tls_libraries", &[]),
            m.total("flyprobe_dropped_events_total", &[]),
        ),
        (0, 0, None, 0),
        "no request without --tls, and nothing of TLS in the kernel\n{}",
        m.text
    );
    assert!(
        m.total(
            "server_exchanges_total",
            &[("server", "uvicorn"), ("protocol", "tls")]
        ) > 0,
        "tls exchanges\n{}",
        m.text
    );
    fp.stop();
}

/// A server started after flyprobe (its libssl found by the daemon's scan once it runs,
/// after start-up, when flyprobe holds only the capabilities it keeps): its HTTPS requests
/// are counted too. flyprobe watches a shell that execs nginx when told to.
#[test]
fn a_tls_server_started_after_flyprobe_is_attached_then() {
    require_root();
    let port = flyprobe_tests::free_port();
    let dir = std::env::temp_dir().join(format!("flyprobe-nginx-later-{port}"));
    let (cert, key) = servers::self_signed(&dir);
    let conf = servers::nginx_conf(
        &dir,
        1,
        "",
        &format!(
            "listen 127.0.0.1:{port} ssl;
    ssl_certificate {};
    ssl_certificate_key {};
    location = / {{ return 200 'ok'; }}",
            cert.display(),
            key.display()
        ),
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let go = dir.join("go");
    let nginx = servers::nginx_bin().expect("nginx is not installed: run `cargo xtask setup`");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; exec {nginx} -c {dir}/nginx.conf -p {dir}",
        go = go.display(),
        nginx = nginx.display(),
        dir = dir.display()
    );
    let shell = Guard::spawn("sh", std::process::Command::new("sh").args(["-c", &script]));
    // The root was a shell when flyprobe found it: the label is set.
    let fp = tls_named(shell.pid(), "nginx");
    assert_eq!(fp.scrape().get("flyprobe_tls_libraries", &[]), Some(0.0));
    std::fs::write(&go, b"").expect("go");
    eventually("nginx answering over TLS", SETTLE, || {
        let seen = https_client(port, &["GET /"], 1, 1, &[]);
        (seen.requests == 1).then_some(()).ok_or(seen.requests)
    });
    watch_attached(&fp);
    let seen = https_client(port, &["GET /"], 20, 2, &[]);
    let m = eventually("20 https requests after the attach", SETTLE, || {
        let m = fp.scrape();
        match requests(&m, "nginx", "https").values().sum::<u64>() {
            n if n >= seen.requests => Ok(m),
            n => Err(n),
        }
    });
    assert!(
        fp.log().contains("capabilities dropped to [CAP_BPF, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE]"),
        "--tls keeps what attaching later needs\n{}",
        fp.log()
    );
    assert_eq!(
        m.total("flyprobe_dropped_events_total", &[("reason", "tls_untied")]),
        0
    );
    fp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until flyprobe has attached to a libssl.
fn watch_attached(fp: &Flyprobe) {
    eventually("the OpenSSL uprobes attached", SETTLE, || {
        match fp.scrape().get("flyprobe_tls_libraries", &[]) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(other),
        }
    });
}
