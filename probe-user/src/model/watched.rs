//! The watched process trees as userspace knows them: discovered from /proc at start, then
//! kept current by the kernel's fork and exit events. Workers are classified from /proc
//! (listening sockets) and the kernel counters; their starts and stops are counted here.
//! Exited processes are retired after a short grace: their final counters move here and
//! their kernel entries are freed.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use probe_common::{ProcStats, ReqKey, ReqStats};
use procfs::process::Process;

use crate::{
    error::StartError,
    kernel::maps::Remains,
    model::{
        lifecycle::Lifecycle,
        persist::{Ledger, MemberLedger, RootLedger},
    },
    processes::containers::Labels,
    processes::server_kind,
    processes::sockets,
    processes::tree::{PF_KTHREAD, alive, nearest_root, parents},
};

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
    /// Container, pod, unit and network namespace, where known.
    pub labels: Labels,
    pub origin: Origin,
}

/// How a root came to be watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Named by `--pid-tree`: watched for flyprobe's whole life.
    PidTree,
    /// Found by a node-wide selector: forgotten some time after it exits.
    Selector,
}

/// Worker starts and stops kept for the dashboard's feed.
pub const EVENT_LOG_LEN: usize = 100;

/// One worker start or stop.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// Unix seconds.
    pub time: f64,
    pub root: u32,
    pub pid: u32,
    /// `None` for a start, the stop reason for a stop.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub ppid: u32,
    pub root: u32,
    pub comm: String,
    /// Seconds after boot the process started.
    pub started: f64,
    /// Forked after flyprobe attached: becoming a worker counts as a start.
    pub forked_here: bool,
    pub role: Role,
    pub exited: Option<Instant>,
}

/// What a member is to its server, as `classify` (or its exit) last found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Not looked at while alive yet: at its exit, a sibling that serves makes it a worker.
    #[default]
    Unclassified,
    /// Has not served (a helper, a child before it serves).
    Other,
    /// Serves right now (holds a listening socket it did not hand down, or accepted).
    Serving,
    /// Has served, not now: its exit is a worker stop.
    Served,
    /// Has handed its listening socket to a descendant: never a worker.
    Supervisor,
}

impl Role {
    pub fn serving(self) -> bool {
        self == Self::Serving
    }

    /// Serves or has served: a worker, whose exit is a stop.
    pub fn has_served(self) -> bool {
        matches!(self, Self::Serving | Self::Served)
    }

    /// The role once the member is known to have served (a previous run's ledger says so):
    /// a supervisor stays one, for `classify` to decide.
    fn served(self) -> Self {
        match self {
            Self::Serving | Self::Supervisor => self,
            Self::Unclassified | Self::Other | Self::Served => Self::Served,
        }
    }

    /// The role after `classify` found the member serving (`serves`) or not.
    fn classified(self, serves: bool) -> Self {
        match (serves, self) {
            (true, _) => Self::Serving,
            (false, Self::Serving | Self::Served) => Self::Served,
            (false, Self::Supervisor) => Self::Supervisor,
            (false, Self::Unclassified | Self::Other) => Self::Other,
        }
    }
}

/// A process of a watched tree: its root and its PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcessKey {
    pub root: u32,
    pub pid: u32,
}

impl ProcessKey {
    pub fn new(root: u32, pid: u32) -> Self {
        Self { root, pid }
    }
}

/// The pid under which exited workers past their retention are folded together (no process
/// has PID 0); exposed as `pid="retired"`.
pub const FOLDED: u32 = 0;

/// Forks of children already gone, remembered until their exit events arrive.
const UNRESOLVED_FORKS: usize = 4096;

