//! Every map, declared once. Sizes here are defaults; the daemon overrides them at load.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use probe_common::{
    ACCESS_BYTES, ConnKey, ConnState, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_REQUEST_SERIES, DEFAULT_PID_SLOTS, DISCOVERY_BYTES, DROPPED_ENTRIES, EVENTS_BYTES,
    ExitInfo, ListenKey, MAX_H2_CONNECTIONS, MAX_LISTEN_PORTS, MAX_PORT_STATS, MAX_SSL_CONNS,
    MAX_STREAMS, NO_PREALLOC, PENDING_ENTRIES, PendingIo, PortStats, ProcEvent, ProcStats, ReqKey,
    ReqStats, SslKey, Stream, StreamKey, TlsCall, drop_reason, h2::H2, target,
};

/// The target set: `TARGETS[pid] != 0` when `pid` is tracked. An array indexed by PID (sized
/// to the kernel's pid_max at load), so the test every syscall event starts with is one
/// inlined load, not a hash lookup: untracked processes pay almost nothing. Seeded by the
/// daemon, set on fork for children of tracked processes, cleared on exit. Threads are set
/// only by the classic fork program (kernels without BTF for `task_struct`, where fork
/// cannot tell them apart); their ids never match a TGID test.
#[map]
pub static TARGETS: Array<u8> = Array::with_max_entries(DEFAULT_PID_SLOTS, 0);

/// Connections of watched processes, keyed by the kernel socket (socket hook set) or by
/// (process, fd) (syscall hook set). A plain hash, not LRU: an evicted entry would leave a
/// connection active forever, so a full map refuses and counts the drop instead.
#[map]
pub static CONNS: HashMap<ConnKey, ConnState> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Sockets the connection map had no room for (socket hook set), so that their later reads
/// and writes neither count a connection nor another drop. LRU: it only needs to remember
/// recent ones, and nothing else ever frees it.
#[map]
pub static DROPPED: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(DROPPED_ENTRIES, 0);

/// Listening ports of watched processes: a connection established on one is served by them
/// (socket hook set). Filled by the kernel when a watched process listens and by the daemon
/// for sockets that listened before it attached.
#[map]
pub static LISTEN_PORTS: HashMap<ListenKey, u8> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);

/// Per listening port of a watched server: waits for a worker and resets (socket-keyed
/// sets), per CPU (no atomics); entries allocated on use.
#[map]
pub static PORT_STATS: PerCpuHashMap<ListenKey, PortStats> =
    PerCpuHashMap::with_max_entries(MAX_PORT_STATS, NO_PREALLOC);

/// Per-process counters, per CPU (no atomics on the hot path); entries allocated on use.
#[map]
pub static STATS: PerCpuHashMap<u32, ProcStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_PROCESSES, NO_PREALLOC);

/// Syscall arguments between sys_enter and sys_exit, one slot per thread (key: pid_tgid).
/// The exit marks the slot consumed instead of deleting it (a delete costs a bucket lock on
/// every syscall); the slot goes when the thread exits, and the daemon removes what is left
/// of a process when it retires it. A plain hash, not LRU: the verifier inlines its lookups,
/// LRU lookups are helper calls (measured: +120 ns per hot-path run).
#[map]
pub static PENDING_IO: HashMap<u64, PendingIo> = HashMap::with_max_entries(PENDING_ENTRIES, 0);

/// The user `sockaddr *` passed to accept, per thread, to read the family on return.
#[map]
pub static PENDING_ACCEPT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(PENDING_ENTRIES, 0);

/// How each tracked process is ending (exit_group code, last signal that can kill), read and
/// removed when its thread-group leader exits.
#[map]
pub static EXITS: HashMap<u32, ExitInfo> = HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

/// Who forked each tracked process (child -> parent), so a process whose fork and exit
/// events the ring had no room for is still attributed to its server: the daemon looks
/// here for a process it finds counted but does not know. LRU: nothing frees it, and only
/// the recent forks matter.
#[map]
pub static LINEAGE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

/// Completed requests by (process, method, status class, protocol), with durations.
#[map]
pub static REQS: PerCpuHashMap<ReqKey, ReqStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_REQUEST_SERIES, NO_PREALLOC);

/// HTTP/2 connections' frame positions and stream counts, by connection: created at the
/// connection preface, removed with the connection. Allocated as used (socket-keyed sets).
#[map]
pub static H2_CONNS: HashMap<ConnKey, H2> =
    HashMap::with_max_entries(MAX_H2_CONNECTIONS, NO_PREALLOC);

