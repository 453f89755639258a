//! TLS through OpenSSL: uprobes on libssl's `SSL_read`, `SSL_read_ex`, `SSL_write` and
//! `SSL_write_ex` (attached by the daemon to each libssl its watched processes map) see a
//! call's plaintext at its return, and the request/response turn (or the HTTP/2 walk) runs on
//! it as it would on a plain connection's bytes.
//!
//! The plaintext is tied to its connection by the thread: a TLS connection's socket events
//! note the connection in the thread's `TLS_CALLS` slot. A call that reads or writes its
//! socket (a socket BIO: nginx, gunicorn) names it during the call; one that does not (a
//! memory BIO: asyncio's SSL, so uvicorn and hypercorn; or bytes OpenSSL had buffered) takes
//! the connection its `SSL *` was tied to at its handshake (`SSL_do_handshake`: the socket
//! the call touched, else the handshaking connection the thread read just before), else,
//! for a read, the oldest connection its thread read that no call was tied to yet (a memory
//! BIO is fed from a socket read before), once. A socket that is not a
//! served connection (the server's own outbound TLS) is `FOREIGN` there: plaintext on it
//! counts nothing. From the first plaintext on, the connection's socket events count bytes
//! only (`io::transfer`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    ConnKey, FOREIGN, SslKey, TlsCall, buf_kind, conn_flags, dir, drop_reason,
    h2::Buffer,
    http::{PROTO_TLS, PROTO_UNKNOWN, has_requests},
    phase, target,
};

use crate::{
    io::{turn_data, walk_h2},
    maps::{
        CONNS, SSL_CONNS, TLS_CALLS, TLS_H2_WALK, TLS_WALKS, count_drop, is_target, set_target,
        stats_mut, target_of,
    },
    record::current,
    requests::record_aborted,
};

/// int SSL_read(SSL *ssl, void *buf, int num)
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, dir::READ, false);
    0
}

/// int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, dir::READ, true);
    0
}

/// int SSL_write(SSL *ssl, const void *buf, int num)
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, dir::WRITE, false);
    0
}

/// int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, dir::WRITE, true);
    0
}

/// int SSL_do_handshake(SSL *s): ties the `SSL *` to its connection before any plaintext
/// (`handshake`), which the first reads of parallel connections on a memory BIO need.
#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, dir::HANDSHAKE, false);
    0
}

/// void SSL_free(SSL *ssl): its connection is forgotten (the address may name another).
#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let (_, tgid, _) = current();
    if is_target(tgid)
        && let Some(ssl) = ctx.arg::<u64>(0)
    {
        let _ = SSL_CONNS.remove(SslKey { ssl, tgid, _pad: 0 });
    }
    0
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32, ex: bool) {
    let (id, tgid, _) = current();
    // Untracked processes leave after one array load.
    let slot = target_of(tgid);
    if slot == 0 {
        return;
    }
    // Its libssl has the uprobes: its TLS handshakes are no exchanges from now on (the
    // daemon marks the processes it finds mapping the library; this one was not yet).
    if slot == target::TRACKED {
        set_target(tgid, target::OPENSSL);
    }
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return;
    };
    let buf = if direction == dir::HANDSHAKE {
        0
    } else {
        ctx.arg::<u64>(1).unwrap_or(0)
    };
    let len_ptr = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    if let Some(call) = TLS_CALLS.get_ptr_mut(id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        let call = unsafe { &mut *call };
        call.ssl = ssl;
        call.buf = buf;
        call.len_ptr = len_ptr;
        call.conn = 0;
        call.dir = direction;
        call.ex = u32::from(ex);
    } else {
        let call = TlsCall {
            ssl,
            buf,
            len_ptr,
            dir: direction,
            ex: u32::from(ex),
            ..TlsCall::default()
        };
        if TLS_CALLS.insert(id, call, BPF_ANY as u64).is_err() {
            count_drop(drop_reason::PENDING_MAP_FULL);
        }
    }
}