#[derive(Debug, Default)]
pub struct Watched {
    roots: Vec<Root>,
    members: BTreeMap<u32, Member>,
    /// Final counters of exited processes; summed if a PID is reused. Pid `FOLDED` holds
    /// those past their retention, folded together.
    retired: BTreeMap<ProcessKey, ProcStats>,
    /// Their labelled requests, by root.
    retired_requests: BTreeMap<(u32, ReqKey), ReqStats>,
    /// When each process of `retired` was retired (a restored one: when restored).
    retired_at: BTreeMap<ProcessKey, Instant>,
    lifecycle: BTreeMap<u32, Lifecycle>,
    /// Members found gone by the last sweep, confirmed by the next.
    suspects: BTreeSet<u32>,
    /// Children of members whose fork event arrived after they were gone from /proc (they
    /// served and exited quickly): child -> parent. A process among them sends an exit
    /// event next, which makes it a member; a thread sends none.
    unresolved_forks: BTreeMap<u32, u32>,
    /// The last `EVENT_LOG_LEN` worker starts and stops, oldest first.
    events: VecDeque<LifecycleEvent>,
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
        self.retired.retain(|key, _| !gone.contains(&key.root));
        self.retired_at.retain(|key, _| !gone.contains(&key.root));
        self.retired_requests
            .retain(|(root, _), _| !gone.contains(root));
        self.lifecycle.retain(|root, _| !gone.contains(root));
        self.events.retain(|e| !gone.contains(&e.root));
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

    pub fn retired(&self) -> &BTreeMap<ProcessKey, ProcStats> {
        &self.retired
    }

    pub fn retired_requests(&self) -> &BTreeMap<(u32, ReqKey), ReqStats> {
        &self.retired_requests
    }

    pub fn events(&self) -> &VecDeque<LifecycleEvent> {
        &self.events
    }

    fn log_event(&mut self, root: u32, pid: u32, stopped: Option<String>) {
        if self.events.len() == EVENT_LOG_LEN {
            self.events.pop_front();
        }
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.events.push_back(LifecycleEvent {
            time,
            root,
            pid,
            stopped,
        });
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
            self.log_event(root, pid, None);
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
            self.log_event(root, pid, Some(reason.to_string()));
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
                    RootLedger {
                        pid: r.pid,
                        started: r.started,
                        started_workers: lc.started,
                        stopped: lc.stopped,
                        retired: self
                            .retired
                            .iter()
                            .filter(|(key, _)| key.root == r.pid)
                            .map(|(key, s)| (key.pid, *s))
                            .collect(),
                        retired_requests: self
                            .retired_requests
                            .iter()
                            .filter(|((root, _), _)| *root == r.pid)
                            .map(|((_, key), s)| (*key, *s))
                            .collect(),
                    }
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
            for (pid, stats) in &rl.retired {
                let key = ProcessKey::new(rl.pid, *pid);
                self.retired.entry(key).or_default().add(stats);
                if *pid != FOLDED {
                    self.retired_at.insert(key, now);
                }
            }
            for (key, stats) in &rl.retired_requests {
                self.retired_requests
                    .entry((rl.pid, *key))
                    .or_default()
                    .add(stats);
            }
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
        let key = ProcessKey::new(member.root, pid);
        self.retired_at.insert(key, Instant::now());
        self.retired
            .entry(key)
            .or_default()
            .add(&last.stats.finished());
        for (key, stats) in &last.requests {
            self.retired_requests
                .entry((member.root, *key))
                .or_default()
                .add(stats);
        }
    }
}

impl Watched {
    /// Fold the exited processes retired more than `retention` ago into their server's
    /// `FOLDED` series: their own series leave /metrics, every total stays the same. Returns
    /// how many were folded.
    pub fn fold_retired(&mut self, now: Instant, retention: Duration) -> usize {
        let due: Vec<ProcessKey> = self
            .retired_at
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= retention)
            .map(|(key, _)| *key)
            .collect();
        if due.is_empty() {
            return 0;
        }
        let due_set: BTreeSet<ProcessKey> = due.iter().copied().collect();
        for key in &due {
            self.retired_at.remove(key);
            if let Some(stats) = self.retired.remove(key) {
                let folded = ProcessKey::new(key.root, FOLDED);
                self.retired.entry(folded).or_default().add(&stats);
            }
        }
        let folded: Vec<(u32, ReqKey)> = self
            .retired_requests
            .keys()
            .filter(|(root, key)| due_set.contains(&ProcessKey::new(*root, key.tgid)))
            .copied()
            .collect();
        for (root, key) in folded {
            if let Some(stats) = self.retired_requests.remove(&(root, key)) {
                let into = ReqKey {
                    tgid: FOLDED,
                    ..key
                };
                self.retired_requests
                    .entry((root, into))
                    .or_default()
                    .add(&stats);
            }
        }
        due.len()
    }
}

