//! The daemon's shared state: kernel maps plus the watched trees, behind one lock that the
//! event pump, the periodic sweep and the scrape take in turn.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use probe_common::{ListenKey, PortStats, ProcEvent, event_kind};
use procfs::Current as _;

use crate::{
    kernel::borrowed::{self, ListenerStats},
    kernel::maps::{KernelMaps, Remains},
    kernel::memory,
    kernel::openssl::OpenSsl,
    kernel::probe::{Probe, ProbeError},
    kernel::sock_diag,
    model::lifecycle,
    model::persist::PinDir,
    model::snapshot::{self, KernelView, ServerPorts, Snapshot, SnapshotSource},
    model::{members::Origin, watched::Watched},
    processes::containers,
    processes::netstat,
    processes::selectors::Selectors,
    processes::sockets::{self, Holder},
    processes::tree::alive,
};

/// Sweeps between full /proc scans for the node-wide selectors: events find new servers at
/// once; the scan is the backstop for what no event announces.
const SCAN_EVERY_SWEEPS: u32 = 30;

/// How long kernel counters of a process the daemon does not know are kept for its fork
/// and exit events to arrive.
const UNKNOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long after a server in a pod started its names are looked for again, when the kubelet
/// had not linked its container's log yet when it was found (seconds).
const NAME_PODS_WITHIN: f64 = 120.0;

/// How many unknown ancestors a lost fork is traced through to a member.
const MAX_LINEAGE: usize = 8;

/// How long a discovered server that exited stays in the metrics (seconds).
const FORGET_AFTER: f64 = 300.0;

pub struct State {
    pub maps: KernelMaps,
    pub watched: Watched,
    /// Map sizes as of the last sweep.
    pub map_entries: Vec<(&'static str, u64)>,
    /// Which root's tree listens on each watched (network namespace, port), as of the last
    /// sweep.
    pub listeners: BTreeMap<(u32, u16), Holder>,
    /// Connections queued on each root's listeners, as of the last sweep.
    pub queued: BTreeMap<u32, u64>,
    /// What the kernel counted on listeners that are gone, by root (counters never go back).
    pub retired_ports: BTreeMap<u32, PortStats>,
    /// Each listener's overflow count as flyprobe publishes it (`Overflows`).
    pub overflows: Mutex<BTreeMap<(u32, u16), Overflows>>,
    /// Kernel memory each map uses, as of the last sweep.
    pub map_memory: BTreeMap<String, u64>,
    /// Map names by kernel map id (looked up once per map).
    pub map_names: BTreeMap<u32, String>,
    /// Processes with kernel counters that the daemon does not know, since when.
    pub unknown_since: BTreeMap<u32, Instant>,
    pub selectors: Selectors,
    /// --server-name, for discovered roots too.
    pub server_name: Option<String>,
    /// Sweeps since the last full selector scan.
    pub since_scan: u32,
    /// --pin-path: where the ledger goes.
    pub pins: Option<PinDir>,
    /// The hook set attached, for `flyprobe_build_info`.
    pub hooks: &'static str,
    /// Process events read from the kernel, by `event_kind` - 1.
    pub kernel_events: [u64; 3],
    /// --worker-retention.
    pub retention: std::time::Duration,
    /// The kernel counts the handshakes dropped at a full accept queue (`skb:kfree_skb` with
    /// `rx_sk`), which overflows need (the listener's drop counter holds them twice).
    pub overflow_correction: bool,
    /// Listeners in other network namespaces are borrowed for their queue, limit and drop
    /// counter (`kernel::borrowed`): not where that would re-tag them.
    pub borrow_listeners: bool,
    /// The programs and their links: dropped (detached) at shutdown; attached to more
    /// libraries meanwhile with `--tls`.
    pub probe: Option<Probe>,
    /// `--tls`: the libssl files attached.
    pub openssl: Option<OpenSsl>,
    /// Announced processes that matched no selector yet: (looks so far, when to look
    /// again). The socket-keyed sets announce a listener at its LISTEN state change, a
    /// moment before /proc lists the socket; a server preempted there is looked at again.
    pub announced: BTreeMap<u32, (u32, Instant)>,
}

#[derive(Clone)]
pub struct Shared(Arc<Mutex<State>>);

impl Shared {
    pub fn new(state: State) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-written: keep serving.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn on_event(&self, event: ProcEvent) {
        let mut state = self.lock();
        if let Some(n) = (event.kind as usize)
            .checked_sub(1)
            .and_then(|i| state.kernel_events.get_mut(i))
        {
            *n += 1;
        }
        match event.kind {
            event_kind::FORK => {
                // The PID was reused before the old process was retired: retire it first,
                // or its final counters would become the new process's.
                if state.watched.exited_member(event.pid) {
                    state.retire(vec![event.pid]);
                }
                if state.watched.on_fork(event.pid, event.ppid) {
                    log::debug!("process {} forked by {}", event.pid, event.ppid);
                }
            }
            event_kind::EXIT => {
                // Its fork event was lost (a full ring): the kernel knows its parent.
                if !state.watched.knows(event.pid) && !state.watched.fork_unresolved(event.pid) {
                    state.join_by_lineage(event.pid, Instant::now());
                }
                let reason = lifecycle::reason(&event.exit);
                let accepted = state.maps.stats_of(event.pid).accepted > 0;
                let watched = &mut state.watched;
                watched.on_exit(event.pid, &reason, accepted, Instant::now(), uptime());
                match watched.roots().iter().find(|r| r.pid == event.pid) {
                    Some(root) if root.origin == Origin::Selector => {
                        log::info!(
                            "server {} (pid {}) exited ({reason})",
                            root.server,
                            root.pid
                        )
                    }
                    Some(_) => log::warn!("watched root {} exited ({reason})", event.pid),
                    None => {}
                }
            }
            event_kind::DISCOVER if state.watched.is_member(event.pid) => {}
            event_kind::DISCOVER => {
                if state.selectors.matches(event.pid) {
                    state.add_root(event.pid);
                } else {
                    state.announced_unmatched(event.pid);
                }
            }
            other => log::debug!("unknown kernel event kind {other}"),
        }
    }

