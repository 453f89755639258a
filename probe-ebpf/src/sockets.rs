//! The socket hook set: raw tracepoints on the socket layer (Linux >= 6.3), nothing on the
//! syscall path, so processes flyprobe does not watch pay only an empty raw-tracepoint run
//! on their socket events. A connection is the kernel socket (`struct sock *`), whichever
//! processes hold descriptors to it:
//! - `inet_sock_set_state`: a watched listener's port is recorded at LISTEN; a connection
//!   established on such a port (SYN_RECV -> ESTABLISHED, in softirq) is queued for it; the
//!   connection ends when a process closes it (-> FIN_WAIT1 / LAST_ACK) or it is reset
//!   (-> CLOSE).
//! - `sock_recv_length` / `sock_send_length`: the watched process that reads or writes a
//!   connection serves it (the accept itself has no event: the first touch is where a worker
//!   takes it). Sockets established before flyprobe attached are adopted there too, when
//!   their local port is a watched listener's. Outbound connections (an upstream, a
//!   database) have an ephemeral local port and are never served connections.
//!   The data's first bytes are found through the syscall's registers, saved at the top of
//!   the task's kernel stack.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_task, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use probe_common::{
    ConnKey, ConnState, ListenKey, buf_kind, conn_flags, dir, drop_reason, h2::Buffer,
    x86_64_syscall,
};

use crate::{
    connections::end_connection,
    io::{data_walks, transfer, walk_h2},
    maps::{CONNS, DROPPED, H2_WALK, LISTEN_PORTS, STATS, count_drop, is_target, stats_mut},
    ports,
    record::{
        ANNOUNCE_LISTEN, NET_INUM_OFFSET, PEEK_REGS, REGS_ARG1_OFFSET, SK_FAMILY_OFFSET,
        SK_NET_OFFSET, SK_NUM_OFFSET, SK_PROTOCOL_OFFSET, SK_STATE_OFFSET, TASK_FLAGS_OFFSET,
        current, kernel_at, tls_enabled,
    },
    unix,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;

// include/net/tcp_states.h
const TCP_ESTABLISHED: u64 = 1;
const TCP_SYN_RECV: u64 = 3;
const TCP_FIN_WAIT1: u64 = 4;
const TCP_CLOSE: u64 = 7;
const TCP_CLOSE_WAIT: u64 = 8;
const TCP_LAST_ACK: u64 = 9;
const TCP_LISTEN: u64 = 10;

/// sock:sock_recv_length(struct sock *sk, int ret, int flags), after data was copied out.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv(ctx: RawTracePointContext) -> i32 {
    let _ = try_sock_data(&ctx, dir::READ);
    0
}

/// sock:sock_send_length(struct sock *sk, int ret, int flags), after data was queued.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send(ctx: RawTracePointContext) -> i32 {
    let _ = try_sock_data(&ctx, dir::WRITE);
    0
}

#[inline(always)]
fn try_sock_data(ctx: &RawTracePointContext, direction: u32) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let ret = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    if sock_data(sk, ret, flags, direction, data_walks, user_buffer) {
        // SAFETY: a raw tracepoint program, tail-calling one of its own type with its
        // context. Without one there (the daemon did not load it), nothing is walked.
        unsafe { H2_WALK.tail_call(ctx, direction) };
    }
    Ok(())
}

// The two frame walks are written out rather than with `#[raw_tracepoint]`: its shim drops
// the inner function's result, so the compiler may leave anything in R0 where that function
// returns (here a stack pointer, which the verifier refuses a subprogram to return). Their
// result, whether they walked, is the program's (the kernel ignores it).

/// An HTTP/2 connection's read, tail-called by `sock_recv` (`H2_WALK[dir::READ]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/sock_recv_length")]
pub fn h2_recv(ctx: *mut c_void) -> u32 {
    h2_data(ctx, true)
}