/// A socket event of TLS connection `conn` on this thread: the connection of the OpenSSL
/// call in progress, if any, and when `read` (a read of a connection no call was tied to
/// yet) the thread's last.
#[inline(always)]
pub fn seen(conn: ConnKey, read: bool) {
    let id = bpf_get_current_pid_tgid();
    if let Some(call) = TLS_CALLS.get_ptr_mut(id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        let call = unsafe { &mut *call };
        if read {
            call.queue_untied(conn);
            call.last = conn;
        }
        if call.dir != dir::NONE && call.conn == 0 {
            call.conn = conn;
        }
    } else if read {
        // No call in progress (it would have made the slot): only the untied read to note.
        let mut call = TlsCall {
            dir: dir::NONE,
            last: conn,
            ..TlsCall::default()
        };
        call.queue_untied(conn);
        if TLS_CALLS.insert(id, call, BPF_ANY as u64).is_err() {
            count_drop(drop_reason::PENDING_MAP_FULL);
        }
    }
}

/// A socket event on this thread of a socket that is not a served connection: the OpenSSL
/// call in progress, if any, is on it (`FOREIGN`). A thread without a slot has no call.
#[inline(always)]
pub fn foreign() {
    let id = bpf_get_current_pid_tgid();
    if let Some(call) = TLS_CALLS.get_ptr_mut(id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        let call = unsafe { &mut *call };
        if call.dir != dir::NONE && call.conn == 0 {
            call.conn = FOREIGN;
        }
        // A handshake fed from this socket (the server's own outbound TLS on a memory BIO)
        // is not the last served connection's.
        call.last = FOREIGN;
    }
}

/// The return of each of the four calls.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    if let Some(direction) = plaintext(&ctx) {
        // SAFETY: a uprobe program tail-calling one of its own type with its context.
        // Without one there (the daemon did not load it), nothing is walked.
        unsafe { TLS_H2_WALK.tail_call(&ctx, direction) };
    }
    0
}

/// The call's plaintext moves its connection's turn. `Some(direction)` when the connection
/// is HTTP/2, whose frames the caller has walked: the call's slot holds the connection and
/// the byte count for it.
#[inline(always)]
fn plaintext(ctx: &RetProbeContext) -> Option<u32> {
    let (id, tgid, _) = current();
    if !is_target(tgid) {
        return None;
    }
    let call = TLS_CALLS.get_ptr_mut(id)?;
    // SAFETY: this thread's own slot; only this thread writes it.
    let call = unsafe { &mut *call };
    let direction = call.dir;
    if direction == dir::NONE {
        return None;
    }
    call.dir = dir::NONE;
    if direction == dir::HANDSHAKE {
        handshake(call, tgid);
        return None;
    }
    let ret: i32 = ctx.ret();
    let bytes = if call.ex != 0 {
        // The _ex functions return 1 and store the count.
        if ret != 1 || call.len_ptr == 0 {
            return None;
        }
        unsafe { bpf_probe_read_user(call.len_ptr as *const u64) }.ok()?
    } else if ret > 0 {
        ret as u64
    } else {
        return None;
    };
    if bytes == 0 {
        return None;
    }
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    // SAFETY: read at once. Not an `Option<u64>`: the payload a `None` leaves undefined may
    // be spilled, which the verifier refuses (0 is no connection).
    let known: ConnKey = match unsafe { SSL_CONNS.get(key) } {
        Some(conn) => *conn,
        None => 0,
    };
    let conn = if call.conn != 0 {
        call.conn
    } else if known != 0 {
        known
    } else if direction == dir::READ {
        // The oldest connection read and not tied yet, still served here and untied.
        call.take_untied(|c| {
            CONNS
                .get_ptr(c)
                // SAFETY: read at once, under RCU.
                .is_some_and(|s| unsafe { (*s).owner == tgid && (*s).flags & conn_flags::TLS == 0 })
        })
    } else {
        // A write on an `SSL *` never seen (a memory BIO's first, before the thread read
        // its connection: an HTTP/2 server's SETTINGS): which connection is not known, and
        // no turn starts with a write.
        return None;
    };
    if conn == FOREIGN {
        if known != FOREIGN {
            let _ = SSL_CONNS.insert(key, FOREIGN, BPF_ANY as u64);
        }
        return None;
    }
    let stats = stats_mut(tgid)?;
    // A served TLS connection of this process, or the plaintext is not placed (a stale
    // guess must not turn a plain connection into a TLS one).
    let state = match CONNS.get_ptr_mut(conn) {
        // SAFETY: valid for this run (RCU); a connection is driven by one thread at a time.
        Some(state) if conn != 0 => unsafe { &mut *state },
        _ => {
            count_drop(drop_reason::TLS_UNTIED);
            return None;
        }
    };
    if state.owner != tgid || (state.protocol != PROTO_TLS && state.flags & conn_flags::TLS == 0) {
        count_drop(drop_reason::TLS_UNTIED);
        return None;
    }
    if known != conn {
        let _ = SSL_CONNS.insert(key, conn, BPF_ANY as u64);
    }
    if state.flags & conn_flags::TLS == 0 {
        // Its turns are the plaintext's from here on: the handshake's exchange ends, and a
        // request whose bytes were not seen (counted as one) ends unanswered.
        if state.phase == phase::REQUEST && has_requests(state.protocol) {
            stats.aborted += 1;
            record_aborted(tgid, state);
        }
        state.flags |= conn_flags::TLS;
        state.protocol = PROTO_UNKNOWN;
        state.phase = phase::IDLE;
    }
    let buf = call.buf;
    let buffer = || (buf_kind::PLAIN, buf);
    let walks = TLS_WALKS.get(0).is_some_and(|w| *w != 0);
    if !walks {
        turn_data(conn, tgid, state, stats, direction, bytes, || false, buffer);
        return None;
    }
    if !turn_data(conn, tgid, state, stats, direction, bytes, || true, buffer) {
        return None;
    }
    call.conn = conn;
    call.bytes = bytes;
    Some(direction)
}