    /// When announced processes that matched no selector are to be looked at again.
    pub fn announced_due(&self) -> Option<Instant> {
        self.lock().announced.values().map(|&(_, due)| due).min()
    }

    /// Look again at the announced processes that are due.
    pub fn retry_announced(&self) {
        self.lock().retry_announced(Instant::now());
    }

    /// Notice processes that vanished without an event, classify workers, and retire the
    /// exited past their grace.
    pub fn sweep(&self) {
        self.lock().sweep();
    }

    /// Detach or attach again the probe's raw programs on the socket events (`--bench-toggle`).
    pub fn set_data_path(&self, attached: bool) -> Result<usize, ProbeError> {
        match &mut self.lock().probe {
            Some(probe) => probe.set_data_path(attached),
            None => Ok(0),
        }
    }

    /// The probe, to detach it at shutdown.
    pub fn take_probe(&self) -> Option<Probe> {
        self.lock().probe.take()
    }

    pub fn all_roots_exited(&self) -> bool {
        self.lock().watched.all_roots_exited()
    }

    /// At shutdown: the ledger, so a restarted daemon continues (--pin-path).
    pub fn save_ledger(&self) {
        self.lock().save_ledger();
    }
}

/// Looks at an announced process that matched no selector (20, 60, 140, 300 and 620 ms
/// after its announcement); after them, the full scan every `SCAN_EVERY_SWEEPS` is the
/// backstop.
const ANNOUNCE_LOOKS: u32 = 5;
/// Announced processes waiting for another look, at most (an exec storm is left to the scan).
const ANNOUNCED_MAX: usize = 1024;

impl State {
    /// Announced process `pid` matched no selector: looked at again shortly.
    fn announced_unmatched(&mut self, pid: u32) {
        log::debug!("announced process {pid} matches no selector (yet)");
        if self.announced.len() < ANNOUNCED_MAX {
            let due = Instant::now() + Duration::from_millis(20);
            self.announced.entry(pid).or_insert((0, due));
        }
    }

    fn retry_announced(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.announced)
            .into_iter()
            .partition(|(_, (_, at))| *at <= now);
        self.announced = later.into_iter().collect();
        for (pid, (looks, _)) in due {
            if self.watched.is_member(pid) || !alive(pid) {
                continue;
            }
            if self.selectors.matches(pid) {
                log::debug!("announced process {pid} matched on look {}", looks + 2);
                self.add_root(pid);
            } else if looks + 1 < ANNOUNCE_LOOKS {
                let due = now + Duration::from_millis(20 << (looks + 1));
                self.announced.insert(pid, (looks + 1, due));
            }
        }
    }

