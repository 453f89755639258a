//! TLS through OpenSSL: uprobes on libssl's `SSL_read`, `SSL_read_ex`, `SSL_write` and
//! `SSL_write_ex` (attached by the daemon to each libssl its watched processes map) see a
//! call's plaintext at its return, and the request/response turn (or the HTTP/2 walk) runs on
//! it as it would on a plain connection's bytes.
//!
//! The plaintext is tied to its connection by the thread: a TLS connection's socket events
//! note the connection in the thread's `TLS_CALLS` slot. A call that reads or writes its
//! socket (a socket BIO: nginx, gunicorn) names it during the call; one that does not (a
//! memory BIO: asyncio's SSL, so uvicorn and hypercorn; or bytes OpenSSL had buffered) takes
//! the connection its `SSL *` was last seen on, else the one its thread last read. From the
//! first plaintext on, the connection's socket events count bytes only (`io::transfer`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    ConnKey, SslKey, TlsCall, buf_kind, conn_flags, dir, drop_reason, http::PROTO_UNKNOWN, phase,
};

use crate::{
    io::{turn_data, walk_h2},
    maps::{CONNS, SSL_CONNS, TLS_CALLS, TLS_H2_WALK, count_drop, is_target, stats_mut},
    record::current,
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

/// void SSL_free(SSL *ssl): its connection is forgotten (the address may name another).
#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let (_, tgid, _) = current();
    if is_target(tgid)
        && let Some(ssl) = ctx.arg::<u64>(0)
    {
        let _ = SSL_CONNS.remove(&SslKey { ssl, tgid, _pad: 0 });
    }
    0
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32, ex: bool) {
    let (id, tgid, _) = current();
    // Untracked processes leave after one array load.
    if !is_target(tgid) {
        return;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    let len_ptr = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    if let Some(call) = TLS_CALLS.get_ptr_mut(&id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        let call = unsafe { &mut *call };
        call.ssl = ssl;
        call.buf = buf;
        call.len_ptr = len_ptr;
        call.conn = 0;
        call.dir = direction;
    } else {
        let call = TlsCall {
            ssl,
            buf,
            len_ptr,
            dir: direction,
            ..TlsCall::default()
        };
        if TLS_CALLS.insert(&id, &call, BPF_ANY as u64).is_err() {
            count_drop(drop_reason::PENDING_MAP_FULL);
        }
    }
}

/// A socket event of TLS connection `conn` on this thread: the connection of the OpenSSL
/// call in progress, if any, and the thread's last.
#[inline(always)]
pub fn seen(conn: ConnKey) {
    let id = bpf_get_current_pid_tgid();
    if let Some(call) = TLS_CALLS.get_ptr_mut(&id) {
        // SAFETY: this thread's own slot; only this thread writes it.
        let call = unsafe { &mut *call };
        call.last = conn;
        if call.dir != dir::NONE && call.conn == 0 {
            call.conn = conn;
        }
    } else {
        let call = TlsCall {
            last: conn,
            dir: dir::NONE,
            ..TlsCall::default()
        };
        if TLS_CALLS.insert(&id, &call, BPF_ANY as u64).is_err() {
            count_drop(drop_reason::PENDING_MAP_FULL);
        }
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
    let call = TLS_CALLS.get_ptr_mut(&id)?;
    // SAFETY: this thread's own slot; only this thread writes it.
    let call = unsafe { &mut *call };
    let direction = call.dir;
    if direction == dir::NONE {
        return None;
    }
    call.dir = dir::NONE;
    let ret: i32 = ctx.ret();
    let bytes = if call.len_ptr != 0 {
        // The _ex functions return 1 and store the count.
        if ret != 1 {
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
    // SAFETY: read at once.
    let known = unsafe { SSL_CONNS.get(&key) }.copied();
    let conn = if call.conn != 0 {
        call.conn
    } else if let Some(conn) = known {
        conn
    } else {
        call.last
    };
    if conn == 0 {
        count_drop(drop_reason::TLS_UNTIED);
        return None;
    }
    if known != Some(conn) {
        let _ = SSL_CONNS.insert(&key, &conn, BPF_ANY as u64);
    }
    let state = CONNS.get_ptr_mut(&conn)?;
    // SAFETY: valid for this run (RCU); a connection is driven by one thread at a time.
    let state = unsafe { &mut *state };
    if state.owner != tgid {
        return None;
    }
    if state.flags & conn_flags::TLS == 0 {
        // Its turns are the plaintext's from here on: the handshake's exchange ends.
        state.flags |= conn_flags::TLS;
        state.protocol = PROTO_UNKNOWN;
        state.phase = phase::IDLE;
    }
    let stats = stats_mut(tgid)?;
    let buf = call.buf;
    if !turn_data::<true>(conn, tgid, state, stats, direction, bytes, || {
        (buf_kind::PLAIN, buf)
    }) {
        return None;
    }
    call.conn = conn;
    call.bytes = bytes;
    Some(direction)
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
    let Some(call) = TLS_CALLS.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: this thread's slot; three fields, not a copy on the walk's stack.
    let (conn, bytes, buf) = unsafe { ((*call).conn, (*call).bytes, (*call).buf) };
    u32::from(walk_h2(conn, tgid, read, bytes, (buf_kind::PLAIN, buf)))
}
