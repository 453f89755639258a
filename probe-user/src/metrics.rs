//! The Prometheus view: a `Collector` that asks for a fresh snapshot at every scrape, so
//! values come straight from the kernel maps at that moment.

use probe_common::drop_reason;
use prometheus::{
    Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::snapshot::Snapshot;

/// Where snapshots come from (the daemon's shared state; a fixed one in tests).
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

const SERVER_PID: &[&str] = &["server", "pid"];
const SERVER: &[&str] = &["server"];

struct Catalog {
    active: IntGaugeVec,
    accepted: IntCounterVec,
    closed: IntCounterVec,
    requests: IntCounterVec,
    in_flight: IntGaugeVec,
    workers: IntGaugeVec,
    uptime: GaugeVec,
    build_info: IntGaugeVec,
    dropped: IntCounterVec,
}

impl Catalog {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            active: IntGaugeVec::new(
                Opts::new(
                    "server_active_connections",
                    "TCP connections accepted and not yet closed.",
                ),
                SERVER_PID,
            )?,
            accepted: IntCounterVec::new(
                Opts::new(
                    "server_connections_accepted_total",
                    "TCP connections accepted.",
                ),
                SERVER_PID,
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "server_connections_closed_total",
                    "TCP connections closed (by close or by process exit).",
                ),
                SERVER_PID,
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "server_requests_total",
                    "Requests: reads on a connection after the server last wrote on it.",
                ),
                SERVER_PID,
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "server_in_flight_requests",
                    "Requests read whose response has not started.",
                ),
                SERVER_PID,
            )?,
            workers: IntGaugeVec::new(
                Opts::new(
                    "server_workers",
                    "Live processes of the tree that serve connections.",
                ),
                SERVER,
            )?,
            uptime: GaugeVec::new(
                Opts::new(
                    "server_uptime_seconds",
                    "Seconds since the watched root process started.",
                ),
                SERVER,
            )?,
            build_info: IntGaugeVec::new(
                Opts::new("flyprobe_build_info", "flyprobe version; always 1."),
                &["version"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "flyprobe_dropped_events_total",
                    "Kernel events flyprobe could not record, by reason.",
                ),
                &["reason"],
            )?,
        })
    }

    fn collectors(&self) -> [&dyn Collector; 9] {
        [
            &self.active,
            &self.accepted,
            &self.closed,
            &self.requests,
            &self.in_flight,
            &self.workers,
            &self.uptime,
            &self.build_info,
            &self.dropped,
        ]
    }

    fn fill(&self, snap: &Snapshot) {
        for c in [&self.accepted, &self.closed, &self.requests, &self.dropped] {
            c.reset();
        }
        for g in [
            &self.active,
            &self.in_flight,
            &self.workers,
            &self.build_info,
        ] {
            g.reset();
        }
        self.uptime.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for (reason, count) in drop_reason::NAMES.iter().zip(snap.drops) {
            self.dropped.with_label_values(&[*reason]).inc_by(count);
        }
        for server in &snap.servers {
            let name = server.server.as_str();
            self.workers
                .with_label_values(&[name])
                .set(gauge(server.workers));
            self.uptime
                .with_label_values(&[name])
                .set(server.uptime_seconds);
            for proc in &server.procs {
                let pid = proc.pid.to_string();
                let labels = [name, pid.as_str()];
                let s = &proc.stats;
                self.accepted.with_label_values(&labels).inc_by(s.accepted);
                self.closed.with_label_values(&labels).inc_by(s.closed);
                self.requests.with_label_values(&labels).inc_by(s.requests);
                self.active
                    .with_label_values(&labels)
                    .set(gauge(s.active()));
                self.in_flight
                    .with_label_values(&labels)
                    .set(gauge(s.in_flight()));
            }
        }
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

struct ProbeCollector<S> {
    source: S,
    catalog: Catalog,
}

impl<S: SnapshotSource> Collector for ProbeCollector<S> {
    fn desc(&self) -> Vec<&Desc> {
        self.catalog
            .collectors()
            .into_iter()
            .flat_map(|c| c.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.catalog.fill(&self.source.snapshot());
        self.catalog
            .collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .collect()
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
    use probe_common::ProcStats;

    use super::*;
    use crate::snapshot::{ProcView, ServerView};

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
        };
        let snap = Snapshot {
            servers: vec![ServerView {
                server: "uvicorn".into(),
                uptime_seconds: 12.5,
                workers: 2,
                procs: vec![ProcView { pid: 42, stats }],
            }],
            drops: [0, 3, 0, 0, 0],
        };
        let text = render(&registry(Fixed(snap)).unwrap()).unwrap();
        for line in [
            "server_active_connections{pid=\"42\",server=\"uvicorn\"} 2",
            "server_connections_accepted_total{pid=\"42\",server=\"uvicorn\"} 7",
            "server_connections_closed_total{pid=\"42\",server=\"uvicorn\"} 5",
            "server_requests_total{pid=\"42\",server=\"uvicorn\"} 11",
            "server_in_flight_requests{pid=\"42\",server=\"uvicorn\"} 1",
            "server_workers{server=\"uvicorn\"} 2",
            "server_uptime_seconds{server=\"uvicorn\"} 12.5",
            "flyprobe_dropped_events_total{reason=\"target_map_full\"} 3",
            "flyprobe_dropped_events_total{reason=\"connection_map_full\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains("flyprobe_build_info{version=\""));
    }
}
