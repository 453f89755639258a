//! Threads are not processes. A thread-per-connection server starts a thread for every
//! connection and ends it with the connection; none of that is a lifecycle event (the
//! kernel tells a new thread from a new process), so a thread storm cannot fill the event
//! ring and crowd out a worker's real exit.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use flyprobe_tests::{client::Conn, eventually, flyprobe::Flyprobe, require_root, servers};

const SERVER: &str = "threaded";
const CONNECTIONS: u64 = 5_000;

/// The live (not zombie) children of `pid`, once there are `n`.
fn live_workers(pid: u32, n: usize) -> Vec<u32> {
    eventually(
        &format!("{n} live workers"),
        Duration::from_secs(10),
        || {
            let live = servers::live_children(pid);
            if live.len() == n { Ok(live) } else { Err(live) }
        },
    )
}

#[test]
fn a_thread_per_connection_server_sends_no_thread_events_and_its_killed_worker_is_reported() {
    require_root();
    let (server, _stdout) = servers::socket_app("threads", &["--workers", "2"]);
    let (port, workers) = (server.port, live_workers(server.pid(), 2));
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        SERVER,
    ]);
    let (answered, cut, made) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (answered, cut, made) = (answered.clone(), cut.clone(), made.clone());
            std::thread::spawn(move || {
                while made.fetch_add(1, Ordering::SeqCst) < CONNECTIONS {
                    let mut conn = Conn::connect(port).expect("connect");
                    match conn.get("/") {
                        Ok(resp) => {
                            assert_eq!(resp.status, 200);
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    conn.close();
                }
            })
        })
        .collect();
    eventually("half the connections made", Duration::from_secs(60), || {
        let n = made.load(Ordering::SeqCst);
        if n >= CONNECTIONS / 2 { Ok(()) } else { Err(n) }
    });
    let victim = workers[0];
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, cut) = (answered.load(Ordering::SeqCst), cut.load(Ordering::SeqCst));
    assert_eq!(ok + cut, CONNECTIONS);
    // A connection the killed worker had accepted counts for it: where it read it (the
    // request aborted), and where it held it untouched (closed as it exited).
    let m = eventually(
        &format!("{ok} responses and {CONNECTIONS} connections counted"),
        Duration::from_secs(20),
        || {
            let m = fp.scrape();
            let (ok_counted, accepted, closed) = m.served(SERVER);
            let stopped = m.total("server_stopped_total", &[("server", SERVER)]);
            if (ok_counted, accepted, closed, stopped) == (ok, CONNECTIONS, CONNECTIONS, 1) {
                Ok(m)
            } else {
                Err((ok_counted, accepted, closed, stopped))
            }
        },
    );
    assert_eq!(
        m.total("flyprobe_dropped_events_total", &[]),
        0,
        "no event dropped"
    );
    assert_eq!(
        m.total(
            "server_stopped_total",
            &[("server", SERVER), ("reason", "signal_SIGKILL")]
        ),
        1,
        "the killed worker, with its signal"
    );
    // One worker killed, one forked in its place: two events for 5,000 threads.
    let events = |kind| m.total("flyprobe_kernel_events_total", &[("kind", kind)]);
    assert_eq!((events("fork"), events("exit")), (1, 1), "process events");
    eprintln!(
        "{CONNECTIONS} connections on a thread each ({cut} cut by the kill of worker \
         {victim}): 1 fork and 1 exit event"
    );
}
