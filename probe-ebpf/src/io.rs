//! The request/response turn. A request starts with the first successful read on a
//! connection after the server last wrote on it (or the first read at all); its response
//! starts with the first successful write after that. For HTTP/1.x the first bytes of the
//! turn give the method and the status code, and the turn follows the protocol: an interim
//! status (100 Continue) does not end the request, a read after the response that does not
//! begin with a request line is the tail of the previous body (a server may answer before
//! reading it all), and every further final status line is one more request (pipelined, or
//! begun in a read that also held the previous body's tail). Each enter program serves the
//! syscalls whose buffer has one shape; the exit program serves them all.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext,
};
use probe_common::{
    ConnState, PendingIo, buf_kind, dir, drop_reason, fd_key,
    http::{
        Head, METHOD_NONE, METHOD_OTHER, PROTO_HTTP1, PROTO_UNKNOWN, has_requests, is_interim,
        parse_method, parse_status, protocol_of,
    },
    phase,
};

use crate::{
    maps::{CONNS, PENDING_IO, count_drop, is_target, stats_mut},
    record::{current, syscall_arg0, syscall_arg1, syscall_ret},
    requests::{log_access, peek, record_completed, record_exchange},
};

/// sys_enter_{read,recvfrom}
#[tracepoint]
pub fn read_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ, buf_kind::PLAIN);
    0
}

/// sys_enter_readv
#[tracepoint]
pub fn readv_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ, buf_kind::IOVEC);
    0
}

/// sys_enter_recvmsg
#[tracepoint]
pub fn recvmsg_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ, buf_kind::MSGHDR);
    0
}

/// sys_enter_{write,sendto}
#[tracepoint]
pub fn write_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::WRITE, buf_kind::PLAIN);
    0
}

/// sys_enter_writev
#[tracepoint]
pub fn writev_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::WRITE, buf_kind::IOVEC);
    0
}

/// sys_enter_sendmsg
#[tracepoint]
pub fn sendmsg_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::WRITE, buf_kind::MSGHDR);
    0
}

/// sys_enter_sendfile64: the data comes from a file, there is nothing to peek at.
#[tracepoint]
pub fn sendfile_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::WRITE, buf_kind::NONE);
    0
}

#[inline(always)]
fn try_io_enter(ctx: &TracePointContext, direction: u32, kind: u32) -> Result<(), i64> {
    let (id, tgid, _) = current();
    // Untracked processes leave after one array load.
    if !is_target(tgid) {
        return Ok(());
    }
    // Every family's first argument is the socket fd (sendfile's is out_fd).
    let fd = syscall_arg0(ctx)? as u32;
    if CONNS.get_ptr(fd_key(tgid, fd)).is_none() {
        return Ok(());
    }
    let buf = if kind == buf_kind::NONE {
        0
    } else {
        syscall_arg1(ctx)?
    };
    let pending = PendingIo {
        fd,
        dir: direction,
        buf,
        kind,
        _pad: 0,
    };
    // Reuse this thread's slot in place: a map update would allocate and swap an element.
    if let Some(slot) = PENDING_IO.get_ptr_mut(id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        unsafe { *slot = pending };
    } else if PENDING_IO.insert(id, pending, BPF_ANY as u64).is_err() {
        count_drop(drop_reason::PENDING_MAP_FULL);
    }
    Ok(())
}

/// sys_exit of every read and write syscall above.
#[tracepoint]
pub fn io_exit(ctx: TracePointContext) -> u32 {
    let _ = try_io_exit(&ctx);
    0
}

fn try_io_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (id, tgid, _) = current();
    if !is_target(tgid) {
        return Ok(());
    }
    let Some(slot) = PENDING_IO.get_ptr_mut(id) else {
        return Ok(());
    };
    // SAFETY: this thread's own slot; only this thread writes it.
    let slot = unsafe { &mut *slot };
    if slot.dir == dir::NONE {
        return Ok(());
    }
    let pending = *slot;
    slot.dir = dir::NONE;
    // Errors (EAGAIN) and EOF (0) move no data and do not turn the connection.
    let ret = syscall_ret(ctx)?;
    if ret <= 0 {
        return Ok(());
    }
    // Another thread may have closed it meanwhile.
    let Some(state) = CONNS.get_ptr_mut(fd_key(tgid, pending.fd)) else {
        return Ok(());
    };
    // SAFETY: the entry stays valid for this program's run (RCU); a connection is driven by
    // one thread at a time, so the state is not written concurrently.
    let state = unsafe { &mut *state };
    transfer(tgid, state, pending.dir, ret, || {
        (pending.kind, pending.buf)
    });
    Ok(())
}