    /// Watch every process the selectors match that is not watched yet (a full /proc scan).
    pub fn scan(&mut self) -> usize {
        self.since_scan = 0;
        let watched = &self.watched;
        let found = self.selectors.scan(|pid| watched.is_member(pid));
        found.into_iter().filter(|&pid| self.add_root(pid)).count()
    }

    /// Make `pid` a root and track it and its descendants.
    fn add_root(&mut self, pid: u32) -> bool {
        match self
            .watched
            .add_root(pid, self.server_name.as_deref(), Origin::Selector)
        {
            Ok(true) => {}
            Ok(false) => return false,
            Err(err) => {
                log::debug!("not watching {pid}: {err}");
                return false;
            }
        }
        // Tracked before /proc is read: a child it forks from now on is tracked by the kernel,
        // one forked before is in the scan.
        if let Err(err) = self.maps.track(pid) {
            log::warn!("cannot track process {pid}: {err}");
        }
        for member in self.watched.rescan() {
            if let Err(err) = self.maps.track(member) {
                log::warn!("cannot track process {member}: {err}");
            }
        }
        self.seed_listeners();
        if let Some(root) = self.watched.roots().iter().find(|r| r.pid == pid) {
            let labels: Vec<String> = root
                .labels
                .pairs()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            log::info!(
                "found {} (pid {pid}{}{}): watching it and its descendants",
                root.server,
                if labels.is_empty() { "" } else { ", " },
                labels.join(", ")
            );
        }
        true
    }

    /// Join `pid`, a process the daemon never saw forked, to its server by the kernel's
    /// record of who forked it (and who forked that one, up to a member). False when the
    /// chain leads to no member.
    fn join_by_lineage(&mut self, pid: u32, now: Instant) -> bool {
        let mut chain = vec![pid];
        while chain.len() <= MAX_LINEAGE {
            let Some(parent) = self.maps.parent_of(*chain.last().unwrap_or(&pid)) else {
                return false;
            };
            if self.watched.knows(parent) {
                // From the member down, each joins under the one that forked it; an ancestor
                // that is gone is reported stopped (its events were lost too). `pid` itself
                // is the caller's to end.
                let mut parent = parent;
                for &child in chain.iter().rev() {
                    if !self.watched.join(child, parent) {
                        return false;
                    }
                    if child != pid && !alive(child) {
                        let accepted = self.maps.stats_of(child).accepted > 0;
                        self.watched
                            .on_exit(child, "unknown", accepted, now, uptime());
                    }
                    parent = child;
                }
                return true;
            }
            chain.push(parent);
        }
        false
    }

