//! The watched process trees as userspace knows them: discovered from /proc at start, then
//! kept current by the kernel's fork and exit events. Workers are classified from /proc
//! (listening sockets) and the kernel counters; their starts and stops are counted here.
//! Exited processes are retired after a short grace: their final counters move to
//! `Retired` and their kernel entries are freed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use probe_common::ProcStats;
use procfs::process::Process;

use crate::{
    error::StartError,
    kernel::maps::Remains,
    model::{
        lifecycle::{EventLog, Lifecycle},
        members::{Member, Origin, ProcessKey, Role, Root},
        persist::{Ledger, MemberLedger, RootLedger},
        retired::Retired,
    },
    processes::{
        containers::Labels,
        server_kind, sockets,
        tree::{PF_KTHREAD, alive, nearest_root, parents},
    },
};

/// How long an exited process's kernel state is kept before it is read one last time: long
/// enough for its other threads to finish exiting.
pub const RETIRE_GRACE: Duration = Duration::from_millis(300);

/// Forks of children already gone, remembered until their exit events arrive.
const UNRESOLVED_FORKS: usize = 4096;

#[derive(Debug, Default)]
pub struct Watched {
    roots: Vec<Root>,
    members: BTreeMap<u32, Member>,
    /// Final counters of exited processes.
    retired: Retired,
    lifecycle: BTreeMap<u32, Lifecycle>,
    /// Members found gone by the last sweep, confirmed by the next.
    suspects: BTreeSet<u32>,
    /// Children of members whose fork event arrived after they were gone from /proc (they
    /// served and exited quickly): child -> parent. A process among them sends an exit
    /// event next, which makes it a member; a thread sends none.
    unresolved_forks: BTreeMap<u32, u32>,
    events: EventLog,
}

/// What /proc says about a process: (comm, start in seconds after boot, ppid).
fn proc_facts(pid: u32) -> Option<(String, f64, u32)> {
    let stat = Process::new(pid as i32).ok()?.stat().ok()?;
    let started = stat.starttime as f64 / procfs::ticks_per_second() as f64;
    Some((stat.comm, started, stat.ppid as u32))
}

impl Watched {
    /// Every root and its descendants as /proc shows them now. `server_name` overrides the
    /// detected server kind.
    pub fn discover(roots: &[u32], server_name: Option<&str>) -> Result<Self, StartError> {
        let mut watched = Self::default();
        for &pid in roots {
            watched.add_root(pid, server_name, Origin::PidTree)?;
        }
        watched.rescan();
        Ok(watched)
    }

    /// Watch `pid` and its descendants from the next `rescan` on. Returns false if it is a
    /// root already.
    pub fn add_root(
        &mut self,
        pid: u32,
        server_name: Option<&str>,
        origin: Origin,
    ) -> Result<bool, StartError> {
        if self.roots.iter().any(|r| r.pid == pid) {
            return Ok(false); // named twice
        }
        let process = Process::new(pid as i32).map_err(|_| StartError::NoSuchProcess { pid })?;
        let stat = process
            .stat()
            .map_err(|_| StartError::NoSuchProcess { pid })?;
        if let Ok(status) = process.status()
            && status.tgid as u32 != pid
        {
            return Err(StartError::Thread {
                pid,
                tgid: status.tgid as u32,
            });
        }
        if stat.flags & PF_KTHREAD != 0 {
            return Err(StartError::KernelThread {
                pid,
                comm: stat.comm,
            });
        }
        let cmdline = process.cmdline().unwrap_or_default();
        let server =
            server_name.map_or_else(|| server_kind::detect(&cmdline, &stat.comm), str::to_string);
        self.roots.push(Root {
            pid,
            server,
            started: stat.starttime as f64 / procfs::ticks_per_second() as f64,
            exited: None,
            labels: Labels::of(pid),
            origin,
        });
        self.lifecycle.insert(pid, Lifecycle::default());
        Ok(true)
    }

    /// Whether `pid` is a live member of a watched tree.
    pub fn is_member(&self, pid: u32) -> bool {
        self.members.get(&pid).is_some_and(|m| m.exited.is_none())
    }

