//! Every map, declared once. Sizes here are defaults; the daemon overrides them at load.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use probe_common::{
    ACCESS_BYTES, ConnKey, ConnState, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_REQUEST_SERIES, EVENTS_BYTES, ExitInfo, PENDING_ENTRIES, PendingIo, ProcStats,
    ReqKey, ReqStats, drop_reason,
};

/// Tracked processes (TGIDs), seeded by the daemon and extended on fork. Thread ids land here
/// too (fork cannot tell a thread from a process without BTF); they are removed when the
/// thread exits and never match a TGID lookup.
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

/// Accepted connections. A plain hash, not LRU: an evicted entry would leave a connection
/// active forever, so a full map refuses and counts the drop instead.
#[map]
pub static CONNS: HashMap<ConnKey, ConnState> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

#[map]
pub static STATS: PerCpuHashMap<u32, ProcStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

/// Syscall arguments between sys_enter and sys_exit, per thread (key: pid_tgid). LRU because
/// a thread killed inside a syscall never reaches its exit.
#[map]
pub static PENDING_IO: LruHashMap<u64, PendingIo> =
    LruHashMap::with_max_entries(PENDING_ENTRIES, 0);

/// The user `sockaddr *` passed to accept, per thread, to read the family on return.
#[map]
pub static PENDING_ACCEPT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(PENDING_ENTRIES, 0);

/// How each tracked process is ending (exit_group code, last signal that can kill), read and
/// removed when its thread-group leader exits.
#[map]
pub static EXITS: HashMap<u32, ExitInfo> = HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

/// Completed requests by (process, method, status class, protocol), with durations.
#[map]
pub static REQS: PerCpuHashMap<ReqKey, ReqStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_REQUEST_SERIES, 0);

/// Access-log records; written only when the daemon runs with --access-log.
#[map]
pub static ACCESS: RingBuf = RingBuf::with_byte_size(ACCESS_BYTES, 0);

#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(slot) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, and programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// This CPU's counters for `tgid`, created on first use.
#[inline(always)]
pub fn stats_mut(tgid: u32) -> Option<&'static mut ProcStats> {
    if let Some(stats) = STATS.get_ptr_mut(tgid) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        return Some(unsafe { &mut *stats });
    }
    // EEXIST means another CPU created it first; the lookup below finds it either way.
    let _ = STATS.insert(tgid, ProcStats::default(), BPF_NOEXIST as u64);
    match STATS.get_ptr_mut(tgid) {
        Some(stats) => Some(unsafe { &mut *stats }),
        None => {
            count_drop(drop_reason::STATS_MAP_FULL);
            None
        }
    }
}

#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    TARGETS.get_ptr(tgid).is_some()
}
