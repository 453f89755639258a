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

use aya_ebpf::{macros::fexit, programs::FExitContext};
use probe_common::{buf_kind, dir, http::PEEK};

use crate::{
    record::{
        ITER_IOVEC, ITER_OFFSET_OFFSET, ITER_PTR_OFFSET, ITER_TYPE_OFFSET, ITER_UBUF,
        MSG_ITER_OFFSET, SOCKET_SK_OFFSET, kernel_at,
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
    // MSG_TRUNC returns more than it copied: the iterator did not move that far.
    if flags & MSG_TRUNC != 0 {
        let _ = sock_data::<false>(sk, ret, flags, dir::READ, || (buf_kind::NONE, 0));
        return;
    }
    let _ = sock_data::<false>(sk, ret, flags, dir::READ, || moved_from(msg, ret));
}

/// int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_send_exit(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let msg: u64 = ctx.arg(1);
    let ret = ctx.arg::<u64>(3) as i32;
    let _ = sock_data::<false>(sk, ret, 0, dir::WRITE, || moved_from(msg, ret));
    0
}

/// int unix_stream_recvmsg(struct socket *sock, struct msghdr *msg, size_t size, int flags):
/// unix-domain stream sockets, whose reads do not pass tcp_recvmsg.
#[fexit(function = "unix_stream_recvmsg")]
pub fn unix_recv_exit(ctx: FExitContext) -> i32 {
    let Some(sk) = socket_sk(ctx.arg(0)) else {
        return 0;
    };
    let msg: u64 = ctx.arg(1);
    let flags = ctx.arg::<u64>(3) as i32;
    let ret = ctx.arg::<u64>(4) as i32;
    if flags & MSG_TRUNC != 0 {
        let _ = sock_data::<false>(sk, ret, flags, dir::READ, || (buf_kind::NONE, 0));
        return 0;
    }
    let _ = sock_data::<false>(sk, ret, flags, dir::READ, || moved_from(msg, ret));
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
    let _ = sock_data::<false>(sk, ret, 0, dir::WRITE, || moved_from(msg, ret));
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
/// sendfile before 6.5. The data is a page cache page: nothing to peek at.
#[fexit(function = "tcp_sendpage")]
pub fn tcp_sendpage_exit(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret = ctx.arg::<u64>(5) as i32;
    let _ = sock_data::<false>(sk, ret, 0, dir::WRITE, || (buf_kind::NONE, 0));
    0
}

/// Where the `moved` bytes this call copied start, in user memory: a single user buffer
/// (`ITER_UBUF`: the iterator's offset counts from its base, which never moves), or an
/// iovec array (`ITER_IOVEC`: the iterator points at the current segment, so walk back over
/// the segments this call emptied, at most `SEGMENTS_BACK`: hyper writes a response as up to
/// 16 buffers, nginx up to 64). Kernel-memory iterators (splice, sendfile
/// since 6.5) have no user bytes.
const SEGMENTS_BACK: u32 = 64;
const MSG_TRUNC: i32 = 0x20;

#[inline(always)]
fn moved_from(msg: u64, moved: i32) -> (u32, u64) {
    const NONE: (u32, u64) = (buf_kind::NONE, 0);
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
            Some(start) => (buf_kind::PLAIN, ptr + start),
            None => NONE,
        };
    }
    if kind as u32 != ITER_IOVEC.load() {
        return NONE;
    }
    if offset >= moved {
        // Still in the segment it started in.
        return match kernel_at::<[u64; 2]>(ptr, 0) {
            Ok([base, len]) => peekable(base, len, offset - moved, moved),
            Err(_) => NONE,
        };
    }
    let mut left = moved - offset;
    let mut segment = ptr;
    let mut i = 0;
    while i < SEGMENTS_BACK {
        // struct iovec { void *iov_base; size_t iov_len; }, the array in kernel memory.
        segment -= 16;
        let Ok([base, len]) = kernel_at::<[u64; 2]>(segment, 0) else {
            return NONE;
        };
        if len >= left {
            return peekable(base, len, len - left, moved);
        }
        left -= len;
        i += 1;
    }
    NONE
}

/// Data starting `start` bytes into a segment of `len` at `base`: peeked only when the
/// segment holds the whole peek (or all the call moved), so the bytes parsed are this
/// call's, never what lies past the segment.
#[inline(always)]
fn peekable(base: u64, len: u64, start: u64, moved: u64) -> (u32, u64) {
    let avail = len - start;
    if avail >= PEEK as u64 || avail >= moved {
        (buf_kind::PLAIN, base + start)
    } else {
        (buf_kind::NONE, 0)
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