    /// Forget servers found by a selector whose every root exited more than `after` seconds
    /// ago (uptime clock), with everything kept for them: on a node, servers come and go for
    /// good. A server is forgotten whole (all roots sharing its labels), so the totals of one
    /// that is still up never go down. Returns how many roots went.
    pub fn forget_exited(&mut self, now: f64, after: f64) -> usize {
        let group = |r: &Root| (r.server.clone(), r.labels.clone());
        // Roots with members left (a worker outliving its master, one not yet retired).
        let busy: BTreeSet<u32> = self.members.values().map(|m| m.root).collect();
        let keep: BTreeSet<(String, Labels)> = self
            .roots
            .iter()
            .filter(|r| {
                r.origin == Origin::PidTree
                    || busy.contains(&r.pid)
                    || r.exited.is_none_or(|t| now - t <= after)
            })
            .map(group)
            .collect();
        let gone: BTreeSet<u32> = self
            .roots
            .iter()
            .filter(|r| !keep.contains(&group(r)))
            .map(|r| r.pid)
            .collect();
        if gone.is_empty() {
            return 0;
        }
        self.roots.retain(|r| !gone.contains(&r.pid));
        self.retired.forget(&gone);
        self.lifecycle.retain(|root, _| !gone.contains(root));
        self.events.forget(&gone);
        gone.len()
    }

