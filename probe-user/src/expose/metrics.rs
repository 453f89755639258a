//! The Prometheus view: a `Collector` that builds every metric family from one snapshot,
//! taken at each scrape, so values come straight from the kernel maps at that moment.
//!
//! `METRICS` is the one list of what flyprobe exports: name, kind, help and labels. The
//! families, their descriptors and the README's metric table (a test holds it to the list)
//! all come from it; a new metric is a row there and the line of `fill` that gives its
//! values.

use std::collections::{BTreeMap, HashMap};

use probe_common::{
    DURATION_BOUNDS_NS, ReqStats, drop_reason, event_kind,
    http::{METHODS, PROTOCOLS, STATUS_CLASSES, is_request, name_of},
    transport,
};
use prometheus::{
    Encoder as _, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    model::lifecycle::COMMON_REASONS,
    model::retired::FOLDED,
    model::snapshot::{Snapshot, SnapshotSource},
    processes::containers,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }

    fn proto(self) -> MetricType {
        match self {
            Self::Counter => MetricType::COUNTER,
            Self::Gauge => MetricType::GAUGE,
            Self::Histogram => MetricType::HISTOGRAM,
        }
    }
}

/// One exported metric.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Its own labels. A server's metric (`server_*`) also carries where the server runs
    /// (`containers::NAMES`, after these); the ones unknown are left out of its series.
    pub labels: &'static [&'static str],
}

impl Def {
    /// A server's metric: its series carry the server's place.
    pub fn placed(&self) -> bool {
        self.name.starts_with("server_")
    }

    /// Every label name its series may carry, in the order `fill` gives their values.
    fn label_names(&self) -> Vec<&'static str> {
        let place: &[&'static str] = if self.placed() {
            &containers::NAMES
        } else {
            &[]
        };
        self.labels.iter().chain(place).copied().collect()
    }
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def {
        name,
        kind,
        help,
        labels,
    }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

