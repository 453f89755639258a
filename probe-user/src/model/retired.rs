//! Exited processes' final counters. Each is kept as its own series for the worker
//! retention, then folded into its server's `pid="retired"` series: its series leaves
//! /metrics, and no total goes down.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use probe_common::{ProcStats, ReqKey, ReqStats};

use crate::{
    kernel::maps::Remains,
    model::{members::ProcessKey, persist::RootLedger},
};

/// The pid under which exited workers past their retention are folded together (no process
/// has PID 0); exposed as `pid="retired"`.
pub const FOLDED: u32 = 0;

#[derive(Debug, Default)]
pub struct Retired {
    /// Final counters of exited processes; summed if a PID is reused. Pid `FOLDED` holds
    /// those past their retention, folded together.
    stats: BTreeMap<ProcessKey, ProcStats>,
    /// Their labelled requests, by root.
    requests: BTreeMap<(u32, ReqKey), ReqStats>,
    /// When each process of `stats` was retired (a restored one: when restored).
    at: BTreeMap<ProcessKey, Instant>,
}

impl Retired {
    pub fn stats(&self) -> &BTreeMap<ProcessKey, ProcStats> {
        &self.stats
    }

    pub fn requests(&self) -> &BTreeMap<(u32, ReqKey), ReqStats> {
        &self.requests
    }

    /// Keep the final counters `last` of the exited process `key`, retired at `now`.
    pub fn add(&mut self, key: ProcessKey, last: &Remains, now: Instant) {
        self.at.insert(key, now);
        self.stats
            .entry(key)
            .or_default()
            .add(&last.stats.finished());
        for (req, stats) in &last.requests {
            self.requests
                .entry((key.root, *req))
                .or_default()
                .add(stats);
        }
    }

