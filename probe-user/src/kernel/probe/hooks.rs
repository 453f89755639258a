//! The hook table: which program serves which kernel events, in which hook set, on what
//! condition. One row per program; `Probe::load` attaches the rows of the chosen set.

/// A program and the events it serves. Syscall families share one program each: their
/// records agree on where the first argument and the return value are (checked at attach).
pub(super) struct Hook {
    pub(super) program: &'static str,
    /// The tracefs category (raw tracepoints are attached by event name alone; the category
    /// says where to check that the event exists); "fexit" for fexit programs.
    pub(super) category: &'static str,
    /// Tracepoints, or for an fexit program its kernel function.
    pub(super) tracepoints: &'static [&'static str],
    pub(super) kind: Kind,
    /// The hook sets it belongs to.
    pub(super) sets: &'static [HookSet],
    /// What else of the kernel decides whether it is attached.
    needs: Needs,
}

/// A condition on the kernel, besides the hook set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Needs {
    Nothing,
    /// BTF names `task_struct`'s pid, tgid and exit_code: the raw lifecycle programs.
    TaskBtf,
    /// The kernel has no such BTF: the classic lifecycle programs instead.
    NoTaskBtf,
    /// In place of this program, where the kernel lacked what it reads (attached first).
    InsteadOf(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A classic perf-event tracepoint program.
    Tracepoint,
    /// A raw tracepoint (BPF_PROG_TYPE_RAW_TRACEPOINT: the event's arguments, none of the
    /// perf-event glue).
    Raw,
    /// A raw tracepoint attached only where its format has this field (an argument the
    /// program reads that older kernels do not pass).
    RawWith(&'static str),
    /// An fexit program (a BPF trampoline on a kernel function, found in BTF), attached
    /// where the function has this many parameters: the program reads the return value
    /// from the slot after them. Skipped elsewhere (and where the function does not exist).
    FExit(usize),
}

impl Hook {
    pub(super) const fn new(
        program: &'static str,
        category: &'static str,
        tracepoints: &'static [&'static str],
        kind: Kind,
        sets: &'static [HookSet],
    ) -> Self {
        Self {
            program,
            category,
            tracepoints,
            kind,
            sets,
            needs: Needs::Nothing,
        }
    }

    const fn needs(self, needs: Needs) -> Self {
        Self { needs, ..self }
    }

    /// A row that stands in for another is not needed for the rest: where the kernel
    /// refuses it, it is left out (logged), not the whole set.
    pub(super) fn optional(&self) -> bool {
        matches!(self.needs, Needs::InsteadOf(_))
    }

    /// Whether the row is attached in `set`, given the programs `skipped` so far.
    pub(super) fn wanted(&self, set: HookSet, task_btf: bool, skipped: &[&str]) -> bool {
        self.sets.contains(&set)
            && match self.needs {
                Needs::Nothing => true,
                Needs::TaskBtf => task_btf,
                Needs::NoTaskBtf => !task_btf,
                Needs::InsteadOf(program) => skipped.contains(&program),
            }
    }
}

/// Which programs carry the requests and connections (`--hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSet {
    /// fexit programs on tcp_recvmsg / tcp_sendmsg (BPF trampolines, where the kernel allows
    /// them), with the socket set's connection programs: nothing on the syscall path, and
    /// Linux 6.1 has it.
    Fentry,
    /// Raw tracepoints on the socket layer (Linux >= 6.3): nothing on the syscall path.
    Socket,
    /// syscalls:* tracepoints: every syscall of every task on the node takes the tracing
    /// slow path while they are attached. The fallback for older kernels.
    Syscall,
}

impl HookSet {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Socket => "socket",
            Self::Syscall => "syscall",
        }
    }
}

const ALL: &[HookSet] = &[HookSet::Fentry, HookSet::Socket, HookSet::Syscall];
const BY_SOCKET: &[HookSet] = &[HookSet::Fentry, HookSet::Socket];
const FENTRY: &[HookSet] = &[HookSet::Fentry];
const SOCKET: &[HookSet] = &[HookSet::Socket];
const SYSCALL: &[HookSet] = &[HookSet::Syscall];

use Kind::{FExit, Raw, RawWith, Tracepoint};
use Needs::{InsteadOf, NoTaskBtf, TaskBtf};