pub const ACTIVE: Def = def(
    "server_active_connections",
    G,
    &["server", "pid"],
    "Connections accepted and not yet closed.",
);
pub const QUEUED: Def = def(
    "server_queued_connections",
    G,
    &["server"],
    "Connections established on the server's listening sockets that no worker has read, \
     written or closed yet: waiting in the accept queue, or accepted and idle (socket hooks; 0 \
     with the syscall hooks).",
);
pub const ACCEPTED: Def = def(
    "server_connections_accepted_total",
    C,
    &["server", "pid"],
    "Connections accepted (TCP and unix-domain).",
);
pub const CLOSED: Def = def(
    "server_connections_closed_total",
    C,
    &["server", "pid"],
    "Connections closed (by close or by process exit).",
);
pub const REQUESTS: Def = def(
    "server_requests_total",
    C,
    &["server", "pid", "method", "status", "protocol", "transport"],
    "HTTP requests, answered (status class) or ended without a response \
     (status=\"aborted\"); status is empty when the response's bytes were not visible \
     (io_uring, sendfile).",
);
pub const DURATION: Def = def(
    "server_request_duration_seconds",
    H,
    &["server", "method", "status"],
    "First request byte read to first response byte written, for requests that got a \
     response.",
);
pub const EXCHANGES: Def = def(
    "server_exchanges_total",
    C,
    &["server", "pid", "protocol", "transport"],
    "Read/write turns on connections that carry no requests flyprobe can see: TLS \
     (protocol=\"tls\"), protocols that are not HTTP (\"other\"), and HTTP/2 whose \
     frames are not walked (\"h2\"). Never counted as requests.",
);
pub const RECEIVED: Def = def(
    "server_received_bytes_total",
    C,
    &["server", "pid"],
    "Bytes read from accepted connections.",
);
pub const SENT: Def = def(
    "server_sent_bytes_total",
    C,
    &["server", "pid"],
    "Bytes written to accepted connections.",
);
pub const IN_FLIGHT: Def = def(
    "server_in_flight_requests",
    G,
    &["server", "pid"],
    "Requests read whose response has not started.",
);
pub const QUEUE_TIME: Def = def(
    "server_connection_queue_seconds",
    H,
    &["server"],
    "Handshake completed to a worker's first read, write or close of the connection: how \
     long clients waited for a free worker (fentry and socket hooks).",
);
pub const LISTEN_QUEUE: Def = def(
    "server_listen_queue_length",
    G,
    &["server", "port"],
    "Connections in the accept queue of the server's listening port right now: handshake \
     done, no worker has accepted them yet.",
);
pub const LISTEN_LIMIT: Def = def(
    "server_listen_queue_limit",
    G,
    &["server", "port"],
    "The accept queue's limit on the port (the listen() backlog, capped by \
     net.core.somaxconn); the kernel drops new connections beyond it.",
);
pub const OVERFLOWS: Def = def(
    "server_listen_overflows_total",
    C,
    &["server", "port"],
    "Connections the kernel dropped on the server's listening port: its accept queue was \
     full (or its SYN queue), so the client's SYN or handshake was dropped (the listener's \
     drop counter, as ss -ltnm shows it, less the dropped handshakes it holds twice; where \
     the kernel cannot tell those, in another network namespace, the namespace's \
     ListenDrops, where the port is the only one listening there).",
);
pub const RESETS: Def = def(
    "server_connection_resets_total",
    C,
    &["server", "direction"],
    "TCP resets on the server's connections, sent (an abort, a close with unread data) or \
     received (a client that aborted) (fentry and socket hooks).",
);
pub const WORKERS: Def = def(
    "server_workers",
    G,
    &["server"],
    "Live processes of the tree that serve connections.",
);
pub const UPTIME: Def = def(
    "server_uptime_seconds",
    G,
    &["server"],
    "Seconds since the watched root process started.",
);
pub const UP: Def = def(
    "server_up",
    G,
    &["server"],
    "1 while a watched root process is alive, else 0.",
);
pub const WORKER_INFO: Def = def(
    "server_worker_info",
    G,
    &["server", "pid", "ppid", "comm"],
    "1 per live worker process.",
);
pub const WORKER_UPTIME: Def = def(
    "server_worker_uptime_seconds",
    G,
    &["server", "pid"],
    "Seconds since each live worker started.",
);
pub const STARTED: Def = def(
    "server_started_total",
    C,
    &["server"],
    "Workers started while flyprobe watched.",
);
pub const STOPPED: Def = def(
    "server_stopped_total",
    C,
    &["server", "reason"],
    "Workers stopped, by reason: exit_0, exit_nonzero, signal_<NAME>, unknown.",
);
pub const BUILD_INFO: Def = def(
    "flyprobe_build_info",
    G,
    &["version", "hooks"],
    "flyprobe version and the kernel hook set it attached; always 1.",
);
pub const MAP_MEMORY: Def = def(
    "flyprobe_map_memory_bytes",
    G,
    &["map"],
    "Kernel memory each of flyprobe's maps uses, as the kernel accounts it (charged to \
     flyprobe's cgroup).",
);
pub const MAP_ENTRIES: Def = def(
    "flyprobe_map_entries",
    G,
    &["map"],
    "Entries in flyprobe's bounded kernel maps (as of the last 1 s sweep).",
);
pub const DROPPED: Def = def(
    "flyprobe_dropped_events_total",
    C,
    &["reason"],
    "Kernel events flyprobe could not record, by reason.",
);
pub const TLS_LIBRARIES: Def = def(
    "flyprobe_tls_libraries",
    G,
    &[],
    "OpenSSL libraries (libssl files) of watched processes with the TLS uprobes attached \
     (--tls; absent without it).",
);
pub const KERNEL_EVENTS: Def = def(
    "flyprobe_kernel_events_total",
    C,
    &["kind"],
    "Process events read from the kernel, by kind: fork and exit of watched processes \
     (threads are not announced where the kernel has BTF), discover (node-wide selectors).",
);

