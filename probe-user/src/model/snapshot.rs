//! One consistent view of everything flyprobe reports, built at scrape time from the kernel
//! counters and the watched trees.

use std::collections::BTreeMap;

use probe_common::{PortStats, ProcStats, ReqKey, ReqStats, drop_reason};

use crate::{
    model::lifecycle::Lifecycle,
    model::{members::Member, watched::Watched},
    processes::containers::Labels,
};

/// Where snapshots come from (the daemon's shared state; a fixed one in tests).
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub servers: Vec<ServerView>,
    pub drops: [u64; drop_reason::COUNT as usize],
    /// Process events read from the kernel, by `event_kind` - 1.
    pub kernel_events: [u64; 3],
    pub map_entries: Vec<(&'static str, u64)>,
    /// Kernel memory each map uses (bytes, as the kernel accounts it).
    pub map_memory: BTreeMap<String, u64>,
    /// The hook set attached (`socket` or `syscall`).
    pub hooks: &'static str,
    /// `--tls`: the libssl files with the OpenSSL uprobes attached; None without it.
    pub tls_libraries: Option<u64>,
    /// Recent worker starts and stops, oldest first.
    pub events: Vec<EventView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventView {
    /// Unix seconds.
    pub time: f64,
    pub server: String,
    /// The server's place (a node runs many servers of one name).
    pub labels: Labels,
    pub pid: u32,
    /// `None` for a start, else the stop reason.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub server: String,
    /// Container, pod, unit, network namespace.
    pub labels: Labels,
    /// Whether a root of this server is alive.
    pub up: bool,
    pub uptime_seconds: f64,
    pub lifecycle: Lifecycle,
    pub workers: Vec<WorkerView>,
    pub procs: Vec<ProcView>,
    /// Completed requests by (pid, method, status class, protocol), exited ones included.
    pub requests: BTreeMap<ReqKey, ReqStats>,
    /// Connections established on its listeners that no worker has read, written or closed
    /// yet (socket hooks): in the accept queue, or accepted and idle.
    pub queued: u64,
    /// Its listening ports: waits for a worker, resets, accept queues.
    pub ports: ServerPorts,
}

/// What a server's listening ports show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerPorts {
    /// The kernel's counts on them (waits for a worker, resets), gone listeners included.
    pub counted: PortStats,
    /// Each port's accept queue right now.
    pub queues: BTreeMap<u16, u64>,
    /// Each port's accept queue limit (listeners in flyprobe's own network namespace).
    pub limits: BTreeMap<u16, u64>,
    /// Each port's dropped connections (accept or SYN queue full), for listeners in
    /// flyprobe's own network namespace.
    pub overflows: BTreeMap<u16, u64>,
}