    /// Fold the processes retired more than `retention` before `now` into their server's
    /// `FOLDED` series. Returns how many were folded.
    pub fn fold(&mut self, now: Instant, retention: Duration) -> usize {
        let due: Vec<ProcessKey> = self
            .at
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= retention)
            .map(|(key, _)| *key)
            .collect();
        if due.is_empty() {
            return 0;
        }
        let due_set: BTreeSet<ProcessKey> = due.iter().copied().collect();
        for key in &due {
            self.at.remove(key);
            if let Some(stats) = self.stats.remove(key) {
                let folded = ProcessKey::new(key.root, FOLDED);
                self.stats.entry(folded).or_default().add(&stats);
            }
        }
        let folded: Vec<(u32, ReqKey)> = self
            .requests
            .keys()
            .filter(|(root, key)| due_set.contains(&ProcessKey::new(*root, key.tgid)))
            .copied()
            .collect();
        for (root, key) in folded {
            if let Some(stats) = self.requests.remove(&(root, key)) {
                let into = ReqKey {
                    tgid: FOLDED,
                    ..key
                };
                self.requests.entry((root, into)).or_default().add(&stats);
            }
        }
        due.len()
    }

    /// Forget everything kept for the roots `gone`.
    pub fn forget(&mut self, gone: &BTreeSet<u32>) {
        self.stats.retain(|key, _| !gone.contains(&key.root));
        self.at.retain(|key, _| !gone.contains(&key.root));
        self.requests.retain(|(root, _), _| !gone.contains(root));
    }

    /// What is kept for root `ledger.pid`, into its ledger: its processes' counters and
    /// their requests.
    pub fn save(&self, ledger: &mut RootLedger) {
        let root = ledger.pid;
        ledger.retired = self
            .stats
            .iter()
            .filter(|(key, _)| key.root == root)
            .map(|(key, s)| (key.pid, *s))
            .collect();
        ledger.retired_requests = self
            .requests
            .iter()
            .filter(|((r, _), _)| *r == root)
            .map(|((_, key), s)| (*key, *s))
            .collect();
    }

    /// Add what a previous run kept for root `ledger.pid`, its retention starting `now`.
    pub fn restore(&mut self, ledger: &RootLedger, now: Instant) {
        for (pid, stats) in &ledger.retired {
            let key = ProcessKey::new(ledger.pid, *pid);
            self.stats.entry(key).or_default().add(stats);
            if *pid != FOLDED {
                self.at.insert(key, now);
            }
        }
        for (key, stats) in &ledger.retired_requests {
            self.requests
                .entry((ledger.pid, *key))
                .or_default()
                .add(stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retiring_keeps_final_counters_with_gauges_at_zero() {
        let mut r = Retired::default();
        let last = ProcStats {
            accepted: 3,
            closed: 1,
            requests: 4,
            responses: 3,
            aborted: 0,
            ..Default::default()
        };
        let remains = Remains {
            stats: last,
            ..Default::default()
        };
        r.add(ProcessKey::new(1, 5), &remains, Instant::now());
        let kept = r.stats()[&ProcessKey::new(1, 5)];
        assert_eq!((kept.accepted, kept.requests), (3, 4));
        assert_eq!((kept.active(), kept.in_flight()), (0, 0));
    }

    #[test]
    fn retired_workers_fold_into_one_series_after_their_retention_and_totals_stay() {
        let mut r = Retired::default();
        let stats = ProcStats {
            accepted: 2,
            requests: 5,
            responses: 5,
            ..Default::default()
        };
        let now = Instant::now();
        for pid in [5, 6] {
            let key = ReqKey {
                tgid: pid,
                method: 1,
                status: 2,
                protocol: 1,
                transport: 0,
            };
            let remains = Remains {
                stats,
                requests: vec![(
                    key,
                    ReqStats {
                        count: 5,
                        ..Default::default()
                    },
                )],
                ..Default::default()
            };
            r.add(ProcessKey::new(1, pid), &remains, now);
        }
        let total = |r: &Retired| -> (u64, u64) {
            (
                r.stats().values().map(|s| s.requests).sum(),
                r.requests().values().map(|s| s.count).sum(),
            )
        };
        assert_eq!(r.fold(now, Duration::from_secs(60)), 0, "within retention");
        assert_eq!(r.stats().len(), 2);
        let later = now + Duration::from_secs(61);
        assert_eq!(r.fold(later, Duration::from_secs(60)), 2);
        assert_eq!(
            r.stats().keys().collect::<Vec<_>>(),
            vec![&ProcessKey::new(1, FOLDED)],
            "one series for the server's retired workers"
        );
        assert_eq!(total(&r), (10, 10), "no count lost or doubled");
        assert!(r.requests().keys().all(|(_, k)| k.tgid == FOLDED));
        assert_eq!(r.fold(later, Duration::from_secs(60)), 0, "folded once");
    }

    /// What a restarted daemon continues from (`--pin-path`): the root's own counters, a
    /// folded series kept folded, other roots' left out.
    #[test]
    fn a_root_s_counters_survive_the_ledger() {
        let mut r = Retired::default();
        let now = Instant::now();
        let remains = |requests| Remains {
            stats: ProcStats {
                requests,
                ..Default::default()
            },
            requests: vec![(
                ReqKey {
                    tgid: 5,
                    method: 1,
                    status: 2,
                    protocol: 1,
                    transport: 0,
                },
                ReqStats {
                    count: requests,
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        r.add(ProcessKey::new(1, 5), &remains(3), now);
        r.add(ProcessKey::new(1, 6), &remains(4), now);
        r.add(ProcessKey::new(2, 7), &remains(9), now);
        r.fold(now + Duration::from_secs(1), Duration::ZERO);
        let mut ledger = RootLedger {
            pid: 1,
            started: 0.0,
            started_workers: 0,
            stopped: Default::default(),
            retired: Vec::new(),
            retired_requests: Vec::new(),
        };
        r.save(&mut ledger);
        let mut again = Retired::default();
        again.restore(&ledger, now);
        let sum = |r: &Retired, root: u32| -> u64 {
            r.stats()
                .iter()
                .filter(|(k, _)| k.root == root)
                .map(|(_, s)| s.requests)
                .sum()
        };
        assert_eq!(sum(&again, 1), 7);
        assert_eq!(sum(&again, 2), 0, "another root's");
        assert_eq!(
            again.stats().keys().collect::<Vec<_>>(),
            vec![&ProcessKey::new(1, FOLDED)]
        );
        assert_eq!(
            again.fold(now + Duration::from_secs(3600), Duration::ZERO),
            0
        );
        assert_eq!(again.requests().values().map(|s| s.count).sum::<u64>(), 7);
    }
}