/// Everything flyprobe exports, in the README's order.
pub const METRICS: [&Def; 28] = [
    &ACTIVE,
    &QUEUED,
    &ACCEPTED,
    &CLOSED,
    &REQUESTS,
    &DURATION,
    &EXCHANGES,
    &RECEIVED,
    &SENT,
    &IN_FLIGHT,
    &QUEUE_TIME,
    &LISTEN_QUEUE,
    &LISTEN_LIMIT,
    &OVERFLOWS,
    &RESETS,
    &WORKERS,
    &UPTIME,
    &UP,
    &WORKER_INFO,
    &WORKER_UPTIME,
    &STARTED,
    &STOPPED,
    &BUILD_INFO,
    &MAP_MEMORY,
    &MAP_ENTRIES,
    &DROPPED,
    &TLS_LIBRARIES,
    &KERNEL_EVENTS,
];

/// The series of one scrape, by metric: label values (in `Def::label_names` order) to a
/// value, or a histogram's series.
#[derive(Default)]
struct Scrape {
    values: BTreeMap<&'static str, BTreeMap<Vec<String>, f64>>,
    histograms: BTreeMap<&'static str, Vec<Metric>>,
}

impl Scrape {
    fn slot(&mut self, def: &Def, labels: Vec<String>) -> &mut f64 {
        debug_assert_eq!(labels.len(), def.label_names().len(), "{}", def.name);
        self.values
            .entry(def.name)
            .or_default()
            .entry(labels)
            .or_insert(0.0)
    }

    /// A gauge's value.
    fn set(&mut self, def: &Def, labels: Vec<String>, value: f64) {
        *self.slot(def, labels) = value;
    }

    /// Added to a counter (series that meet under the same labels add up; 0 makes one).
    fn add(&mut self, def: &Def, labels: Vec<String>, value: u64) {
        *self.slot(def, labels) += value as f64;
    }

    /// Every family of `METRICS`, those without series included (the registry drops them).
    fn families(mut self) -> Vec<MetricFamily> {
        METRICS
            .iter()
            .map(|def| {
                let metrics = match def.kind {
                    Kind::Histogram => self.histograms.remove(def.name).unwrap_or_default(),
                    kind => {
                        let names = def.label_names();
                        self.values
                            .remove(def.name)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(values, value)| {
                                let pairs =
                                    names.iter().copied().zip(values.iter().map(String::as_str));
                                let mut metric = Metric::from_label(label_pairs(pairs.collect()));
                                if kind == Kind::Counter {
                                    let mut counter = Counter::default();
                                    counter.set_value(value);
                                    metric.set_counter(counter);
                                } else {
                                    let mut gauge = Gauge::default();
                                    gauge.set_value(value);
                                    metric.set_gauge(gauge);
                                }
                                metric
                            })
                            .collect()
                    }
                };
                let mut family = MetricFamily::default();
                family.set_name(def.name.into());
                family.set_help(def.help.into());
                family.set_field_type(def.kind.proto());
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

/// A series' labels, sorted by name; a place label whose value is unknown (empty) is left
/// out.
fn label_pairs(mut pairs: Vec<(&str, &str)>) -> Vec<LabelPair> {
    pairs.retain(|(name, value)| !(value.is_empty() && containers::NAMES.contains(name)));
    pairs.sort_unstable();
    pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.into());
            pair.set_value(value.into());
            pair
        })
        .collect()
}

