//! The data path: bytes moved on a connection count for the process that moved them and
//! move the connection's request/response turn (`probe_common::turn`, shared with its
//! tests). The syscall hook set's programs are here too: each enter program serves the
//! syscalls whose buffer has one shape; the exit program serves them all.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use probe_common::{
    ConnKey, ConnState, PendingIo, ProcStats, Stream, StreamKey, buf_kind, conn_flags, dir,
    drop_reason, fd_key,
    h2::{self, Buffer, Frames, H2, WINDOW},
    http::{Head, PROTO_H2, PROTO_TLS, status_class},
    turn::{self, Turns},
};

use crate::{
    maps::{
        CONNS, DATA_WALKS, H2_CONNS, H2_WALK, PENDING_IO, STREAMS, count_drop, is_target,
        sees_openssl, stats_mut,
    },
    record::{
        access_log_enabled, current, syscall_arg, syscall_arg0, syscall_arg1, syscall_ret,
        tls_enabled,
    },
    requests::{
        log_access, log_stream, peek, record_aborted_n, record_completed, record_exchange,
        record_stream, stream_labels,
    },
    tls,
};

/// sys_enter_read
#[tracepoint]
pub fn read_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ, buf_kind::PLAIN);
    0
}

/// sys_enter_recvfrom(fd, buf, size, flags, ...): a peek (nginx looks at a TLS port's first
/// byte) leaves the data to be read again, and the real read is the one that counts.
#[tracepoint]
pub fn recvfrom_enter(ctx: TracePointContext) -> u32 {
    if syscall_arg(&ctx, 3) as i32 & MSG_PEEK == 0 {
        let _ = try_io_enter(&ctx, dir::READ, buf_kind::PLAIN);
    }
    0
}

/// sys_enter_readv
#[tracepoint]
pub fn readv_enter(ctx: TracePointContext) -> u32 {
    let _ = try_io_enter(&ctx, dir::READ, buf_kind::IOVEC);
    0
}

/// sys_enter_recvmsg(fd, msg, flags)
#[tracepoint]
pub fn recvmsg_enter(ctx: TracePointContext) -> u32 {
    if syscall_arg(&ctx, 2) as i32 & MSG_PEEK == 0 {
        let _ = try_io_enter(&ctx, dir::READ, buf_kind::MSGHDR);
    }
    0
}

/// recv(2)'s MSG_PEEK.
const MSG_PEEK: i32 = 2;

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
        if tls_enabled() {
            tls::foreign();
        }
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
    let key = fd_key(tgid, pending.fd);
    let buffer = || (pending.kind, pending.buf);
    if transfer(key, tgid, state, pending.dir, ret, data_walks, buffer) {
        // An HTTP/2 connection's frames: walked by a program of its own (`io_h2_recv`,
        // `io_h2_send`), with its own stack and instruction budget. It finds the buffer in
        // this thread's slot, which keeps it until the next call.
        // SAFETY: a tracepoint program, tail-calling one of its own type with its context.
        unsafe { H2_WALK.tail_call(ctx, pending.dir) };
    }
    Ok(())
}

// The walks are written out rather than with `#[tracepoint]`, as `sockets::h2_recv` is.

/// An HTTP/2 connection's read, tail-called by `io_exit` (`H2_WALK[dir::READ]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "tracepoint/io_h2_recv")]
pub fn io_h2_recv(ctx: *mut c_void) -> u32 {
    io_h2(ctx, true);
    0
}

/// An HTTP/2 connection's write, tail-called by `io_exit` (`H2_WALK[dir::WRITE]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "tracepoint/io_h2_send")]
pub fn io_h2_send(ctx: *mut c_void) -> u32 {
    io_h2(ctx, false);
    0
}