impl Member {
    fn new(ppid: u32, root: u32, comm: String, started: f64, forked_here: bool) -> Self {
        Self {
            ppid,
            root,
            comm,
            started,
            forked_here,
            role: Role::Unclassified,
            exited: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ppid: u32, forked_here: bool) -> Member {
        Member::new(ppid, 1, "python".into(), 0.0, forked_here)
    }

    /// The role's state machine: serving makes a worker for good (its exit is a stop), a
    /// supervisor is never made a worker by not serving, and the ledger's word that a member
    /// served leaves a supervisor to `classify`.
    #[test]
    fn a_role_once_served_stays_a_worker_and_a_supervisor_stays_one() {
        use Role::*;
        assert_eq!(Unclassified.classified(false), Other);
        assert_eq!(Other.classified(true), Serving);
        assert_eq!(Serving.classified(false), Served);
        assert_eq!(Served.classified(true), Serving);
        assert_eq!(Supervisor.classified(false), Supervisor);
        assert!(Served.has_served() && Serving.has_served());
        assert!(!Other.has_served() && !Supervisor.has_served() && !Unclassified.has_served());
        assert_eq!(Unclassified.served(), Served);
        assert_eq!(Supervisor.served(), Supervisor);
        assert_eq!(Serving.served(), Serving);
    }

    #[test]
    fn retiring_keeps_final_counters_with_gauges_at_zero() {
        let mut w = Watched::default();
        let mut m = member(1, false);
        m.exited = Some(Instant::now());
        w.members.insert(5, m);
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
        w.retire(5, &remains);
        w.retire(5, &remains); // not a member any more: ignored
        let kept = w.retired()[&ProcessKey::new(1, 5)];
        assert_eq!((kept.accepted, kept.requests), (3, 4));
        assert_eq!((kept.active(), kept.in_flight()), (0, 0));
        assert!(w.members().is_empty());
    }

    #[test]
    fn retired_workers_fold_into_one_series_after_their_retention_and_totals_stay() {
        let mut w = Watched::default();
        let stats = ProcStats {
            accepted: 2,
            requests: 5,
            responses: 5,
            ..Default::default()
        };
        for pid in [5, 6] {
            w.members.insert(pid, member(1, false));
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
            w.retire(pid, &remains);
        }
        let total = |w: &Watched| -> (u64, u64) {
            (
                w.retired().values().map(|s| s.requests).sum(),
                w.retired_requests().values().map(|s| s.count).sum(),
            )
        };
        let now = Instant::now();
        assert_eq!(
            w.fold_retired(now, Duration::from_secs(60)),
            0,
            "within retention"
        );
        assert_eq!(w.retired().len(), 2);
        let later = now + Duration::from_secs(61);
        assert_eq!(w.fold_retired(later, Duration::from_secs(60)), 2);
        assert_eq!(
            w.retired().keys().collect::<Vec<_>>(),
            vec![&ProcessKey::new(1, FOLDED)],
            "one series for the server's retired workers"
        );
        assert_eq!(total(&w), (10, 10), "no count lost or doubled");
        assert!(w.retired_requests().keys().all(|(_, k)| k.tgid == FOLDED));
        assert_eq!(
            w.fold_retired(later, Duration::from_secs(60)),
            0,
            "folded once"
        );
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
        w.retired
            .insert(ProcessKey::new(10, 11), ProcStats::default());
        assert_eq!(w.forget_exited(1000.0, 300.0), 0, "its totals still count");
        w.roots[1].exited = Some(600.0);
        assert_eq!(
            w.forget_exited(800.0, 300.0),
            0,
            "the second exited too recently"
        );
        assert_eq!(w.forget_exited(1000.0, 300.0), 2);
        assert!(w.roots.is_empty() && w.retired.is_empty());
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