/// The series of `snap`.
fn fill(snap: &Snapshot) -> Scrape {
    let mut out = Scrape::default();
    let strings = |values: &[&str]| values.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    out.set(
        &BUILD_INFO,
        strings(&[env!("CARGO_PKG_VERSION"), snap.hooks]),
        1.0,
    );
    if let Some(n) = snap.tls_libraries {
        out.set(&TLS_LIBRARIES, Vec::new(), n as f64);
    }
    for (map, n) in &snap.map_entries {
        out.set(&MAP_ENTRIES, strings(&[map]), *n as f64);
    }
    for (map, bytes) in &snap.map_memory {
        out.set(&MAP_MEMORY, strings(&[map]), *bytes as f64);
    }
    for (reason, count) in drop_reason::NAMES.iter().zip(snap.drops) {
        out.add(&DROPPED, strings(&[reason]), count);
    }
    for (kind, count) in event_kind::NAMES.iter().zip(snap.kernel_events) {
        out.add(&KERNEL_EVENTS, strings(&[kind]), count);
    }
    for server in &snap.servers {
        let name = server.server.as_str();
        let place = server.labels.values();
        // The server's own labels, then the place it runs.
        let with = |first: &[&str]| -> Vec<String> {
            first
                .iter()
                .chain(place.iter())
                .map(|s| s.to_string())
                .collect()
        };
        out.set(&WORKERS, with(&[name]), server.workers.len() as f64);
        out.set(&QUEUED, with(&[name]), server.queued as f64);
        for (port, length) in &server.ports.queues {
            out.set(
                &LISTEN_QUEUE,
                with(&[name, &port.to_string()]),
                *length as f64,
            );
        }
        for (port, limit) in &server.ports.limits {
            out.set(
                &LISTEN_LIMIT,
                with(&[name, &port.to_string()]),
                *limit as f64,
            );
        }
        for (port, n) in &server.ports.overflows {
            out.add(&OVERFLOWS, with(&[name, &port.to_string()]), *n);
        }
        if snap.hooks != "syscall" {
            let counted = &server.ports.counted;
            out.add(&RESETS, with(&[name, "sent"]), counted.resets_sent);
            out.add(&RESETS, with(&[name, "received"]), counted.resets_received);
            let mut pairs = vec![("server", name)];
            pairs.extend(server.labels.pairs());
            out.histograms
                .entry(QUEUE_TIME.name)
                .or_default()
                .push(histogram(pairs, &counted.waited));
        }
        out.set(&UPTIME, with(&[name]), server.uptime_seconds);
        out.set(&UP, with(&[name]), f64::from(u8::from(server.up)));
        out.add(&STARTED, with(&[name]), server.lifecycle.started);
        for reason in COMMON_REASONS {
            out.add(&STOPPED, with(&[name, reason]), 0);
        }
        for (reason, n) in &server.lifecycle.stopped {
            out.add(&STOPPED, with(&[name, reason]), *n);
        }
        for w in &server.workers {
            let (pid, ppid) = (w.pid.to_string(), w.ppid.to_string());
            out.set(&WORKER_INFO, with(&[name, &pid, &ppid, &w.comm]), 1.0);
            out.set(&WORKER_UPTIME, with(&[name, &pid]), w.uptime_seconds);
        }
        let mut timed: BTreeMap<(u8, u8), ReqStats> = BTreeMap::new();
        for (key, stats) in &server.requests {
            let pid = pid_label(key.tgid);
            let protocol = name_of(&PROTOCOLS, key.protocol);
            let transport = name_of(&transport::NAMES, key.transport);
            if stats.timed > 0 {
                timed
                    .entry((key.method, key.status))
                    .or_default()
                    .add(stats);
            }
            if !is_request(key.protocol, key.method) {
                out.add(
                    &EXCHANGES,
                    with(&[name, &pid, protocol, transport]),
                    stats.count,
                );
                continue;
            }
            let (method, status) = (
                name_of(&METHODS, key.method),
                name_of(&STATUS_CLASSES, key.status),
            );
            out.add(
                &REQUESTS,
                with(&[name, &pid, method, status, protocol, transport]),
                stats.count,
            );
        }
        for ((method, status), stats) in timed {
            let mut pairs = vec![
                ("method", name_of(&METHODS, method)),
                ("server", name),
                ("status", name_of(&STATUS_CLASSES, status)),
            ];
            pairs.extend(server.labels.pairs());
            out.histograms
                .entry(DURATION.name)
                .or_default()
                .push(histogram(pairs, &stats));
        }
        for proc in &server.procs {
            let pid = pid_label(proc.pid);
            let labels = with(&[name, pid.as_str()]);
            let s = &proc.stats;
            out.add(&ACCEPTED, labels.clone(), s.accepted);
            out.add(&CLOSED, labels.clone(), s.closed);
            out.add(&RECEIVED, labels.clone(), s.rx_bytes);
            out.add(&SENT, labels.clone(), s.tx_bytes);
            out.set(&ACTIVE, labels.clone(), s.active() as f64);
            out.set(&IN_FLIGHT, labels, s.in_flight() as f64);
        }
    }
    out
}

