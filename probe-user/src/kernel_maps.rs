//! Userspace access to the kernel's state: the target set, connections, per-process and
//! per-label counters (summed over CPUs) and drop counters.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use probe_common::{ConnKey, ConnState, ProcStats, ReqKey, ReqStats, drop_reason, names, phase};

use crate::probe::{ProbeError, take};

pub struct KernelMaps {
    targets: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, ConnKey, ConnState>,
    stats: PerCpuHashMap<MapData, u32, ProcStats>,
    reqs: PerCpuHashMap<MapData, ReqKey, ReqStats>,
    drops: PerCpuArray<MapData, u64>,
}

/// What is left of an exited process: its counters and its labelled requests, with the
/// requests it was still reading counted as aborted.
#[derive(Debug, Default)]
pub struct Remains {
    pub stats: ProcStats,
    pub requests: Vec<(ReqKey, ReqStats)>,
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        Ok(Self {
            targets: take(ebpf, names::TARGETS)?,
            conns: take(ebpf, names::CONNS)?,
            stats: take(ebpf, names::STATS)?,
            reqs: take(ebpf, names::REQS)?,
            drops: take(ebpf, names::DROPS)?,
        })
    }

    /// Add a process to the kernel's target set.
    pub fn track(&mut self, pid: u32) -> Result<(), MapError> {
        self.targets.insert(pid, 1, 0)
    }

    /// Counters of every process the kernel has seen accept, summed over CPUs.
    pub fn stats(&self) -> BTreeMap<u32, ProcStats> {
        self.stats
            .iter()
            .filter_map(Result::ok)
            .map(|(pid, per_cpu)| {
                let mut total = ProcStats::default();
                per_cpu.iter().for_each(|s| total.add(s));
                (pid, total)
            })
            .collect()
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
        self.reqs
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| {
                let mut total = ReqStats::default();
                per_cpu.iter().for_each(|s| total.add(s));
                (key, total)
            })
            .collect()
    }

    /// Everything the kernel kept for an exited process, removed from the maps.
    pub fn retire(&mut self, pid: u32) -> Remains {
        let mut remains = Remains {
            stats: self.stats_of(pid),
            requests: self
                .requests()
                .into_iter()
                .filter(|(key, _)| key.tgid == pid)
                .collect(),
        };
        for (key, _) in &remains.requests {
            let _ = self.reqs.remove(key);
        }
        let _ = self.stats.remove(&pid);
        let _ = self.targets.remove(&pid);
        let held: Vec<(ConnKey, ConnState)> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.tgid == pid)
            .collect();
        for (key, state) in held {
            let _ = self.conns.remove(&key);
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