/// A subprogram of its own, as `sockets::h2_data` is. The syscall's buffer is the one its
/// enter program left in this thread's `PENDING_IO` slot.
#[inline(never)]
fn io_h2(ctx: *mut c_void, read: bool) -> u32 {
    let ctx = TracePointContext::new(ctx);
    let (id, tgid, _) = current();
    let ret = match syscall_ret(&ctx) {
        Ok(ret) if ret > 0 => ret as u64,
        _ => return 0,
    };
    // SAFETY: this thread's own slot, read at once.
    let Some(pending) = PENDING_IO.get_ptr(id).map(|p| unsafe { *p }) else {
        return 0;
    };
    let buf = Buffer::at(pending.kind, pending.buf);
    u32::from(walk_h2(fd_key(tgid, pending.fd), tgid, read, ret, buf))
}

/// `ret` (> 0) bytes moved on the connection `key` in direction `direction`, by process
/// `tgid`: counts the bytes and moves the request/response turn (`probe_common::turn`), or
/// leaves an HTTP/2 connection's frames to the caller's walk where `walks` says there is
/// one. `buffer` says where the data is (`buf_kind`, address); it is asked only when the
/// bytes must be looked at. Shared by every hook set. True when the event is an HTTP/2
/// connection's, for `walk_h2`.
#[inline(always)]
pub fn transfer(
    key: ConnKey,
    tgid: u32,
    state: &mut ConnState,
    direction: u32,
    ret: i64,
    walks: impl Fn() -> bool,
    buffer: impl Fn() -> (u32, u64),
) -> bool {
    let Some(stats) = stats_mut(tgid) else {
        return false;
    };
    if direction == dir::READ {
        stats.rx_bytes += ret as u64;
    } else {
        stats.tx_bytes += ret as u64;
    }
    // TLS (`--tls`): the socket carries ciphertext. Its events tie it to this thread's
    // OpenSSL calls; once their plaintext is seen (`tls::plaintext`), that moves the turns.
    if tls_enabled() && (state.protocol == PROTO_TLS || state.flags & conn_flags::TLS != 0) {
        // A read of a connection no call has been tied to yet is the one an unknown
        // `SSL *`'s first read may take (`tls::plaintext`).
        let untied_read = direction == dir::READ && state.flags & conn_flags::TLS == 0;
        tls::seen(key, untied_read);
        if state.flags & conn_flags::TLS != 0 {
            return false;
        }
    }
    turn_data(
        key, tgid, state, stats, direction, ret as u64, walks, buffer,
    )
}

/// Whether the daemon loaded the data path's HTTP/2 walks (`H2_WALK`, or the fexit
/// programs' arrays): asked only of an h2 connection's events. Without them (a verifier
/// that refused them) an h2 connection is counted by exchanges.
#[inline(always)]
pub fn data_walks() -> bool {
    DATA_WALKS.get(0).is_some_and(|w| *w != 0)
}

/// `ret` (> 0) bytes of connection `key`'s data (plaintext, for TLS) moved in `direction`
/// by `tgid`, whose counters are `stats`: moves the turn, or tells the caller to walk an
/// HTTP/2 connection's frames (true) where `walks` (asked of h2 connections only).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn turn_data(
    key: ConnKey,
    tgid: u32,
    state: &mut ConnState,
    stats: &'static mut ProcStats,
    direction: u32,
    ret: u64,
    walks: impl Fn() -> bool,
    buffer: impl Fn() -> (u32, u64),
) -> bool {
    let read = direction == dir::READ;
    // An HTTP/2 connection's frames are walked by a program of their own (`walk_h2`,
    // tail-called by the caller): with the turn, they would need more than the 512 bytes of
    // stack and the instructions the verifier allows one program.
    if state.protocol == PROTO_H2 && walks() {
        return true;
    }
    let mut kernel = Kernel {
        tgid,
        stats,
        buffer,
        walks,
    };
    turn::on_data(state, read, ret, &mut kernel);
    // Not h2 before the turn: this read began an HTTP/2 connection.
    if !(state.protocol == PROTO_H2 && kernel.walks_h2()) {
        return false;
    }
    // The connection preface: the frames start after it. Inserted from the static, by
    // reference: a copy on the stack would take 88 of its 512 bytes.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let inserted = H2_CONNS.insert(key, &FRESH_H2, BPF_ANY as u64);
    if inserted.is_err() {
        count_drop(drop_reason::H2_MAP_FULL);
        return false;
    }
    let Some(conn) = H2_CONNS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: valid for this run (RCU); just created for this connection.
    unsafe {
        (*conn).rx.need = h2::PREFACE_LEN;
        (*conn).flags = state.flags;
    }
    true
}

