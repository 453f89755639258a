//! The live dashboard (`GET /`) in headless Chromium, against the real daemon watching
//! gunicorn: the cards and the worker table must show what the client did and what
//! `/api/v1/snapshot` and `/metrics` report, and a SIGKILLed worker must appear in the
//! lifecycle feed with its replacement.
//!
//! Saves a screenshot to `target/dashboard.png` on every run (and
//! `target/dashboard-failed.png` when a wait times out); `FLYPROBE_UPDATE_SCREENSHOT=1` also
//! writes `docs/dashboard.png`.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use flyprobe_tests::{
    browser::Browser,
    client::{Conn, Response},
    eventually,
    flyprobe::{self, Flyprobe, log_path},
    free_port,
    procs::Guard,
    require_root,
    servers::{self, children},
    workspace,
};
use serde::Deserialize;

const SERVER: &str = "gunicorn";
/// Idle connections held open while the page is checked.
const IDLE: u64 = 3;
const SETTLE: Duration = Duration::from_secs(20);
const REQUESTS: &str = "server_requests_total";
const ACTIVE: &str = "server_active_connections";
const IN_FLIGHT: &str = "server_in_flight_requests";

// ---------- what the client did ----------

#[derive(Default, Debug, Clone, Copy, PartialEq)]
struct Classes {
    ok: u64,
    error: u64,
}

#[derive(Default, Debug, Clone)]
struct Ledger {
    requests: u64,
    by_pid: BTreeMap<u32, Classes>,
    /// Requests that got no response (only tolerated while a worker is being killed).
    failed: u64,
}

impl Ledger {
    fn record(&mut self, resp: &Response) {
        let pid = resp.worker_pid.expect("every response names its worker");
        let c = self.by_pid.entry(pid).or_default();
        match resp.status {
            200 => c.ok += 1,
            500 => c.error += 1,
            other => panic!("unexpected status {other}: {resp:?}"),
        }
        self.requests += 1;
    }

    fn merge(&mut self, other: &Ledger) {
        self.requests += other.requests;
        self.failed += other.failed;
        for (pid, c) in &other.by_pid {
            let mine = self.by_pid.entry(*pid).or_default();
            mine.ok += c.ok;
            mine.error += c.error;
        }
    }
}

/// Steady traffic from a background thread: sequential GETs, every 10th one `/error`
/// (500), in keep-alive batches of 50 on fresh connections (so both workers serve), each
/// connection closed — and its close seen from the server — before the next opens. So
/// while it runs, it holds at most one connection and one request in flight.
struct Traffic {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    handle: JoinHandle<Ledger>,
}

impl Traffic {
    fn start(port: u16, tolerate_failures: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), completed.clone());
        let handle = thread::spawn(move || {
            let mut ledger = Ledger::default();
            let mut n = 0u64;
            'connections: while !s.load(Ordering::Relaxed) {
                let mut conn = match Conn::connect(port) {
                    Ok(conn) => conn,
                    Err(e) if tolerate_failures => {
                        ledger.failed += 1;
                        eprintln!("[traffic] connect failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => panic!("connecting: {e}"),
                };
                for _ in 0..50 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = if n % 10 == 9 { "/error" } else { "/" };
                    match conn.get(path) {
                        Ok(resp) => {
                            ledger.record(&resp);
                            n += 1;
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if tolerate_failures => {
                            ledger.failed += 1;
                            eprintln!("[traffic] request failed: {e}");
                            continue 'connections;
                        }
                        Err(e) => panic!("GET {path}: {e}"),
                    }
                    // About 200 requests/s: steady, and leaves CPU for the browser.
                    thread::sleep(Duration::from_millis(4));
                }
                conn.close();
            }
            ledger
        });
        Self {
            stop,
            completed,
            handle,
        }
    }

    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Stop after the current request; every connection is closed when this returns.
    fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the traffic thread panicked")
    }
}