pub(super) const CALIBRATION: Hook = Hook::new(
    "calibration",
    "syscalls",
    &["sys_enter_read"],
    Tracepoint,
    ALL,
);

/// Node-wide discovery: attached only for the selectors that need them. The socket-keyed
/// sets announce listen() from `sock_state` instead of this syscall hook.
pub(super) const EXEC_DISCOVER: Hook = Hook::new(
    "exec_discover",
    "sched",
    &["sched_process_exec"],
    Tracepoint,
    ALL,
);
pub(super) const LISTEN_DISCOVER: Hook = Hook::new(
    "listen_discover",
    "syscalls",
    &["sys_exit_listen"],
    Tracepoint,
    SYSCALL,
);

/// The socket events a socket set needs from tracefs.
pub(super) const SOCKET_EVENTS: [&str; 3] = [
    "sock_recv_length",
    "sock_send_length",
    "inet_sock_set_state",
];

/// Empty programs on each socket-keyed set's events, alone: the cost floor (`--empty-hooks`).
#[rustfmt::skip]
pub(super) const FLOOR: &[Hook] = &[
    Hook::new("empty_recv", "sock", &["sock_recv_length"], Raw, SOCKET),
    Hook::new("empty_send", "sock", &["sock_send_length"], Raw, SOCKET),
    Hook::new("empty_recv_exit", "fexit", &["tcp_recvmsg"], FExit(5), FENTRY),
    Hook::new("empty_recv_exit", "fexit", &["tcp_recvmsg"], FExit(4), FENTRY),
    Hook::new("empty_send_exit", "fexit", &["tcp_sendmsg"], FExit(3), FENTRY),
    Hook::new("empty_unix_recv_exit", "fexit", &["unix_stream_recvmsg"], FExit(4), FENTRY),
    Hook::new("empty_unix_send_exit", "fexit", &["unix_stream_sendmsg"], FExit(3), FENTRY),
    Hook::new(
        "empty_state",
        "sock",
        &["inet_sock_set_state"],
        Raw,
        BY_SOCKET,
    ),
];

