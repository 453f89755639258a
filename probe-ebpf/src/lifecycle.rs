//! Process lifecycle. Fork extends the target set in the kernel, so a worker forked by a
//! tracked supervisor is tracked before its first accept; exit removes the id and tells the
//! daemon, which retires the process's counters.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext,
};
use probe_common::{ProcEvent, drop_reason, event_kind};

use crate::{
    maps::{EVENTS, TARGETS, count_drop, is_target},
    record::{current, fork_child_pid},
};

/// sched:sched_process_fork. The current task is the parent.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let _ = try_process_fork(&ctx);
    0
}

fn try_process_fork(ctx: &TracePointContext) -> Result<(), i64> {
    let (_, parent, _) = current();
    if !is_target(parent) {
        return Ok(());
    }
    let child = fork_child_pid(ctx)? as u32;
    if TARGETS.insert(child, 1, BPF_ANY as u64).is_err() {
        count_drop(drop_reason::TARGET_MAP_FULL);
        return Ok(());
    }
    emit(event_kind::FORK, child, parent);
    Ok(())
}

/// sched:sched_process_exit, once per exiting thread.
#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let _ = ctx;
    let (_, tgid, tid) = current();
    if TARGETS.remove(tid).is_ok() && tid == tgid {
        emit(event_kind::EXIT, tgid, 0);
    }
    0
}

#[inline(always)]
fn emit(kind: u32, pid: u32, ppid: u32) {
    let event = ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        pid,
        ppid,
        _reserved: 0,
    };
    if EVENTS.output::<ProcEvent>(&event, 0).is_err() {
        count_drop(drop_reason::EVENT_RING_FULL);
    }
}
