//! A stalled daemon loses nothing that the kernel holds. flyprobe is stopped (SIGSTOP) for
//! 10 s while gunicorn recycles its workers every 10 requests under steady load and one
//! worker is SIGKILLed; after SIGCONT the request and connection totals equal what the
//! clients did, and every worker that exited is reported stopped: with its reason when its
//! exit event reached the daemon, `unknown` when the kernel's event ring had no room for it
//! (a burst of forks during the stall fills it), the ring's drops counted.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root, servers,
};

const SERVER: &str = "stalled";
const WORKERS: u32 = 4;

/// What the clients saw, and what flyprobe reported once it caught up.
struct Outcome {
    metrics: Metrics,
    /// Workers that exited during the run (they answered the clients, or were killed, and
    /// are gone).
    exited_workers: u64,
}

/// Steady load on gunicorn recycling its workers; flyprobe stopped for 10 s in the middle,
/// with `during_stall` run 1 s into it (on the server's port) and a worker SIGKILLed 5 s
/// into it. Waits until the totals are exact.
fn stalled_run(during_stall: impl FnOnce(u16) -> u64) -> Outcome {
    require_root();
    let server = servers::gunicorn_recycling(WORKERS, 10);
    let port = server.port;
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        SERVER,
    ]);
    // Responses, and connections a killed worker cut; the workers that answered.
    let (answered, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (answered, cut, workers, stop) =
                (answered.clone(), cut.clone(), workers.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut conn = Conn::connect(port).expect("connect");
                    match conn.get("/") {
                        Ok(resp) => {
                            assert_eq!(resp.status, 200);
                            workers
                                .lock()
                                .unwrap()
                                .insert(resp.worker_pid.expect("x-worker-pid"));
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    conn.close();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let daemon = |sig| assert_eq!(unsafe { libc::kill(fp.pid() as i32, sig) }, 0);
    daemon(libc::SIGSTOP);
    let before = answered.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let extra = during_stall(port);
    std::thread::sleep(Duration::from_secs(4));
    let victim = kill_a_worker(server.pid(), &workers);
    std::thread::sleep(Duration::from_secs(5));
    let during = answered.load(Ordering::SeqCst) - before;
    daemon(libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let ok = answered.load(Ordering::SeqCst) + extra;
    let connections = ok + cut.load(Ordering::SeqCst);
    eprintln!(
        "{connections} connections ({} cut by the kill), {during} answered while the daemon \
         was stopped; killed worker {victim}",
        connections - ok
    );
    let mut served = workers.lock().unwrap().clone();
    served.insert(victim);
    // Workers gone (a zombie not yet reaped has exited too). Asked again at each look: a
    // worker that answered its last request just before the clients stopped may still be
    // exiting, and it is gone by the time its stop is counted.
    let exited = || {
        let live: BTreeSet<u32> = servers::live_children(server.pid()).into_iter().collect();
        served.difference(&live).count() as u64
    };
    let (metrics, exited_workers) = eventually(
        &format!(
            "{ok}..={connections} 2xx responses, {connections} connections and a stop \
             counted for each worker that answered and exited"
        ),
        Duration::from_secs(20),
        || {
            let exited_workers = exited();
            let m = fp.scrape();
            // A worker that exited during the scrape: look again.
            if exited() != exited_workers {
                return Err((0, 0, 0, 0, exited_workers));
            }
            let (ok_counted, accepted, closed) = m.served(SERVER);
            let stops = stopped_total(&m);
            // A connection cut by the kill counts for the killed worker (read or not); its
            // response counts if the worker had written the status line when it was stopped
            // (a response starts at its first write; the client saw the body cut). Each
            // worker that exited is reported stopped once: those the clients saw, and
            // perhaps one that served only the harness's readiness request.
            if (ok..=connections).contains(&ok_counted)
                && (accepted, closed) == (connections, connections)
                && (exited_workers..=exited_workers + 1).contains(&stops)
            {
                Ok((m, exited_workers))
            } else {
                Err((ok_counted, accepted, closed, stops, exited_workers))
            }
        },
    );
    let requests = metrics.total("server_requests_total", &[("server", SERVER)]);
    assert!(
        (ok..=connections).contains(&requests),
        "{requests} requests: {ok} answered, {} cut",
        connections - ok
    );
    Outcome {
        metrics,
        exited_workers,
    }
}

/// SIGKILL a worker that has answered the clients (so the kernel holds counters of it: a
/// process that never served and whose fork and exit events were both lost to a full ring
/// left nothing to report) and that is not ending on its own (a recycled worker may already
/// be exiting: its status then says exit_0, whatever is sent to it). Stopped first (state
/// T), it is not exiting, and the SIGKILL is what ends it. The youngest such worker: one
/// about to be recycled is less likely.
fn kill_a_worker(parent: u32, served: &Mutex<BTreeSet<u32>>) -> u32 {
    let state = |pid: u32| {
        procfs::process::Process::new(pid as i32)
            .and_then(|p| p.stat())
            .map(|s| s.state)
    };
    eventually(
        "a worker that served stopped, then killed",
        Duration::from_secs(10),
        || {
            let served = served.lock().unwrap().clone();
            let Some(victim) = servers::live_children(parent)
                .into_iter()
                .rev()
                .find(|pid| served.contains(pid))
            else {
                std::thread::sleep(Duration::from_millis(5));
                return Err(0);
            };
            assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGSTOP) }, 0);
            for _ in 0..100 {
                match state(victim) {
                    Ok('T') => {
                        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
                        return Ok(victim);
                    }
                    Ok('Z') | Err(_) => return Err(victim), // it was exiting: another one
                    Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            unsafe { libc::kill(victim as i32, libc::SIGCONT) }; // not stopped yet: let it be
            Err(victim)
        },
    )
}

fn stopped(m: &Metrics, reason: &str) -> u64 {
    m.total(
        "server_stopped_total",
        &[("server", SERVER), ("reason", reason)],
    )
}

fn stopped_total(m: &Metrics) -> u64 {
    m.total("server_stopped_total", &[("server", SERVER)])
}

#[test]
fn a_stopped_daemon_reads_every_queued_event_and_reports_the_kill_with_its_signal() {
    let Outcome { metrics: m, .. } = stalled_run(|_| 0);
    assert_eq!(
        m.total("flyprobe_dropped_events_total", &[]),
        0,
        "a 10 s stall fits the event ring"
    );
    assert_eq!(
        stopped(&m, "signal_SIGKILL"),
        1,
        "the worker killed during the stall:\n{}",
        m.text
            .lines()
            .filter(|l| l.starts_with("server_stopped_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(stopped(&m, "unknown"), 0, "every exit event was read");
}

#[test]
fn events_lost_to_a_full_ring_lose_no_counts_and_exits_are_reconciled() {
    // 4,000 forks and exits during the stall: 8,000 events, where the 256 KiB ring holds
    // about 6,500 (40 bytes each); the recycling during the stall adds to them.
    let Outcome {
        metrics: m,
        exited_workers,
    } = stalled_run(|port| {
        let mut conn = Conn::connect(port).expect("connect");
        // 4,000 forks of a Python worker took over 30 s in CI with the syscall hooks.
        conn.set_read_timeout(Duration::from_secs(150)).unwrap();
        let resp = conn.get("/spawn?n=4000").expect("GET /spawn");
        assert_eq!(resp.status, 200);
        conn.close();
        1
    });
    let lost = m.total(
        "flyprobe_dropped_events_total",
        &[("reason", "event_ring_full")],
    );
    assert!(lost > 0, "the fork burst overflowed the event ring");
    assert!(
        stopped(&m, "unknown") >= 1,
        "workers whose exit events were lost are reported stopped, reason unknown"
    );
    eprintln!("{lost} events lost; {exited_workers} workers exited");
}
