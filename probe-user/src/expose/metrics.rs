//! The Prometheus view: a `Collector` that asks for a fresh snapshot at every scrape, so
//! values come straight from the kernel maps at that moment.

use std::collections::BTreeMap;

use probe_common::{
    DURATION_BOUNDS_NS, ReqStats, drop_reason, event_kind,
    http::{METHODS, PROTOCOLS, STATUS_CLASSES, is_request, name_of},
    transport,
};
use prometheus::{
    Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{containers, lifecycle::COMMON_REASONS, snapshot::Snapshot, watched::FOLDED};

/// Where snapshots come from (the daemon's shared state; a fixed one in tests).
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

// Every server_* series also carries where the server runs (`containers::NAMES`, after
// its own labels); the ones that are unknown are dropped from the exposition.
fn placed(own: &[&'static str]) -> Vec<&'static str> {
    own.iter()
        .chain(containers::NAMES.iter())
        .copied()
        .collect()
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

fn float_gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
    GaugeVec::new(Opts::new(name, help), labels)
}

struct Catalog {
    active: IntGaugeVec,
    queued: IntGaugeVec,
    accepted: IntCounterVec,
    closed: IntCounterVec,
    requests: IntCounterVec,
    exchanges: IntCounterVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    duration: Desc,
    queue_time: Desc,
    listen_queue: IntGaugeVec,
    listen_limit: IntGaugeVec,
    resets: IntCounterVec,
    overflows: IntCounterVec,
    in_flight: IntGaugeVec,
    workers: IntGaugeVec,
    uptime: GaugeVec,
    up: IntGaugeVec,
    worker_info: IntGaugeVec,
    worker_uptime: GaugeVec,
    started: IntCounterVec,
    stopped: IntCounterVec,
    build_info: IntGaugeVec,
    tls_libraries: IntGaugeVec,
    dropped: IntCounterVec,
    kernel_events: IntCounterVec,
    map_entries: IntGaugeVec,
    map_memory: IntGaugeVec,
}

impl Catalog {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            active: gauge(
                "server_active_connections",
                "Connections accepted and not yet closed.",
                &placed(&["server", "pid"]),
            )?,
            queued: gauge(
                "server_queued_connections",
                "Connections established on the server's listening sockets that no worker has \
                 read, written or closed yet: waiting in the accept queue, or accepted and idle \
                 (socket hooks; 0 with the syscall hooks).",
                &placed(&["server"]),
            )?,
            accepted: counter(
                "server_connections_accepted_total",
                "Connections accepted (TCP and unix-domain).",
                &placed(&["server", "pid"]),
            )?,
            closed: counter(
                "server_connections_closed_total",
                "Connections closed (by close or by process exit).",
                &placed(&["server", "pid"]),
            )?,
            requests: counter(
                "server_requests_total",
                "HTTP requests, answered (status class) or ended without a response \
                 (status=\"aborted\"); status is empty when the response's bytes were not \
                 visible (io_uring, sendfile).",
                &placed(&["server", "pid", "method", "status", "protocol", "transport"]),
            )?,
            exchanges: counter(
                "server_exchanges_total",
                "Read/write turns on connections that carry no requests flyprobe can see: TLS \
                 (protocol=\"tls\") and protocols that are not HTTP (\"other\"). Never counted \
                 as requests.",
                &placed(&["server", "pid", "protocol", "transport"]),
            )?,
            received: counter(
                "server_received_bytes_total",
                "Bytes read from accepted connections.",
                &placed(&["server", "pid"]),
            )?,
            sent: counter(
                "server_sent_bytes_total",
                "Bytes written to accepted connections.",
                &placed(&["server", "pid"]),
            )?,
            duration: Desc::new(
                DURATION.into(),
                DURATION_HELP.into(),
                vec!["server".into(), "method".into(), "status".into()],
                std::collections::HashMap::new(),
            )?,
            queue_time: Desc::new(
                QUEUE_TIME.into(),
                QUEUE_TIME_HELP.into(),
                vec!["server".into()],
                std::collections::HashMap::new(),
            )?,
            listen_queue: gauge(
                "server_listen_queue_length",
                "Connections in the accept queue of the server's listening port right now: \
                 handshake done, no worker has accepted them yet.",
                &placed(&["server", "port"]),
            )?,
            listen_limit: gauge(
                "server_listen_queue_limit",
                "The accept queue's limit on the port (the listen() backlog, capped by \
                 net.core.somaxconn); the kernel drops new connections beyond it.",
                &placed(&["server", "port"]),
            )?,
            overflows: counter(
                "server_listen_overflows_total",
                "Connections the kernel dropped on the server's listening port: its accept \
                 queue was full (or its SYN queue), so the client's SYN or handshake was \
                 dropped (the listener's drop counter, as ss -ltnm shows it; listeners in \
                 flyprobe's own network namespace).",
                &placed(&["server", "port"]),
            )?,
            resets: counter(
                "server_connection_resets_total",
                "TCP resets on the server's connections, sent (an abort, a close with unread \
                 data) or received (a client that aborted) (fentry and socket hooks).",
                &placed(&["server", "direction"]),
            )?,
            in_flight: gauge(
                "server_in_flight_requests",
                "Requests read whose response has not started.",
                &placed(&["server", "pid"]),
            )?,
            workers: gauge(
                "server_workers",
                "Live processes of the tree that serve connections.",
                &placed(&["server"]),
            )?,
            uptime: float_gauge(
                "server_uptime_seconds",
                "Seconds since the watched root process started.",
                &placed(&["server"]),
            )?,
            up: gauge(
                "server_up",
                "1 while a watched root process is alive, else 0.",
                &placed(&["server"]),
            )?,
            worker_info: gauge(
                "server_worker_info",
                "1 per live worker process.",
                &placed(&["server", "pid", "ppid", "comm"]),
            )?,
            worker_uptime: float_gauge(
                "server_worker_uptime_seconds",
                "Seconds since each live worker started.",
                &placed(&["server", "pid"]),
            )?,
            started: counter(
                "server_started_total",
                "Workers started while flyprobe watched.",
                &placed(&["server"]),
            )?,
            stopped: counter(
                "server_stopped_total",
                "Workers stopped, by reason: exit_0, exit_nonzero, signal_<NAME>, unknown.",
                &placed(&["server", "reason"]),
            )?,
            build_info: gauge(
                "flyprobe_build_info",
                "flyprobe version and the kernel hook set it attached; always 1.",
                &["version", "hooks"],
            )?,
            tls_libraries: gauge(
                "flyprobe_tls_libraries",
                "OpenSSL libraries (libssl files) of watched processes with the TLS uprobes \
                 attached (--tls; absent without it).",
                &[],
            )?,
            dropped: counter(
                "flyprobe_dropped_events_total",
                "Kernel events flyprobe could not record, by reason.",
                &["reason"],
            )?,
            kernel_events: counter(
                "flyprobe_kernel_events_total",
                "Process events read from the kernel, by kind: fork and exit of watched \
                 processes (threads are not announced where the kernel has BTF), discover \
                 (node-wide selectors).",
                &["kind"],
            )?,
            map_memory: gauge(
                "flyprobe_map_memory_bytes",
                "Kernel memory each of flyprobe's maps uses, as the kernel accounts it (charged \
                 to flyprobe's cgroup).",
                &["map"],
            )?,
            map_entries: gauge(
                "flyprobe_map_entries",
                "Entries in flyprobe's bounded kernel maps (as of the last 1 s sweep).",
                &["map"],
            )?,
        })
    }

    fn counters(&self) -> [&IntCounterVec; 12] {
        [
            &self.resets,
            &self.overflows,
            &self.accepted,
            &self.closed,
            &self.requests,
            &self.exchanges,
            &self.received,
            &self.sent,
            &self.started,
            &self.stopped,
            &self.dropped,
            &self.kernel_events,
        ]
    }

    fn gauges(&self) -> [&IntGaugeVec; 12] {
        [
            &self.listen_queue,
            &self.listen_limit,
            &self.map_entries,
            &self.map_memory,
            &self.active,
            &self.queued,
            &self.in_flight,
            &self.workers,
            &self.up,
            &self.worker_info,
            &self.build_info,
            &self.tls_libraries,
        ]
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        let mut all: Vec<&dyn Collector> = Vec::new();
        all.extend(self.counters().map(|c| c as &dyn Collector));
        all.extend(self.gauges().map(|g| g as &dyn Collector));
        all.push(&self.uptime);
        all.push(&self.worker_uptime);
        all
    }

    fn fill(&self, snap: &Snapshot) {
        self.counters().iter().for_each(|c| c.reset());
        self.gauges().iter().for_each(|g| g.reset());
        self.uptime.reset();
        self.worker_uptime.reset();

        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), snap.hooks])
            .set(1);
        if let Some(n) = snap.tls_libraries {
            self.tls_libraries
                .with_label_values::<&str>(&[])
                .set(int(n));
        }
        for (map, n) in &snap.map_entries {
            self.map_entries.with_label_values(&[*map]).set(int(*n));
        }
        for (map, bytes) in &snap.map_memory {
            self.map_memory
                .with_label_values(&[map.as_str()])
                .set(int(*bytes));
        }
        for (reason, count) in drop_reason::NAMES.iter().zip(snap.drops) {
            self.dropped.with_label_values(&[*reason]).inc_by(count);
        }
        for (kind, count) in event_kind::NAMES.iter().zip(snap.kernel_events) {
            self.kernel_events.with_label_values(&[*kind]).inc_by(count);
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
            let set = |vec: &IntGaugeVec, first: &[&str], v: i64| {
                let values = with(first);
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                vec.with_label_values(&refs).set(v);
            };
            let add = |vec: &IntCounterVec, first: &[&str], v: u64| {
                let values = with(first);
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                vec.with_label_values(&refs).inc_by(v);
            };
            let setf = |vec: &GaugeVec, first: &[&str], v: f64| {
                let values = with(first);
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                vec.with_label_values(&refs).set(v);
            };
            set(&self.workers, &[name], int(server.workers.len() as u64));
            set(&self.queued, &[name], int(server.queued));
            for (port, length) in &server.ports.queues {
                set(&self.listen_queue, &[name, &port.to_string()], int(*length));
            }
            for (port, limit) in &server.ports.limits {
                set(&self.listen_limit, &[name, &port.to_string()], int(*limit));
            }
            for (port, n) in &server.ports.overflows {
                add(&self.overflows, &[name, &port.to_string()], *n);
            }
            if snap.hooks != "syscall" {
                let counted = &server.ports.counted;
                add(&self.resets, &[name, "sent"], counted.resets_sent);
                add(&self.resets, &[name, "received"], counted.resets_received);
            }
            setf(&self.uptime, &[name], server.uptime_seconds);
            set(&self.up, &[name], i64::from(server.up));
            add(&self.started, &[name], server.lifecycle.started);
            for reason in COMMON_REASONS {
                add(&self.stopped, &[name, reason], 0);
            }
            for (reason, n) in &server.lifecycle.stopped {
                add(&self.stopped, &[name, reason], *n);
            }
            for w in &server.workers {
                let (pid, ppid) = (w.pid.to_string(), w.ppid.to_string());
                set(&self.worker_info, &[name, &pid, &ppid, &w.comm], 1);
                setf(&self.worker_uptime, &[name, &pid], w.uptime_seconds);
            }
            for (key, stats) in &server.requests {
                let pid = pid_label(key.tgid);
                if !is_request(key.protocol, key.method) {
                    add(
                        &self.exchanges,
                        &[
                            name,
                            &pid,
                            name_of(&PROTOCOLS, key.protocol),
                            name_of(&transport::NAMES, key.transport),
                        ],
                        stats.count,
                    );
                    continue;
                }
                add(
                    &self.requests,
                    &[
                        name,
                        &pid,
                        name_of(&METHODS, key.method),
                        name_of(&STATUS_CLASSES, key.status),
                        name_of(&PROTOCOLS, key.protocol),
                        name_of(&transport::NAMES, key.transport),
                    ],
                    stats.count,
                );
            }
            for proc in &server.procs {
                let pid = pid_label(proc.pid);
                let labels = [name, pid.as_str()];
                let s = &proc.stats;
                add(&self.accepted, &labels, s.accepted);
                add(&self.closed, &labels, s.closed);
                add(&self.received, &labels, s.rx_bytes);
                add(&self.sent, &labels, s.tx_bytes);
                set(&self.active, &labels, int(s.active()));
                set(&self.in_flight, &labels, int(s.in_flight()));
            }
        }
    }
}

