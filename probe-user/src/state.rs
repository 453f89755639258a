//! The daemon's shared state: kernel maps plus the watched trees, behind one lock that the
//! event pump, the periodic sweep and the scrape take in turn.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use probe_common::{ProcEvent, event_kind};
use procfs::Current as _;

use crate::{
    kernel_maps::KernelMaps,
    lifecycle,
    metrics::SnapshotSource,
    snapshot::{self, KernelView, Snapshot},
    watched::Watched,
};

pub struct State {
    pub maps: KernelMaps,
    pub watched: Watched,
    /// Map sizes as of the last sweep.
    pub map_entries: Vec<(&'static str, u64)>,
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
        match event.kind {
            event_kind::FORK => {
                // The PID was reused before the old process was retired: retire it first,
                // or its final counters would become the new process's.
                if state.watched.exited_member(event.pid) {
                    let last = state.maps.retire(event.pid);
                    state.watched.retire(event.pid, last);
                }
                if state.watched.on_fork(event.pid, event.ppid) {
                    log::debug!("process {} forked by {}", event.pid, event.ppid);
                }
            }
            event_kind::EXIT => {
                let reason = lifecycle::reason(&event.exit);
                let accepted = state.maps.stats_of(event.pid).accepted > 0;
                let watched = &mut state.watched;
                watched.on_exit(event.pid, &reason, accepted, Instant::now(), uptime());
                if watched.roots().iter().any(|r| r.pid == event.pid) {
                    log::warn!("watched root {} exited ({reason})", event.pid);
                }
            }
            other => log::debug!("unknown kernel event kind {other}"),
        }
    }

    /// Notice processes that vanished without an event, classify workers, and retire the
    /// exited past their grace.
    pub fn sweep(&self) {
        self.lock().sweep();
    }

    pub fn all_roots_exited(&self) -> bool {
        self.lock().watched.all_roots_exited()
    }
}

impl State {
    /// Once a second (and at start): reads /proc, so it stays off the scrape path.
    pub fn sweep(&mut self) {
        let now = Instant::now();
        for pid in self.watched.vanished() {
            log::debug!("process {pid} is gone (no exit event seen)");
            self.maps.untrack(pid);
            let accepted = self.maps.stats_of(pid).accepted > 0;
            self.watched
                .on_exit(pid, "unknown", accepted, now, uptime());
        }
        let stats = self.maps.stats();
        for pid in stats.keys() {
            if !self.watched.members().contains_key(pid) && !self.watched.adopt(*pid) {
                // Counted by the kernel, unknown here and not adoptable (gone, or not under
                // a root): free its entries.
                log::debug!("freeing kernel state of unknown process {pid}");
                let _ = self.maps.retire(*pid);
            }
        }
        self.watched.classify(&stats);
        self.retire_due(now);
        self.map_entries = self.maps.entries();
    }

    /// Free the kernel state of processes whose grace has passed.
    fn retire_due(&mut self, now: Instant) {
        for pid in self.watched.due(now) {
            let last = self.maps.retire(pid);
            self.watched.retire(pid, last);
        }
    }
}

impl SnapshotSource for Shared {
    fn snapshot(&self) -> Snapshot {
        let mut state = self.lock();
        state.retire_due(Instant::now());
        let kernel = KernelView {
            stats: state.maps.stats(),
            requests: state.maps.requests(),
            drops: state.maps.drops(),
            map_entries: state.map_entries.clone(),
        };
        snapshot::build(&state.watched, &kernel, uptime())
    }
}

/// Seconds since boot, the clock /proc start times are on.
pub fn uptime() -> f64 {
    procfs::Uptime::current().map_or(0.0, |u| u.uptime)
}
