//! flyprobe watching real servers driven by a real client: connection and request counts
//! must equal what the client did and what the server says (x-worker-pid) served each one.

use std::{collections::BTreeMap, thread, time::Duration};

use flyprobe_tests::{
    client::{Conn, Response},
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, Server},
};

const ACCEPTED: &str = "server_connections_accepted_total";
const CLOSED: &str = "server_connections_closed_total";
const ACTIVE: &str = "server_active_connections";
const REQUESTS: &str = "server_requests_total";
const IN_FLIGHT: &str = "server_in_flight_requests";
const QUEUED: &str = "server_queued_connections";
const SETTLE: Duration = Duration::from_secs(10);

/// What the client did, and which process the server says served each request.
#[derive(Default, Debug)]
struct Ledger {
    connections: u64,
    requests: u64,
    served_by: BTreeMap<u32, u64>,
}

impl Ledger {
    fn record(&mut self, resp: &Response) {
        assert_eq!(resp.status, 200, "unexpected response {resp:?}");
        self.requests += 1;
        let pid = resp.worker_pid.expect("every response names its worker");
        *self.served_by.entry(pid).or_default() += 1;
    }

    fn connect(&mut self, port: u16) -> Conn {
        self.connections += 1;
        Conn::connect(port).expect("connecting to the server")
    }

    /// flyprobe's totals equal the ledger, per process and in sum, with nothing open.
    fn assert_matches(&self, m: &Metrics, server: &str) {
        assert_eq!(
            m.sum(ACCEPTED, server),
            self.connections,
            "accepted\n{}",
            m.text
        );
        assert_eq!(
            m.sum(CLOSED, server),
            self.connections,
            "closed\n{}",
            m.text
        );
        assert_eq!(
            m.sum(REQUESTS, server),
            self.requests,
            "requests\n{}",
            m.text
        );
        let mut counted = m.by_pid(REQUESTS, server);
        counted.retain(|_, n| *n > 0);
        assert_eq!(counted, self.served_by, "requests per worker\n{}", m.text);
        assert_eq!(m.sum(ACTIVE, server), 0);
        assert_eq!(m.sum(IN_FLIGHT, server), 0);
    }
}

fn settled(fp: &Flyprobe, server: &str, active: u64, in_flight: u64) -> Metrics {
    eventually(
        &format!("{server}: active == {active}, in flight == {in_flight}"),
        SETTLE,
        || {
            let m = fp.scrape();
            let seen = (m.sum(ACTIVE, server), m.sum(IN_FLIGHT, server));
            if seen == (active, in_flight) {
                Ok(m)
            } else {
                Err(seen)
            }
        },
    )
}

fn exercise(server: &Server, label: &str, workers: u64) {
    let fp = Flyprobe::watch(server.pid());
    let m = eventually(
        &format!("{label}: server_workers == {workers}"),
        SETTLE,
        || {
            let m = fp.scrape();
            match m.get("server_workers", &[("server", label)]) {
                Some(w) if w as u64 == workers => Ok(m),
                other => Err(other),
            }
        },
    );
    let worker_pids: Vec<u32> = m.by_pid(ACTIVE, label).into_keys().collect();
    assert_eq!(
        worker_pids.len() as u64,
        workers,
        "one series per worker\n{}",
        m.text
    );
    let port = server.port;
    let mut ledger = Ledger::default();

    // Fresh connections with one request each, then keep-alive requests over a few.
    for _ in 0..20 {
        let mut conn = ledger.connect(port);
        ledger.record(&conn.get("/").unwrap());
        conn.close();
    }
    for _ in 0..3 {
        let mut conn = ledger.connect(port);
        for _ in 0..10 {
            ledger.record(&conn.get("/").unwrap());
        }
        conn.close();
    }
    ledger.assert_matches(&settled(&fp, label, 0, 0), label);
    for pid in ledger.served_by.keys() {
        assert!(
            worker_pids.contains(pid),
            "pid {pid} served but is not a worker series"
        );
    }
    assert!(
        !worker_pids.contains(&server.pid()) || workers == 1,
        "the supervisor is not a worker"
    );

    // Connections held open (no request): each is counted exactly once, as active for the
    // worker that has touched it (hyper reads at once) or, until a worker reads, writes or
    // closes it, as queued on the server (uvloop waits for data: the socket hooks see no
    // accept), then all drop to 0.
    let held: Vec<Conn> = (0..5).map(|_| ledger.connect(port)).collect();
    let open = |m: &Metrics| {
        let queued = m.get(QUEUED, &[("server", label)]).unwrap_or(0.0) as u64;
        (m.sum(ACTIVE, label), queued)
    };
    let m = eventually(&format!("{label}: 5 held open"), SETTLE, || {
        let m = fp.scrape();
        let (active, queued) = open(&m);
        if active + queued == 5 {
            Ok(m)
        } else {
            Err((active, queued))
        }
    });
    let (_, queued) = open(&m);
    assert_eq!(m.sum(ACCEPTED, label) + queued, ledger.connections);
    thread::sleep(Duration::from_millis(1300));
    let (active, queued) = open(&fp.scrape());
    assert_eq!(active + queued, 5, "held connections stay exact");
    held.into_iter().for_each(|c| {
        c.close();
    });
    eventually(
        &format!("{label}: nothing open or queued"),
        SETTLE,
        || match open(&fp.scrape()) {
            (0, 0) => Ok(()),
            seen => Err(seen),
        },
    );
    let m = settled(&fp, label, 0, 0);
    assert_eq!(
        m.sum(ACCEPTED, label),
        ledger.connections,
        "held ones accepted once closed"
    );

    // Concurrent slow requests are in flight while the server waits, and not after.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let mut conn = ledger.connect(port);
            thread::spawn(move || {
                let resp = conn.get("/slow?ms=3000").unwrap();
                conn.close();
                resp
            })
        })
        .collect();
    settled(&fp, label, 4, 4);
    for handle in slow {
        ledger.record(&handle.join().unwrap());
    }
    ledger.assert_matches(&settled(&fp, label, 0, 0), label);
    eprintln!("{label}: {ledger:?} counted exactly");

    let log = fp.stop();
    assert!(log.contains("detached"), "flyprobe logs its detach:\n{log}");
}

#[test]
fn uvicorn_with_two_workers() {
    require_root();
    let server = servers::uvicorn(2);
    exercise(&server, "uvicorn", 2);
}

#[test]
fn rust_axum_server() {
    require_root();
    let server = servers::rust_server();
    exercise(&server, "flyprobe-test-server", 1);
}