/// The turn's clock, bytes and counts, in the kernel.
struct Kernel<F, W> {
    tgid: u32,
    stats: &'static mut ProcStats,
    buffer: F,
    walks: W,
}

/// `ret` bytes read (`read`) or written on the HTTP/2 connection `key` by `tgid`, in
/// `buffer`: walks its frames (`h2::on_data`); its streams are its requests. False when
/// the connection is not (or no longer) one.
#[inline(always)]
pub fn walk_h2(key: ConnKey, tgid: u32, read: bool, ret: u64, buffer: Buffer) -> bool {
    let Some(conn) = H2_CONNS.get_ptr_mut(key) else {
        return false;
    };
    let Some(stats) = stats_mut(tgid) else {
        return false;
    };
    // SAFETY: valid for this run (RCU); a connection is driven by one thread at a time.
    let conn = unsafe { &mut *conn };
    let mut streams = Requests {
        key,
        tgid,
        flags: conn.flags,
        stats,
    };
    if h2::on_data(conn, read, buffer, ret, &mut streams) {
        count_drop(drop_reason::H2_FRAMES_LOST);
    }
    true
}

impl<F: Fn() -> (u32, u64), W: Fn() -> bool> Turns for Kernel<F, W> {
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
        // Where OpenSSL's plaintext will come, a TLS connection's handshake is no exchange.
        if tls_enabled() && state.protocol == PROTO_TLS && sees_openssl(self.tgid) {
            return;
        }
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

    #[inline(always)]
    fn walks_h2(&self) -> bool {
        (self.walks)()
    }
}

/// A new HTTP/2 connection's state, copied into `H2_CONNS` from here (not the stack, which
/// the frame walk needs).
static FRESH_H2: H2 = H2::ZERO;

/// An HTTP/2 connection's streams, in the kernel: each is a request in `STREAMS` until its
/// response headers.
struct Requests {
    key: ConnKey,
    tgid: u32,
    flags: u8,
    stats: *mut ProcStats,
}

/// What `bpf_loop` hands each step of an event's walk: pointers to the walk's state, which
/// lives in the caller's frame and in `H2_CONNS`.
struct Steps {
    walk: *mut h2::Walk,
    d: *mut h2::Direction,
    s: *mut h2::Streams,
    requests: *mut Requests,
}

