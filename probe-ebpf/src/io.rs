//! The data path: bytes moved on a connection count for the process that moved them and
//! move the connection's request/response turn (`probe_common::turn`, shared with its
//! tests). The syscall hook set's programs are here too: each enter program serves the
//! syscalls whose buffer has one shape; the exit program serves them all.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext,
};
use probe_common::{
    ConnState, PendingIo, ProcStats, buf_kind, dir, drop_reason, fd_key,
    http::Head,
    turn::{self, Turns},
};

use crate::{
    maps::{CONNS, PENDING_IO, count_drop, is_target, stats_mut},
    record::{access_log_enabled, current, syscall_arg0, syscall_arg1, syscall_ret},
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
/// counts the bytes and moves the request/response turn (`probe_common::turn`). `buffer`
/// says where the data is (`buf_kind`, address); it is asked only when the first bytes
/// must be peeked at. Shared by both hook sets.
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
    let read = direction == dir::READ;
    if read {
        stats.rx_bytes += ret as u64;
    } else {
        stats.tx_bytes += ret as u64;
    }
    let mut kernel = Kernel {
        tgid,
        stats,
        buffer,
    };
    turn::on_data(state, read, ret as u64, &mut kernel);
}

/// The turn's clock, bytes and counts, in the kernel.
struct Kernel<F> {
    tgid: u32,
    stats: &'static mut ProcStats,
    buffer: F,
}

impl<F: Fn() -> (u32, u64)> Turns for Kernel<F> {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn peek(&mut self, ret: u64) -> Option<(Head, usize)> {
        let (kind, buf) = (self.buffer)();
        peek(kind, buf, ret as i64)
    }

    #[inline(always)]
    fn started(&mut self) {
        self.stats.requests += 1;
    }

    #[inline(always)]
    fn exchanged(&mut self, state: &ConnState) {
        record_exchange(self.tgid, state);
    }

    #[inline(always)]
    fn responded(&mut self, state: &ConnState) {
        self.stats.responses += 1;
        record_completed(self.tgid, state);
    }

    #[inline(always)]
    fn wants_finished(&self) -> bool {
        // A load-time constant: the verifier wires the branch, nothing is copied without it.
        access_log_enabled()
    }

    #[inline(always)]
    fn finished(&mut self, turn: &ConnState) {
        log_access(self.tgid, turn);
    }
}
