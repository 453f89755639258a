//! One consistent view of everything flyprobe reports, built at scrape time from the kernel
//! counters, the watched trees and /proc.

use std::collections::BTreeMap;

use probe_common::{ProcStats, drop_reason};

use crate::{sockets, watched::Watched};

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub servers: Vec<ServerView>,
    pub drops: [u64; drop_reason::COUNT as usize],
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub server: String,
    pub uptime_seconds: f64,
    pub workers: u64,
    pub procs: Vec<ProcView>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcView {
    pub pid: u32,
    /// Exited processes report `ProcStats::finished`: counters kept, gauges at zero.
    pub stats: ProcStats,
}

pub fn build(
    watched: &Watched,
    kernel: &BTreeMap<u32, ProcStats>,
    drops: [u64; drop_reason::COUNT as usize],
    uptime_now: f64,
) -> Snapshot {
    let members = watched.members();
    let parents: BTreeMap<u32, u32> = members.iter().map(|(&pid, m)| (pid, m.ppid)).collect();
    let live: Vec<u32> = members
        .iter()
        .filter(|(_, m)| m.exited.is_none())
        .map(|(&pid, _)| pid)
        .collect();
    let holders = sockets::listening(live.iter().copied());
    let mut workers = sockets::workers(&holders, &parents);
    // Anything that accepted a connection serves, listening socket or not (e.g. passed fds).
    workers.extend(
        live.iter()
            .filter(|pid| kernel.get(pid).is_some_and(|s| s.accepted > 0)),
    );

    // Roots that share a label (two uvicorns) are one server.
    let mut labels: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for root in watched.roots() {
        labels.entry(&root.server).or_default().push(root.pid);
    }
    let servers = labels
        .into_iter()
        .map(|(label, roots)| {
            let in_server = |root: u32| roots.contains(&root);
            let mut per_pid: BTreeMap<u32, ProcStats> = BTreeMap::new();
            for (&pid, member) in members.iter().filter(|(_, m)| in_server(m.root)) {
                let counters = kernel.get(&pid).copied();
                let serving = workers.contains(&pid);
                if counters.is_none() && !serving {
                    continue; // a supervisor or helper that never accepted
                }
                let mut stats = counters.unwrap_or_default();
                if member.exited.is_some() {
                    stats = stats.finished();
                }
                per_pid.entry(pid).or_default().add(&stats);
            }
            for (&(root, pid), stats) in watched.retired() {
                if in_server(root) {
                    per_pid.entry(pid).or_default().add(stats);
                }
            }
            let live_workers = members
                .iter()
                .filter(|(pid, m)| in_server(m.root) && m.exited.is_none() && workers.contains(pid))
                .count() as u64;
            let uptime_seconds = watched
                .roots()
                .iter()
                .filter(|r| roots.contains(&r.pid))
                .map(|r| (r.exited.unwrap_or(uptime_now) - r.started).max(0.0))
                .fold(0.0, f64::max);
            ServerView {
                server: label.to_string(),
                uptime_seconds,
                workers: live_workers,
                procs: per_pid
                    .into_iter()
                    .map(|(pid, stats)| ProcView { pid, stats })
                    .collect(),
            }
        })
        .collect();
    Snapshot { servers, drops }
}
