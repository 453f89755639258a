//! Process lifecycle. Fork extends the target set in the kernel, so a worker forked by a
//! tracked supervisor is tracked before its first accept. How a process ends is gathered on
//! the way (its exit_group code, the signals sent to it) and reported with its exit, since
//! sched_process_exit itself carries no exit status.

use aya_ebpf::{
    bindings::BPF_ANY,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use probe_common::{ExitInfo, drop_reason, event_kind, exit_flags};

use crate::{
    maps::{
        EVENTS, EXITS, LINEAGE, PENDING_IO, TLS_CALLS, count_drop, is_target, send_event,
        set_target, target_of,
    },
    record::{
        TASK_EXIT_CODE_OFFSET, TASK_PID_OFFSET, TASK_TGID_OFFSET, current, fork_child_pid,
        kernel_at, signal_generated, syscall_arg0,
    },
    sockets::current_exit_code,
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
    track_child(fork_child_pid(ctx)? as u32, parent);
    Ok(())
}

/// A tracked process forked `child`: tracked from now on, its parent noted, and announced
/// to the daemon.
#[inline(always)]
fn track_child(child: u32, parent: u32) {
    // The parent's slot: a child of a process whose libssl has the uprobes maps it too.
    if !set_target(child, target_of(parent)) {
        count_drop(drop_reason::TARGET_MAP_FULL);
        return;
    }
    // An LRU map evicts the oldest entries rather than refuse for room; a failed insert
    // only leaves this child unattributable if its events are lost too.
    let _ = LINEAGE.insert(child, parent, BPF_ANY as u64);
    emit(event_kind::FORK, child, parent, ExitInfo::default());
}

/// sched_process_fork(struct task_struct *parent, struct task_struct *child) as a raw
/// tracepoint (the socket-keyed sets, which have BTF): no perf event to open, which Debian's
/// perf_event_paranoid=3 refuses without CAP_SYS_ADMIN, and the child's task says whether it
/// is a new process or a thread of one. Threads are neither targets nor lifecycle events.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn process_fork_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_process_fork_raw(&ctx);
    0
}

fn try_process_fork_raw(ctx: &RawTracePointContext) -> Result<(), i64> {
    let (_, parent, _) = current();
    if !is_target(parent) {
        return Ok(());
    }
    let child: u64 = ctx.arg(1);
    let pid: i32 = kernel_at(child, TASK_PID_OFFSET.load())?;
    let tgid: i32 = kernel_at(child, TASK_TGID_OFFSET.load())?;
    if pid == tgid {
        track_child(pid as u32, parent);
    }
    Ok(())
}

/// syscalls:sys_enter_exit_group: the status the whole process exits with.
#[tracepoint]
pub fn exit_group_enter(ctx: TracePointContext) -> u32 {
    let _ = try_exit_group_enter(&ctx);
    0
}

fn try_exit_group_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let (_, tgid, _) = current();
    if !is_target(tgid) {
        return Ok(());
    }
    let code = syscall_arg0(ctx)? as u32;
    update_exit(tgid, |info| {
        info.flags |= exit_flags::EXITED;
        info.code = code;
    });
    Ok(())
}

/// signal:signal_generate, in the sender's context (the faulting task's own for SIGSEGV).
#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let _ = try_signal_generate(&ctx);
    0
}

// Signals whose default action cannot end a process: CHLD, CONT, STOP, TSTP, TTIN, TTOU,
// URG, WINCH.
const HARMLESS: [i32; 8] = [17, 18, 19, 20, 21, 22, 23, 28];
// trace_signal_generate results that mean the signal is (or already was) queued.
const DELIVERED: i32 = 0;
const ALREADY_PENDING: i32 = 2;

fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i64> {
    let (sig, target, result) = signal_generated(ctx)?;
    // A fault (SIGSEGV, SIGBUS) or abort() targets the faulting thread, which is current:
    // record it for the whole process.
    let (_, cur_tgid, cur_tid) = current();
    let target = if target as u32 == cur_tid {
        cur_tgid
    } else {
        target as u32
    };
    if (result != DELIVERED && result != ALREADY_PENDING)
        || HARMLESS.contains(&sig)
        || !is_target(target)
    {
        return Ok(());
    }
    update_exit(target, |info| {
        info.flags |= exit_flags::SIGNALED;
        info.signal = sig as u32;
    });
    Ok(())
}

#[inline(always)]
fn update_exit(tgid: u32, f: impl FnOnce(&mut ExitInfo)) {
    if let Some(info) = EXITS.get_ptr_mut(tgid) {
        // SAFETY: the entry is valid for this run; racing writers only overwrite fields.
        f(unsafe { &mut *info });
        return;
    }
    let mut info = ExitInfo::default();
    f(&mut info);
    if EXITS.insert(tgid, info, BPF_ANY as u64).is_err() {
        count_drop(drop_reason::EXIT_MAP_FULL);
    }
}

/// sched:sched_process_exit, once per exiting thread.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    exit_current();
    0
}

/// The same as a raw tracepoint (the socket-keyed sets: no perf event to open).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit_raw(_ctx: RawTracePointContext) -> i32 {
    exit_current();
    0
}

/// The current thread exits: clean up after it, and report its process's end when it is the
/// leader.
#[inline(always)]
fn exit_current() {
    let (id, tgid, tid) = current();
    // The leader often exits before the other threads of a dying process: a thread must be
    // cleaned up even when its process is no longer in the set.
    let thread_tracked = is_target(tid);
    if !thread_tracked && !is_target(tgid) {
        return;
    }
    // The thread's pending-syscall slot, if it did socket I/O, and its OpenSSL slot.
    let _ = PENDING_IO.remove(id);
    let _ = TLS_CALLS.remove(id);
    if !thread_tracked {
        return; // a thread that was there before flyprobe: not in the set
    }
    set_target(tid, 0);
    let exit = EXITS.get_ptr(tid).map(|p| unsafe { *p });
    if exit.is_some() {
        // A signal aimed at a thread leaves an entry under its id: gone with the thread.
        let _ = EXITS.remove(tid);
    }
    if tid == tgid {
        // The socket hook set reads how the process ends from the task itself (no
        // exit_group hook on the syscall path); the syscall set gathered it on the way.
        let exit = match current_exit_code(TASK_EXIT_CODE_OFFSET.load()) {
            Some(code) => exit_info(code),
            None => exit.unwrap_or_default(),
        };
        emit(event_kind::EXIT, tgid, 0, exit);
    } else {
        // A thread the classic fork program took for a process: no lineage to keep.
        let _ = LINEAGE.remove(tid);
    }
}

/// `task_struct.exit_code` as `ExitInfo`: the killing signal in the low 7 bits (0x80 marks
/// a core dump), else the exit status in bits 8..16.
#[inline(always)]
fn exit_info(code: u32) -> ExitInfo {
    let signal = code & 0x7f;
    if signal != 0 {
        ExitInfo {
            flags: exit_flags::SIGNALED,
            code: 0,
            signal,
        }
    } else {
        ExitInfo {
            flags: exit_flags::EXITED,
            code: (code >> 8) & 0xff,
            signal: 0,
        }
    }
}

#[inline(always)]
fn emit(kind: u32, pid: u32, ppid: u32, exit: ExitInfo) {
    send_event(&EVENTS, drop_reason::EVENT_RING_FULL, kind, pid, ppid, exit);
}