    /// Once a second (and at start): reads /proc, so it stays off the scrape path.
    pub fn sweep(&mut self) {
        let now = Instant::now();
        self.since_scan += 1;
        if !self.selectors.is_empty() && self.since_scan >= SCAN_EVERY_SWEEPS {
            self.scan();
        }
        self.watched.name_pods(uptime(), NAME_PODS_WITHIN);
        let forgotten = self.watched.forget_exited(uptime(), FORGET_AFTER);
        if forgotten > 0 {
            log::info!("forgot {forgotten} servers that exited over {FORGET_AFTER} s ago");
        }
        for pid in self.watched.vanished() {
            log::debug!("process {pid} is gone (no exit event seen)");
            self.maps.untrack(pid);
            let accepted = self.maps.stats_of(pid).accepted > 0;
            self.watched
                .on_exit(pid, "unknown", accepted, now, uptime());
        }
        let stats = self.maps.stats();
        for (&pid, counted) in &stats {
            if self.watched.members().contains_key(&pid) || self.watched.adopt(pid) {
                continue;
            }
            // Counted by the kernel, unknown here, and not adoptable from /proc (gone, or its
            // parent unknown too). Unknown already at the last sweep: every event queued
            // since was read before this one, so its fork event was lost to a full ring (and
            // its exit event, if it is gone). The kernel's lineage names its server; gone, it
            // is reported stopped for a reason the daemon cannot know.
            if self.unknown_since.contains_key(&pid) && self.join_by_lineage(pid, now) {
                self.unknown_since.remove(&pid);
                if !alive(pid) {
                    log::debug!("process {pid}: fork and exit events lost; joined by lineage");
                    self.watched
                        .on_exit(pid, "unknown", counted.accepted > 0, now, uptime());
                } else {
                    log::debug!("process {pid}: fork event lost; joined by lineage");
                }
                continue;
            }
            // Not attributable: free its entries only when it stays unknown for a while.
            let since = *self.unknown_since.entry(pid).or_insert(now);
            if now.duration_since(since) >= UNKNOWN_GRACE {
                log::debug!("freeing kernel state of unknown process {pid}");
                let _ = self.maps.retire(pid);
                self.unknown_since.remove(&pid);
            }
        }
        let members = self.watched.members();
        self.unknown_since
            .retain(|pid, _| stats.contains_key(pid) && !members.contains_key(pid));
        self.watched.classify(&stats);
        self.seed_listeners();
        if let (Some(openssl), Some(probe)) = (&mut self.openssl, &mut self.probe) {
            let live = self
                .watched
                .members()
                .iter()
                .filter(|(_, m)| m.exited.is_none())
                .map(|(&pid, _)| pid)
                .collect();
            for (pid, attached) in openssl.sweep(probe, &live) {
                self.maps.mark_openssl(pid, attached);
            }
        }
        self.retire_due(now);
        let folded = self.watched.fold_retired(now, self.retention);
        if folded > 0 {
            log::debug!("{folded} exited processes folded into their servers' retired series");
        }
        let census = self.maps.census();
        self.map_entries = census.entries;
        self.map_memory = memory::in_use(&mut self.map_names);
        self.queued = BTreeMap::new();
        for (listener, n) in census.queued {
            if let Some(&Holder { root, .. }) = self.listeners.get(&listener) {
                *self.queued.entry(root).or_default() += n;
            }
        }
        self.save_ledger();
    }

    /// Tell the kernel of the listening ports of every live member (the socket hooks see
    /// listen() itself only in processes tracked at the time).
    pub fn seed_listeners(&mut self) {
        let live: Vec<(u32, u32)> = self
            .watched
            .members()
            .iter()
            .filter(|(_, m)| m.exited.is_none())
            .map(|(&pid, m)| (pid, m.root))
            .collect();
        let listeners = sockets::listen_keys(live);
        // Listeners seen before and gone now (the server exited or closed them). Ones the
        // kernel recorded at listen() and /proc did not show yet are left alone.
        for (&(netns, port), &Holder { root, .. }) in &self.listeners {
            if !listeners.contains_key(&(netns, port)) {
                let counted = self.maps.unlisten(&ListenKey {
                    netns,
                    port,
                    _pad: 0,
                });
                if let Some(counted) = counted {
                    self.retired_ports.entry(root).or_default().add(&counted);
                }
                lock(&self.overflows).remove(&(netns, port));
            }
        }
        self.listeners = listeners;
        for &(netns, port) in self.listeners.keys() {
            let key = ListenKey {
                netns,
                port,
                _pad: 0,
            };
            if let Err(err) = self.maps.listen(key) {
                log::warn!("cannot record listening port {port}: {err}");
            }
        }
    }

    pub fn save_ledger(&mut self) {
        if let Some(pins) = &mut self.pins {
            let ledger = self.watched.ledger();
            // Logged once per failure streak: a sweep runs every second.
            match pins.save(&ledger) {
                Ok(()) => pins.failing = false,
                Err(err) if !pins.failing => {
                    pins.failing = true;
                    log::warn!("writing {}: {err}", pins.ledger_path().display());
                }
                Err(_) => {}
            }
        }
    }

    /// Free the kernel state of processes whose grace has passed.
    fn retire_due(&mut self, now: Instant) {
        let due = self.watched.due(now);
        if !due.is_empty() {
            self.retire(due);
        }
    }

