//! Unix-domain stream connections in the socket-keyed sets (gunicorn `--bind unix:…` behind
//! nginx, uvicorn `--uds`). The data events are the same as TCP's; what differs:
//! - which side is served: the socket a server accepted shares its listener's bound address
//!   (`unix_sock.addr`, one reference each), so a connected stream socket whose address is
//!   held at least twice is the passive side. A client's socket has no address (or, bound
//!   or autobound, one it holds alone); a socketpair has none.
//! - its end: no tracepoint sees a unix socket close. A freed `struct sock` is soon reused
//!   for the next connection, so each event checks that the socket is still the one the
//!   entry was made for (its inode number), and the daemon runs `unix_sweep` on each unix
//!   entry of `CONNS` as it walks the map every second, to end those whose socket is gone.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::raw_tracepoint, programs::RawTracePointContext};
use probe_common::{ConnKey, ConnState, conn_flags, drop_reason};

use crate::{
    connections::end_connection,
    maps::{CONNS, count_drop, is_target, stats_mut},
    record::{
        SK_SOCKET_OFFSET, SK_STATE_OFFSET, SK_TYPE_OFFSET, SOCKET_INO_OFFSET, UNIX_ADDR_OFFSET,
        kernel_at,
    },
};

const SOCK_STREAM: u16 = 1;
const TCP_ESTABLISHED: u8 = 1;

/// The inode number of the `struct socket` that `sk` belongs to, 0 once it is orphaned
/// (closed by its last holder).
#[inline(always)]
fn socket_ino(sk: u64) -> u64 {
    let Ok(socket) = kernel_at::<u64>(sk, SK_SOCKET_OFFSET.load()) else {
        return 0;
    };
    if socket == 0 {
        return 0;
    }
    kernel_at::<u64>(socket, SOCKET_INO_OFFSET.load()).unwrap_or(0)
}

/// A fresh entry for `sk` if it is the served side of a unix stream connection.
#[inline(always)]
pub fn adopt(sk: u64) -> Option<*mut ConnState> {
    let addr_offset = UNIX_ADDR_OFFSET.load();
    if addr_offset == 0 {
        return None;
    }
    let ty: u16 = kernel_at(sk, SK_TYPE_OFFSET.load()).ok()?;
    let state: u8 = kernel_at(sk, SK_STATE_OFFSET.load()).ok()?;
    if ty != SOCK_STREAM || state != TCP_ESTABLISHED {
        return None;
    }
    // struct unix_address { refcount_t refcnt; ... }: the listener's reference and ours.
    let addr: u64 = kernel_at(sk, addr_offset).ok()?;
    if addr == 0 || kernel_at::<u32>(addr, 0).ok()? < 2 {
        return None;
    }
    let ino = socket_ino(sk);
    if ino == 0 {
        return None;
    }
    let fresh = ConnState {
        flags: conn_flags::QUEUED | conn_flags::UNIX,
        ino,
        ..ConnState::default()
    };
    // Two threads touching it first at once: one entry, taken once (by `take`'s owner check).
    // No close event to forget a drop by: a full map counts each touch it refuses.
    if CONNS.insert(sk, fresh, BPF_NOEXIST as u64).is_err() && CONNS.get_ptr(sk).is_none() {
        count_drop(drop_reason::CONNECTION_MAP_FULL);
        return None;
    }
    CONNS.get_ptr_mut(sk)
}

/// Whether the unix connection in `state` has ended: its socket was closed (and `sk` may
/// already be a new socket's). An ended one is counted and removed.
#[inline(always)]
pub fn ended(sk: ConnKey, state: &ConnState) -> bool {
    if socket_ino(sk) == state.ino {
        return false;
    }
    let state = *state;
    // The sweep and an event on a reused socket at once: the entry may already be the new
    // connection's (then it is not this one to end), and only the one that removes it counts.
    // SAFETY: read at once, under RCU.
    if CONNS
        .get_ptr(sk)
        .is_some_and(|now| unsafe { (*now).ino } != state.ino)
    {
        return true;
    }
    if CONNS.remove(sk).is_ok()
        && is_target(state.owner)
        && let Some(stats) = stats_mut(state.owner)
    {
        end_connection(sk, state.owner, stats, &state);
    }
    true
}

/// Run by the daemon (BPF_PROG_TEST_RUN, never attached) with a unix connection's socket
/// as its argument: ends the connection if its socket is gone. Returns 1 when it ended.
#[raw_tracepoint(tracepoint = "unix_sweep")]
pub fn unix_sweep(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(state) = CONNS.get_ptr(sk) else {
        return 0;
    };
    // SAFETY: valid for this run (RCU); copied before it is removed.
    let state = unsafe { *state };
    // An exited owner's connections are the daemon's to retire with the rest of it (the
    // request they were reading counted as aborted).
    if state.flags & conn_flags::UNIX == 0 || (state.owner != 0 && !is_target(state.owner)) {
        return 0;
    }
    i32::from(ended(sk, &state))
}
