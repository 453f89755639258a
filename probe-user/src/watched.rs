//! The watched process trees as userspace knows them: discovered from /proc at start, then
//! kept current by the kernel's fork and exit events. Exited processes are retired after a
//! short grace: their final counters move here and their kernel entries are freed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use probe_common::ProcStats;
use procfs::process::{Process, all_processes};

use crate::{error::StartError, server_kind};

/// How long an exited process's kernel state is kept before it is read one last time: long
/// enough for its other threads to finish exiting.
pub const RETIRE_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct Root {
    pub pid: u32,
    pub server: String,
    /// Seconds after boot the root process started.
    pub started: f64,
    /// Seconds after boot it exited, once it has.
    pub exited: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub ppid: u32,
    pub root: u32,
    pub exited: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Watched {
    roots: Vec<Root>,
    members: BTreeMap<u32, Member>,
    /// Final counters of exited processes, by (root, pid); summed if a PID is reused.
    retired: BTreeMap<(u32, u32), ProcStats>,
}

impl Watched {
    /// Every root and its descendants as /proc shows them now.
    pub fn discover(roots: &[u32]) -> Result<Self, StartError> {
        let mut watched = Self::default();
        for &pid in roots {
            let process =
                Process::new(pid as i32).map_err(|_| StartError::NoSuchProcess { pid })?;
            let stat = process
                .stat()
                .map_err(|_| StartError::NoSuchProcess { pid })?;
            let cmdline = process.cmdline().unwrap_or_default();
            watched.roots.push(Root {
                pid,
                server: server_kind::detect(&cmdline, &stat.comm),
                started: stat.starttime as f64 / procfs::ticks_per_second() as f64,
                exited: None,
            });
        }
        watched.rescan();
        Ok(watched)
    }

    /// Add descendants that appeared since the last scan; returns their PIDs.
    pub fn rescan(&mut self) -> Vec<u32> {
        let parents: BTreeMap<u32, u32> = all_processes()
            .into_iter()
            .flatten()
            .filter_map(|p| p.ok()?.stat().ok())
            .map(|s| (s.pid as u32, s.ppid as u32))
            .collect();
        let roots: BTreeSet<u32> = self.roots.iter().map(|r| r.pid).collect();
        let mut added = Vec::new();
        for (&pid, &ppid) in &parents {
            if self.members.contains_key(&pid) {
                continue;
            }
            if let Some(root) = nearest_root(pid, &parents, &roots) {
                self.members.insert(
                    pid,
                    Member {
                        ppid,
                        root,
                        exited: None,
                    },
                );
                added.push(pid);
            }
        }
        added
    }

    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    pub fn members(&self) -> &BTreeMap<u32, Member> {
        &self.members
    }

    pub fn retired(&self) -> &BTreeMap<(u32, u32), ProcStats> {
        &self.retired
    }

    /// A tracked process forked `child`, which may be a thread: only processes join.
    pub fn on_fork(&mut self, child: u32, parent: u32) -> bool {
        let Some(root) = self.members.get(&parent).map(|m| m.root) else {
            return false;
        };
        let is_process = Process::new(child as i32)
            .and_then(|p| p.status())
            .is_ok_and(|s| s.tgid == child as i32);
        if is_process {
            self.members.insert(
                child,
                Member {
                    ppid: parent,
                    root,
                    exited: None,
                },
            );
        }
        is_process
    }

    pub fn on_exit(&mut self, pid: u32, now: Instant, uptime: f64) {
        if let Some(member) = self.members.get_mut(&pid) {
            member.exited.get_or_insert(now);
        }
        for root in self.roots.iter_mut().filter(|r| r.pid == pid) {
            root.exited.get_or_insert(uptime);
        }
    }

    /// Live members whose process is gone without an exit event (it exited before it was
    /// tracked, or the event ring overflowed).
    pub fn vanished(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(pid, m)| m.exited.is_none() && !procfs_has(**pid))
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Exited members whose grace has passed.
    pub fn due(&self, now: Instant) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(_, m)| {
                m.exited
                    .is_some_and(|t| now.duration_since(t) >= RETIRE_GRACE)
            })
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Keep an exited member's final counters and forget the member.
    pub fn retire(&mut self, pid: u32, last: ProcStats) {
        if let Some(member) = self.members.remove(&pid) {
            self.retired
                .entry((member.root, pid))
                .or_default()
                .add(&last.finished());
        }
    }
}

fn procfs_has(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

/// The closest ancestor of `pid` (or `pid` itself) that is a root.
fn nearest_root(pid: u32, parents: &BTreeMap<u32, u32>, roots: &BTreeSet<u32>) -> Option<u32> {
    let mut cur = pid;
    // PIDs form a tree; the bound only guards against a /proc snapshot taken mid-reparent.
    for _ in 0..256 {
        if roots.contains(&cur) {
            return Some(cur);
        }
        cur = *parents.get(&cur)?;
        if cur == 0 {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_root_walks_up_to_the_closest_root() {
        // 1 -> 10 -> 11 -> 12, 1 -> 20
        let parents = BTreeMap::from([(1, 0), (10, 1), (11, 10), (12, 11), (20, 1)]);
        let roots = BTreeSet::from([10, 11]);
        assert_eq!(nearest_root(12, &parents, &roots), Some(11));
        assert_eq!(nearest_root(10, &parents, &roots), Some(10));
        assert_eq!(nearest_root(20, &parents, &roots), None);
    }

    #[test]
    fn retiring_keeps_final_counters_with_gauges_at_zero() {
        let mut w = Watched::default();
        w.members.insert(
            5,
            Member {
                ppid: 1,
                root: 1,
                exited: Some(Instant::now()),
            },
        );
        let last = ProcStats {
            accepted: 3,
            closed: 1,
            requests: 4,
            responses: 3,
            aborted: 0,
        };
        w.retire(5, last);
        w.retire(5, last); // not a member any more: ignored
        let kept = w.retired()[&(1, 5)];
        assert_eq!((kept.accepted, kept.requests), (3, 4));
        assert_eq!((kept.active(), kept.in_flight()), (0, 0));
        assert!(w.members().is_empty());
    }
}
