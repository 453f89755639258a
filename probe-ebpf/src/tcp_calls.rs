//! The fentry hook set's own programs: fexit on `tcp_recvmsg` and `tcp_sendmsg` (and
//! `tcp_sendpage`, sendfile's path before 6.5), and on `unix_stream_recvmsg` and
//! `unix_stream_sendmsg` for unix-domain stream connections. They are BPF trampolines, a direct call from
//! the function itself, and exist where the socket tracepoints do not (6.1); the rest of the
//! set (connections queued and ended from `inet_sock_set_state`, fork and exit) is the socket
//! set's, and so is everything a transfer does (`sockets::sock_data`): a worker takes a
//! connection at its first touch there too. (An fexit on `inet_csk_accept` would take it at
//! accept, but a process that accepts and hands the socket on — fork per connection,
//! SCM_RIGHTS — would then count it as well as the one that serves it.)
//!
//! fexit sees the `struct msghdr` after the copy: its iterator has moved past the data, so
//! the first bytes are found by walking back over what this call moved. Struct offsets and
//! the iterator kinds come from the kernel's BTF (`iov_iter` changed between 6.1 and 6.12).
//! An HTTP/2 connection's frames are walked by fexit programs of their own on the same
//! functions, tail-called (`tcp_h2_*`).

use core::ffi::c_void;

use aya_ebpf::{macros::fexit, programs::FExitContext};
use probe_common::{buf_kind, dir, h2::Buffer, http::PEEK};

use crate::{
    io::{data_walks, walk_h2},
    maps::{FEXIT_RECV_WALK, FEXIT_SEND_WALK, FEXIT_SENDPAGE_WALK},
    record::{
        ITER_IOVEC, ITER_OFFSET_OFFSET, ITER_PTR_OFFSET, ITER_TYPE_OFFSET, ITER_UBUF,
        MSG_ITER_OFFSET, SOCKET_SK_OFFSET, current, kernel_at,
    },
    sockets::sock_data,
};

/// int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len)
/// (before 6.16).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recv_exit(ctx: FExitContext) -> i32 {
    recv_exit(&ctx, ctx.arg::<u64>(5) as i32);
    0
}

/// int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags) (6.16 on).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recv4_exit(ctx: FExitContext) -> i32 {
    recv_exit(&ctx, ctx.arg::<u64>(4) as i32);
    0
}

/// The return value is read from the context, after the arguments, rather than with
/// bpf_get_func_ret: 6.1's verifier does not see that helper write its result (it takes the
/// stack slot for the 0 it held before the call, and prunes every path of a non-zero return
/// as dead). Which slot that is depends on the kernel: the daemon loads the program whose
/// slot matches the function's BTF.
#[inline(always)]
fn recv_exit(ctx: &FExitContext, ret: i32) {
    let sk: u64 = ctx.arg(0);
    let msg: u64 = ctx.arg(1);
    let flags = ctx.arg::<u64>(3) as i32;
    if sock_data(sk, ret, flags, dir::READ, data_walks, || {
        moved_from(msg, ret, flags)
    }) {
        // SAFETY: an fexit program on tcp_recvmsg tail-calling one on the same function,
        // with its context. Without one there (not loaded), nothing is walked.
        unsafe { FEXIT_RECV_WALK.tail_call(ctx, 0) };
    }
}

/// int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_send_exit(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let msg: u64 = ctx.arg(1);
    let ret = ctx.arg::<u64>(3) as i32;
    if sock_data(sk, ret, 0, dir::WRITE, data_walks, || {
        moved_from(msg, ret, 0)
    }) {
        // SAFETY: as in `recv_exit`, on tcp_sendmsg.
        unsafe { FEXIT_SEND_WALK.tail_call(&ctx, 0) };
    }
    0
}

/// int unix_stream_recvmsg(struct socket *sock, struct msghdr *msg, size_t size, int flags):
/// unix-domain stream sockets, whose reads do not pass tcp_recvmsg. HTTP/2 there is
/// counted by exchanges (no walk: it would be two more programs for a rare transport).
#[fexit(function = "unix_stream_recvmsg")]
pub fn unix_recv_exit(ctx: FExitContext) -> i32 {
    let Some(sk) = socket_sk(ctx.arg(0)) else {
        return 0;
    };
    let msg: u64 = ctx.arg(1);
    let flags = ctx.arg::<u64>(3) as i32;
    let ret = ctx.arg::<u64>(4) as i32;
    let _ = sock_data(
        sk,
        ret,
        flags,
        dir::READ,
        || false,
        || moved_from(msg, ret, flags),
    );
    0
}

