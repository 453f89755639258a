//! Reading tracepoint records. Syscall records are a stable ABI (`__syscall_nr`, then the
//! arguments, 8 bytes each, from offset 16; `ret` at 16), so the hot path reads them with
//! plain loads at constant offsets; the daemon checks every attached syscall's format file
//! against these offsets before it attaches. Other records are not stable (sched_process_fork
//! changed in 6.x): their offsets come from the format files through load-time globals,
//! named as in `probe_common::names`.

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    programs::TracePointContext,
};
use probe_common::syscall_layout;

#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(44);
#[unsafe(no_mangle)]
static ACCESS_LOG_ENABLED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TLS_ENABLED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_SIG_OFFSET: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static SIGNAL_PID_OFFSET: Global<u32> = Global::new(36);
#[unsafe(no_mangle)]
static SIGNAL_RESULT_OFFSET: Global<u32> = Global::new(44);

// Kernel struct field offsets (socket hook set), from the kernel's BTF at load time. Rust
// emits no CO-RE relocations, so the daemon reads them and fills these in.
#[unsafe(no_mangle)]
pub static SK_FAMILY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SK_STATE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SK_NUM_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SK_NET_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static NET_INUM_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SK_PROTOCOL_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static INET_SPORT_OFFSET: Global<u32> = Global::new(0);
/// Never a real reason until the daemon sets it.
#[unsafe(no_mangle)]
pub static DROP_REASON_LISTEN_OVERFLOW: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
pub static DROP_REASON_NOT_SPECIFIED: Global<u32> = Global::new(u32::MAX);
/// 0: exit reasons come from exit_group and signal_generate (syscall hook set).
#[unsafe(no_mangle)]
pub static TASK_EXIT_CODE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static TASK_PID_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.flags` (0: unknown, nothing is taken for an exiting task).
#[unsafe(no_mangle)]
pub static TASK_FLAGS_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static TASK_TGID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static REGS_ARG1_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static PEEK_REGS: Global<u32> = Global::new(0);

// The fentry set's iterator reads: `msghdr.msg_iter`, `iov_iter.{iter_type, iov_offset}`, the
// union holding `ubuf` and the iovec pointer, and the `enum iter_type` values (they changed
// order in 6.x), all from BTF.
#[unsafe(no_mangle)]
pub static MSG_ITER_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static ITER_TYPE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static ITER_OFFSET_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static ITER_PTR_OFFSET: Global<u32> = Global::new(0);
/// Never a real `iter_type` until the daemon sets it.
#[unsafe(no_mangle)]
pub static ITER_UBUF: Global<u32> = Global::new(255);
#[unsafe(no_mangle)]
pub static ITER_IOVEC: Global<u32> = Global::new(255);
// Unix-domain sockets (socket-keyed sets), from BTF; UNIX_ADDR_OFFSET 0: not counted.
#[unsafe(no_mangle)]
pub static SK_TYPE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SK_SOCKET_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static UNIX_ADDR_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SOCKET_INO_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static SOCKET_SK_OFFSET: Global<u32> = Global::new(0);
// The syscall set's way from an fd to its socket's family, from BTF; 0: not read.
#[unsafe(no_mangle)]
pub static TASK_FILES_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static FILES_FDT_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static FDT_FD_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static FILE_PRIVATE_DATA_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static ANNOUNCE_LISTEN: Global<u32> = Global::new(0);

/// Syscall arguments are `unsigned long`; the return value is `long`.
#[inline(always)]
pub fn syscall_arg0(ctx: &TracePointContext) -> Result<u64, i64> {
    Ok(load(ctx, syscall_layout::ARG0))
}

#[inline(always)]
pub fn syscall_arg1(ctx: &TracePointContext) -> Result<u64, i64> {
    Ok(load(ctx, syscall_layout::ARG1))
}

/// Argument `n` of a syscall record.
#[inline(always)]
pub fn syscall_arg(ctx: &TracePointContext, n: usize) -> u64 {
    load(ctx, syscall_layout::arg(n))
}

#[inline(always)]
pub fn syscall_ret(ctx: &TracePointContext) -> Result<i64, i64> {
    Ok(load::<i64>(ctx, syscall_layout::RET))
}

/// A direct context load: the verifier checks the constant offset against the record size.
#[inline(always)]
fn load<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: offset is a constant inside every syscall record (checked at attach).
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<T>() }
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

/// A kernel value at `base + offset` (an address from a tracepoint argument or the task).
#[inline(always)]
pub fn kernel_at<T>(base: u64, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one yields an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(i64::from)
}

#[inline(always)]
pub fn access_log_enabled() -> bool {
    ACCESS_LOG_ENABLED.load() != 0
}

/// `--tls`: a load-time constant, so without it the TLS branches are dead code.
#[inline(always)]
pub fn tls_enabled() -> bool {
    TLS_ENABLED.load() != 0
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
