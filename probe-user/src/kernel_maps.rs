//! Userspace access to the kernel's state: the target set, connections, per-process counters
//! (summed over CPUs) and drop counters.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use probe_common::{ConnKey, ConnState, ProcStats, drop_reason, names};

use crate::probe::{ProbeError, take};

pub struct KernelMaps {
    targets: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, ConnKey, ConnState>,
    stats: PerCpuHashMap<MapData, u32, ProcStats>,
    drops: PerCpuArray<MapData, u64>,
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        Ok(Self {
            targets: take(ebpf, names::TARGETS)?,
            conns: take(ebpf, names::CONNS)?,
            stats: take(ebpf, names::STATS)?,
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
            .map(|(pid, per_cpu)| (pid, sum(per_cpu.iter())))
            .collect()
    }

    /// One process's counters, summed over CPUs.
    pub fn stats_of(&self, pid: u32) -> ProcStats {
        self.stats
            .get(&pid, 0)
            .map(|per_cpu| sum(per_cpu.iter()))
            .unwrap_or_default()
    }

    /// Final counters of an exited process; removes everything the kernel kept for it.
    pub fn retire(&mut self, pid: u32) -> ProcStats {
        let last = self.stats_of(pid);
        let _ = self.stats.remove(&pid);
        let _ = self.targets.remove(&pid);
        let stale: Vec<ConnKey> = self
            .conns
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.tgid == pid)
            .collect();
        for key in stale {
            let _ = self.conns.remove(&key);
        }
        last
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

fn sum<'a>(per_cpu: impl Iterator<Item = &'a ProcStats>) -> ProcStats {
    per_cpu.fold(ProcStats::default(), |mut acc, s| {
        acc.add(s);
        acc
    })
}
