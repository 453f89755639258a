//! Workers and lifecycle seen from the kernel: starts, stops with their reason, respawns,
//! scaling, reloads, root exit, uptimes — compared with what the servers did.

use std::{collections::BTreeSet, thread, time::Duration};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, children},
};
use procfs::{Current as _, Uptime, process::Process};

const SETTLE: Duration = Duration::from_secs(15);

fn stopped(m: &Metrics, server: &str, reason: &str) -> u64 {
    m.get(
        "server_stopped_total",
        &[("server", server), ("reason", reason)],
    )
    .unwrap_or(0.0) as u64
}

fn stopped_sum(m: &Metrics, server: &str) -> u64 {
    m.series("server_stopped_total", &[("server", server)])
        .iter()
        .map(|(_, v)| *v as u64)
        .sum()
}

fn gauge(m: &Metrics, name: &str, server: &str) -> u64 {
    // A missing series is a failure, not a zero.
    let v = m.get(name, &[("server", server)]);
    v.unwrap_or_else(|| panic!("no single {name}{{server={server}}} in\n{}", m.text)) as u64
}

fn worker_pids(m: &Metrics, server: &str) -> BTreeSet<u32> {
    m.series("server_worker_info", &[("server", server)])
        .into_iter()
        .filter_map(|(labels, _)| labels.get("pid")?.parse().ok())
        .collect()
}

/// Wait until flyprobe's lifecycle view equals (workers, started, stopped in sum).
fn lifecycle_is(fp: &Flyprobe, server: &str, want: (u64, u64, u64)) -> Metrics {
    eventually(
        &format!("{server}: (workers, started, stopped) == {want:?}"),
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = (
                gauge(&m, "server_workers", server),
                gauge(&m, "server_started_total", server),
                stopped_sum(&m, server),
            );
            if seen == want { Ok(m) } else { Err(seen) }
        },
    )
}

#[test]
fn gunicorn_worker_killed_mid_request_is_respawned_and_released() {
    require_root();
    let server = servers::gunicorn(3);
    let fp = Flyprobe::watch(server.pid());
    let before = lifecycle_is(&fp, "gunicorn", (3, 0, 0));
    let old = worker_pids(&before, "gunicorn");
    assert_eq!(
        old,
        children(server.pid()).into_iter().collect(),
        "workers are gunicorn's children"
    );

    let port = server.port;
    let slow = thread::spawn(move || Conn::connect(port).unwrap().get("/slow?ms=20000"));
    let victim = eventually("one request in flight", SETTLE, || {
        let in_flight = fp.scrape().by_pid("server_in_flight_requests", "gunicorn");
        match in_flight.iter().find(|(_, n)| **n == 1) {
            Some((pid, _)) if in_flight.values().sum::<u64>() == 1 => Ok(*pid),
            _ => Err(in_flight),
        }
    });
    // SAFETY: kill(2) on a gunicorn worker this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    assert!(
        slow.join().unwrap().is_err(),
        "the killed worker never answered"
    );

    let m = lifecycle_is(&fp, "gunicorn", (3, 1, 1));
    assert_eq!(stopped(&m, "gunicorn", "signal_SIGKILL"), 1, "{}", m.text);
    let victim_s = victim.to_string();
    let released = [("server", "gunicorn"), ("pid", victim_s.as_str())];
    assert_eq!(m.get("server_active_connections", &released), Some(0.0));
    assert_eq!(m.get("server_in_flight_requests", &released), Some(0.0));
    assert_eq!(
        m.get("server_connections_accepted_total", &released),
        Some(1.0)
    );
    let now = worker_pids(&m, "gunicorn");
    let fresh: Vec<u32> = now.difference(&old).copied().collect();
    assert_eq!(fresh.len(), 1, "one respawned worker: {now:?} vs {old:?}");
    assert_eq!(now, children(server.pid()).into_iter().collect());

    // The respawned worker's traffic is counted exactly.
    let fresh = fresh[0];
    let mut served_by_fresh = 0;
    for _ in 0..400 {
        let mut conn = Conn::connect(port).unwrap();
        let resp = conn.get("/").unwrap();
        conn.close();
        if resp.worker_pid == Some(fresh) {
            served_by_fresh += 1;
            if served_by_fresh == 3 {
                break;
            }
        }
    }
    assert_eq!(served_by_fresh, 3, "the new worker {fresh} never served");
    let fresh_s = fresh.to_string();
    eventually("the new worker's requests", SETTLE, || {
        let m = fp.scrape();
        let got = m.get(
            "server_requests_total",
            &[("server", "gunicorn"), ("pid", &fresh_s)],
        );
        if got == Some(3.0) { Ok(()) } else { Err(got) }
    });
    fp.stop();
}

