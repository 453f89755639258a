//! Worker churn, as deployments make it: gunicorn recycling each worker after 10 requests
//! (`--max-requests`), 20,000 requests. An exited worker keeps its own series for
//! `--worker-retention`, then leaves /metrics, its counters folded into the server's
//! `pid="retired"` series: /metrics does not grow with every recycled worker, the totals
//! stay exact, and the daemon's memory stays flat.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flyprobe_tests::{client::Conn, eventually, flyprobe::Flyprobe, require_root, servers};

const SERVER: &str = "churn";
const WORKERS: u32 = 4;
const RETENTION: Duration = Duration::from_secs(2);
/// The retention is checked by the daemon's 1 s sweep after a 300 ms retire grace: a worker
/// may keep its series this much longer.
const SWEEP_SLACK: Duration = Duration::from_millis(2500);

/// The daemon's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn recycled_workers_leave_metrics_after_their_retention_and_totals_stay_exact() {
    require_root();
    let total: u64 = 20_000;
    let server = servers::gunicorn_recycling(WORKERS, 10);
    let port = server.port;
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        SERVER,
        "--worker-retention",
        "2s",
    ]);
    let sent = Arc::new(AtomicU64::new(0));
    // When each worker last answered: a worker exits right after its last response.
    let last_seen: Arc<Mutex<BTreeMap<u32, Instant>>> = Arc::default();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (sent, last_seen) = (sent.clone(), last_seen.clone());
            std::thread::spawn(move || {
                while sent.fetch_add(1, Ordering::SeqCst) < total {
                    let mut conn = Conn::connect(port).expect("connect");
                    let resp = conn.get("/").expect("GET /");
                    assert_eq!(resp.status, 200);
                    let pid = resp.worker_pid.expect("x-worker-pid");
                    last_seen.lock().unwrap().insert(pid, Instant::now());
                    conn.close();
                }
            })
        })
        .collect();

    let mut rss_at_5000 = None;
    let mut checks = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        std::thread::sleep(Duration::from_millis(500));
        let done = sent.load(Ordering::SeqCst).min(total);
        // Workers that answered within the retention (plus the sweep's slack) before the
        // scrape may still have their own series; the live ones do.
        let recent = {
            let seen = last_seen.lock().unwrap();
            let since = Instant::now() - RETENTION - SWEEP_SLACK;
            seen.values().filter(|t| **t >= since).count()
        };
        let m = fp.scrape();
        let pids: BTreeSet<String> = m
            .series("server_requests_total", &[("server", SERVER)])
            .into_iter()
            .map(|(labels, _)| labels["pid"].clone())
            .filter(|pid| pid != "retired")
            .collect();
        assert!(
            pids.len() <= WORKERS as usize + recent,
            "{} pid labels after {done} requests, with {WORKERS} workers and {recent} that \
             answered within the retention window: {pids:?}",
            pids.len()
        );
        checks += 1;
        if rss_at_5000.is_none() && done >= 5_000 {
            rss_at_5000 = Some(rss_kib(fp.pid()));
        }
    }
    for c in clients {
        c.join().unwrap();
    }
    let rss_at_end = rss_kib(fp.pid());
    let m = eventually(
        &format!("{total} requests counted"),
        Duration::from_secs(20),
        || {
            let m = fp.scrape();
            let counted = m.total("server_requests_total", &[("server", SERVER)]);
            if counted == total {
                Ok(m)
            } else {
                Err(counted)
            }
        },
    );
    let retired = m.total(
        "server_requests_total",
        &[("server", SERVER), ("pid", "retired")],
    );
    assert!(
        retired > total / 2,
        "most requests were served by workers folded into pid=\"retired\" ({retired})"
    );
    let stopped = m.total("server_stopped_total", &[("server", SERVER)]);
    assert!(
        stopped >= total / 10 - u64::from(WORKERS) * 2,
        "about one worker stop per 10 requests: {stopped}"
    );
    let rss_at_5000 = rss_at_5000.expect("a sample at 5,000 requests");
    let growth = rss_at_end as f64 / rss_at_5000 as f64;
    assert!(
        (0.9..=1.1).contains(&growth),
        "daemon RSS {rss_at_5000} KiB at 5,000 requests, {rss_at_end} KiB at {total}"
    );
    eprintln!(
        "{total} requests, {stopped} workers recycled, {retired} requests folded into \
         pid=\"retired\", {checks} checks of the pid labels; daemon RSS {rss_at_5000} -> \
         {rss_at_end} KiB"
    );
}