/// One step of an event's walk (`h2::step`): the body of its `bpf_loop`, which the verifier
/// checks once, not once per frame. Returns 1 to end the loop.
#[inline(never)]
extern "C" fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Steps` in `Requests::run`'s frame, alive for the whole loop;
    // its pointers are to that frame and to this connection's map value.
    let steps = unsafe { &*(ctx as *const Steps) };
    let (w, d, s, requests) = unsafe {
        (
            &mut *steps.walk,
            &mut *steps.d,
            &mut *steps.s,
            &mut *steps.requests,
        )
    };
    if h2::step(w, d, s, requests) { 0 } else { 1 }
}

impl Frames for Requests {
    #[inline(always)]
    fn run(&mut self, walk: &mut h2::Walk, d: &mut h2::Direction, s: &mut h2::Streams) {
        let mut steps = Steps {
            walk,
            d,
            s,
            requests: self,
        };
        // SAFETY: a static callback and a context on this frame, as bpf_loop wants.
        unsafe {
            bpf_loop(
                h2::STEP_LOOPS,
                walk_step as *mut c_void,
                &mut steps as *mut Steps as *mut c_void,
                0,
            )
        };
    }

    #[inline(always)]
    fn read(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool {
        if len == 0 {
            return true;
        }
        let len = if len > WINDOW as u32 {
            WINDOW as u32
        } else {
            len
        };
        // Linux 6.1 loses the clamp's bound on its way to the helper (the check is on one
        // register or stack slot, the call uses another): "R2 unbounded memory access". A
        // mask in the register the helper takes keeps it; the volatile read keeps LLVM from
        // folding the mask away. For 1..=WINDOW it is the identity.
        // SAFETY: a read of a local.
        let len = ((unsafe { core::ptr::read_volatile(&len) } - 1) & (WINDOW as u32 - 1)) + 1;
        // SAFETY: at most WINDOW bytes into `out`; a fault returns an error.
        unsafe {
            bpf_probe_read_user(out.as_mut_ptr() as *mut c_void, len, addr as *const c_void) == 0
        }
    }

    #[inline(always)]
    fn read_kernel(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool {
        // Only ever an iovec's 8-byte halves: a constant length.
        if len != 8 {
            return false;
        }
        // SAFETY: 8 bytes into `out`; a fault returns an error.
        unsafe {
            bpf_probe_read_kernel(out.as_mut_ptr() as *mut c_void, 8, addr as *const c_void) == 0
        }
    }

    #[inline(always)]
    fn opened(&mut self, stream: u32, method: u8) {
        // SAFETY: this CPU's counters (a per-CPU map value), for this run.
        unsafe { (*self.stats).requests += 1 };
        let value = Stream {
            start_ns: unsafe { bpf_ktime_get_ns() },
            method,
            _pad: [0; 7],
        };
        if STREAMS
            .insert(stream_key(self.key, stream), value, BPF_ANY as u64)
            .is_err()
        {
            count_drop(drop_reason::STREAM_MAP_FULL);
        }
    }

    #[inline(always)]
    fn reset(&mut self, stream: u32) -> bool {
        let Some(open) = take_stream(self.key, stream) else {
            return false;
        };
        // SAFETY: this CPU's counters (a per-CPU map value), for this run.
        abort_streams(self.tgid, self.flags, open.method, 1, unsafe {
            &mut *self.stats
        });
        true
    }

    #[inline(always)]
    fn responded(&mut self, stream: u32, status: u16) -> bool {
        let Some(open) = take_stream(self.key, stream) else {
            return false;
        };
        // SAFETY: this CPU's counters (a per-CPU map value), for this run.
        unsafe { (*self.stats).responses += 1 };
        let duration = unsafe { bpf_ktime_get_ns() }.saturating_sub(open.start_ns);
        let labels = stream_labels(self.tgid, self.flags, open.method, status_class(status));
        record_stream(&labels, duration);
        log_stream(self.tgid, open.method, status, duration);
        true
    }
}

#[inline(always)]
fn stream_key(conn: ConnKey, stream: u32) -> StreamKey {
    StreamKey {
        conn,
        stream,
        _pad: 0,
    }
}

/// The open stream `stream` of connection `conn`, taken out of `STREAMS`; None when it is
/// not open (answered, reset, never seen) or another CPU took it first.
#[inline(always)]
pub fn take_stream(conn: ConnKey, stream: u32) -> Option<Stream> {
    let key = stream_key(conn, stream);
    // SAFETY: read at once, under RCU.
    let open = STREAMS.get_ptr(key).map(|s| unsafe { *s })?;
    STREAMS.remove(key).ok()?;
    Some(open)
}

/// `n` HTTP/2 streams of `method` that ended unanswered (reset, or open when their
/// connection ended), for process `tgid` whose counters are `stats`.
#[inline(always)]
pub fn abort_streams(tgid: u32, flags: u8, method: u8, n: u64, stats: &mut ProcStats) {
    stats.aborted += n;
    record_aborted_n(&stream_labels(tgid, flags, method, 0), n);
}