#[test]
fn gunicorn_scale_up_down_and_reload_match_what_gunicorn_did() {
    require_root();
    let server = servers::gunicorn(2);
    let master = server.pid();
    let fp = Flyprobe::watch(master);
    lifecycle_is(&fp, "gunicorn", (2, 0, 0));
    let mut seen: BTreeSet<u32> = children(master).into_iter().collect();
    let initial = seen.clone();
    let mut observe = |want: usize| {
        let now: BTreeSet<u32> =
            eventually(&format!("gunicorn has {want} workers"), SETTLE, || {
                let c: BTreeSet<u32> = children(master).into_iter().collect();
                if c.len() == want { Ok(c) } else { Err(c) }
            });
        seen.extend(&now);
        now
    };
    let signal = |sig| unsafe { libc::kill(master as i32, sig) };

    signal(libc::SIGTTIN);
    observe(3);
    lifecycle_is(&fp, "gunicorn", (3, 1, 0));
    signal(libc::SIGTTOU);
    observe(2);
    lifecycle_is(&fp, "gunicorn", (2, 1, 1));
    let before_reload = observe(2);
    signal(libc::SIGHUP);
    let after_reload = eventually("gunicorn replaced every worker", SETTLE, || {
        let c: BTreeSet<u32> = children(master).into_iter().collect();
        if c.len() == 2 && c.is_disjoint(&before_reload) {
            Ok(c)
        } else {
            Err(c)
        }
    });
    seen.extend(&after_reload);

    // Every worker gunicorn started after flyprobe attached is a start; every one gone is a
    // stop. (TTOU and HUP stop workers with SIGTERM; uvicorn re-raises it after draining.)
    let started = seen.difference(&initial).count() as u64;
    let stopped_n = seen.difference(&after_reload).count() as u64;
    assert_eq!((started, stopped_n), (3, 3), "what gunicorn did: {seen:?}");
    let m = lifecycle_is(&fp, "gunicorn", (2, started, stopped_n));
    assert_eq!(worker_pids(&m, "gunicorn"), after_reload);
    fp.stop();
}

/// A uvicorn worker exits with `code`; returns the scrape once flyprobe counted the stop.
fn uvicorn_worker_exits(code: u32) -> (servers::Server, Flyprobe) {
    let server = servers::uvicorn(2);
    let fp = Flyprobe::watch(server.pid());
    lifecycle_is(&fp, "uvicorn", (2, 0, 0));
    let mut conn = Conn::connect(server.port).unwrap();
    assert!(
        conn.get(&format!("/exit?code={code}")).is_err(),
        "the worker exits without answering"
    );
    eventually("the exit_nonzero stop", SETTLE, || {
        let m = fp.scrape();
        let n = stopped(&m, "uvicorn", "exit_nonzero");
        if n == 1 { Ok(()) } else { Err(n) }
    });
    (server, fp)
}

