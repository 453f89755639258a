//! Reading tracepoint records. Offsets come from the tracefs format files: the daemon reads
//! them at load time and writes them into these globals, so a kernel that lays a record out
//! differently (sched_process_fork changed in 6.x) still reads the right field. The symbol
//! names are the ones in `probe_common::names`.

use aya_ebpf::{Global, helpers::bpf_get_current_pid_tgid, programs::TracePointContext};

#[unsafe(no_mangle)]
static SYSCALL_ARG0_OFFSET: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static SYSCALL_ARG1_OFFSET: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static SYSCALL_RET_OFFSET: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(44);
#[unsafe(no_mangle)]
static ACCESS_LOG_ENABLED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_SIG_OFFSET: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static SIGNAL_PID_OFFSET: Global<u32> = Global::new(36);
#[unsafe(no_mangle)]
static SIGNAL_RESULT_OFFSET: Global<u32> = Global::new(44);

/// Syscall arguments are `unsigned long`; the return value is `long`.
#[inline(always)]
pub fn syscall_arg0(ctx: &TracePointContext) -> Result<u64, i64> {
    read(ctx, SYSCALL_ARG0_OFFSET.load())
}

#[inline(always)]
pub fn syscall_arg1(ctx: &TracePointContext) -> Result<u64, i64> {
    read(ctx, SYSCALL_ARG1_OFFSET.load())
}

#[inline(always)]
pub fn syscall_ret(ctx: &TracePointContext) -> Result<i64, i64> {
    read(ctx, SYSCALL_RET_OFFSET.load())
}

#[inline(always)]
pub fn fork_child_pid(ctx: &TracePointContext) -> Result<i32, i64> {
    read(ctx, FORK_CHILD_PID_OFFSET.load())
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad offset yields an error.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(i64::from)
}

#[inline(always)]
pub fn access_log_enabled() -> bool {
    ACCESS_LOG_ENABLED.load() != 0
}

/// signal:signal_generate: (signal, target pid, result).
#[inline(always)]
pub fn signal_generated(ctx: &TracePointContext) -> Result<(i32, i32, i32), i64> {
    Ok((
        read(ctx, SIGNAL_SIG_OFFSET.load())?,
        read(ctx, SIGNAL_PID_OFFSET.load())?,
        read(ctx, SIGNAL_RESULT_OFFSET.load())?,
    ))
}

/// The calling thread: (full pid_tgid, tgid, tid).
#[inline(always)]
pub fn current() -> (u64, u32, u32) {
    let id = bpf_get_current_pid_tgid();
    (id, (id >> 32) as u32, id as u32)
}