/// An HTTP/2 connection's write, tail-called by `sock_send` (`H2_WALK[dir::WRITE]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/sock_send_length")]
pub fn h2_send(ctx: *mut c_void) -> u32 {
    h2_data(ctx, false)
}

/// A subprogram of its own: the verifier explores the walk within a million instructions
/// that way, not inlined into the program.
#[inline(never)]
fn h2_data(ctx: *mut c_void, read: bool) -> u32 {
    let ctx = RawTracePointContext::new(ctx);
    let sk: u64 = ctx.arg(0);
    let ret = ctx.arg::<u64>(1) as i32;
    if ret <= 0 {
        return 0;
    }
    let (_, tgid, _) = current();
    let (kind, buf) = user_buffer();
    u32::from(walk_h2(sk, tgid, read, ret as u64, Buffer::at(kind, buf)))
}

/// `ret` bytes (or an error) moved on socket `sk` by the current process: the data path both
/// socket-layer hook sets share (the tracepoints here, the fexit programs of `tcp_calls`).
/// `buffer` finds the data when it must be looked at; `walks`: the caller walks HTTP/2
/// frames (asked of h2 connections only). True when the event is an HTTP/2 connection's,
/// whose frames the caller is to walk.
#[inline(always)]
pub fn sock_data(
    sk: u64,
    ret: i32,
    flags: i32,
    direction: u32,
    walks: impl Fn() -> bool,
    buffer: impl Fn() -> (u32, u64),
) -> bool {
    let (_, tgid, _) = current();
    // Untracked processes leave after one array load.
    if !is_target(tgid) {
        return false;
    }
    // A peek leaves the data to be read again: the real read is the one that counts.
    if direction == dir::READ && flags & MSG_PEEK != 0 {
        return false;
    }
    let Some(state) = take(sk, tgid) else {
        // Not a served connection: an OpenSSL call on it (the server's own outbound TLS)
        // is not one of its connections' either.
        if tls_enabled() {
            crate::tls::foreign();
        }
        return false;
    };
    // Errors and EOF move no data and do not turn the connection; they are a worker's touch
    // all the same (an accepted connection reset before its first byte was accepted).
    if ret <= 0 {
        return false;
    }
    transfer(sk, tgid, state, direction, ret as i64, walks, buffer)
}

/// The connection of `sk`, served by `tgid` from now on (its first touch or its accept): a
/// queued one, or one established before flyprobe attached. None for a socket that is not a
/// served connection of a watched listener.
#[inline(always)]
fn take(sk: u64, tgid: u32) -> Option<&'static mut ConnState> {
    let state = match CONNS.get_ptr_mut(sk) {
        // SAFETY: valid for this run (RCU).
        Some(state) if unsafe { (*state).flags } & conn_flags::UNIX == 0 => state,
        // A unix socket's entry may be a closed socket's whose memory this one reuses.
        Some(state) if !unix::ended(sk, unsafe { &*state }) => state,
        _ => adopt(sk)?,
    };
    // SAFETY: the entry stays valid for this program's run (RCU); a connection is driven by
    // one thread at a time, so the state is not written concurrently.
    let state = unsafe { &mut *state };
    if state.owner != tgid {
        serve(sk, state, tgid);
    }
    Some(state)
}

/// `tgid` serves the connection from now on: a queued one is accepted; one another watched
/// process served (a hand-off over SCM_RIGHTS, fork-per-connection) ends there and starts
/// here, with whatever turn it was in.
#[inline(always)]
fn serve(sk: u64, state: &mut ConnState, tgid: u32) {
    if state.owner != 0
        && let Some(stats) = stats_mut(state.owner)
    {
        end_connection(sk, state.owner, stats, state);
        *state = ConnState {
            flags: state.flags & conn_flags::UNIX,
            port: state.port,
            netns: state.netns,
            ino: state.ino,
            ..ConnState::default()
        };
    }
    if state.flags & conn_flags::QUEUED != 0 {
        ports::taken(state);
        state.start_ns = 0;
    }
    state.flags &= !conn_flags::QUEUED;
    state.owner = tgid;
    if let Some(stats) = stats_mut(tgid) {
        stats.accepted += 1;
    }
}