#[test]
fn uvicorn_worker_exiting_nonzero_is_counted_and_replaced() {
    require_root();
    let (_server, fp) = uvicorn_worker_exits(7);
    let m = lifecycle_is(&fp, "uvicorn", (2, 1, 1));
    assert_eq!(stopped(&m, "uvicorn", "exit_nonzero"), 1, "{}", m.text);
    fp.stop();
}

#[test]
fn uvicorn_worker_exiting_with_3_stops_uvicorn() {
    require_root();
    // uvicorn reads status 3 as "failed to start" and shuts everything down.
    let (_server, fp) = uvicorn_worker_exits(3);
    let m = eventually("uvicorn to stop", SETTLE, || {
        let m = fp.scrape();
        let seen = (
            gauge(&m, "server_up", "uvicorn"),
            gauge(&m, "server_workers", "uvicorn"),
        );
        if seen == (0, 0) { Ok(m) } else { Err(seen) }
    });
    assert_eq!(stopped(&m, "uvicorn", "exit_nonzero"), 1, "{}", m.text);
    assert_eq!(
        stopped_sum(&m, "uvicorn"),
        2,
        "the other worker stops too\n{}",
        m.text
    );
    assert_eq!(gauge(&m, "server_started_total", "uvicorn"), 0);
    fp.stop();
}

#[test]
fn root_exit_sets_up_to_zero_and_flyprobe_keeps_serving() {
    require_root();
    let mut server = servers::rust_server();
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        "api",
    ]);
    let m = fp.scrape();
    assert_eq!(gauge(&m, "server_up", "api"), 1, "{}", m.text);
    assert_eq!(gauge(&m, "server_workers", "api"), 1);
    server.guard.signal(libc::SIGTERM);
    server
        .guard
        .wait_timeout(Duration::from_secs(5))
        .expect("server exits");
    eventually("server_up == 0", SETTLE, || {
        let up = gauge(&fp.scrape(), "server_up", "api");
        if up == 0 { Ok(()) } else { Err(up) }
    });
    thread::sleep(Duration::from_millis(1500));
    let m = fp.scrape();
    assert_eq!(
        (
            gauge(&m, "server_up", "api"),
            gauge(&m, "server_workers", "api")
        ),
        (0, 0)
    );
    let log = fp.stop();
    assert!(log.contains("exited (signal_SIGTERM)"), "{log}");
}

#[test]
fn root_exit_with_exit_with_target_stops_flyprobe() {
    require_root();
    let mut server = servers::rust_server();
    let mut fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--exit-with-target",
    ]);
    server.guard.signal(libc::SIGKILL);
    server
        .guard
        .wait_timeout(Duration::from_secs(5))
        .expect("server exits");
    let status = fp.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flyprobe exits 0: {status:?}\n{}",
        fp.log()
    );
    assert!(fp.log().contains("--exit-with-target"), "{}", fp.log());
}

#[test]
fn uptimes_match_proc_within_a_second() {
    require_root();
    let server = servers::uvicorn(2);
    let fp = Flyprobe::watch(server.pid());
    let m = lifecycle_is(&fp, "uvicorn", (2, 0, 0));
    let now = Uptime::current().unwrap().uptime;
    let age = |pid: u32| {
        let start = Process::new(pid as i32).unwrap().stat().unwrap().starttime;
        now - start as f64 / procfs::ticks_per_second() as f64
    };
    let root = m
        .get("server_uptime_seconds", &[("server", "uvicorn")])
        .unwrap();
    assert!(
        (root - age(server.pid())).abs() < 1.0,
        "root uptime {root} vs /proc {}",
        age(server.pid())
    );
    for pid in worker_pids(&m, "uvicorn") {
        let p = pid.to_string();
        let got = m
            .get(
                "server_worker_uptime_seconds",
                &[("server", "uvicorn"), ("pid", &p)],
            )
            .unwrap();
        assert!(
            (got - age(pid)).abs() < 1.0,
            "worker {pid}: {got} vs /proc {}",
            age(pid)
        );
    }
    fp.stop();
}
