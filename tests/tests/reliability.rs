//! Reliability: detach and crash behaviour, abrupt clients, a full connection map, 10,000
//! concurrent connections and 100,000 connections of churn, each with the figure it reached.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root, servers,
};

const SETTLE: Duration = Duration::from_secs(30);
const SERVER: &str = "flyprobe-test-server";

/// Names of flyprobe's programs loaded in the kernel right now (bpftool truncates to 15).
fn loaded_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (installed by `cargo xtask setup`)");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    const OURS: [&str; 11] = [
        "accept_enter",
        "accept_exit",
        "close_enter",
        "io_exit",
        "process_fork",
        "process_exit",
        "process_fork_raw",
        "process_exit_raw",
        "sock_recv",
        "sock_send",
        "sock_state",
    ];
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| OURS.contains(n))
        .map(String::from)
        .collect()
}

fn settled(fp: &Flyprobe, active: u64, requests: u64) -> Metrics {
    eventually(
        &format!("active {active}, requests {requests}, in flight 0"),
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = (
                m.total("server_active_connections", &[("server", SERVER)]),
                m.total("server_requests_total", &[("server", SERVER)]),
                m.total("server_in_flight_requests", &[("server", SERVER)]),
            );
            if seen == (active, requests, 0) {
                Ok(m)
            } else {
                Err(seen)
            }
        },
    )
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn stop_detaches_everything_and_a_killed_daemon_leaves_the_app_serving() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    // The socket hooks: fork, exit and the three socket events; the syscall hooks: fork,
    // exit, accept enter and exit, close and the I/O exit (of the ones listed above).
    let expected = match std::env::var("FLYPROBE_HOOKS").as_deref() {
        Ok("syscall") => 6,
        _ => 5,
    };
    assert_eq!(
        loaded_programs().len(),
        expected,
        "our programs are loaded while running: {:?}",
        loaded_programs()
    );
    fp.stop();
    // Teardown after the last fd closes is deferred in the kernel: give it a moment.
    eventually("SIGTERM to detach and unload every program", SETTLE, || {
        let left = loaded_programs();
        if left.is_empty() { Ok(()) } else { Err(left) }
    });
    assert!(
        loaded_programs().is_empty(),
        "SIGTERM detached and unloaded every program"
    );

    let mut fp = Flyprobe::watch(server.pid());
    // SAFETY: kill(2) on the flyprobe this test started.
    unsafe { libc::kill(fp.pid() as i32, libc::SIGKILL) };
    fp.wait_timeout(Duration::from_secs(5))
        .expect("flyprobe died");
    for _ in 0..20 {
        let mut conn = Conn::connect(server.port).unwrap();
        assert_eq!(conn.get("/").unwrap().status, 200, "the app serves on");
        conn.close();
    }
    eventually(
        "the kernel to drop a killed daemon's programs",
        SETTLE,
        || {
            let left = loaded_programs();
            if left.is_empty() { Ok(()) } else { Err(left) }
        },
    );
    let fp = Flyprobe::watch(server.pid());
    for _ in 0..10 {
        let mut conn = Conn::connect(server.port).unwrap();
        conn.get("/").unwrap();
        conn.close();
    }
    settled(&fp, 0, 10);
    fp.stop();
}

#[test]
fn resets_half_closes_silent_clients_and_dead_servers_leave_nothing_open() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    // A request in flight, then a reset (SO_LINGER 0) before the response.
    let mut conn = Conn::connect(server.port).unwrap();
    conn.write(b"GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    conn.reset();
    // A half-close after the request. hyper closes on the client's FIN without answering
    // (its default); either way the request must end, answered or aborted.
    let mut conn = Conn::connect(server.port).unwrap();
    conn.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    conn.shutdown_write();
    let answered = conn.read_response(false).is_ok_and(|r| r.status == 200);
    conn.close();
    let aborted = 1 + u64::from(!answered);
    // Clients that connect and never send.
    let silent: Vec<Conn> = (0..5)
        .map(|_| Conn::connect(server.port).unwrap())
        .collect();
    settled(&fp, 5, 2);
    silent.into_iter().for_each(|c| {
        c.close();
    });
    let m = settled(&fp, 0, 2);
    assert_eq!(
        m.total(
            "server_requests_total",
            &[("server", SERVER), ("status", "aborted")]
        ),
        aborted,
        "the reset request was aborted\n{}",
        m.text
    );

    // The server dies with a request in flight: released when it exits.
    let mut conn = Conn::connect(server.port).unwrap();
    conn.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    settled_in_flight(&fp, 1);
    server.guard.signal(libc::SIGKILL);
    // Gauges drop at once; the aborted request is labelled when the process is retired.
    eventually(
        "the dead server's connection released and its request aborted",
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = (
                m.total("server_active_connections", &[("server", SERVER)]),
                m.total("server_in_flight_requests", &[("server", SERVER)]),
                m.total(
                    "server_requests_total",
                    &[("server", SERVER), ("status", "aborted")],
                ),
            );
            if seen == (0, 0, aborted + 1) {
                Ok(())
            } else {
                Err(seen)
            }
        },
    );
    fp.stop();
}