const DURATION: &str = "server_request_duration_seconds";
const DURATION_HELP: &str =
    "First request byte read to first response byte written, for requests that got a response.";

/// The duration histograms, built from the kernel's bucket counts (the prometheus crate's
/// Histogram only takes observations, so the family is assembled here).
fn duration_family(snap: &Snapshot) -> MetricFamily {
    let mut metrics = Vec::new();
    for server in &snap.servers {
        let mut by_labels: BTreeMap<(u8, u8), ReqStats> = BTreeMap::new();
        for (key, stats) in &server.requests {
            if stats.timed > 0 {
                by_labels
                    .entry((key.method, key.status))
                    .or_default()
                    .add(stats);
            }
        }
        for ((method, status), stats) in by_labels {
            let mut pairs = vec![
                ("method", name_of(&METHODS, method)),
                ("server", server.server.as_str()),
                ("status", name_of(&STATUS_CLASSES, status)),
            ];
            pairs.extend(server.labels.pairs());
            metrics.push(histogram(pairs, &stats));
        }
    }
    family(DURATION, DURATION_HELP, metrics)
}

const QUEUE_TIME: &str = "server_connection_queue_seconds";
const QUEUE_TIME_HELP: &str = "Handshake completed to a worker's first read, write or close of \
     the connection: how long clients waited for a free worker (fentry and socket hooks).";