/// The return of `SSL_do_handshake`: its `SSL *` is on the connection whose socket it read
/// or wrote (a socket BIO: nginx, gunicorn), else on the TLS connection in its handshake
/// that the thread read last (a memory BIO: asyncio's and uvloop's TLS feed the BIO from
/// the socket's read and call `SSL_do_handshake` at once). Each call of a handshake ties it
/// again: a connection's first read is not yet known as TLS, the last one is. Parallel
/// connections then need no guess at their first `SSL_read`: uvloop reads other sockets
/// between a connection's handshake and its first request, in any order.
#[inline(always)]
fn handshake(call: &mut TlsCall, tgid: u32) {
    // Never `FOREIGN` here: other I/O in or before the call (a log write, a DNS lookup in a
    // callback, a keylog file) would hide the served connection and drop its plaintext. An
    // `SSL *` left untied is placed at its first read, as before handshakes were seen.
    let conn = if call.conn != 0 && call.conn != FOREIGN {
        call.conn
    } else {
        call.last
    };
    if conn == 0 || conn == FOREIGN {
        return;
    }
    // A connection of this process in its handshake (no plaintext yet), or no tie.
    // SAFETY: read at once, under RCU.
    let handshaking = CONNS.get_ptr(conn).is_some_and(|s| unsafe {
        (*s).owner == tgid && (*s).protocol == PROTO_TLS && (*s).flags & conn_flags::TLS == 0
    });
    if handshaking {
        let key = SslKey {
            ssl: call.ssl,
            tgid,
            _pad: 0,
        };
        let _ = SSL_CONNS.insert(key, conn, BPF_ANY as u64);
        // Tied: no other `SSL *`'s first read may take it from the queue.
        call.remove_untied(conn);
    }
}

// The walks are written out rather than with `#[uprobe]`, as `sockets::h2_recv` is: the
// shim would drop the result, leaving the compiler free to return a stack pointer.

/// An HTTP/2 connection's plaintext read, tail-called by `ssl_return`
/// (`TLS_H2_WALK[dir::READ]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe/ssl_h2_recv")]
pub fn ssl_h2_recv(_ctx: *mut c_void) -> u32 {
    ssl_h2(true)
}

/// An HTTP/2 connection's plaintext write (`TLS_H2_WALK[dir::WRITE]`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe/ssl_h2_send")]
pub fn ssl_h2_send(_ctx: *mut c_void) -> u32 {
    ssl_h2(false)
}

#[inline(never)]
fn ssl_h2(read: bool) -> u32 {
    let (id, tgid, _) = current();
    let Some(call) = TLS_CALLS.get_ptr(id) else {
        return 0;
    };
    // SAFETY: this thread's slot; three fields, not a copy on the walk's stack.
    let (conn, bytes, buf) = unsafe { ((*call).conn, (*call).bytes, (*call).buf) };
    u32::from(walk_h2(
        conn,
        tgid,
        read,
        bytes,
        Buffer::at(buf_kind::PLAIN, buf),
    ))
}