/// A socket not in the map, read or written by a watched process: its connection if it is
/// the passive side of an open TCP connection on a watched listener's port, established
/// before flyprobe attached (or before the daemon told the kernel of the listener), or the
/// served side of a unix stream connection.
#[inline(always)]
fn adopt(sk: u64) -> Option<*mut ConnState> {
    let family: u16 = kernel_at(sk, SK_FAMILY_OFFSET.load()).ok()?;
    if family == AF_UNIX {
        return unix::adopt(sk);
    }
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let protocol: u16 = kernel_at(sk, SK_PROTOCOL_OFFSET.load()).ok()?;
    let state: u8 = kernel_at(sk, SK_STATE_OFFSET.load()).ok()?;
    if protocol != IPPROTO_TCP
        || (state as u64 != TCP_ESTABLISHED && state as u64 != TCP_CLOSE_WAIT)
    {
        return None;
    }
    let key = listen_key(sk)?;
    LISTEN_PORTS.get_ptr(key)?;
    // One the map had no room for when it was established: still no room for it.
    if DROPPED.get_ptr(sk).is_some() {
        return None;
    }
    insert(sk, &key, conn_flags::QUEUED)
}

/// A fresh entry for `sk`; a full map counts the drop once per socket.
#[inline(always)]
fn insert(sk: ConnKey, key: &ListenKey, flags: u8) -> Option<*mut ConnState> {
    let fresh = ConnState {
        flags,
        port: key.port,
        netns: key.netns,
        ..ConnState::default()
    };
    if CONNS.insert(sk, fresh, BPF_NOEXIST as u64).is_err() && CONNS.get_ptr(sk).is_none() {
        count_drop(drop_reason::CONNECTION_MAP_FULL);
        let _ = DROPPED.insert(sk, 1, 0);
        return None;
    }
    CONNS.get_ptr_mut(sk)
}

/// The local port and network namespace of `sk`.
#[inline(always)]
pub fn listen_key(sk: u64) -> Option<ListenKey> {
    let port: u16 = kernel_at(sk, SK_NUM_OFFSET.load()).ok()?;
    let net: u64 = kernel_at(sk, SK_NET_OFFSET.load()).ok()?;
    let netns: u32 = kernel_at(net, NET_INUM_OFFSET.load()).ok()?;
    Some(ListenKey {
        netns,
        port,
        _pad: 0,
    })
}

/// sock:inet_sock_set_state(const struct sock *sk, int oldstate, int newstate): every TCP
/// state change on the node, most in softirq. Per connection, not per request.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn sock_state(ctx: RawTracePointContext) -> i32 {
    let _ = try_sock_state(&ctx);
    0
}

fn try_sock_state(ctx: &RawTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    match new {
        TCP_ESTABLISHED if old == TCP_SYN_RECV => established(sk),
        TCP_LISTEN => listening(sk),
        TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE => ended(sk, new),
        _ => {}
    }
    Ok(())
}

