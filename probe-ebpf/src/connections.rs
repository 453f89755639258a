//! Connection lifetime: `accept`/`accept4` return starts one (the accepting process is the
//! current task there, unlike in `sock:inet_sock_set_state`, which may run in softirq), and
//! `close` of its fd ends it. Process exit is handled by the daemon, which retires the
//! process's counters and entries.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_task, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use probe_common::{
    ConnKey, ConnState, ProcStats, conn_flags, drop_reason, fd_key,
    http::{METHOD_OTHER, PROTO_H2, has_requests},
    phase,
};

use crate::{
    io::{abort_streams, take_stream},
    maps::{CONNS, H2_CONNS, PENDING_ACCEPT, count_drop, is_target, stats_mut},
    record::{
        FDT_FD_OFFSET, FILE_PRIVATE_DATA_OFFSET, FILES_FDT_OFFSET, SK_FAMILY_OFFSET,
        SOCKET_SK_OFFSET, TASK_FILES_OFFSET, current, kernel_at, syscall_arg0, syscall_arg1,
        syscall_ret,
    },
    requests::{log_access, record_aborted},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EEXIST: i64 = 17;

/// sys_enter_accept / sys_enter_accept4: remember where the peer address will be written.
#[tracepoint]
pub fn accept_enter(ctx: TracePointContext) -> u32 {
    let _ = try_accept_enter(&ctx);
    0
}

fn try_accept_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let (id, tgid, _) = current();
    if !is_target(tgid) {
        return Ok(());
    }
    let sockaddr = syscall_arg1(ctx)?;
    if PENDING_ACCEPT.insert(id, sockaddr, BPF_ANY as u64).is_err() {
        count_drop(drop_reason::PENDING_MAP_FULL);
    }
    Ok(())
}

/// sys_exit_accept / sys_exit_accept4: a new TCP connection owned by this process.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx);
    0
}

fn try_accept_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (id, tgid, _) = current();
    if !is_target(tgid) {
        return Ok(());
    }
    // No entry: the accept began before the programs were attached (a worker blocked in
    // accept() when flyprobe started); the connection is still this process's.
    let sockaddr = match PENDING_ACCEPT.get_ptr(id).map(|p| unsafe { *p }) {
        Some(sockaddr) => {
            let _ = PENDING_ACCEPT.remove(id);
            sockaddr
        }
        None => 0,
    };
    let fd = syscall_ret(ctx)?;
    if fd < 0 {
        return Ok(());
    }
    // accept only returns stream sockets: TCP or unix-domain ones, told apart by the
    // family: the socket's own, through the fd table where BTF gave the offsets, else the
    // peer address's (many servers pass no address buffer: then it is TCP).
    let family = match fd_family(fd as u32) {
        Some(family) => Some(family),
        None if sockaddr != 0 => unsafe { bpf_probe_read_user(sockaddr as *const u16) }.ok(),
        None => None,
    };
    let flags = match family {
        Some(AF_UNIX) => conn_flags::UNIX,
        Some(AF_INET | AF_INET6) | None => 0,
        Some(_) => return Ok(()),
    };
    let Some(stats) = stats_mut(tgid) else {
        return Ok(());
    };
    let key = fd_key(tgid, fd as u32);
    let fresh = ConnState {
        owner: tgid,
        flags,
        ..ConnState::default()
    };
    match CONNS.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(err) if i64::from(err) == -EEXIST => {
            // The fd was reused without a close we saw (dup2, close_range): end the old one.
            if let Some(old) = CONNS.get_ptr(key).map(|p| unsafe { *p }) {
                end_connection(key, tgid, stats, &old);
            }
            let _ = CONNS.insert(key, fresh, BPF_ANY as u64);
        }
        Err(_) => {
            count_drop(drop_reason::CONNECTION_MAP_FULL);
            return Ok(());
        }
    }
    stats.accepted += 1;
    Ok(())
}

/// The address family of the socket open as `fd` in the current process: task -> files ->
/// fdt -> fd[fd] -> file.private_data (the `struct socket`) -> sk. None without the offsets.
#[inline(always)]
fn fd_family(fd: u32) -> Option<u16> {
    let files_offset = TASK_FILES_OFFSET.load();
    if files_offset == 0 || fd >= 1 << 20 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kernel_at(task, files_offset).ok()?;
    let fdt: u64 = kernel_at(files, FILES_FDT_OFFSET.load()).ok()?;
    let table: u64 = kernel_at(fdt, FDT_FD_OFFSET.load()).ok()?;
    let file: u64 = kernel_at(table, fd * 8).ok()?;
    let socket: u64 = kernel_at(file, FILE_PRIVATE_DATA_OFFSET.load()).ok()?;
    let sk: u64 = kernel_at(socket, SOCKET_SK_OFFSET.load()).ok()?;
    kernel_at(sk, SK_FAMILY_OFFSET.load()).ok()
}

/// sys_enter_close: the fd is released whatever close returns (except EBADF, where it was
/// not open, and then it is not in the map either).
#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let _ = try_close_enter(&ctx);
    0
}

fn try_close_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let (_, tgid, _) = current();
    if !is_target(tgid) {
        return Ok(());
    }
    let fd = syscall_arg0(ctx)?;
    let key = fd_key(tgid, fd as u32);
    // One lookup decides for every process: only tracked connections are in the map.
    let Some(state) = CONNS.get_ptr(key).map(|p| unsafe { *p }) else {
        return Ok(());
    };
    // Two threads closing the same fd at once: only the one that removes it counts.
    if CONNS.remove(key).is_err() {
        return Ok(());
    }
    if let Some(stats) = stats_mut(tgid) {
        end_connection(key, tgid, stats, &state);
    }
    Ok(())
}

/// The connection `key` is gone: a request still waiting for its response is aborted, a
/// finished turn gets its access-log record. Shared by every hook set.
#[inline(always)]
pub fn end_connection(key: ConnKey, tgid: u32, stats: &mut ProcStats, state: &ConnState) {
    stats.closed += 1;
    if state.protocol == PROTO_H2 {
        end_streams(key, tgid, stats, state);
        return;
    }
    if !has_requests(state.protocol) {
        return;
    }
    if state.phase == phase::REQUEST {
        stats.aborted += 1;
        record_aborted(tgid, state);
        log_access(tgid, state);
    } else if state.phase == phase::RESPONSE {
        log_access(tgid, state);
    }
}

/// Streams an HTTP/2 connection left open when it ended are aborted. The newest ones are
/// looked up (their methods, and their `STREAMS` entries go with the connection); any
/// older ones count with method `OTHER`, and their entries age out of the LRU map.
#[inline(always)]
fn end_streams(key: ConnKey, tgid: u32, stats: &mut ProcStats, state: &ConnState) {
    // SAFETY: read at once, under RCU.
    let Some(streams) = H2_CONNS.get_ptr(key).map(|p| unsafe { (*p).streams }) else {
        return;
    };
    let _ = H2_CONNS.remove(key);
    let mut open = streams.open();
    let mut stream = streams.last_stream;
    let mut i = 0;
    while i < 8 && open > 0 && stream > 0 {
        if let Some(s) = take_stream(key, stream) {
            open -= 1;
            abort_streams(tgid, state.flags, s.method, 1, stats);
        }
        stream = stream.saturating_sub(2);
        i += 1;
    }
    if open > 0 {
        abort_streams(tgid, state.flags, METHOD_OTHER, open as u64, stats);
    }
}