/// int unix_stream_sendmsg(struct socket *sock, struct msghdr *msg, size_t len)
#[fexit(function = "unix_stream_sendmsg")]
pub fn unix_send_exit(ctx: FExitContext) -> i32 {
    let Some(sk) = socket_sk(ctx.arg(0)) else {
        return 0;
    };
    let msg: u64 = ctx.arg(1);
    let ret = ctx.arg::<u64>(3) as i32;
    let _ = sock_data(sk, ret, 0, dir::WRITE, || false, || moved_from(msg, ret, 0));
    0
}

/// `socket->sk`, for the functions that take a `struct socket *`.
#[inline(always)]
fn socket_sk(socket: u64) -> Option<u64> {
    let offset = SOCKET_SK_OFFSET.load();
    if offset == 0 {
        return None;
    }
    kernel_at::<u64>(socket, offset).ok().filter(|&sk| sk != 0)
}

/// int tcp_sendpage(struct sock *sk, struct page *page, int offset, size_t size, int flags):
/// sendfile before 6.5. The data is a page cache page: nothing to peek at (an HTTP/2
/// connection's walk passes over it, inside a DATA frame).
#[fexit(function = "tcp_sendpage")]
pub fn tcp_sendpage_exit(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret = ctx.arg::<u64>(5) as i32;
    if sock_data(sk, ret, 0, dir::WRITE, data_walks, || (buf_kind::NONE, 0)) {
        // SAFETY: as in `recv_exit`, on tcp_sendpage.
        unsafe { FEXIT_SENDPAGE_WALK.tail_call(&ctx, 0) };
    }
    0
}

// The walks are written out rather than with `#[fexit]`, as `sockets::h2_recv` is; an fexit
// program must return 0.

/// An HTTP/2 connection's read (tcp_recvmsg with 5 parameters), tail-called by
/// `tcp_recv_exit` (`FEXIT_RECV_WALK`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "fexit/tcp_recvmsg")]
pub fn tcp_h2_recv(ctx: *mut c_void) -> i32 {
    let ctx = FExitContext::new(ctx);
    let flags = ctx.arg::<u64>(3) as i32;
    fexit_h2(
        ctx.arg(0),
        ctx.arg(1),
        ctx.arg::<u64>(5) as i32,
        flags,
        dir::READ,
    );
    0
}

/// The same with 4 parameters (6.16 on), tail-called by `tcp_recv4_exit`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "fexit/tcp_recvmsg")]
pub fn tcp_h2_recv4(ctx: *mut c_void) -> i32 {
    let ctx = FExitContext::new(ctx);
    let flags = ctx.arg::<u64>(3) as i32;
    fexit_h2(
        ctx.arg(0),
        ctx.arg(1),
        ctx.arg::<u64>(4) as i32,
        flags,
        dir::READ,
    );
    0
}

/// An HTTP/2 connection's write, tail-called by `tcp_send_exit` (`FEXIT_SEND_WALK`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "fexit/tcp_sendmsg")]
pub fn tcp_h2_send(ctx: *mut c_void) -> i32 {
    let ctx = FExitContext::new(ctx);
    fexit_h2(
        ctx.arg(0),
        ctx.arg(1),
        ctx.arg::<u64>(3) as i32,
        0,
        dir::WRITE,
    );
    0
}

/// sendfile's bytes on an HTTP/2 connection (before 6.5), tail-called by
/// `tcp_sendpage_exit` (`FEXIT_SENDPAGE_WALK`): passed over, unseen.
#[unsafe(no_mangle)]
#[unsafe(link_section = "fexit/tcp_sendpage")]
pub fn tcp_h2_sendpage(ctx: *mut c_void) -> i32 {
    let ctx = FExitContext::new(ctx);
    fexit_h2(ctx.arg(0), 0, ctx.arg::<u64>(5) as i32, 0, dir::WRITE);
    0
}

/// A subprogram of its own, as `sockets::h2_data` is: walks the `ret` bytes the call moved
/// on `sk`, found in `msg`'s iterator (unseen without a msghdr, sendpage's page, or with
/// MSG_TRUNC in `flags`).
#[inline(never)]
fn fexit_h2(sk: u64, msg: u64, ret: i32, flags: i32, direction: u32) -> u32 {
    if ret <= 0 {
        return 0;
    }
    let (_, tgid, _) = current();
    let buf = if msg == 0 || flags & MSG_TRUNC != 0 {
        Buffer::at(buf_kind::NONE, 0)
    } else {
        moved_span(msg, ret)
    };
    u32::from(walk_h2(sk, tgid, direction == dir::READ, ret as u64, buf))
}