/// The passive side of a new connection: queued for the listener's processes when the
/// port is a watched one, with the time its handshake completed (how long it then waits
/// for a worker is `ports::taken`'s).
#[inline(always)]
fn established(sk: u64) {
    if let Some(key) = listen_key(sk)
        && LISTEN_PORTS.get_ptr(key).is_some()
        && let Some(state) = insert(sk, &key, conn_flags::QUEUED)
    {
        // SAFETY: valid for this run; nobody has touched a new entry yet.
        let state = unsafe { &mut *state };
        if state.owner == 0 && state.flags & conn_flags::QUEUED != 0 {
            state.start_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
}

/// listen(): in the listening process's context.
#[inline(always)]
fn listening(sk: u64) {
    let (_, tgid, _) = current();
    if is_target(tgid) {
        if let Some(key) = listen_key(sk)
            && LISTEN_PORTS.insert(key, 1, 0).is_err()
        {
            count_drop(drop_reason::LISTEN_MAP_FULL);
        }
    } else if ANNOUNCE_LISTEN.load() != 0 {
        crate::discovery::announce();
    }
}

/// Closed by a process (FIN_WAIT1, LAST_ACK) or reset/aborted (CLOSE).
#[inline(always)]
fn ended(sk: u64, new: u64) {
    let Some(state) = CONNS.get_ptr_mut(sk) else {
        if new == TCP_CLOSE {
            // Forget a drop with its socket: the address will name another one.
            let _ = DROPPED.remove(sk);
        }
        return;
    };
    // SAFETY: valid for this run; removed below before anyone else counts it.
    let state = unsafe { &mut *state };
    if state.flags & conn_flags::QUEUED != 0 {
        // Closed before any watched process read or wrote it: by a watched process that
        // accepted it (that is its touch), or by a worker that exits holding it (its
        // descriptors close after it left the target set, a close with the request unread
        // is a reset: -> CLOSE), else nobody served it.
        let (_, tgid, _) = current();
        let closer = (new != TCP_CLOSE && is_target(tgid)) || exiting_worker(tgid);
        if !closer {
            let _ = CONNS.remove(sk);
            return;
        }
        serve(sk, state, tgid);
    }
    let state = *state;
    // Two CPUs ending it at once: only the one that removes it counts.
    if CONNS.remove(sk).is_err() {
        return;
    }
    if let Some(stats) = stats_mut(state.owner) {
        end_connection(sk, state.owner, stats, &state);
    }
}

/// The current task is exiting (`PF_EXITING`) and its process has served (it has counters):
/// a worker closing the descriptors it still held.
#[inline(always)]
fn exiting_worker(tgid: u32) -> bool {
    const PF_EXITING: u32 = 0x4;
    let offset = TASK_FLAGS_OFFSET.load();
    if offset == 0 {
        return false;
    }
    let task = unsafe { bpf_get_current_task() };
    kernel_at::<u32>(task, offset).is_ok_and(|flags| flags & PF_EXITING != 0)
        && STATS.get_ptr(tgid).is_some()
}

/// Where the current syscall's data is: its number and second argument, from the user
/// registers saved at the top of the task's kernel stack: `si`, and `orig_ax` 16 bytes
/// after it (the x86_64 layout; the daemon checks it before it turns peeking on).
/// io_uring, sendfile and splice have no user buffer there.
#[inline(always)]
fn user_buffer() -> (u32, u64) {
    const NONE: (u32, u64) = (buf_kind::NONE, 0);
    if PEEK_REGS.load() == 0 {
        return NONE;
    }
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    // Plain loads from the BTF-typed pointer the helper returns: the verifier knows the
    // offset (a frozen .rodata constant) and makes them fault-safe loads, with no
    // helper call (a bpf_probe_read_kernel here was a tenth of the program's time).
    let at = REGS_ARG1_OFFSET.load() as usize;
    // SAFETY: checked by the verifier against pt_regs' BTF; a fault reads 0.
    let (arg1, nr) = unsafe {
        (
            core::ptr::read_volatile(regs.add(at) as *const u64),
            core::ptr::read_volatile(regs.add(at + 16) as *const u64),
        )
    };
    match x86_64_syscall::buffer_kind(nr) {
        buf_kind::NONE => NONE,
        kind => (kind, arg1),
    }
}

/// The exit status of the current task (`task_struct.exit_code`: the signal in the low 7
/// bits, else the status in bits 8..16), or None without the offset.
#[inline(always)]
pub fn current_exit_code(offset: u32) -> Option<u32> {
    if offset == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    kernel_at::<i32>(task, offset).ok().map(|c| c as u32)
}

/// Empty programs on the same three events: the benchmark's floor (`--empty-hooks`).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn empty_recv(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn empty_send(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn empty_state(_ctx: RawTracePointContext) -> i32 {
    0
}