// ---------- what the API says ----------

#[derive(Deserialize, Debug, Clone)]
struct Snapshot {
    time: f64,
    servers: Vec<ServerSnap>,
    lifecycle: Vec<LifecycleEvent>,
}

#[derive(Deserialize, Debug, Clone)]
struct ServerSnap {
    server: String,
    uptime_seconds: f64,
    workers: u64,
    active_connections: u64,
    /// Open connections no worker has touched yet (the socket hooks see no accept).
    #[serde(default)]
    queued_connections: u64,
    in_flight_requests: u64,
    requests_total: u64,
    worker_list: Vec<WorkerSnap>,
}

impl ServerSnap {
    /// What the page's "Active connections" card shows: served and queued.
    fn open_connections(&self) -> u64 {
        self.active_connections + self.queued_connections
    }
}

#[derive(Deserialize, Debug, Clone)]
struct WorkerSnap {
    pid: u32,
    active_connections: u64,
    in_flight_requests: u64,
    requests_total: u64,
    status_classes: BTreeMap<String, u64>,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
struct LifecycleEvent {
    server: String,
    pid: u32,
    event: String,
    reason: Option<String>,
}

impl Snapshot {
    fn fetch(port: u16) -> Self {
        let resp = Conn::connect(port)
            .and_then(|mut c| c.get("/api/v1/snapshot"))
            .expect("GET /api/v1/snapshot");
        assert_eq!(resp.status, 200, "GET /api/v1/snapshot");
        serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
            panic!(
                "snapshot does not parse: {e}\n{}",
                String::from_utf8_lossy(&resp.body)
            )
        })
    }

    fn server(&self) -> &ServerSnap {
        self.servers
            .iter()
            .find(|s| s.server == SERVER)
            .unwrap_or_else(|| panic!("no {SERVER} in {self:?}"))
    }
}

impl ServerSnap {
    fn worker(&self, pid: u32) -> &WorkerSnap {
        self.worker_list
            .iter()
            .find(|w| w.pid == pid)
            .unwrap_or_else(|| panic!("no worker {pid} in {self:?}"))
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.worker_list.iter().map(|w| w.pid).collect()
    }
}

// ---------- what the page shows ----------

/// One value on the page: its text and its raw `data-value`.
#[derive(Deserialize, Debug, Clone)]
struct Shown {
    text: String,
    value: String,
}

impl Shown {
    /// An integer shown grouped (`1,234`) whose `data-value` is the same number.
    fn int(&self) -> u64 {
        let raw: u64 = self
            .value
            .parse()
            .unwrap_or_else(|_| panic!("not an integer: {self:?}"));
        assert_eq!(
            self.text,
            grouped(raw),
            "text and data-value differ: {self:?}"
        );
        raw
    }

    fn float(&self) -> f64 {
        self.value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {self:?}"))
    }
}

#[derive(Deserialize, Debug, Clone)]
struct Row {
    pid: u32,
    cells: BTreeMap<String, Shown>,
}