impl ServerPorts {
    pub fn add(&mut self, other: &Self) {
        self.counted.add(&other.counted);
        for (mine, theirs) in [
            (&mut self.queues, &other.queues),
            (&mut self.limits, &other.limits),
            (&mut self.overflows, &other.overflows),
        ] {
            for (port, n) in theirs {
                *mine.entry(*port).or_default() += n;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub uptime_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcView {
    pub pid: u32,
    /// Exited processes report `ProcStats::finished`: counters kept, gauges at zero.
    pub stats: ProcStats,
}

/// What the kernel maps hold at one moment.
pub struct KernelView {
    pub stats: BTreeMap<u32, ProcStats>,
    pub requests: BTreeMap<ReqKey, ReqStats>,
    pub drops: [u64; drop_reason::COUNT as usize],
    pub kernel_events: [u64; 3],
    pub map_entries: Vec<(&'static str, u64)>,
    /// Queued connections by root.
    pub queued: BTreeMap<u32, u64>,
    /// Listening ports by root.
    pub ports: BTreeMap<u32, ServerPorts>,
    pub map_memory: BTreeMap<String, u64>,
    pub hooks: &'static str,
    pub tls_libraries: Option<u64>,
}

pub fn build(watched: &Watched, kernel: &KernelView, uptime_now: f64) -> Snapshot {
    // Roots that share their labels (two uvicorns on a laptop) are one server.
    let mut groups: BTreeMap<(&str, &Labels), Vec<u32>> = BTreeMap::new();
    for root in watched.roots() {
        groups
            .entry((&root.server, &root.labels))
            .or_default()
            .push(root.pid);
    }
    let servers = groups
        .into_iter()
        .map(|((label, labels), roots)| {
            server(watched, kernel, (label, labels), &roots, uptime_now)
        })
        .collect();
    let server_of = |root: u32| {
        watched
            .roots()
            .iter()
            .find(|r| r.pid == root)
            .map(|r| (r.server.clone(), r.labels.clone()))
            .unwrap_or_default()
    };
    Snapshot {
        servers,
        drops: kernel.drops,
        kernel_events: kernel.kernel_events,
        map_entries: kernel.map_entries.clone(),
        map_memory: kernel.map_memory.clone(),
        hooks: kernel.hooks,
        tls_libraries: kernel.tls_libraries,
        events: watched
            .events()
            .iter()
            .map(|e| {
                let (server, labels) = server_of(e.root);
                EventView {
                    time: e.time,
                    server,
                    labels,
                    pid: e.pid,
                    stopped: e.stopped.clone(),
                }
            })
            .collect(),
    }
}

fn server(
    watched: &Watched,
    kernel: &KernelView,
    (label, labels): (&str, &Labels),
    roots: &[u32],
    uptime_now: f64,
) -> ServerView {
    let members: BTreeMap<u32, &Member> = watched
        .members()
        .iter()
        .filter(|(_, m)| roots.contains(&m.root))
        .map(|(&pid, m)| (pid, m))
        .collect();
    let mut requests: BTreeMap<ReqKey, ReqStats> = kernel
        .requests
        .iter()
        .filter(|(key, _)| members.contains_key(&key.tgid))
        .map(|(k, v)| (*k, *v))
        .collect();
    for ((root, key), stats) in watched.retired().requests() {
        if roots.contains(root) {
            requests.entry(*key).or_default().add(stats);
        }
    }
    let mut per_pid: BTreeMap<u32, ProcStats> = BTreeMap::new();
    let mut workers = Vec::new();
    for (&pid, member) in &members {
        if member.role.serving() {
            workers.push(WorkerView {
                pid,
                ppid: member.ppid,
                comm: member.comm.clone(),
                uptime_seconds: seconds(uptime_now - member.started),
            });
        }
        let counters = kernel.stats.get(&pid).copied();
        if counters.is_none() && !member.role.has_served() {
            continue; // a supervisor or helper that never accepted
        }
        let mut stats = counters.unwrap_or_default();
        if member.exited.is_some() {
            stats = stats.finished();
        }
        per_pid.entry(pid).or_default().add(&stats);
    }
    for (key, stats) in watched.retired().stats() {
        if roots.contains(&key.root) {
            per_pid.entry(key.pid).or_default().add(stats);
        }
    }
    let mine = || watched.roots().iter().filter(|r| roots.contains(&r.pid));
    let mut lifecycle = Lifecycle::default();
    for root in roots {
        let lc = watched.lifecycle(*root);
        lifecycle.started += lc.started;
        for (reason, n) in lc.stopped {
            *lifecycle.stopped.entry(reason).or_default() += n;
        }
    }
    ServerView {
        server: label.to_string(),
        labels: labels.clone(),
        up: mine().any(|r| r.exited.is_none()),
        uptime_seconds: mine()
            .map(|r| seconds(r.exited.unwrap_or(uptime_now) - r.started))
            .fold(0.0, f64::max),
        lifecycle,
        workers,
        procs: per_pid
            .into_iter()
            .map(|(pid, stats)| ProcView { pid, stats })
            .collect(),
        requests,
        queued: roots.iter().filter_map(|r| kernel.queued.get(r)).sum(),
        ports: roots.iter().filter_map(|r| kernel.ports.get(r)).fold(
            ServerPorts::default(),
            |mut all, p| {
                all.add(p);
                all
            },
        ),
    }
}

/// Start times tick at 100 Hz: report centiseconds, not float noise.
fn seconds(span: f64) -> f64 {
    (span.max(0.0) * 100.0).round() / 100.0
}