/// The HTTP/2 frame walks by direction: the socket set's (`h2_recv`, `h2_send`),
/// tail-called by `sock_recv` and `sock_send`, or the syscall set's (`io_h2_recv`,
/// `io_h2_send`), tail-called by `io_exit`. A program of their own has its own stack and
/// instruction budget.
#[map]
pub static H2_WALK: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The fentry set's walks, one array per kernel function: a tail call stays within
/// programs attached to the same function (Linux >= 6.11 refuses others). `tcp_h2_recv`
/// (tcp_recvmsg's), tail-called by `tcp_recv_exit`.
#[map]
pub static FEXIT_RECV_WALK: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `tcp_h2_send` (tcp_sendmsg's), tail-called by `tcp_send_exit`.
#[map]
pub static FEXIT_SEND_WALK: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `tcp_h2_sendpage` (tcp_sendpage's, before 6.5), tail-called by `tcp_sendpage_exit`.
#[map]
pub static FEXIT_SENDPAGE_WALK: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Non-zero once the daemon has filled the data path's walk arrays: without them (a
/// verifier that refused them) an h2 connection is counted by exchanges.
#[map]
pub static DATA_WALKS: Array<u32> = Array::with_max_entries(1, 0);

/// HTTP/2 requests waiting for their response headers, by (connection, stream).
#[map]
pub static STREAMS: LruHashMap<StreamKey, Stream> = LruHashMap::with_max_entries(MAX_STREAMS, 0);

/// OpenSSL calls in progress and the TLS connection each thread last moved bytes on, one
/// slot per thread (key: pid_tgid), reused in place like `PENDING_IO`'s.
#[map]
pub static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(PENDING_ENTRIES, 0);

/// The connection each `SSL *` of a watched process was last seen on: where its calls that
/// touch no socket (a memory BIO, data already buffered) count. An entry leaves with
/// `SSL_free`; LRU, since a process may free without the probe (killed, or a library the
/// daemon attached after its connections began).
#[map]
pub static SSL_CONNS: LruHashMap<SslKey, ConnKey> = LruHashMap::with_max_entries(MAX_SSL_CONNS, 0);

/// The HTTP/2 frame walks of plaintext from OpenSSL (`ssl_h2_recv`, `ssl_h2_send`),
/// tail-called by `ssl_return`: uprobe programs, so not `H2_WALK`'s.
#[map]
pub static TLS_H2_WALK: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Non-zero once the daemon has put the walks in `TLS_H2_WALK`: without them (a verifier
/// that refused them) HTTP/2 over TLS is counted by exchanges, as where frames are not
/// walked.
#[map]
pub static TLS_WALKS: Array<u32> = Array::with_max_entries(1, 0);

/// Access-log records; written only when the daemon runs with --access-log.
#[map]
pub static ACCESS: RingBuf = RingBuf::with_byte_size(ACCESS_BYTES, 0);

#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Exec and listen of untracked processes, for node-wide selectors.
#[map]
pub static DISCOVERIES: RingBuf = RingBuf::with_byte_size(DISCOVERY_BYTES, 0);

/// Send a process event to `ring` (`EVENTS` or `DISCOVERIES`); a full ring counts `full`.
#[inline(always)]
pub fn send_event(ring: &RingBuf, full: u32, kind: u32, pid: u32, ppid: u32, exit: ExitInfo) {
    let event = ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        pid,
        ppid,
        exit,
    };
    if ring.output::<ProcEvent>(&event, 0).is_err() {
        count_drop(full);
    }
}

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(slot) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, and programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// This CPU's value for `key` in a per-CPU hash, created from `zero` on first use; a full
/// map counts `full` as a drop. `zero` is a static: a value built on the stack for the
/// insert would take its size of the program's 512 bytes of stack.
#[inline(always)]
pub fn per_cpu_entry<K, V>(
    map: &PerCpuHashMap<K, V>,
    key: &K,
    zero: &'static V,
    full: u32,
) -> Option<*mut V> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    // EEXIST means another CPU created it first; the lookup below finds it either way.
    let _ = map.insert(key, zero, BPF_NOEXIST as u64);
    let value = map.get_ptr_mut(key);
    if value.is_none() {
        count_drop(full);
    }
    value
}

static ZERO_PROC_STATS: ProcStats = ProcStats::ZERO;

/// This CPU's counters for `tgid`, created on first use.
#[inline(always)]
pub fn stats_mut(tgid: u32) -> Option<&'static mut ProcStats> {
    // SAFETY: per-CPU value, only this CPU writes it while the program runs.
    per_cpu_entry(&STATS, &tgid, &ZERO_PROC_STATS, drop_reason::STATS_MAP_FULL)
        .map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn is_target(pid: u32) -> bool {
    TARGETS.get(pid).is_some_and(|t| *t != 0)
}

/// Whether tracked `pid`'s libssl has the OpenSSL uprobes (`target::OPENSSL`).
#[inline(always)]
pub fn sees_openssl(pid: u32) -> bool {
    TARGETS.get(pid).is_some_and(|t| *t == target::OPENSSL)
}

/// Set `pid`'s slot to `value` (`target::*`, 0 to remove it); false when it is beyond the
/// array (pid_max was raised after load).
#[inline(always)]
pub fn set_target(pid: u32, value: u8) -> bool {
    match TARGETS.get_ptr_mut(pid) {
        Some(slot) => {
            // SAFETY: one byte per PID; its writers (fork of it, exit of it) do not race.
            unsafe { *slot = value };
            true
        }
        None => false,
    }
}

/// `pid`'s slot (0: not tracked).
#[inline(always)]
pub fn target_of(pid: u32) -> u8 {
    TARGETS.get(pid).copied().unwrap_or(0)
}