impl Row {
    fn cell(&self, field: &str) -> &Shown {
        self.cells
            .get(field)
            .unwrap_or_else(|| panic!("no td[data-field={field}] in {self:?}"))
    }
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
struct Entry {
    pid: u32,
    event: String,
    reason: Option<String>,
    time: f64,
    text: String,
}

#[derive(Deserialize, Debug, Clone)]
struct View {
    updates: u64,
    time: f64,
    status: String,
    cards: BTreeMap<String, Shown>,
    workers: Vec<Row>,
    lifecycle: Vec<Entry>,
    /// Resources the page loaded from anywhere but its own origin.
    foreign: Vec<String>,
}

/// Reads the page through its test hooks only: `data-testid` cards, `#workers tr[data-pid]`
/// with `td[data-field]`, `#lifecycle li[data-pid][data-event]`, `#status`, and
/// `body[data-updates]` / `body[data-time]`.
const READ_VIEW: &str = r#"
const q = (s) => document.querySelector(s);
const shown = (e) => ({ text: e.textContent.trim(), value: e.dataset.value ?? '' });
const cards = {};
for (const e of document.querySelectorAll('[data-testid^="card-"]')) cards[e.dataset.testid.slice(5)] = shown(e);
return {
  updates: Number(document.body.dataset.updates || 0),
  time: Number(document.body.dataset.time || 0),
  status: q('#status').textContent.trim(),
  cards,
  workers: Array.from(document.querySelectorAll('#workers tr[data-pid]'), (tr) => ({
    pid: Number(tr.dataset.pid),
    cells: Object.fromEntries(Array.from(tr.querySelectorAll('td[data-field]'),
      (td) => [td.dataset.field, shown(td)])),
  })),
  lifecycle: Array.from(document.querySelectorAll('#lifecycle li[data-pid][data-event]'), (li) => ({
    pid: Number(li.dataset.pid), event: li.dataset.event, reason: li.dataset.reason || null,
    time: Number(li.dataset.time), text: li.textContent.replace(/\s+/g, ' ').trim(),
  })),
  foreign: performance.getEntriesByType('resource').map((e) => e.name)
    .filter((n) => !n.startsWith(location.origin + '/')),
};
"#;

impl View {
    fn card(&self, name: &str) -> &Shown {
        self.cards
            .get(name)
            .unwrap_or_else(|| panic!("no [data-testid=card-{name}] in {self:?}"))
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.workers.iter().map(|r| r.pid).collect()
    }