#[rustfmt::skip]
pub(super) const HOOKS: &[Hook] = &[
    // Lifecycle: raw where BTF names the task's fields (threads are told apart from
    // processes, and untracked; no perf event, which Debian's perf_event_paranoid=3 wants
    // CAP_SYS_ADMIN for), else classic, with the exit status gathered on the way
    Hook::new("process_fork_raw", "sched", &["sched_process_fork"], Raw, ALL).needs(TaskBtf),
    Hook::new("process_exit_raw", "sched", &["sched_process_exit"], Raw, ALL).needs(TaskBtf),
    Hook::new("process_fork", "sched", &["sched_process_fork"], Tracepoint, SYSCALL).needs(NoTaskBtf),
    Hook::new("process_exit", "sched", &["sched_process_exit"], Tracepoint, SYSCALL).needs(NoTaskBtf),
    Hook::new("exit_group_enter", "syscalls", &["sys_enter_exit_group"], Tracepoint, SYSCALL).needs(NoTaskBtf),
    Hook::new("signal_generate", "signal", &["signal_generate"], Tracepoint, SYSCALL).needs(NoTaskBtf),
    // Connections of the socket-keyed sets, and their resets
    Hook::new("sock_state", "sock", &["inet_sock_set_state"], Raw, BY_SOCKET),
    Hook::new("reset_sent", "tcp", &["tcp_send_reset"], Raw, BY_SOCKET),
    Hook::new("reset_received", "tcp", &["tcp_receive_reset"], Raw, BY_SOCKET),
    Hook::new("packet_dropped", "skb", &["kfree_skb"], RawWith("rx_sk"), BY_SOCKET),
    // Before 6.11 (no rx_sk), the fentry set sees the handshakes a listener dropped here
    Hook::new("check_req_exit", "fexit", &["tcp_check_req"], FExit(5), FENTRY).needs(InsteadOf("packet_dropped")),
    // The fentry set's data
    Hook::new("tcp_recv_exit", "fexit", &["tcp_recvmsg"], FExit(5), FENTRY),
    Hook::new("tcp_recv4_exit", "fexit", &["tcp_recvmsg"], FExit(4), FENTRY),
    Hook::new("tcp_send_exit", "fexit", &["tcp_sendmsg"], FExit(3), FENTRY),
    // sendfile before 6.5
    Hook::new("tcp_sendpage_exit", "fexit", &["tcp_sendpage"], FExit(5), FENTRY),
    Hook::new("unix_recv_exit", "fexit", &["unix_stream_recvmsg"], FExit(4), FENTRY),
    Hook::new("unix_send_exit", "fexit", &["unix_stream_sendmsg"], FExit(3), FENTRY),
    // The socket set's data
    Hook::new("sock_recv", "sock", &["sock_recv_length"], Raw, SOCKET),
    Hook::new("sock_send", "sock", &["sock_send_length"], Raw, SOCKET),
    // The syscall set
    Hook::new("accept_enter", "syscalls", &["sys_enter_accept", "sys_enter_accept4"], Tracepoint, SYSCALL),
    Hook::new("accept_exit", "syscalls", &["sys_exit_accept", "sys_exit_accept4"], Tracepoint, SYSCALL),
    Hook::new("close_enter", "syscalls", &["sys_enter_close"], Tracepoint, SYSCALL),
    Hook::new("read_enter", "syscalls", &["sys_enter_read"], Tracepoint, SYSCALL),
    Hook::new("recvfrom_enter", "syscalls", &["sys_enter_recvfrom"], Tracepoint, SYSCALL),
    Hook::new("readv_enter", "syscalls", &["sys_enter_readv"], Tracepoint, SYSCALL),
    Hook::new("recvmsg_enter", "syscalls", &["sys_enter_recvmsg"], Tracepoint, SYSCALL),
    Hook::new("write_enter", "syscalls", &["sys_enter_write", "sys_enter_sendto"], Tracepoint, SYSCALL),
    Hook::new("writev_enter", "syscalls", &["sys_enter_writev"], Tracepoint, SYSCALL),
    Hook::new("sendmsg_enter", "syscalls", &["sys_enter_sendmsg"], Tracepoint, SYSCALL),
    Hook::new("sendfile_enter", "syscalls", &["sys_enter_sendfile64"], Tracepoint, SYSCALL),
    Hook::new(
        "io_exit",
        "syscalls",
        &[
            "sys_exit_read", "sys_exit_readv", "sys_exit_recvfrom", "sys_exit_recvmsg",
            "sys_exit_write", "sys_exit_writev", "sys_exit_sendto", "sys_exit_sendmsg",
            "sys_exit_sendfile64",
        ],
        Tracepoint,
        SYSCALL,
    ),
];

/// The OpenSSL uprobes (`--tls`): (entry program, libssl symbol, required). Each call's
/// return is `ssl_return`'s (a uretprobe); `SSL_free` has none.
pub(super) const OPENSSL_CALLS: [(&str, &str, bool); 6] = [
    ("ssl_read", "SSL_read", true),
    ("ssl_write", "SSL_write", true),
    ("ssl_read_ex", "SSL_read_ex", false),
    ("ssl_write_ex", "SSL_write_ex", false),
    ("ssl_do_handshake", "SSL_do_handshake", false),
    ("ssl_free", "SSL_free", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn row(program: &str) -> &'static Hook {
        HOOKS.iter().find(|h| h.program == program).unwrap()
    }

    #[test]
    fn handshake_drops_come_from_kfree_skb_and_else_from_the_fentry_sets_fexit() {
        let kfree = row("packet_dropped");
        for set in [HookSet::Fentry, HookSet::Socket] {
            assert!(kfree.wanted(set, true, &[]));
        }
        assert!(!kfree.wanted(HookSet::Syscall, true, &[]));
        let fexit = row("check_req_exit");
        assert!(fexit.optional());
        // Only where kfree_skb had no rx_sk, and only on the fentry set.
        assert!(!fexit.wanted(HookSet::Fentry, true, &[]));
        assert!(fexit.wanted(HookSet::Fentry, true, &["packet_dropped"]));
        assert!(!fexit.wanted(HookSet::Socket, true, &["packet_dropped"]));
        assert!(!fexit.wanted(HookSet::Syscall, true, &["packet_dropped"]));
        // Attached after the row they stand in for, which decides.
        let at = |p| HOOKS.iter().position(|h| h.program == p).unwrap();
        assert!(at("packet_dropped") < at("check_req_exit"));
        assert!(!kfree.optional());
    }
}