    /// Keep exited members' final counters and free their kernel state. With --pin-path the
    /// ledger holding those counters is written before their kernel entries go, so a daemon
    /// killed in between loses nothing (the next one frees entries it finds twice).
    fn retire(&mut self, pids: Vec<u32>) {
        let parents: Vec<Option<u32>> = pids
            .iter()
            .map(|pid| self.watched.members().get(pid).map(|m| m.ppid))
            .collect();
        let remains = self.maps.remains(&pids);
        let kept: Vec<(u32, Remains)> = pids.into_iter().zip(remains).collect();
        for (pid, last) in &kept {
            self.watched.retire(*pid, last);
        }
        self.save_ledger();
        for ((pid, last), parent) in kept.iter().zip(parents) {
            self.maps.forget(*pid, last);
            // Unless the PID names a new process already (forked by another parent).
            if let Some(parent) = parent {
                self.maps.forget_lineage(*pid, parent);
            }
        }
    }

    /// Each root's listening ports: the kernel's counts and the accept queues right now
    /// (read at scrape time: a queue is a gauge of this moment).
    fn ports(&self) -> BTreeMap<u32, ServerPorts> {
        let mut out: BTreeMap<u32, ServerPorts> = BTreeMap::new();
        let counted = self.maps.ports();
        for (key, stats) in &counted {
            if let Some(&Holder { root, .. }) = self.listeners.get(key) {
                out.entry(root).or_default().counted.add(stats);
            }
        }
        for (root, counted) in &self.retired_ports {
            out.entry(*root).or_default().counted.add(counted);
        }
        // Queues, limits and drops per listener from sock_diag, in flyprobe's own network
        // namespace; elsewhere from the listening sockets themselves, borrowed (or where
        // that is refused, the queue from /proc and the drops from the namespace's own
        // count where the port is all that listens there).
        let own = containers::netns_id(std::process::id() as i32).map(|n| n as u32);
        let diag = if self.listeners.keys().any(|(netns, _)| Some(*netns) == own) {
            sock_diag::listeners()
                .map_err(|err| {
                    if !DIAG_WARNED.swap(true, Ordering::Relaxed) {
                        // inet_diag is a module on most distributions' kernels: one the
                        // host cannot load, or a filter refusing AF_NETLINK.
                        log::warn!(
                            "sock_diag: {err}: listeners in flyprobe's network namespace are \
                             read from borrowed copies instead"
                        );
                    } else {
                        log::debug!("sock_diag: {err}");
                    }
                })
                .ok()
        } else {
            None
        };
        // A listener's drop counter holds each dropped handshake twice and the other
        // discards on it once: the kernel's count of the discards is taken out. That count
        // is read after the drop counter, so a discard between the two reads is an
        // undercount (made good at the next scrape), never an overflow too many.
        let overflows = |key: &(u32, u16), drops: u64| {
            self.overflow_correction.then(|| {
                let discarded = self
                    .maps
                    .port(key.0, key.1)
                    .map_or(0, |c| c.handshakes_dropped);
                lock(&self.overflows)
                    .entry(*key)
                    .or_insert_with(|| Overflows::new(drops, discarded))
                    .read(drops, discarded)
            })
        };
        // One source per series: where listeners are read for their own count, a failed
        // read leaves the series out rather than switch to the namespace's count (which is
        // then not read at all).
        let per_listener = self.overflow_correction && self.borrow_listeners;
        let mut namespaces: BTreeMap<u32, Namespace> = BTreeMap::new();
        let mut borrowed_by: BTreeMap<u32, BTreeMap<u16, ListenerStats>> = BTreeMap::new();
        for (&(netns, port), &Holder { root, pid }) in &self.listeners {
            let entry = out.entry(root).or_default();
            let read = if Some(netns) == own
                && let Some(diag) = &diag
            {
                let mut sum = ListenerStats::default();
                for l in diag.iter().filter(|l| l.port == port) {
                    sum.add(&l.stats);
                }
                Some(sum)
            } else {
                // Flyprobe's own namespace's count would be the host's since boot (and its
                // /metrics port listens there too): only another namespace's is read.
                let other = Some(netns) != own;
                let ns = namespaces
                    .entry(netns)
                    .or_insert_with(|| Namespace::read(pid, other && !per_listener));
                // Here for another namespace, or flyprobe's own where sock_diag failed.
                let read = if self.borrow_listeners && !borrowed::refused() {
                    // Each holder's own sockets (two servers of a pod, each its port).
                    borrowed_by
                        .entry(pid)
                        .or_insert_with(|| Namespace::borrow(pid, netns))
                        .get(&port)
                        .copied()
                } else {
                    None
                };
                if read.is_none()
                    && let Some(&queue) = ns.queues.get(&port)
                {
                    entry.queues.insert(port, queue);
                }
                if let Some(drops) = ns.drops_of(port) {
                    entry.overflows.insert(port, drops);
                }
                read
            };
            if let Some(read) = read {
                entry.queues.insert(port, read.queue);
                entry.limits.insert(port, read.limit);
                if let Some(n) = overflows(&(netns, port), read.drops) {
                    entry.overflows.insert(port, n);
                }
            }
        }
        out
    }
}

