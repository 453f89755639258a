//! What only the kernel sees of a watched listening port (socket-keyed sets), once per
//! connection and never per request:
//! - how long each connection waited for a worker: from the handshake completing
//!   (`inet_sock_set_state` SYN_RECV -> ESTABLISHED, which queues it) to the first read,
//!   write or close by a watched process (where a worker takes it);
//! - the TCP resets on its connections, sent (`tcp:tcp_send_reset`: an abort, a close with
//!   unread data) and received (`tcp:tcp_receive_reset`: a client that aborted);
//! - the packets discarded on the listener after they were added to its drop counter,
//!   which holds a handshake dropped at a full accept queue twice (`skb:kfree_skb` on the
//!   listener, `rx_sk` since 6.11; before 6.11, on the fentry set, `tcp_check_req`
//!   returning no child). SYNs dropped at a full queue have no event (they are consumed,
//!   not freed): the daemon reads the listener's drop counter for the total, and takes
//!   these out.
//!
//! A connection is the port's when its local port and network namespace are a watched
//! listener's, as for the connections themselves: outbound connections never are.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_ktime_get_ns,
    macros::{fexit, raw_tracepoint},
    programs::{FExitContext, RawTracePointContext},
};
use probe_common::{ConnState, ListenKey, PortStats, drop_reason};

use crate::{
    maps::{LISTEN_PORTS, PORT_STATS, per_cpu_entry},
    record::{
        DROP_REASON_LISTEN_OVERFLOW, DROP_REASON_NOT_SPECIFIED, INET_SPORT_OFFSET, SK_STATE_OFFSET,
        kernel_at,
    },
    requests::observe,
    sockets::listen_key,
};

static ZERO: PortStats = PortStats::ZERO;

/// This CPU's counters of the port, created on first use.
#[inline(always)]
fn port_stats(key: &ListenKey) -> Option<&'static mut PortStats> {
    // SAFETY: per-CPU value, only this CPU writes it while the program runs.
    per_cpu_entry(&PORT_STATS, key, &ZERO, drop_reason::LISTEN_MAP_FULL).map(|p| unsafe { &mut *p })
}

/// A queued connection's first touch by a worker: how long it waited since its handshake
/// (`state.start_ns`, set when it was queued; 0 for one adopted from before flyprobe).
#[inline(always)]
pub fn taken(state: &ConnState) {
    if state.start_ns == 0 {
        return;
    }
    let key = ListenKey {
        netns: state.netns,
        port: state.port,
        _pad: 0,
    };
    let Some(stats) = port_stats(&key) else {
        return;
    };
    let waited = unsafe { bpf_ktime_get_ns() }.saturating_sub(state.start_ns);
    observe(&mut stats.waited, waited);
}

/// tcp:tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...): `sk` may be
/// NULL (a reset for a packet no socket owns), a request or a time-wait socket: all begin
/// with `sock_common`, which is all that is read.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn reset_sent(ctx: RawTracePointContext) -> i32 {
    if let Some(stats) = port_of(ctx.arg(0)) {
        stats.resets_sent += 1;
    }
    0
}

/// tcp:tcp_receive_reset(struct sock *sk)
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn reset_received(ctx: RawTracePointContext) -> i32 {
    if let Some(stats) = port_of(ctx.arg(0)) {
        stats.resets_received += 1;
    }
    0
}

/// skb:kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
/// struct sock *rx_sk): a dropped packet, anywhere on the node (never a delivered one).
/// Attached only where the tracepoint has `rx_sk` (Linux >= 6.11). Counted: the packets
/// `tcp_v{4,6}_rcv` discards on a listener (`rx_sk` in LISTEN state) after adding them to its
/// drop counter, whose reasons the daemon sets from BTF: a handshake dropped at a full accept
/// queue (TCP_LISTEN_OVERFLOW from 6.15, NOT_SPECIFIED before) and the other discards of a
/// request socket's packets (NOT_SPECIFIED: a bare ACK under TCP_DEFER_ACCEPT).
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn packet_dropped(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(3);
    let reason = ctx.arg::<u64>(2) as u32;
    if (reason == DROP_REASON_NOT_SPECIFIED.load() || reason == DROP_REASON_LISTEN_OVERFLOW.load())
        && sk != 0
        && kernel_at::<u8>(sk, SK_STATE_OFFSET.load()) == Ok(TCP_LISTEN)
        && let Some(stats) = port_of(sk)
    {
        stats.handshakes_dropped += 1;
    }
    0
}

const TCP_LISTEN: u8 = 10;

/// struct sock *tcp_check_req(struct sock *sk, struct sk_buff *skb, struct request_sock *req,
/// bool fastopen, bool *req_stolen): a segment for listener `sk`'s request socket `req` (the
/// handshake's ACK, or a later one). Before Linux 6.11 (`kfree_skb` has no `rx_sk`), the
/// fentry set counts here the packets `tcp_v{4,6}_rcv` then discards on the listener, adding
/// them to its `sk_drops` (`discard_and_relse`): every NULL return not stolen, from every
/// call but Fast Open's (`tcp_rcv_state_process`, which drops nothing on the listener). A
/// handshake dropped at a full accept queue is one of them, held twice in `sk_drops`
/// (`tcp_listendrop` in `tcp_v{4,6}_syn_recv_sock` first); the others (a bare ACK under
/// TCP_DEFER_ACCEPT, an out-of-window segment) are held there once and are no overflow
/// either. So taking these out of `sk_drops` leaves the listen drops. (The failing function
/// itself cannot be hooked there: it has seven arguments, more than 6.1's trampolines take.)
#[fexit(function = "tcp_check_req")]
pub fn check_req_exit(ctx: FExitContext) -> i32 {
    let child: u64 = ctx.arg(5);
    if child == 0 {
        no_child(ctx.as_ptr());
    }
    0
}

/// A subprogram of its own: the verifier types the returned child as a pointer, and inlined,
/// LLVM folds its test with the others into one OR, which the verifier refuses on a pointer.
#[inline(never)]
fn no_child(ctx: *mut c_void) {
    let ctx = FExitContext::new(ctx);
    let sk: u64 = ctx.arg(0);
    let fastopen = ctx.arg::<u64>(3) as u8;
    // `bool *`: a scalar to the verifier, read as kernel memory (the caller's stack).
    let req_stolen: u64 = ctx.arg(4);
    if fastopen != 0 || kernel_at::<u8>(req_stolen, 0) != Ok(0) {
        return;
    }
    if let Some(stats) = port_of(sk) {
        stats.handshakes_dropped += 1;
    }
}

/// The counters of the watched port `sk` is on.
#[inline(always)]
fn port_of(sk: u64) -> Option<&'static mut PortStats> {
    if sk == 0 {
        return None;
    }
    let mut key = listen_key(sk)?;
    if key.port == 0 {
        // An abort (a close with unread data) unhashes the socket, which zeroes its local
        // port, before the reset goes out; `inet_sock.inet_sport` (big-endian) keeps it.
        // Only full sockets lose it: request and time-wait sockets keep theirs.
        let offset = INET_SPORT_OFFSET.load();
        if offset == 0 {
            return None;
        }
        key.port = u16::from_be(kernel_at::<u16>(sk, offset).ok()?);
    }
    LISTEN_PORTS.get_ptr(key)?;
    port_stats(&key)
}