/// Where the `moved` bytes this call copied start, in user memory: a single user buffer
/// (`ITER_UBUF`: the iterator's offset counts from its base, which never moves), or an
/// iovec array (`ITER_IOVEC`: the iterator points at the current segment, so walk back over
/// the segments this call emptied, at most `SEGMENTS_BACK`: hyper writes a response as up to
/// 16 buffers, nginx up to 64); the array is the kernel's copy. Kernel-memory iterators
/// (splice, sendfile since 6.5) have no user bytes.
const SEGMENTS_BACK: u32 = 64;
const MSG_TRUNC: i32 = 0x20;

#[inline(always)]
fn moved_span(msg: u64, moved: i32) -> Buffer {
    const NONE: Buffer = Buffer::at(buf_kind::NONE, 0);
    let iter = msg + MSG_ITER_OFFSET.load() as u64;
    let Ok(kind) = kernel_at::<u8>(iter, ITER_TYPE_OFFSET.load()) else {
        return NONE;
    };
    let Ok(ptr) = kernel_at::<u64>(iter, ITER_PTR_OFFSET.load()) else {
        return NONE;
    };
    let Ok(offset) = kernel_at::<u64>(iter, ITER_OFFSET_OFFSET.load()) else {
        return NONE;
    };
    let moved = moved as u64;
    if kind as u32 == ITER_UBUF.load() {
        // The offset counts everything this iterator moved, this call's bytes last (io_uring
        // reuses an iterator when it retries a partial send).
        return match offset.checked_sub(moved) {
            Some(start) => Buffer::at(buf_kind::PLAIN, ptr + start),
            None => NONE,
        };
    }
    if kind as u32 != ITER_IOVEC.load() {
        return NONE;
    }
    let iovec = |segment: u64, skip: u64| Buffer {
        kind: buf_kind::KERNEL_IOVEC,
        addr: segment,
        skip: skip as u32,
    };
    if offset >= moved {
        // Still in the segment it started in.
        return iovec(ptr, offset - moved);
    }
    let mut left = moved - offset;
    let mut segment = ptr;
    let mut i = 0;
    while i < SEGMENTS_BACK {
        // struct iovec { void *iov_base; size_t iov_len; }, the array in kernel memory.
        segment -= 16;
        let Ok(len) = kernel_at::<u64>(segment, 8) else {
            return NONE;
        };
        if len >= left {
            return iovec(segment, len - left);
        }
        left -= len;
        i += 1;
    }
    NONE
}

/// The first bytes this call moved, for a peek: `moved_span`'s start when its segment holds
/// the whole peek (or all the call moved), so the bytes parsed are this call's, never what
/// lies past the segment.
#[inline(always)]
fn moved_from(msg: u64, moved: i32, flags: i32) -> (u32, u64) {
    const NONE: (u32, u64) = (buf_kind::NONE, 0);
    // MSG_TRUNC returns more than it copied: the iterator did not move that far.
    if flags & MSG_TRUNC != 0 {
        return NONE;
    }
    let span = moved_span(msg, moved);
    if span.kind != buf_kind::KERNEL_IOVEC {
        return (span.kind, span.addr);
    }
    let Ok([base, len]) = kernel_at::<[u64; 2]>(span.addr, 0) else {
        return NONE;
    };
    let start = span.skip as u64;
    let avail = len.saturating_sub(start);
    if avail >= PEEK as u64 || avail >= moved as u64 {
        (buf_kind::PLAIN, base + start)
    } else {
        NONE
    }
}

/// Empty programs on the same functions: the fentry set's cost floor (`--empty-hooks`).
#[fexit(function = "tcp_recvmsg")]
pub fn empty_recv_exit(_ctx: FExitContext) -> i32 {
    0
}

#[fexit(function = "tcp_sendmsg")]
pub fn empty_send_exit(_ctx: FExitContext) -> i32 {
    0
}

#[fexit(function = "unix_stream_recvmsg")]
pub fn empty_unix_recv_exit(_ctx: FExitContext) -> i32 {
    0
}

#[fexit(function = "unix_stream_sendmsg")]
pub fn empty_unix_send_exit(_ctx: FExitContext) -> i32 {
    0
}