/// A network namespace's TCP listeners as /proc shows them to any reader: the accept queue
/// of each listening port, and the namespace's own drop count.
struct Namespace {
    queues: BTreeMap<u16, u64>,
    /// `ListenDrops`, read where one port listens (only then is it that port's) and it is
    /// wanted.
    drops: Option<u64>,
}

impl Namespace {
    /// The namespace of `pid`; its drop count too where `drops` says so.
    fn read(pid: u32, drops: bool) -> Self {
        let queues = sockets::listen_queues(pid);
        let drops = (drops && queues.len() == 1)
            .then(|| netstat::listen_drops(pid))
            .flatten();
        Self { queues, drops }
    }

    /// The summed kernel numbers of each port all of whose sockets in network namespace
    /// `netns` `pid` holds and lent (a port with a socket missing would be half counted: it is
    /// left to /proc). Nothing where `pid` is no longer in `netns` (a PID reused since the
    /// sweep).
    fn borrow(pid: u32, netns: u32) -> BTreeMap<u16, ListenerStats> {
        if containers::netns_id(pid as i32).map(|n| n as u32) != Some(netns) {
            return BTreeMap::new();
        }
        Self::borrow_held(pid, &sockets::held_listeners(pid))
    }

    fn borrow_held(pid: u32, held: &[sockets::HeldListener]) -> BTreeMap<u16, ListenerStats> {
        let mut out: BTreeMap<u16, Option<ListenerStats>> = BTreeMap::new();
        for l in held {
            let read = l.fd.and_then(|fd| {
                borrowed::listener(pid, fd, l.inode)
                    .map_err(|err| borrowed::failed(pid, fd, l.port, &err))
                    .ok()
            });
            let sum = out.entry(l.port).or_insert(Some(ListenerStats::default()));
            match (sum.as_mut(), read) {
                (Some(sum), Some(read)) => sum.add(&read),
                _ => *sum = None,
            }
        }
        out.into_iter()
            .filter_map(|(port, sum)| Some((port, sum?)))
            .collect()
    }

    /// The connections dropped on `port`: the namespace's count, when `port` is the only
    /// TCP port listening there (a pod's server). The count is the namespace's since it was
    /// created, so it includes drops of an earlier listener on the port (a restarted
    /// container in its pod).
    fn drops_of(&self, port: u16) -> Option<u64> {
        let sole = self.queues.len() == 1 && self.queues.contains_key(&port);
        self.drops.filter(|_| sole)
    }
}

impl SnapshotSource for Shared {
    fn snapshot(&self) -> Snapshot {
        // A scrape only reads: retiring is the sweep's.
        let state = self.lock();
        let ports = state.ports();
        let kernel = KernelView {
            ports,
            stats: state.maps.stats(),
            requests: state.maps.requests(),
            drops: state.maps.drops(),
            kernel_events: state.kernel_events,
            map_entries: state.map_entries.clone(),
            queued: state.queued.clone(),
            map_memory: state.map_memory.clone(),
            hooks: state.hooks,
            tls_libraries: state.openssl.as_ref().map(|o| o.attached() as u64),
        };
        snapshot::build(&state.watched, &kernel, uptime())
    }
}

/// Seconds since boot, the clock /proc start times are on.
pub fn uptime() -> f64 {
    procfs::Uptime::current().map_or(0.0, |u| u.uptime)
}

/// sock_diag's failure is warned about once (it would fail at every scrape).
static DIAG_WARNED: AtomicBool = AtomicBool::new(false);