    /// Add descendants that appeared since the last scan; returns their PIDs.
    pub fn rescan(&mut self) -> Vec<u32> {
        let parents = parents();
        let roots: BTreeSet<u32> = self.roots.iter().map(|r| r.pid).collect();
        let mut added = Vec::new();
        let me = std::process::id();
        for &pid in parents.keys() {
            // flyprobe never watches itself, even when it runs inside a watched tree.
            if pid == me || self.members.contains_key(&pid) {
                continue;
            }
            let Some(root) = nearest_root(pid, &parents, &roots) else {
                continue;
            };
            if let Some((comm, started, ppid)) = proc_facts(pid) {
                self.members
                    .insert(pid, Member::new(ppid, root, comm, started, false));
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

    pub fn retired(&self) -> &Retired {
        &self.retired
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn lifecycle(&self, root: u32) -> Lifecycle {
        self.lifecycle.get(&root).cloned().unwrap_or_default()
    }

    /// Every root named by --pid-tree has exited (discovered ones come and go).
    /// The first --pid-tree root that is gone, if any.
    pub fn exited_root(&self) -> Option<u32> {
        self.roots
            .iter()
            .filter(|r| r.origin == Origin::PidTree)
            .map(|r| r.pid)
            .find(|&pid| !alive(pid))
    }

    pub fn all_roots_exited(&self) -> bool {
        self.roots
            .iter()
            .filter(|r| r.origin == Origin::PidTree)
            .all(|r| r.exited.is_some())
    }

    /// A tracked process forked `child`, which may be a thread: only processes join.
    pub fn on_fork(&mut self, child: u32, parent: u32) -> bool {
        if self.members.get(&child).is_some_and(|m| m.exited.is_none()) {
            return false; // already adopted by a sweep
        }
        let Some(root) = self.members.get(&parent).map(|m| m.root) else {
            return false;
        };
        match Process::new(child as i32).and_then(|p| p.status()) {
            Ok(status) if status.tgid == child as i32 => {}
            Ok(_) => return false, // a thread
            Err(_) => {
                // Gone already: remembered until its exit event says it was a process.
                if self.unresolved_forks.len() >= UNRESOLVED_FORKS {
                    self.unresolved_forks.pop_first();
                }
                self.unresolved_forks.insert(child, parent);
                return false;
            }
        }
        let (comm, started, _) = proc_facts(child).unwrap_or_default();
        self.members
            .insert(child, Member::new(parent, root, comm, started, true));
        true
    }

    /// Recompute which live members are workers; count first-time workers as started.
    pub fn classify(&mut self, kernel: &BTreeMap<u32, ProcStats>) {
        let parents: BTreeMap<u32, u32> = self.members.iter().map(|(&p, m)| (p, m.ppid)).collect();
        let live: Vec<u32> = self
            .members
            .iter()
            .filter(|(_, m)| m.exited.is_none())
            .map(|(&pid, _)| pid)
            .collect();
        let holders = sockets::listening(live.iter().copied());
        let roles = sockets::roles(&holders, &parents);
        // A supervisor stays one when its workers are gone (all crashed, or between a
        // reload's generations); it is then the only holder left but still not a worker.
        for pid in &roles.supervisors {
            if let Some(m) = self.members.get_mut(pid) {
                m.role = Role::Supervisor;
            }
        }
        let mut workers = roles.workers;
        // Anything that accepted a connection serves, listening socket or not.
        workers.extend(
            live.iter()
                .filter(|pid| kernel.get(pid).is_some_and(|s| s.accepted > 0)),
        );
        workers.retain(|pid| {
            self.members
                .get(pid)
                .is_some_and(|m| m.role != Role::Supervisor)
        });
        for pid in live {
            let is_worker = workers.contains(&pid);
            if let Some((comm, _, _)) = is_worker.then(|| proc_facts(pid)).flatten() {
                // exec changes comm (a spawned worker becomes `python`): keep it fresh.
                if let Some(m) = self.members.get_mut(&pid) {
                    m.comm = comm;
                }
            }
            self.set_worker(pid, is_worker);
        }
    }

    fn set_worker(&mut self, pid: u32, is_worker: bool) {
        let Some(m) = self.members.get_mut(&pid) else {
            return;
        };
        // Its first time serving: a start, for a process forked while flyprobe watched.
        let started = is_worker && !m.role.has_served() && m.forked_here;
        m.role = m.role.classified(is_worker);
        if started {
            let root = m.root;
            self.lifecycle.entry(root).or_default().started += 1;
            log::info!("worker {pid} ({}) started", m.comm);
            self.events.push(root, pid, None);
        }
    }

    /// A member exited. One that was never classified because it died within a sweep of its
    /// birth still counts as a worker if it accepted, or if a sibling under the same parent
    /// is a worker: a crash-looping worker is still a worker.
    pub fn on_exit(&mut self, pid: u32, reason: &str, accepted: bool, now: Instant, uptime: f64) {
        for root in self.roots.iter_mut().filter(|r| r.pid == pid) {
            root.exited.get_or_insert(uptime);
        }
        // A child that was gone when its fork event was read: exit events come from
        // processes only, so it was one, and what it served belongs to its parent's tree.
        if let Some(parent) = self.unresolved_forks.remove(&pid) {
            self.join(pid, parent);
        }
        let Some(member) = self.members.get(&pid) else {
            return;
        };
        if member.exited.is_some() {
            return;
        }
        let ppid = member.ppid;
        let sibling_serves = member.role == Role::Unclassified
            && self
                .members
                .iter()
                .any(|(&p, m)| p != pid && m.ppid == ppid && m.role.has_served());
        if !member.role.has_served() && (accepted || sibling_serves) {
            self.set_worker(pid, true);
        }
        let Some(member) = self.members.get_mut(&pid) else {
            return;
        };
        member.exited = Some(now);
        member.role = member.role.classified(false);
        if member.role.has_served() {
            log::info!("worker {pid} ({}) stopped: {reason}", member.comm);
            let root = member.root;
            *self
                .lifecycle
                .entry(root)
                .or_default()
                .stopped
                .entry(reason.to_string())
                .or_default() += 1;
            self.events.push(root, pid, Some(reason.to_string()));
        } else {
            log::debug!("process {pid} exited: {reason}");
        }
    }

    /// Live members whose process is gone without an exit event (it exited before it was
    /// tracked, or the event ring overflowed). Gone on two sweeps in a row: on the first, its
    /// exit event (which carries the reason) may still be in the ring.
    pub fn vanished(&mut self) -> Vec<u32> {
        let missing: BTreeSet<u32> = self
            .members
            .iter()
            .filter(|(pid, m)| m.exited.is_none() && !alive(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        let gone = missing.intersection(&self.suspects).copied().collect();
        self.suspects = missing;
        gone
    }

    /// A process the kernel counts that userspace does not know: its fork event was lost,
    /// or it was reaped before the event was read. It joins if its parent is a member.
    pub fn adopt(&mut self, pid: u32) -> bool {
        let is_process = Process::new(pid as i32)
            .and_then(|p| p.status())
            .is_ok_and(|s| s.tgid == pid as i32);
        let Some((comm, started, ppid)) = proc_facts(pid).filter(|_| is_process) else {
            return false;
        };
        let Some(root) = self.members.get(&ppid).map(|m| m.root) else {
            return false;
        };
        self.members
            .insert(pid, Member::new(ppid, root, comm, started, true));
        true
    }

    /// Look again for the Kubernetes names of live roots found in a pod before the kubelet
    /// had linked their container's log (for `within` seconds after they started).
    pub fn name_pods(&mut self, uptime_now: f64, within: f64) {
        for root in &mut self.roots {
            if root.exited.is_none()
                && uptime_now - root.started < within
                && root.labels.unnamed_pod()
                && root.labels.name_pod()
            {
                log::info!(
                    "{} (pid {}): named {}/{} container {}",
                    root.server,
                    root.pid,
                    root.labels.namespace.as_deref().unwrap_or(""),
                    root.labels.pod.as_deref().unwrap_or(""),
                    root.labels.container.as_deref().unwrap_or("?")
                );
            }
        }
    }

    /// Whether `pid` is a member, live or exited but not retired yet.
    pub fn knows(&self, pid: u32) -> bool {
        self.members.contains_key(&pid)
    }

    /// Whether `pid`'s fork was read after it was gone, and its exit is awaited.
    pub fn fork_unresolved(&self, pid: u32) -> bool {
        self.unresolved_forks.contains_key(&pid)
    }

    /// A process whose fork the daemon never read (the kernel's ring had no room), joined
    /// under `parent`, a member, as the kernel recorded it: its facts from /proc while it
    /// runs, else its parent's name. False when `parent` is not a member.
    pub fn join(&mut self, pid: u32, parent: u32) -> bool {
        let Some((root, parent_comm)) = self.members.get(&parent).map(|m| (m.root, m.comm.clone()))
        else {
            return false;
        };
        if self.members.contains_key(&pid) {
            return true;
        }
        let (comm, started) = proc_facts(pid)
            .filter(|_| alive(pid))
            .map_or((parent_comm, 0.0), |(comm, started, _)| (comm, started));
        self.members
            .insert(pid, Member::new(parent, root, comm, started, true));
        true
    }

    /// Whether `pid` is a member that has exited but is not retired yet.
    pub fn exited_member(&self, pid: u32) -> bool {
        self.members.get(&pid).is_some_and(|m| m.exited.is_some())
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

    /// What a restarted daemon needs to continue (--pin-path).
    pub fn ledger(&self) -> Ledger {
        Ledger {
            roots: self
                .roots
                .iter()
                .map(|r| {
                    let lc = self.lifecycle(r.pid);
                    let mut ledger = RootLedger {
                        pid: r.pid,
                        started: r.started,
                        started_workers: lc.started,
                        stopped: lc.stopped,
                        retired: Vec::new(),
                        retired_requests: Vec::new(),
                    };
                    self.retired.save(&mut ledger);
                    ledger
                })
                .collect(),
            members: self
                .members
                .iter()
                .map(|(&pid, m)| MemberLedger {
                    pid,
                    root: m.root,
                    started: m.started,
                    ever_worker: m.role.has_served(),
                    exited: m.exited.is_some(),
                })
                .collect(),
        }
    }

    /// Continue from the previous run's ledger: the final counters and lifecycle of the roots
    /// that are still the same processes, and the members that died while no daemon ran
    /// (their kernel counters are retired into their root at the next sweep; a worker among
    /// them counts as stopped, reason unknown). Returns how many roots continued, and the
    /// live members /proc did not place under a root any more (reparented): to track again.
    pub fn restore(&mut self, ledger: &Ledger, now: Instant) -> (usize, Vec<u32>) {
        let same = |a: f64, b: f64| (a - b).abs() < 0.05;
        let mut continued = BTreeSet::new();
        for rl in &ledger.roots {
            if !self
                .roots
                .iter()
                .any(|r| r.pid == rl.pid && same(r.started, rl.started))
            {
                continue;
            }
            continued.insert(rl.pid);
            self.lifecycle.insert(rl.pid, rl.lifecycle());
            self.retired.restore(rl, now);
        }
        let mut retrack = Vec::new();
        for ml in ledger
            .members
            .iter()
            .filter(|m| continued.contains(&m.root))
        {
            if let Some(m) = self.members.get_mut(&ml.pid) {
                if same(m.started, ml.started) && ml.ever_worker {
                    m.role = m.role.served();
                }
                continue; // alive (or its PID taken by a member since)
            }
            if let Some((comm, started, ppid)) = proc_facts(ml.pid)
                && same(started, ml.started)
                && alive(ml.pid)
            {
                let mut member = Member::new(ppid, ml.root, comm, started, false);
                if ml.ever_worker {
                    member.role = Role::Served;
                }
                self.members.insert(ml.pid, member);
                retrack.push(ml.pid);
                continue;
            }
            let mut member = Member::new(0, ml.root, String::new(), ml.started, false);
            member.role = if ml.ever_worker {
                Role::Served
            } else {
                Role::Other
            };
            member.exited = Some(now.checked_sub(RETIRE_GRACE).unwrap_or(now));
            if ml.ever_worker && !ml.exited {
                *self
                    .lifecycle
                    .entry(ml.root)
                    .or_default()
                    .stopped
                    .entry("unknown".into())
                    .or_default() += 1;
            }
            self.members.insert(ml.pid, member);
        }
        (continued.len(), retrack)
    }

    /// Keep an exited member's final counters and forget the member.
    pub fn retire(&mut self, pid: u32, last: &Remains) {
        let Some(member) = self.members.remove(&pid) else {
            return;
        };
        self.retired
            .add(ProcessKey::new(member.root, pid), last, Instant::now());
    }

    /// Fold the exited processes retired more than `retention` ago into their server's
    /// `FOLDED` series: their own series leave /metrics, every total stays the same. Returns
    /// how many were folded.
    pub fn fold_retired(&mut self, now: Instant, retention: Duration) -> usize {
        self.retired.fold(now, retention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ppid: u32, forked_here: bool) -> Member {
        Member::new(ppid, 1, "python".into(), 0.0, forked_here)
    }

    #[test]
    fn a_retired_member_leaves_its_counters_and_is_forgotten() {
        let mut w = Watched::default();
        let mut m = member(1, false);
        m.exited = Some(Instant::now());
        w.members.insert(5, m);
        let remains = Remains {
            stats: ProcStats {
                accepted: 3,
                requests: 4,
                ..Default::default()
            },
            ..Default::default()
        };
        w.retire(5, &remains);
        w.retire(5, &remains); // not a member any more: ignored
        let kept = w.retired().stats()[&ProcessKey::new(1, 5)];
        assert_eq!((kept.accepted, kept.requests), (3, 4));
        assert!(w.members().is_empty());
    }

    fn found_root(pid: u32, exited: Option<f64>) -> Root {
        Root {
            pid,
            server: "nginx".into(),
            started: 0.0,
            exited,
            labels: Labels::default(),
            origin: Origin::Selector,
        }
    }

    #[test]
    fn a_server_is_forgotten_whole_once_all_its_roots_are_long_gone() {
        let mut w = Watched::default();
        // nginx restarted in place: the old master exited long ago, the new one runs.
        w.roots.push(found_root(10, Some(100.0)));
        w.roots.push(found_root(20, None));
        w.members
            .insert(11, Member::new(10, 10, "nginx".into(), 0.0, false));
        w.retire(11, &Remains::default());
        assert_eq!(w.forget_exited(1000.0, 300.0), 0, "its totals still count");
        w.roots[1].exited = Some(600.0);
        assert_eq!(
            w.forget_exited(800.0, 300.0),
            0,
            "the second exited too recently"
        );
        assert_eq!(w.forget_exited(1000.0, 300.0), 2);
        assert!(w.roots.is_empty() && w.retired().stats().is_empty());
    }

    #[test]
    fn starts_count_new_workers_and_stops_count_worker_exits_by_reason() {
        let mut w = Watched::default();
        w.lifecycle.insert(1, Lifecycle::default());
        w.members.insert(1, member(0, false)); // the supervisor
        w.members.insert(10, member(1, false)); // a worker that was there before flyprobe
        w.members.insert(11, member(1, true)); // a worker forked later
        w.members.insert(12, member(1, true)); // dies before any sweep classifies it
        w.members.insert(13, member(11, true)); // a helper the worker forked
        for pid in [10, 11] {
            w.set_worker(pid, true);
        }
        let now = Instant::now();
        w.on_exit(12, "signal_SIGSEGV", false, now, 0.5);
        w.on_exit(11, "exit_0", false, now, 0.5);
        w.on_exit(11, "exit_0", false, now, 0.5); // duplicate event: counted once
        w.on_exit(13, "exit_0", false, now, 0.5); // never served, no serving sibling
        let lc = w.lifecycle(1);
        assert_eq!(lc.started, 2, "11 and 12 started; 10 predates flyprobe");
        assert_eq!(
            lc.stopped,
            BTreeMap::from([("exit_0".into(), 1), ("signal_SIGSEGV".into(), 1)])
        );
    }
}
