//! Drains the kernel's lifecycle ring buffer (fork and exit of tracked processes) and runs
//! the daemon's periodic sweep, in one task: the sweep first reads every event the kernel
//! has queued, so a process that exited while the daemon was stopped or busy is reported
//! with its exit event's reason, never found "vanished" ahead of it.

use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use probe_common::ProcEvent;
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::MissedTickBehavior,
};

use crate::{kernel::ring::decode, model::state::Shared};

/// How often the daemon reads /proc and the kernel maps' sizes.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sweeps between returns of the heap's free pages to the system.
const TRIM_EVERY_SWEEPS: u32 = 60;

/// Hand the heap's free pages back to the system. glibc keeps what the daemon freed (the
/// kernel's BTF, parsed at start-up: tens of MB; the buffers of a scrape of thousands of
/// connections) and the daemon's RSS would count it for good: measured idle on 6.18, 31 MB
/// before a trim, 10 MB after.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Read lifecycle events as they come and sweep once a second. Returns when `until` says
/// so after a sweep (`--exit-with-target`).
pub async fn run(
    ring: RingBuf<MapData>,
    state: Shared,
    until: impl Fn(&Shared) -> bool,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    // After a stall, one sweep, not a burst of them.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sweeps: u32 = 0;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &state);
                guard.clear_ready();
            }
            _ = tick.tick() => {
                drain(ring.get_mut(), &state);
                state.sweep();
                sweeps = sweeps.wrapping_add(1);
                if sweeps.is_multiple_of(TRIM_EVERY_SWEEPS) {
                    release_free_heap();
                }
                if until(&state) {
                    return Ok(());
                }
            }
        }
    }
}

/// Hand every queued event to the state.
fn drain(ring: &mut RingBuf<MapData>, state: &Shared) {
    while let Some(item) = ring.next() {
        if let Some(event) = decode::<ProcEvent>(&item) {
            state.on_event(event);
        }
    }
}

/// Node-wide discovery announcements: handled as they come (nothing waits on them), and
/// those that matched no selector looked at again when due.
pub async fn pump(ring: RingBuf<MapData>, state: Shared) -> std::io::Result<()> {
    // SAFETY: as in `run`.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
    loop {
        let due = state.announced_due();
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &state);
                guard.clear_ready();
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                state.retry_announced();
            }
        }
    }
}
