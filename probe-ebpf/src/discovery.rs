//! Node-wide discovery: tell the daemon when an untracked process exec's or starts listening,
//! so a selector (--comm, --cgroup, --port, --all-listeners) can pick it up at once instead of
//! rescanning /proc. Attached only when such a selector is given; both events are rare.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use probe_common::{ExitInfo, drop_reason, event_kind};

use crate::{
    maps::{DISCOVERIES, is_target, send_event},
    record::{current, syscall_ret},
};

/// sched:sched_process_exec: the current task has a new program.
#[tracepoint]
pub fn exec_discover(ctx: TracePointContext) -> u32 {
    let _ = ctx;
    announce();
    0
}

/// syscalls:sys_exit_listen.
#[tracepoint]
pub fn listen_discover(ctx: TracePointContext) -> u32 {
    if syscall_ret(&ctx).is_ok_and(|ret| ret == 0) {
        announce();
    }
    0
}

#[inline(always)]
pub fn announce() {
    let (_, tgid, _) = current();
    if !is_target(tgid) {
        // Its own ring: a storm of execs fills this one, never the lifecycle ring.
        let full = drop_reason::DISCOVERY_RING_FULL;
        send_event(
            &DISCOVERIES,
            full,
            event_kind::DISCOVER,
            tgid,
            0,
            ExitInfo::default(),
        );
    }
}
