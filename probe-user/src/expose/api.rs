//! The JSON API behind the dashboard: `/api/v1/snapshot`, and `/api/v1/stream`, which sends a
//! snapshot per interval with rates computed against the same stream's previous event (so
//! every client has its own baseline). Shapes are documented in docs/api.md.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use probe_common::{
    DURATION_BOUNDS_NS, ReqStats,
    http::{STATUS_CLASSES, is_request, name_of},
};
use serde::Serialize;

use crate::{
    model::snapshot::{ServerView, Snapshot},
    processes::containers::Labels,
};

/// Status classes as the API names them: "" (no HTTP status) is "other".
const CLASSES: [&str; 7] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx", "aborted"];

#[derive(Debug, Clone, Serialize)]
pub struct ApiSnapshot {
    pub version: &'static str,
    pub time: f64,
    pub servers: Vec<ApiServer>,
    pub lifecycle: Vec<ApiEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiServer {
    pub server: String,
    pub labels: BTreeMap<&'static str, String>,
    pub up: bool,
    pub uptime_seconds: f64,
    pub workers: usize,
    pub active_connections: u64,
    pub queued_connections: u64,
    pub in_flight_requests: u64,
    pub requests_total: u64,
    pub status_classes: BTreeMap<&'static str, u64>,
    /// Read/write turns on connections without requests (TLS, not HTTP).
    pub exchanges_total: u64,
    pub latency: Latency,
    /// Waiting for a worker: handshake done to a worker's first touch (fentry and socket
    /// hooks; empty with the syscall hooks).
    pub queue_latency: Latency,
    /// The accept queues of its listening ports right now, summed.
    pub listen_queue_length: u64,
    pub listen_queue_limit: u64,
    /// Connections its listeners dropped (accept or SYN queue full; listeners in flyprobe's
    /// network namespace).
    pub listen_overflows: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub started_total: u64,
    pub stopped_total: BTreeMap<String, u64>,
    pub worker_list: Vec<ApiWorker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiWorker {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub uptime_seconds: f64,
    pub active_connections: u64,
    pub in_flight_requests: u64,
    pub requests_total: u64,
    pub status_classes: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiEvent {
    pub time: f64,
    pub server: String,
    pub labels: BTreeMap<&'static str, String>,
    pub pid: u32,
    pub event: &'static str,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Rates {
    pub interval_seconds: f64,
    pub requests_per_second: f64,
    pub error_rate: f64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Quantiles of the wait for a worker over the interval.
    pub queue_p50_seconds: Option<f64>,
    pub queue_p99_seconds: Option<f64>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn build(snap: &Snapshot, time: f64) -> ApiSnapshot {
    ApiSnapshot {
        version: env!("CARGO_PKG_VERSION"),
        time,
        servers: snap.servers.iter().map(server).collect(),
        lifecycle: snap
            .events
            .iter()
            .map(|e| ApiEvent {
                time: e.time,
                server: e.server.clone(),
                labels: label_map(&e.labels),
                pid: e.pid,
                event: if e.stopped.is_some() {
                    "stopped"
                } else {
                    "started"
                },
                reason: e.stopped.clone(),
            })
            .collect(),
    }
}

fn label_map(labels: &Labels) -> BTreeMap<&'static str, String> {
    labels
        .pairs()
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}

fn classes() -> BTreeMap<&'static str, u64> {
    CLASSES.iter().map(|c| (*c, 0)).collect()
}

fn class_of(status: u8) -> &'static str {
    match name_of(&STATUS_CLASSES, status) {
        "" => CLASSES[0],
        name => name,
    }
}

fn server(view: &ServerView) -> ApiServer {
    let mut status_classes = classes();
    let mut timed = ReqStats::default();
    let mut per_pid: BTreeMap<u32, (u64, BTreeMap<&'static str, u64>)> = BTreeMap::new();
    let mut exchanges_total = 0;
    for (key, stats) in &view.requests {
        if !is_request(key.protocol, key.method) {
            exchanges_total += stats.count;
            continue;
        }
        *status_classes.entry(class_of(key.status)).or_default() += stats.count;
        timed.add(stats);
        let entry = per_pid.entry(key.tgid).or_insert_with(|| (0, classes()));
        entry.0 += stats.count;
        *entry.1.entry(class_of(key.status)).or_default() += stats.count;
    }
    let latency = latency_of(&timed);
    let worker_list = view
        .workers
        .iter()
        .map(|w| {
            let stats = view
                .procs
                .iter()
                .find(|p| p.pid == w.pid)
                .map(|p| p.stats)
                .unwrap_or_default();
            let (requests_total, status_classes) = per_pid
                .get(&w.pid)
                .cloned()
                .unwrap_or_else(|| (0, classes()));
            ApiWorker {
                pid: w.pid,
                ppid: w.ppid,
                comm: w.comm.clone(),
                uptime_seconds: w.uptime_seconds,
                active_connections: stats.active(),
                in_flight_requests: stats.in_flight(),
                requests_total,
                status_classes,
                requests_per_second: None,
            }
        })
        .collect();
    ApiServer {
        server: view.server.clone(),
        labels: label_map(&view.labels),
        up: view.up,
        uptime_seconds: view.uptime_seconds,
        workers: view.workers.len(),
        active_connections: view.procs.iter().map(|p| p.stats.active()).sum(),
        queued_connections: view.queued,
        in_flight_requests: view.procs.iter().map(|p| p.stats.in_flight()).sum(),
        requests_total: status_classes.values().sum(),
        status_classes,
        exchanges_total,
        latency,
        queue_latency: latency_of(&view.ports.counted.waited),
        listen_queue_length: view.ports.queues.values().sum(),
        listen_queue_limit: view.ports.limits.values().sum(),
        listen_overflows: view.ports.overflows.values().sum(),
        resets_sent: view.ports.counted.resets_sent,
        resets_received: view.ports.counted.resets_received,
        started_total: view.lifecycle.started,
        stopped_total: view.lifecycle.stopped.clone(),
        worker_list,
        rates: None,
    }
}

/// A histogram in the API's shape, from the kernel's counts.
fn latency_of(stats: &ReqStats) -> Latency {
    let mut cumulative = 0;
    Latency {
        bounds: DURATION_BOUNDS_NS.iter().map(|b| *b as f64 / 1e9).collect(),
        cumulative: stats
            .buckets
            .iter()
            .map(|n| {
                cumulative += n;
                cumulative
            })
            .collect(),
        count: stats.timed,
        sum: stats.duration_sum_ns as f64 / 1e9,
    }
}

/// One stream's memory of its previous event.
#[derive(Debug, Default)]
pub struct RateTracker {
    last: Option<ApiSnapshot>,
}

impl RateTracker {
    /// Fill in `rates` (and each worker's requests/s) against this stream's previous event.
    pub fn apply(&mut self, mut snap: ApiSnapshot) -> ApiSnapshot {
        let prev = self.last.take();
        let interval = prev.as_ref().map_or(0.0, |p| (snap.time - p.time).max(0.0));
        for server in &mut snap.servers {
            let before = prev.as_ref().and_then(|p| {
                p.servers
                    .iter()
                    .find(|s| s.server == server.server && s.labels == server.labels)
            });
            server.rates = Some(rates(server, before, interval));
            for worker in &mut server.worker_list {
                let was = before
                    .and_then(|b| b.worker_list.iter().find(|w| w.pid == worker.pid))
                    .map_or(0, |w| w.requests_total);
                worker.requests_per_second = Some(per_second(
                    worker.requests_total.saturating_sub(was),
                    interval,
                ));
            }
        }
        self.last = Some(snap.clone());
        snap
    }
}

fn per_second(n: u64, interval: f64) -> f64 {
    if interval > 0.0 {
        n as f64 / interval
    } else {
        0.0
    }
}

fn rates(now: &ApiServer, before: Option<&ApiServer>, interval: f64) -> Rates {
    if interval <= 0.0 {
        return Rates {
            interval_seconds: 0.0,
            requests_per_second: 0.0,
            error_rate: 0.0,
            p50_seconds: None,
            p99_seconds: None,
            queue_p50_seconds: None,
            queue_p99_seconds: None,
        };
    }
    let delta = |f: &dyn Fn(&ApiServer) -> u64| f(now).saturating_sub(before.map_or(0, f));
    let requests = delta(&|s| s.requests_total);
    let errors = delta(&|s| s.status_classes.get("5xx").copied().unwrap_or(0));
    let latency = |q: f64| interval_quantile(q, &now.latency, before.map(|b| &b.latency));
    let queue = |q: f64| interval_quantile(q, &now.queue_latency, before.map(|b| &b.queue_latency));
    Rates {
        interval_seconds: interval,
        requests_per_second: per_second(requests, interval),
        error_rate: if requests > 0 {
            errors as f64 / requests as f64
        } else {
            0.0
        },
        p50_seconds: latency(0.5),
        p99_seconds: latency(0.99),
        queue_p50_seconds: queue(0.5),
        queue_p99_seconds: queue(0.99),
    }
}

/// Quantile `q` of what histogram `now` gained since `before`.
fn interval_quantile(q: f64, now: &Latency, before: Option<&Latency>) -> Option<f64> {
    let count = now.count.saturating_sub(before.map_or(0, |b| b.count));
    let cumulative: Vec<u64> = now
        .cumulative
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.saturating_sub(before.map_or(0, |b| b.cumulative.get(i).copied().unwrap_or(0)))
        })
        .collect();
    quantile(q, &now.bounds, &cumulative, count)
}

