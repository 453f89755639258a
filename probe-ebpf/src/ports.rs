//! What only the kernel sees of a watched listening port (socket-keyed sets), once per
//! connection and never per request:
//! - how long each connection waited for a worker: from the handshake completing
//!   (`inet_sock_set_state` SYN_RECV -> ESTABLISHED, which queues it) to the first read,
//!   write or close by a watched process (where a worker takes it);
//! - the TCP resets on its connections, sent (`tcp:tcp_send_reset`: an abort, a close with
//!   unread data) and received (`tcp:tcp_receive_reset`: a client that aborted);
//! - the handshakes dropped because its accept queue was full (`skb:kfree_skb` on the
//!   listener: `rx_sk` since 6.11, the reason TCP_LISTEN_OVERFLOW since 6.15). SYNs
//!   dropped for the same reason have no event (they are consumed, not freed): the daemon
//!   reads the listener's drop counter for the total.
//!
//! A connection is the port's when its local port and network namespace are a watched
//! listener's, as for the connections themselves: outbound connections never are.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};
use probe_common::{ConnState, ListenKey, PortStats, drop_reason};

use crate::{
    maps::{LISTEN_PORTS, PORT_STATS, per_cpu_entry},
    record::{DROP_REASON_LISTEN_OVERFLOW, INET_SPORT_OFFSET, SK_STATE_OFFSET, kernel_at},
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
/// Attached only where the tracepoint has `rx_sk` (Linux >= 6.11). The reason that marks a
/// handshake dropped on a listener is TCP_LISTEN_OVERFLOW from 6.15; before, such a drop
/// is NOT_SPECIFIED (the daemon sets whichever BTF names), which other drops share: only a
/// listener's count (the packet of a request socket, dropped on its listener).
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn packet_dropped(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(3);
    if ctx.arg::<u64>(2) as u32 == DROP_REASON_LISTEN_OVERFLOW.load()
        && sk != 0
        && kernel_at::<u8>(sk, SK_STATE_OFFSET.load()) == Ok(TCP_LISTEN)
        && let Some(stats) = port_of(sk)
    {
        stats.handshakes_dropped += 1;
    }
    0
}

const TCP_LISTEN: u8 = 10;

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