fn settled_in_flight(fp: &Flyprobe, n: u64) {
    eventually(&format!("{n} in flight"), SETTLE, || {
        let got = fp
            .scrape()
            .total("server_in_flight_requests", &[("server", SERVER)]);
        if got == n { Ok(()) } else { Err(got) }
    });
}

#[test]
fn a_full_connection_map_counts_drops_and_keeps_tracked_counts_exact() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--max-connections",
        "8",
    ]);
    let held: Vec<Conn> = (0..20)
        .map(|_| Conn::connect(server.port).unwrap())
        .collect();
    let m = eventually("8 tracked, 12 dropped", SETTLE, || {
        let m = fp.scrape();
        let seen = (
            m.total("server_active_connections", &[("server", SERVER)]),
            m.total(
                "flyprobe_dropped_events_total",
                &[("reason", "connection_map_full")],
            ),
        );
        if seen == (8, 12) { Ok(m) } else { Err(seen) }
    });
    eprintln!(
        "map of 8: {} tracked, {} dropped",
        8,
        m.total(
            "flyprobe_dropped_events_total",
            &[("reason", "connection_map_full")]
        )
    );
    held.into_iter().for_each(|c| {
        c.close();
    });
    settled(&fp, 0, 0);
    // Room again: new connections are counted exactly.
    for _ in 0..5 {
        let mut conn = Conn::connect(server.port).unwrap();
        conn.get("/").unwrap();
        conn.close();
    }
    let m = settled(&fp, 0, 5);
    assert_eq!(
        m.total("server_connections_accepted_total", &[("server", SERVER)]),
        13
    );
    fp.stop();
}

#[test]
fn ten_thousand_concurrent_keepalive_connections() {
    require_root();
    raise_fd_limit();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let t = Instant::now();
    let mut conns: Vec<Conn> = (0..10_000)
        .map(|_| Conn::connect(server.port).unwrap())
        .collect();
    for conn in &mut conns {
        assert_eq!(conn.get("/").unwrap().status, 200);
    }
    let m = settled(&fp, 10_000, 10_000);
    eprintln!(
        "10,000 keep-alive connections open and counted in {:?}",
        t.elapsed()
    );
    assert_eq!(
        m.total("server_connections_accepted_total", &[("server", SERVER)]),
        10_000
    );
    conns.into_iter().for_each(|c| {
        c.close();
    });
    settled(&fp, 0, 10_000);
    fp.stop();
}

#[test]
fn one_hundred_thousand_connections_of_churn() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let entries = |m: &Metrics| m.total("flyprobe_map_entries", &[("map", "connections")]);
    let baseline = entries(&fp.scrape());
    let t = Instant::now();
    let port = server.port;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..25_000 {
                    let mut conn = Conn::connect(port).unwrap();
                    assert_eq!(conn.get("/").unwrap().status, 200);
                    conn.close();
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|w| w.join().unwrap());
    let m = settled(&fp, 0, 100_000);
    eprintln!(
        "100,000 connections opened, used and closed in {:?}",
        t.elapsed()
    );
    assert_eq!(
        m.total("server_connections_accepted_total", &[("server", SERVER)]),
        100_000
    );
    assert_eq!(
        m.total("server_connections_closed_total", &[("server", SERVER)]),
        100_000
    );
    eventually("connection map back to its baseline", SETTLE, || {
        let now = entries(&fp.scrape());
        if now == baseline { Ok(()) } else { Err(now) }
    });
    fp.stop();
}