/// PromQL's histogram_quantile: linear interpolation inside the bucket that holds the rank;
/// a rank past the last finite bound reports that bound.
pub fn quantile(q: f64, bounds: &[f64], cumulative: &[u64], count: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut lower = 0.0;
    let mut below = 0;
    for (bound, &cum) in bounds.iter().zip(cumulative) {
        if cum as f64 >= rank {
            let inside = (cum - below) as f64;
            let share = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * share);
        }
        lower = *bound;
        below = cum;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(got: Option<f64>, want: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() < 1e-9)
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let bounds = [0.1, 0.2, 0.4];
        // 10 requests: 0 ≤ 0.1, 10 in (0.1, 0.2].
        assert!(near(quantile(0.5, &bounds, &[0, 10, 10], 10), 0.15));
        assert!(near(quantile(0.5, &bounds, &[10, 10, 10], 10), 0.05));
        // Past the last finite bound: that bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0], 10), Some(0.4));
        assert_eq!(quantile(0.5, &bounds, &[0, 0, 0], 0), None);
    }

    fn server(requests: u64, errors: u64, cumulative: Vec<u64>) -> ApiServer {
        let mut status_classes = classes();
        status_classes.insert("2xx", requests - errors);
        status_classes.insert("5xx", errors);
        ApiServer {
            server: "s".into(),
            labels: BTreeMap::new(),
            up: true,
            uptime_seconds: 1.0,
            workers: 1,
            active_connections: 0,
            queued_connections: 0,
            in_flight_requests: 0,
            requests_total: requests,
            status_classes,
            exchanges_total: 0,
            latency: Latency {
                bounds: vec![0.1, 0.2],
                count: *cumulative.last().unwrap(),
                cumulative,
                sum: 0.0,
            },
            queue_latency: latency_of(&ReqStats::default()),
            listen_queue_length: 0,
            listen_queue_limit: 0,
            listen_overflows: 0,
            resets_sent: 0,
            resets_received: 0,
            started_total: 0,
            stopped_total: BTreeMap::new(),
            worker_list: Vec::new(),
            rates: None,
        }
    }

    #[test]
    fn each_stream_rates_against_its_own_previous_event() {
        let snap = |time, s| ApiSnapshot {
            version: "t",
            time,
            servers: vec![s],
            lifecycle: Vec::new(),
        };
        let mut a = RateTracker::default();
        let first = a.apply(snap(100.0, server(10, 0, vec![10, 10])));
        assert_eq!(first.servers[0].rates.unwrap().interval_seconds, 0.0);
        assert_eq!(first.servers[0].rates.unwrap().p50_seconds, None);
        let second = a.apply(snap(102.0, server(30, 5, vec![10, 30])));
        let r = second.servers[0].rates.unwrap();
        assert_eq!((r.interval_seconds, r.requests_per_second), (2.0, 10.0));
        assert_eq!(r.error_rate, 0.25);
        assert!(near(r.p50_seconds, 0.15), "{r:?}");
        // A second stream starting now has no baseline yet.
        let mut b = RateTracker::default();
        let fresh = b.apply(snap(102.0, server(30, 5, vec![10, 30])));
        assert_eq!(fresh.servers[0].rates.unwrap().requests_per_second, 0.0);
    }
}