/// The wait-for-a-worker histograms, one per server (fentry and socket hooks).
fn queue_time_family(snap: &Snapshot) -> MetricFamily {
    let metrics = if snap.hooks == "syscall" {
        Vec::new()
    } else {
        snap.servers
            .iter()
            .map(|server| {
                let mut pairs = vec![("server", server.server.as_str())];
                pairs.extend(server.labels.pairs());
                histogram(pairs, &server.ports.counted.waited)
            })
            .collect()
    };
    family(QUEUE_TIME, QUEUE_TIME_HELP, metrics)
}

fn family(name: &str, help: &str, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.into());
    family.set_help(help.into());
    family.set_field_type(MetricType::HISTOGRAM);
    family.set_metric(metrics);
    family
}

/// One histogram series from the kernel's counts (`timed` observations, `buckets` per bound
/// of `DURATION_BOUNDS_NS`).
fn histogram(mut pairs: Vec<(&str, &str)>, stats: &ReqStats) -> Metric {
    pairs.sort_unstable();
    let mut metric = Metric::from_label(
        pairs
            .iter()
            .map(|(k, v)| {
                let mut pair = LabelPair::default();
                pair.set_name((*k).into());
                pair.set_value((*v).into());
                pair
            })
            .collect(),
    );
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

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

struct ProbeCollector<S> {
    source: S,
    catalog: Catalog,
}

impl<S: SnapshotSource> Collector for ProbeCollector<S> {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs: Vec<&Desc> = self
            .catalog
            .collectors()
            .into_iter()
            .flat_map(|c| c.desc())
            .collect();
        descs.push(&self.catalog.duration);
        descs.push(&self.catalog.queue_time);
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.source.snapshot();
        self.catalog.fill(&snap);
        let mut families: Vec<MetricFamily> = self
            .catalog
            .collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .collect();
        families.push(duration_family(&snap));
        families.push(queue_time_family(&snap));
        for family in &mut families {
            for metric in family.mut_metric() {
                let kept: Vec<LabelPair> = metric
                    .take_label()
                    .into_iter()
                    .filter(|l| !(l.value().is_empty() && containers::NAMES.contains(&l.name())))
                    .collect();
                metric.set_label(kept);
            }
        }
        families
    }
}

pub fn registry(source: impl SnapshotSource + 'static) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(ProbeCollector {
        source,
        catalog: Catalog::new()?,
    }))?;
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
        snapshot::{ProcView, ServerView, WorkerView},
        watched::Lifecycle,
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
        for name in containers::NAMES {
            assert!(!text.contains(&format!("{name}=")), "{name} in\n{text}");
        }
    }
}