/// A listener's overflows as published: its drop counter less the discards the kernel
/// programs counted on its port, both from when flyprobe first read it (the counter runs
/// from the listener's creation, but the discards it holds are seen only from then on), and
/// never less than published before (a counter).
#[derive(Clone, Copy, Debug)]
pub struct Overflows {
    /// The readings this stretch counts from, and what was published when it began.
    drops: u64,
    discarded: u64,
    base: u64,
    /// The last drop count read, and the value published.
    last: u64,
    published: u64,
}

impl Overflows {
    fn new(drops: u64, discarded: u64) -> Self {
        Self {
            drops,
            discarded,
            base: 0,
            last: drops,
            published: 0,
        }
    }

    /// The count given the port's drop counter and the discards counted on it now.
    fn read(&mut self, drops: u64, discarded: u64) -> u64 {
        if drops < self.last || discarded < self.discarded {
            // A socket of the port closed, or a new listener took it (its counter starts
            // again): a new stretch, from what was published.
            *self = Self {
                base: self.published,
                ..Self::new(drops, discarded)
            };
            self.published = self.base;
        }
        self.last = drops;
        let value = self.base + (drops - self.drops).saturating_sub(discarded - self.discarded);
        self.published = self.published.max(value);
        self.published
    }
}

/// A lock no panic elsewhere can poison for good: what it guards is rebuilt as it is used.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overflows: the drop counter less the discards, from the first read, never going back.
    #[test]
    fn overflows_count_from_the_first_read_and_never_go_back() {
        // A listener that dropped 10 and discarded 4 before flyprobe: none of it counts.
        let mut o = Overflows::new(10, 4);
        assert_eq!(o.read(10, 4), 0);
        // A deferred accept's bare ACK: once in the counter, once discarded.
        assert_eq!(o.read(11, 5), 0);
        // A handshake dropped at a full queue: twice in the counter, one discard.
        assert_eq!(o.read(13, 6), 1);
        // A SYN dropped at a full queue: once, no discard.
        assert_eq!(o.read(14, 6), 2);
        // Discards counted ahead of the counter (read in between): no step back.
        assert_eq!(o.read(14, 7), 2);
        assert_eq!(o.read(15, 7), 2);
        // A socket of the port closed (the summed counter fell): a new stretch from here.
        assert_eq!(o.read(3, 7), 2);
        assert_eq!(o.read(5, 8), 3);
        // A new listener (the kernel's discard count started again too).
        assert_eq!(o.read(0, 0), 3);
        assert_eq!(o.read(1, 0), 4);
    }

    /// A namespace's drop count is a port's only where that port is all that listens there.
    #[test]
    fn a_namespace_s_drops_are_its_only_listening_port_s() {
        let ns = |ports: &[u16]| Namespace {
            queues: ports.iter().map(|&p| (p, 0)).collect(),
            drops: Some(7),
        };
        assert_eq!(ns(&[8000]).drops_of(8000), Some(7));
        assert_eq!(ns(&[8000]).drops_of(9000), None, "another port's");
        assert_eq!(
            ns(&[8000, 9100]).drops_of(8000),
            None,
            "shared with a sidecar"
        );
        assert_eq!(ns(&[]).drops_of(8000), None);
    }

    /// A port is borrowed whole or not at all: a socket on it that the holder does not hold
    /// (a SO_REUSEPORT sibling of another worker) leaves the port to /proc.
    #[test]
    fn a_port_is_borrowed_only_when_all_its_sockets_are_held() {
        use std::{net::TcpListener, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _};
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
            .unwrap()
            .ino();
        let held = sockets::HeldListener {
            port,
            inode,
            fd: Some(socket.as_raw_fd()),
        };
        let sibling = sockets::HeldListener {
            inode: inode + 1,
            fd: None,
            ..held
        };
        let pid = std::process::id();
        let whole = Namespace::borrow_held(pid, &[held]);
        assert_eq!(whole.get(&port).map(|s| (s.queue, s.drops)), Some((0, 0)));
        assert!(whole[&port].limit > 0, "listen()'s backlog");
        assert!(Namespace::borrow_held(pid, &[held, sibling]).is_empty());
        let gone = sockets::HeldListener {
            inode: inode + 1,
            ..held
        };
        assert!(
            Namespace::borrow_held(pid, &[gone]).is_empty(),
            "an fd that names another socket now"
        );
    }
}