    fn entry(&self, pid: u32, event: &str) -> Option<(usize, &Entry)> {
        self.lifecycle
            .iter()
            .enumerate()
            .find(|(_, e)| e.pid == pid && e.event == event)
    }
}

/// `n` as the page shows integers (en-US grouping).
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// A duration as the page shows it: `42s`, `5m 07s`, `3h 04m`, `2d 03h`.
fn human(seconds: f64) -> String {
    let s = seconds.max(0.0).floor() as u64;
    let (d, h, m, sec) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    match () {
        _ if d > 0 => format!("{d}d {h:02}h"),
        _ if h > 0 => format!("{h}h {m:02}m"),
        _ if m > 0 => format!("{m}m {sec:02}s"),
        _ => format!("{sec}s"),
    }
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    workspace().join("target").join(name)
}

fn read_view(browser: &Browser) -> View {
    browser.eval(READ_VIEW)
}

/// Poll the page until `check` accepts it; on timeout, save a screenshot and fail with the
/// last view.
fn wait_view(
    browser: &Browser,
    what: &str,
    timeout: Duration,
    check: impl Fn(&View) -> bool,
) -> View {
    let deadline = Instant::now() + timeout;
    loop {
        let view = read_view(browser);
        if check(&view) {
            return view;
        }
        if Instant::now() >= deadline {
            let shot = screenshot_path("dashboard-failed.png");
            browser.screenshot(&shot);
            panic!(
                "timed out after {timeout:?} waiting for the page to show {what} (screenshot: {})\nlast seen: {view:#?}\nchromedriver log tail:\n{}",
                shot.display(),
                tail(&browser.driver_log(), 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Wait for `n` more stream events than `view` had.
fn more_updates(browser: &Browser, view: &View, n: u64) -> View {
    let want = view.updates + n;
    let timeout = SETTLE + Duration::from_secs(2 * n);
    wait_view(browser, &format!("{want} stream updates"), timeout, |v| {
        v.updates >= want
    })
}

#[test]
fn dashboard_shows_live_values_and_worker_restarts() {
    require_root();
    let server = servers::gunicorn(2);
    let (master, port) = (server.pid(), server.port);
    let fp = Flyprobe::watch(master);
    let initial: BTreeSet<u32> = children(master).into_iter().collect();
    assert_eq!(initial.len(), 2, "gunicorn forked 2 workers");
    eventually("flyprobe to see gunicorn's 2 workers", SETTLE, || {
        let s = Snapshot::fetch(fp.port);
        let pids = s.server().pids();
        if pids == initial { Ok(()) } else { Err(pids) }
    });

    // Idle connections that never send a request: gunicorn closes keep-alive connections
    // 2 s after a response, but leaves these open.
    let mut ledger = Ledger::default();
    let idle: Vec<Conn> = (0..IDLE)
        .map(|_| Conn::connect(port).expect("connecting"))
        .collect();
    eventually("the idle connections open", SETTLE, || {
        let s = Snapshot::fetch(fp.port);
        let open = s.server().open_connections();
        if open == IDLE { Ok(()) } else { Err(open) }
    });
    let traffic = Traffic::start(port, false);
    eventually("traffic to flow", SETTLE, || {
        let n = traffic.completed();
        if n >= 100 { Ok(()) } else { Err(n) }
    });

    let browser = Browser::start(1400, 800);
    browser.goto(&format!("http://127.0.0.1:{}/", fp.port));
    let view = wait_view(&browser, "3 stream updates, live", SETTLE, |v| {
        v.updates >= 3 && v.status == "live"
    });
    assert!(
        view.foreign.is_empty(),
        "the page loads nothing from another origin: {:?}",
        view.foreign
    );

    // ---- live: cards and table against snapshots taken just before and just after ----
    let before = Snapshot::fetch(fp.port);
    let view = wait_view(&browser, "an update newer than the snapshot", SETTLE, |v| {
        v.time > before.time
    });
    let after = Snapshot::fetch(fp.port);
    let (b, a) = (before.server(), after.server());
    let live = |what: &str, shown: u64, lo: u64, hi: u64| {
        assert!(
            (lo..=hi).contains(&shown),
            "{what}: page shows {shown}, expected {lo}..={hi}\n{view:#?}"
        );
    };
    assert_eq!(view.status, "live");
    assert_eq!(view.card("workers").int(), 2, "{view:#?}");
    assert_eq!((b.workers, a.workers), (2, 2));
    // The idle connections, plus the traffic's one unless it is between connections.
    live("active", view.card("active").int(), IDLE, IDLE + 1);
    live("snapshot active", b.open_connections(), IDLE, IDLE + 1);
    live("in flight", view.card("inflight").int(), 0, 1);
    live("snapshot in flight", a.in_flight_requests, 0, 1);
    live(
        "requests",
        view.card("requests").int(),
        b.requests_total,
        a.requests_total,
    );
    let uptime = view.card("uptime").float();
    assert!(
        b.uptime_seconds - 0.01 <= uptime && uptime <= a.uptime_seconds + 0.01,
        "uptime {uptime} outside [{}, {}]",
        b.uptime_seconds,
        a.uptime_seconds
    );
    assert_eq!(view.card("uptime").text, human(uptime));
    // Requests/s: of the order of what the snapshots show over the same time.
    let rps = view.card("rps").float();
    let measured = (a.requests_total - b.requests_total) as f64 / (after.time - before.time);
    assert!(
        rps > 0.0 && rps > measured / 3.0 && rps < measured * 3.0,
        "requests/s: page {rps}, snapshots {measured}"
    );
    // Every 10th request of the traffic answers 500.
    let errors = view.card("errors").float();
    assert!(
        (0.03..=0.25).contains(&errors),
        "error rate {errors} (the traffic sends 10 % /error)\n{view:#?}"
    );
    assert!(view.card("errors").text.ends_with('%'), "{view:#?}");
    // The table: exactly gunicorn's workers; rows add up to the cards (one event).
    assert_eq!(view.pids(), initial, "table rows are gunicorn's children");
    assert_eq!(a.pids(), initial);
    let sum = |field: &str| -> u64 { view.workers.iter().map(|r| r.cell(field).int()).sum() };
    // The card counts open connections: the rows' plus the idle ones no worker touched.
    assert_eq!(
        b.queued_connections, a.queued_connections,
        "idle ones stay queued"
    );
    assert_eq!(
        sum("active") + a.queued_connections,
        view.card("active").int()
    );
    assert_eq!(sum("inflight"), view.card("inflight").int());
    assert_eq!(
        sum("requests"),
        view.card("requests").int(),
        "no worker exited yet"
    );
    let row_rps: f64 = view.workers.iter().map(|r| r.cell("rps").float()).sum();
    assert!(
        (row_rps - rps).abs() <= 1e-6 * rps.max(1.0),
        "per-worker req/s {row_rps} vs {rps}"
    );
    for row in &view.workers {
        let requests = row.cell("requests").int();
        live(
            &format!("worker {} requests", row.pid),
            requests,
            b.worker(row.pid).requests_total,
            a.worker(row.pid).requests_total,
        );
        assert_eq!(
            row.cell("status-2xx").int() + row.cell("status-5xx").int(),
            requests,
            "{row:?}"
        );
        assert_eq!(
            row.cell("status-3xx").int() + row.cell("status-4xx").int(),
            0
        );
        assert_eq!(row.cell("pid").text, row.pid.to_string());
        assert!(!row.cell("comm").text.is_empty(), "{row:?}");
    }

    // ---- quiet: the traffic stops, one slow request stays in flight; exact values ----
    let slow = thread::spawn(move || Conn::connect(port).and_then(|mut c| c.get("/slow?ms=15000")));
    ledger.merge(&traffic.stop());
    assert_eq!(ledger.failed, 0);
    let view = wait_view(
        &browser,
        "every request counted, nothing moving",
        SETTLE,
        |v| {
            v.card("requests").int() == ledger.requests
                && v.card("active").int() == IDLE + 1
                && v.card("inflight").int() == 1
                && v.card("rps").float() == 0.0
        },
    );
    let snap = Snapshot::fetch(fp.port);
    let m = fp.scrape();
    let s = snap.server();
    assert_eq!(
        (
            s.workers,
            s.open_connections(),
            s.in_flight_requests,
            s.requests_total
        ),
        (
            view.card("workers").int(),
            view.card("active").int(),
            view.card("inflight").int(),
            view.card("requests").int()
        ),
        "page vs /api/v1/snapshot"
    );
    assert_eq!(m.sum(REQUESTS, SERVER), ledger.requests, "{}", m.text);
    let shown: BTreeMap<u32, u64> = view
        .workers
        .iter()
        .map(|r| (r.pid, r.cell("requests").int()))
        .collect();
    assert_eq!(
        shown,
        m.by_pid(REQUESTS, SERVER),
        "requests per worker vs /metrics"
    );
    for row in &view.workers {
        let pid = row.pid;
        let did = ledger.by_pid.get(&pid).copied().unwrap_or_default();
        let w = s.worker(pid);
        assert_eq!(
            (row.cell("status-2xx").int(), row.cell("status-5xx").int()),
            (did.ok, did.error),
            "worker {pid}: status classes vs what the client got"
        );
        assert_eq!(
            (w.status_classes["2xx"], w.status_classes["5xx"]),
            (did.ok, did.error)
        );
        let p = pid.to_string();
        let labels = [("server", SERVER), ("pid", p.as_str())];
        assert_eq!(
            (row.cell("active").int(), row.cell("inflight").int()),
            (
                m.get(ACTIVE, &labels).unwrap_or(-1.0) as u64,
                m.get(IN_FLIGHT, &labels).unwrap_or(-1.0) as u64
            ),
            "worker {pid}: gauges vs /metrics"
        );
        assert_eq!(
            (w.active_connections, w.in_flight_requests, w.requests_total),
            (
                row.cell("active").int(),
                row.cell("inflight").int(),
                row.cell("requests").int()
            )
        );
    }
    assert!(
        view.lifecycle.is_empty(),
        "no starts or stops yet: {view:#?}"
    );

    // ---- a worker SIGKILLed while traffic runs: the feed shows the stop and the start ----
    // Two clients now, so that both workers serve at once in the screenshot.
    let traffic = [Traffic::start(port, true), Traffic::start(port, true)];
    let victim = *initial.first().unwrap();
    // SAFETY: kill(2) on a gunicorn worker this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let now: BTreeSet<u32> = eventually("gunicorn to replace the killed worker", SETTLE, || {
        let c: BTreeSet<u32> = children(master).into_iter().collect();
        if c.len() == 2 && !c.contains(&victim) {
            Ok(c)
        } else {
            Err(c)
        }
    });
    let fresh = *now.difference(&initial).next().expect("one new worker");
    let view = wait_view(&browser, "the kill and the replacement", SETTLE, |v| {
        v.entry(victim, "stopped").is_some()
            && v.entry(fresh, "started").is_some()
            && v.pids() == now
    });
    let (i_stop, stop) = view.entry(victim, "stopped").unwrap();
    let (i_start, start) = view.entry(fresh, "started").unwrap();
    assert_eq!(stop.reason.as_deref(), Some("signal_SIGKILL"), "{view:#?}");
    assert!(stop.text.contains("signal_SIGKILL") && stop.text.contains(&victim.to_string()));
    assert_eq!(start.reason, None);
    assert!(
        i_start < i_stop && start.time >= stop.time,
        "newest first: the replacement above the kill\n{view:#?}"
    );
    assert_eq!(view.lifecycle.len(), 2, "{view:#?}");
    let feed = Snapshot::fetch(fp.port).lifecycle;
    let from_api: Vec<(u32, String, Option<String>)> = feed
        .iter()
        .rev()
        .filter(|e| e.server == SERVER)
        .map(|e| (e.pid, e.event.clone(), e.reason.clone()))
        .collect();
    let on_page: Vec<(u32, String, Option<String>)> = view
        .lifecycle
        .iter()
        .map(|e| (e.pid, e.event.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        on_page, from_api,
        "the feed is the snapshot's lifecycle, newest first"
    );
    // For the README's screenshot, let the charts fill up.
    let update_docs = std::env::var("FLYPROBE_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
    let view = more_updates(&browser, &view, if update_docs { 45 } else { 6 });
    assert_eq!(view.card("workers").int(), 2);
    assert_eq!(view.status, "live");

    let shot = screenshot_path("dashboard.png");
    browser.screenshot(&shot);
    eprintln!("[dashboard] screenshot: {}", shot.display());
    if update_docs {
        let docs = workspace().join("docs/dashboard.png");
        std::fs::copy(&shot, &docs).expect("copying the screenshot to docs/");
        eprintln!("[dashboard] updated {}", docs.display());
    }
    for t in traffic {
        t.stop();
    }
    drop(idle);
    drop(browser);
    let _ = slow; // answered by now, or cut by the kill: either way not waited for
    fp.stop();
}

#[test]
fn dashboard_shows_disconnected_when_the_stream_ends() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let browser = Browser::start(1000, 800);
    browser.goto(&format!("http://127.0.0.1:{}/", fp.port));
    let view = wait_view(&browser, "2 stream updates, live", SETTLE, |v| {
        v.updates >= 2 && v.status == "live"
    });
    assert_eq!(view.card("workers").int(), 1);
    assert_eq!(view.pids(), BTreeSet::from([server.pid()]));
    fp.stop();
    let view = wait_view(&browser, "the disconnected badge", SETTLE, |v| {
        v.status == "disconnected"
    });
    // What was last shown stays on the page.
    assert_eq!(view.card("workers").int(), 1);
}

/// A self-signed P-256 certificate for 127.0.0.1 and localhost (valid until 2126), and its
/// key: test material only.
const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBozCCAUmgAwIBAgIUJdyzYe2/4Y0xHWh6ayPfpMGAY90wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNZmx5cHJvYmUgdGVzdDAgFw0yNjExMjUyMTI4MTdaGA8yMTI2
MTEwMTIxMjgxN1owGDEWMBQGA1UEAwwNZmx5cHJvYmUgdGVzdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABP19z8QEFTSkcOCJ/PrkCOw2BZmWoWj1FlX3ZjLyWe92
g+mRCVO+1IUkA6kPC5OlBJQx655pr07GnZtM/2OznmejbzBtMB0GA1UdDgQWBBTV
eerkYR35TmsU01fbPwBcQzF91DAfBgNVHSMEGDAWgBTVeerkYR35TmsU01fbPwBc
QzF91DAPBgNVHRMBAf8EBTADAQH/MBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9z
dDAKBggqhkjOPQQDAgNIADBFAiBBGGw/wUeJdnU4AwZEWfMcwKYQe3dYi7mzj/Jx
inLTwgIhAKaRv2T3Sd1eoEGqohW8KnRuVRbijdUJD4JPsIxmuTV+
-----END CERTIFICATE-----
";
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgECFy4Nh6Mm4OBS3U
LtSPekINc87pUNZHynItn41jQS6hRANCAAT9fc/EBBU0pHDgifz65AjsNgWZlqFo
9RZV92Yy8lnvdoPpkQlTvtSFJAOpDwuTpQSUMeueaa9Oxp2bTP9js55n
-----END PRIVATE KEY-----
";
/// bcrypt (cost 4) of `dashboard-test-password`.
const TEST_HASH: &str = "$2b$04$kzlw6jvd5oP/oJeXW5yhIuO8591cb13lA1a41RDF.ORUc5vghcwV.";

#[test]
fn dashboard_works_behind_tls_and_basic_auth() {
    require_root();
    let server = servers::rust_server();
    let dir = std::env::temp_dir().join(format!("flyprobe-web-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), TEST_CERT).unwrap();
    std::fs::write(dir.join("key.pem"), TEST_KEY).unwrap();
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
             basic_auth_users:\n  viewer: '{TEST_HASH}'\n"
        ),
    )
    .unwrap();
    // Started by hand: the harness's readiness check scrapes over plain HTTP.
    let port = free_port();
    let log = log_path("flyprobe-tls");
    let mut fp = Guard::spawn(
        "flyprobe",
        Command::new(flyprobe::bin())
            .args(["--pid-tree", &server.pid().to_string()])
            .arg("--web.config.file")
            .arg(dir.join("web.yml"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let flyprobe_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("flyprobe to listen", SETTLE, || {
        if let Ok(Some(status)) = fp.child.try_wait() {
            panic!("flyprobe exited early ({status}):\n{}", flyprobe_log());
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
    // Without credentials nothing is served.
    assert!(
        Conn::connect(port).and_then(|mut c| c.get("/")).is_err(),
        "plain HTTP is refused on a TLS endpoint"
    );

    let browser = Browser::start(1000, 800);
    browser.goto(&format!(
        "https://viewer:dashboard-test-password@127.0.0.1:{port}/"
    ));
    let view = wait_view(
        &browser,
        "2 stream updates over TLS with basic auth",
        SETTLE,
        |v| v.updates >= 2 && v.status == "live",
    );
    assert_eq!(view.card("workers").int(), 1, "{}", flyprobe_log());
    assert_eq!(view.pids(), BTreeSet::from([server.pid()]));
    assert!(view.foreign.is_empty(), "{:?}", view.foreign);
    drop(browser);
    fp.signal(libc::SIGTERM);
    assert!(
        fp.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "flyprobe exits 0 on SIGTERM:\n{}",
        flyprobe_log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
