//! The request/response turn. A request starts with the first successful read on a
//! connection after the server last wrote on it (or the first read at all); its response
//! starts with the first successful write after that. Each enter program is attached to a
//! whole syscall family, the exit program to all of them.

use aya_ebpf::{bindings::BPF_ANY, macros::tracepoint, programs::TracePointContext};
use probe_common::{ConnKey, PendingIo, dir, drop_reason, phase};

use crate::{
    maps::{CONNS, PENDING_IO, count_drop, stats_mut},
    record::{current, syscall_arg0, syscall_ret},
};

/// sys_enter_{read,readv,recvfrom,recvmsg}
#[tracepoint]
pub fn read_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ);
    0
}

/// sys_enter_{write,writev,sendto,sendmsg,sendfile64}
#[tracepoint]
pub fn write_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::WRITE);
    0
}

#[inline(always)]
fn try_io_enter(ctx: &TracePointContext, direction: u32) -> Result<(), i64> {
    let (id, tgid, _) = current();
    // Every family's first argument is the socket fd (sendfile's is out_fd).
    let fd = syscall_arg0(ctx)? as u32;
    // Untracked processes and non-connection fds leave after this one lookup.
    if CONNS.get_ptr(ConnKey { tgid, fd }).is_none() {
        return Ok(());
    }
    let pending = PendingIo { fd, dir: direction };
    if PENDING_IO.insert(id, pending, BPF_ANY as u64).is_err() {
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
    let Some(pending) = PENDING_IO.get_ptr(id).map(|p| unsafe { *p }) else {
        return Ok(());
    };
    let _ = PENDING_IO.remove(id);
    // Errors (EAGAIN) and EOF (0) move no data and do not turn the connection.
    if syscall_ret(ctx)? <= 0 {
        return Ok(());
    }
    let key = ConnKey {
        tgid,
        fd: pending.fd,
    };
    // Another thread may have closed it meanwhile.
    let Some(state) = CONNS.get_ptr_mut(key) else {
        return Ok(());
    };
    // SAFETY: the entry stays valid for this program's run (RCU); a connection is driven by
    // one thread at a time, so the phase is not written concurrently.
    let state = unsafe { &mut *state };
    let Some(stats) = stats_mut(tgid) else {
        return Ok(());
    };
    if pending.dir == dir::READ {
        if state.phase != phase::REQUEST {
            state.phase = phase::REQUEST;
            stats.requests += 1;
        }
    } else if state.phase == phase::REQUEST {
        state.phase = phase::RESPONSE;
        stats.responses += 1;
    }
    Ok(())
}
