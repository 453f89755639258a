//! Request accounting shared by the I/O and close paths: peeking at the first bytes of a
//! turn (the only payload ever read), recording completed and aborted requests, and the
//! optional access-log record.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
};
use probe_common::{
    ACCESS_WAKE_BYTES, AccessRecord, ConnState, DURATION_BOUNDS_NS, ReqKey, ReqStats, buf_kind,
    drop_reason,
    http::{Head, PEEK, PROTO_H2, STATUS_ABORTED, label_of, status_class},
    transport,
};

use crate::{
    maps::{ACCESS, REQS, count_drop, per_cpu_entry},
    record::access_log_enabled,
};

/// The first bytes of a syscall's data (at most `ret`, and at most the first iovec) in the
/// buffer `buf` shaped as `kind` says, or `None` when there is no user buffer or it cannot
/// be read.
#[inline(always)]
pub fn peek(kind: u32, buf: u64, ret: i64) -> Option<(Head, usize)> {
    let (ptr, cap) = match kind {
        buf_kind::PLAIN => (buf, u64::MAX),
        // struct iovec { void *iov_base; size_t iov_len; }
        buf_kind::IOVEC => first_iovec(buf)?,
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        buf_kind::MSGHDR | buf_kind::MMSGHDR => {
            let iov: u64 = unsafe { bpf_probe_read_user((buf + 16) as *const u64) }.ok()?;
            first_iovec(iov)?
        }
        _ => return None,
    };
    let head: Head = unsafe { bpf_probe_read_user(ptr as *const Head) }.ok()?;
    let mut len = PEEK as u64;
    if (ret as u64) < len {
        len = ret as u64;
    }
    if cap < len {
        len = cap;
    }
    Some((head, len as usize))
}

#[inline(always)]
fn first_iovec(iov: u64) -> Option<(u64, u64)> {
    let [base, len]: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
    Some((base, len))
}

#[inline(always)]
fn labels(tgid: u32, state: &ConnState, status: u8) -> ReqKey {
    ReqKey {
        tgid,
        method: state.method,
        status,
        protocol: label_of(state.protocol, state.flags),
        transport: transport::of(state.flags),
    }
}

/// The labels of an HTTP/2 stream of a connection with `flags`.
#[inline(always)]
pub fn stream_labels(tgid: u32, flags: u8, method: u8, status: u8) -> ReqKey {
    ReqKey {
        tgid,
        method,
        status,
        protocol: PROTO_H2,
        transport: transport::of(flags),
    }
}

/// An HTTP/2 stream answered after `duration_ns`.
#[inline(always)]
pub fn record_stream(key: &ReqKey, duration_ns: u64) {
    if let Some(stats) = req_stats(key) {
        observe(stats, duration_ns);
    }
}

static ZERO: ReqStats = ReqStats::ZERO;

#[inline(always)]
fn req_stats(key: &ReqKey) -> Option<&'static mut ReqStats> {
    // SAFETY: per-CPU value, only this CPU writes it while the program runs.
    per_cpu_entry(&REQS, key, &ZERO, drop_reason::REQUEST_MAP_FULL).map(|p| unsafe { &mut *p })
}

/// A request whose response started after `state.duration_ns`.
#[inline(always)]
pub fn record_completed(tgid: u32, state: &ConnState) {
    let key = labels(tgid, state, status_class(state.status));
    let Some(stats) = req_stats(&key) else {
        return;
    };
    observe(stats, state.duration_ns);
}

/// One timed observation of `d` ns in a histogram of `DURATION_BOUNDS_NS`.
#[inline(always)]
pub fn observe(stats: &mut ReqStats, d: u64) {
    stats.count += 1;
    stats.timed += 1;
    stats.duration_sum_ns += d;
    let mut i = 0;
    while i < DURATION_BOUNDS_NS.len() {
        if d <= DURATION_BOUNDS_NS[i] {
            stats.buckets[i] += 1;
            break;
        }
        i += 1;
    }
}

/// A request that ended with its connection, before any response.
#[inline(always)]
pub fn record_aborted(tgid: u32, state: &ConnState) {
    record_aborted_n(&labels(tgid, state, STATUS_ABORTED), 1);
}

/// `n` requests labelled `key` (its status is set here) that ended with their connection,
/// unanswered.
#[inline(always)]
pub fn record_aborted_n(key: &ReqKey, n: u64) {
    let key = ReqKey {
        status: STATUS_ABORTED,
        ..*key
    };
    if let Some(stats) = req_stats(&key) {
        stats.count += n;
    }
}

/// A read/write turn on a connection that has no requests (TLS, not HTTP): counted by
/// protocol when it starts, never timed.
#[inline(always)]
pub fn record_exchange(tgid: u32, state: &ConnState) {
    if let Some(stats) = req_stats(&labels(tgid, state, 0)) {
        stats.count += 1;
    }
}

/// The access-log record of a finished turn, when the log is on.
#[inline(always)]
pub fn log_access(tgid: u32, state: &ConnState) {
    if !access_log_enabled() {
        return;
    }
    log(AccessRecord {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        duration_ns: state.duration_ns,
        rx: state.rx,
        tx: state.tx,
        tgid,
        status: state.status,
        method: state.method,
        protocol: label_of(state.protocol, state.flags),
    });
}

/// The access-log record of an answered HTTP/2 stream (its bytes are not told apart from
/// the other streams': 0), when the log is on.
#[inline(always)]
pub fn log_stream(tgid: u32, method: u8, status: u16, duration_ns: u64) {
    if !access_log_enabled() {
        return;
    }
    log(AccessRecord {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        duration_ns,
        rx: 0,
        tx: 0,
        tgid,
        status,
        method,
        protocol: PROTO_H2,
    });
}

#[inline(always)]
fn log(record: AccessRecord) {
    let wake = if ACCESS.query(BPF_RB_AVAIL_DATA as u64) >= ACCESS_WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if ACCESS.output::<AccessRecord>(&record, wake as u64).is_err() {
        count_drop(drop_reason::ACCESS_RING_FULL);
    }
}