/// One histogram series from the kernel's counts (`timed` observations, `buckets` per bound
/// of `DURATION_BOUNDS_NS`).
fn histogram(pairs: Vec<(&str, &str)>, stats: &ReqStats) -> Metric {
    let mut metric = Metric::from_label(label_pairs(pairs));
    let mut histogram = Histogram::default();
    histogram.set_sample_count(stats.timed);
    histogram.set_sample_sum(stats.duration_sum_ns as f64 / 1e9);
    let mut cumulative = 0;
    let buckets = DURATION_BOUNDS_NS
        .iter()
        .zip(stats.buckets)
        .map(|(bound, n)| {
            cumulative += n;
            let mut bucket = Bucket::default();
            bucket.set_upper_bound(*bound as f64 / 1e9);
            bucket.set_cumulative_count(cumulative);
            bucket
        })
        .collect();
    histogram.set_bucket(buckets);
    metric.set_histogram(histogram);
    metric
}

/// The `pid` label: exited workers past --worker-retention share one `retired` series.
fn pid_label(pid: u32) -> String {
    if pid == FOLDED {
        "retired".into()
    } else {
        pid.to_string()
    }
}

struct ProbeCollector<S> {
    source: S,
    descs: Vec<Desc>,
}

impl<S: SnapshotSource> Collector for ProbeCollector<S> {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        fill(&self.source.snapshot()).families()
    }
}

pub fn registry(source: impl SnapshotSource + 'static) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let descs = METRICS
        .iter()
        .map(|def| {
            let labels = def.label_names().iter().map(|l| l.to_string()).collect();
            Desc::new(def.name.into(), def.help.into(), labels, HashMap::new())
        })
        .collect::<prometheus::Result<_>>()?;
    registry.register(Box::new(ProbeCollector { source, descs }))?;
    Ok(registry)
}