/// `ret` (> 0) bytes moved on a connection in direction `direction`, by process `tgid`:
/// counts the bytes and moves the request/response turn. `buffer` says where the data is
/// (`buf_kind`, address); it is asked only when the first bytes must be peeked at. Shared by
/// both hook sets.
#[inline(always)]
pub fn transfer(
    tgid: u32,
    state: &mut ConnState,
    direction: u32,
    ret: i64,
    buffer: impl Fn() -> (u32, u64),
) {
    let Some(stats) = stats_mut(tgid) else {
        return;
    };
    // The turn this event finishes, if any: logged once, at the end (one call site keeps
    // the program small enough for the verifier when the access log is on).
    let mut finished: Option<ConnState> = None;
    if direction == dir::READ {
        let now = unsafe { bpf_ktime_get_ns() };
        stats.rx_bytes += ret as u64;
        if state.phase != phase::REQUEST {
            // Only HTTP/1.x turns (and the first, which tells the protocol) need the bytes.
            let head = if state.protocol == PROTO_UNKNOWN || state.protocol == PROTO_HTTP1 {
                let (kind, buf) = buffer();
                peek(kind, buf, ret)
            } else {
                None
            };
            let method = match &head {
                Some((bytes, len)) => parse_method(bytes, *len),
                None => METHOD_NONE,
            };
            let body_tail = state.phase == phase::RESPONSE
                && state.protocol == PROTO_HTTP1
                && method == METHOD_NONE;
            if !body_tail {
                if state.phase == phase::RESPONSE {
                    finished = Some(*state);
                }
                start_request(state, &head, method, now);
                if has_requests(state.protocol) {
                    stats.requests += 1;
                } else {
                    record_exchange(tgid, state);
                }
            }
        }
        state.rx += ret as u64;
        state.last_read_ns = now;
    } else {
        // The clock is read only where a turn changes: most writes (a body's) do not.
        stats.tx_bytes += ret as u64;
        let http = state.protocol == PROTO_HTTP1;
        if state.phase == phase::REQUEST {
            let status = if http { status_of(&buffer, ret) } else { 0 };
            if !is_interim(status) {
                let now = unsafe { bpf_ktime_get_ns() };
                state.phase = phase::RESPONSE;
                state.status = status;
                // Saturating: a server that reads and writes one connection from two threads
                // (HTTP/2) can move start_ns past this event's `now`.
                state.duration_ns = now.saturating_sub(state.start_ns);
                if has_requests(state.protocol) {
                    stats.responses += 1;
                    record_completed(tgid, state);
                }
            }
        } else if state.phase == phase::RESPONSE && http {
            // Another final status line: one more request, whose start was not seen.
            let status = status_of(&buffer, ret);
            if status != 0 && !is_interim(status) {
                let now = unsafe { bpf_ktime_get_ns() };
                finished = Some(*state);
                state.status = status;
                state.start_ns = state.last_read_ns;
                state.duration_ns = now.saturating_sub(state.start_ns);
                state.rx = 0;
                state.tx = 0;
                stats.requests += 1;
                stats.responses += 1;
                record_completed(tgid, state);
            }
        }
        state.tx += ret as u64;
    }
    if let Some(turn) = finished
        && has_requests(turn.protocol)
    {
        log_access(tgid, &turn);
    }
}

#[inline(always)]
fn start_request(state: &mut ConnState, head: &Option<(Head, usize)>, method: u8, now: u64) {
    if state.protocol == PROTO_UNKNOWN {
        state.protocol = match head {
            Some((bytes, len)) => protocol_of(bytes, *len, method),
            // No bytes to look at (io_uring, sendfile): not known, rather than not HTTP;
            // the next request tries again.
            None => PROTO_UNKNOWN,
        };
    }
    state.method = if state.protocol != PROTO_HTTP1 {
        METHOD_NONE
    } else if method == METHOD_NONE {
        // Not a request line where one should start: still a request, method unknown.
        METHOD_OTHER
    } else {
        method
    };
    state.phase = phase::REQUEST;
    state.status = 0;
    state.start_ns = now;
    state.duration_ns = 0;
    state.rx = 0;
    state.tx = 0;
}

#[inline(always)]
fn status_of(buffer: &impl Fn() -> (u32, u64), ret: i64) -> u16 {
    let (kind, buf) = buffer();
    match peek(kind, buf, ret) {
        Some((bytes, len)) => parse_status(&bytes, len),
        None => 0,
    }
}
