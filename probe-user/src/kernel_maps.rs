//! Userspace access to the kernel's state: the target set, connections, per-process and
//! per-label counters (summed over CPUs) and drop counters.

use std::collections::BTreeMap;

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use probe_common::{
    ConnKey, ConnState, ListenKey, PendingIo, ProcStats, ReqKey, ReqStats, conn_flags, drop_reason,
    names, phase,
};

use crate::probe::{ProbeError, take};

pub struct KernelMaps {
    targets: Array<MapData, u8>,
    conns: HashMap<MapData, ConnKey, ConnState>,
    listen_ports: HashMap<MapData, ListenKey, u8>,
    pending: HashMap<MapData, u64, PendingIo>,
    stats: PerCpuHashMap<MapData, u32, ProcStats>,
    reqs: PerCpuHashMap<MapData, ReqKey, ReqStats>,
    drops: PerCpuArray<MapData, u64>,
}

/// What the sweep reads of the maps as a whole.
#[derive(Debug, Default)]
pub struct Census {
    pub entries: Vec<(&'static str, u64)>,
    /// Established connections on watched listeners, not yet read, written or closed by a
    /// watched process, by (network namespace, port).
    pub queued: BTreeMap<(u32, u16), u64>,
}

/// What is left of an exited process: its counters and its labelled requests, with the
/// requests it was still reading counted as aborted.
#[derive(Debug, Default)]
pub struct Remains {
    pub stats: ProcStats,
    pub requests: Vec<(ReqKey, ReqStats)>,
    /// The connections it still held, to free with the rest (`forget`).
    pub held: Vec<ConnKey>,
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        Ok(Self {
            targets: take(ebpf, names::TARGETS)?,
            conns: take(ebpf, names::CONNS)?,
            listen_ports: take(ebpf, names::LISTEN_PORTS)?,
            pending: take(ebpf, names::PENDING_IO)?,
            stats: take(ebpf, names::STATS)?,
            reqs: take(ebpf, names::REQS)?,
            drops: take(ebpf, names::DROPS)?,
        })
    }

    /// Add a process to the kernel's target set.
    pub fn track(&mut self, pid: u32) -> Result<(), MapError> {
        self.targets.set(pid, 1, 0)
    }

    /// Take a process out of the target set: only for one whose exit the kernel did not see
    /// (it exited before it was seeded); otherwise the kernel clears it at exit, and clearing
    /// here could untrack a new process that reused the PID.
    pub fn untrack(&mut self, pid: u32) {
        let _ = self.targets.set(pid, 0, 0);
    }

    /// Tell the kernel of a watched listener (one that listened before the programs were
    /// attached, or in a process tracked after it listened): connections on it are served.
    pub fn listen(&mut self, key: ListenKey) -> Result<(), MapError> {
        if self.listen_ports.get(&key, 0).is_ok() {
            return Ok(());
        }
        self.listen_ports.insert(key, 1, 0)
    }

    /// Forget a listener that is gone: its port may become an ephemeral one, and an outbound
    /// connection from it must not look served.
    pub fn unlisten(&mut self, key: &ListenKey) {
        let _ = self.listen_ports.remove(key);
    }

    /// Counters of every process the kernel has seen accept, summed over CPUs.
    pub fn stats(&self) -> BTreeMap<u32, ProcStats> {
        summed(&self.stats, ProcStats::add)
    }

    /// One process's counters, summed over CPUs.
    pub fn stats_of(&self, pid: u32) -> ProcStats {
        let mut total = ProcStats::default();
        if let Ok(per_cpu) = self.stats.get(&pid, 0) {
            per_cpu.iter().for_each(|s| total.add(s));
        }
        total
    }

    /// Completed requests by labels, summed over CPUs.
    pub fn requests(&self) -> BTreeMap<ReqKey, ReqStats> {
        summed(&self.reqs, ReqStats::add)
    }

    /// Everything the kernel kept for an exited process, removed from the maps.
    pub fn retire(&mut self, pid: u32) -> Remains {
        let remains = self.remains(pid);
        self.forget(pid, &remains);
        remains
    }

    /// What the kernel kept for an exited process, left in the maps: the connections it
    /// still held are closed, and the request each was reading is aborted.
    pub fn remains(&self, pid: u32) -> Remains {
        let mut remains = Remains {
            stats: self.stats_of(pid),
            requests: self
                .requests()
                .into_iter()
                .filter(|(key, _)| key.tgid == pid)
                .collect(),
            held: Vec::new(),
        };
        // A key can be listed twice when other keys are deleted mid-walk: count it once.
        let held: std::collections::HashMap<ConnKey, ConnState> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| state.owner == pid)
            .collect();
        remains.held = held.keys().copied().collect();
        for state in held.values() {
            if state.phase == phase::REQUEST {
                // The kernel closed it with the process: aborted, no status.
                let labels = ReqKey {
                    tgid: pid,
                    method: state.method,
                    status: 0,
                    protocol: state.protocol,
                    _pad: 0,
                };
                let aborted = ReqStats {
                    count: 1,
                    ..Default::default()
                };
                remains.requests.push((labels, aborted));
            }
        }
        remains
    }

    /// Free the entries `remains` was read from, once it is kept. Keys, not a second walk of
    /// the maps: the walk was done by `remains`.
    pub fn forget(&mut self, pid: u32, remains: &Remains) {
        // The aborted requests added to `remains` name no entry: removing them is a no-op.
        for (key, _) in &remains.requests {
            let _ = self.reqs.remove(key);
        }
        for key in &remains.held {
            let _ = self.conns.remove(key);
        }
        let _ = self.stats.remove(&pid);
        // Pending-syscall slots of its threads (keyed by pid_tgid) that outlived the process.
        let slots: Vec<u64> = self
            .pending
            .keys()
            .filter_map(Result::ok)
            .filter(|id| (id >> 32) as u32 == pid)
            .collect();
        for id in slots {
            let _ = self.pending.remove(&id);
        }
    }

    /// Entries in the bounded maps, by `flyprobe_map_entries` label, and the connections
    /// no watched process has touched yet, by listening port (`conn_flags::QUEUED`). Walks
    /// the maps, so it runs in the 1 s sweep, not at scrape time.
    pub fn census(&self) -> Census {
        let mut queued: BTreeMap<(u32, u16), u64> = BTreeMap::new();
        let mut connections = 0;
        for (_, state) in self.conns.iter().filter_map(Result::ok) {
            connections += 1;
            if state.flags & conn_flags::QUEUED != 0 {
                *queued.entry((state.netns, state.port)).or_default() += 1;
            }
        }
        Census {
            entries: vec![
                ("connections", connections),
                ("processes", self.stats.keys().count() as u64),
                ("request_series", self.reqs.keys().count() as u64),
            ],
            queued,
        }
    }

    pub fn drops(&self) -> [u64; drop_reason::COUNT as usize] {
        let mut out = [0; drop_reason::COUNT as usize];
        for (reason, slot) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.drops.get(&(reason as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// Every entry of a per-CPU hash, its CPUs' values added up with `add`.
fn summed<K: Pod + Ord, V: Pod + Default>(
    map: &PerCpuHashMap<MapData, K, V>,
    add: fn(&mut V, &V),
) -> BTreeMap<K, V> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| {
            let mut total = V::default();
            per_cpu.iter().for_each(|v| add(&mut total, v));
            (key, total)
        })
        .collect()
}