/// The text exposition of everything in `registry`.
pub fn render(registry: &Registry) -> prometheus::Result<String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use probe_common::{ProcStats, ReqKey};

    use super::*;
    use crate::{
        model::lifecycle::Lifecycle,
        model::snapshot::{ProcView, ServerView, WorkerView},
    };

    struct Fixed(Snapshot);
    impl SnapshotSource for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    #[test]
    fn renders_the_catalog_with_labels() {
        let stats = ProcStats {
            accepted: 7,
            closed: 5,
            requests: 11,
            responses: 9,
            aborted: 1,
            ..Default::default()
        };
        let mut drops = [0; drop_reason::COUNT as usize];
        drops[drop_reason::TARGET_MAP_FULL as usize] = 3;
        let snap = Snapshot {
            servers: vec![ServerView {
                server: "uvicorn".into(),
                // Unknown on a laptop: no container labels at all in the exposition.
                labels: Default::default(),
                up: true,
                uptime_seconds: 12.5,
                lifecycle: Lifecycle {
                    started: 4,
                    stopped: BTreeMap::from([("signal_SIGSEGV".into(), 2)]),
                },
                workers: vec![WorkerView {
                    pid: 42,
                    ppid: 41,
                    comm: "python".into(),
                    uptime_seconds: 3.0,
                }],
                procs: vec![ProcView { pid: 42, stats }],
                requests: BTreeMap::from([(
                    ReqKey {
                        tgid: 42,
                        method: 1,
                        status: 2,
                        protocol: 1,
                        transport: 0,
                    },
                    ReqStats {
                        count: 11,
                        timed: 10,
                        duration_sum_ns: 30_000_000,
                        buckets: [0, 0, 4, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    },
                )]),
                queued: 0,
                ports: Default::default(),
            }],
            drops,
            kernel_events: [4, 2, 0],
            map_entries: vec![("connections", 3)],
            map_memory: BTreeMap::from([("CONNS".to_string(), 4096)]),
            hooks: "socket",
            tls_libraries: None,
            events: Vec::new(),
        };
        let text = render(&registry(Fixed(snap)).unwrap()).unwrap();
        for line in [
            "server_active_connections{pid=\"42\",server=\"uvicorn\"} 2",
            "server_connections_accepted_total{pid=\"42\",server=\"uvicorn\"} 7",
            "server_connections_closed_total{pid=\"42\",server=\"uvicorn\"} 5",
            "server_requests_total{method=\"GET\",pid=\"42\",protocol=\"http1\",server=\"uvicorn\",status=\"2xx\",transport=\"tcp\"} 11",
            "server_request_duration_seconds_bucket{method=\"GET\",server=\"uvicorn\",status=\"2xx\",le=\"0.001\"} 0",
            "server_request_duration_seconds_bucket{method=\"GET\",server=\"uvicorn\",status=\"2xx\",le=\"0.0025\"} 4",
            "server_request_duration_seconds_bucket{method=\"GET\",server=\"uvicorn\",status=\"2xx\",le=\"0.005\"} 10",
            "server_request_duration_seconds_bucket{method=\"GET\",server=\"uvicorn\",status=\"2xx\",le=\"+Inf\"} 10",
            "server_request_duration_seconds_sum{method=\"GET\",server=\"uvicorn\",status=\"2xx\"} 0.03",
            "server_request_duration_seconds_count{method=\"GET\",server=\"uvicorn\",status=\"2xx\"} 10",
            "server_in_flight_requests{pid=\"42\",server=\"uvicorn\"} 1",
            "server_workers{server=\"uvicorn\"} 1",
            "server_uptime_seconds{server=\"uvicorn\"} 12.5",
            "server_up{server=\"uvicorn\"} 1",
            "server_worker_info{comm=\"python\",pid=\"42\",ppid=\"41\",server=\"uvicorn\"} 1",
            "server_worker_uptime_seconds{pid=\"42\",server=\"uvicorn\"} 3",
            "server_started_total{server=\"uvicorn\"} 4",
            "server_stopped_total{reason=\"signal_SIGSEGV\",server=\"uvicorn\"} 2",
            "server_stopped_total{reason=\"exit_0\",server=\"uvicorn\"} 0",
            "flyprobe_dropped_events_total{reason=\"target_map_full\"} 3",
            "flyprobe_kernel_events_total{kind=\"fork\"} 4",
            "flyprobe_kernel_events_total{kind=\"discover\"} 0",
            "flyprobe_map_memory_bytes{map=\"CONNS\"} 4096",
            "server_queued_connections{server=\"uvicorn\"} 0",
            "flyprobe_dropped_events_total{reason=\"connection_map_full\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains("flyprobe_build_info{hooks=\"socket\",version=\""));
        for def in METRICS {
            let kind = def.kind.name();
            let help = format!("# HELP {} {}", def.name, def.help);
            let typed = format!("# TYPE {} {kind}", def.name);
            let has_series = text.lines().any(|l| l.starts_with(def.name));
            if has_series {
                assert!(
                    text.contains(&help) && text.contains(&typed),
                    "{}",
                    def.name
                );
            }
        }
        for name in containers::NAMES {
            assert!(!text.contains(&format!("{name}=")), "{name} in\n{text}");
        }
    }

    /// The README's metric table is the list: a row per metric, with its labels and kind,
    /// in the list's order, and no row of a metric that is not exported.
    #[test]
    fn the_readme_documents_every_metric() {
        let readme = include_str!("../../../README.md");
        let rows: Vec<(&str, &str)> = readme
            .lines()
            .filter(|l| l.starts_with("| `server_") || l.starts_with("| `flyprobe_"))
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                Some((cells.next()?.trim_matches('`'), cells.next()?))
            })
            .collect();
        let wanted: Vec<(String, &str)> = METRICS
            .iter()
            .map(|def| {
                let name = if def.labels.is_empty() {
                    def.name.to_string()
                } else {
                    format!("{}{{{}}}", def.name, def.labels.join(","))
                };
                (name, def.kind.name())
            })
            .collect();
        let rows: Vec<(String, &str)> = rows.iter().map(|(n, k)| (n.to_string(), *k)).collect();
        assert_eq!(rows, wanted, "README.md's metric table against METRICS");
    }
}
