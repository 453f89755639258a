//! Loads the embedded kernel object, fills in record offsets and map sizes, and attaches every
//! program to its tracepoints. Dropping `Probe` detaches them all.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, MapData, MapError, ProgramArray, RingBuf},
    programs::{
        FExit as FExitProgram, ProgramError, ProgramFd, RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use probe_common::{dir, names, syscall_layout};
use thiserror::Error;

use crate::{
    kernel::btf::{Btf, BtfError},
    kernel::maps::{KernelMaps, TakeError, UnixSweep, take},
    kernel::tracefs::{Format, TracefsError},
};

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flyprobe"));

/// A program and the events it serves. Syscall families share one program each: their
/// records agree on where the first argument and the return value are (checked at attach).
struct Hook {
    program: &'static str,
    /// The tracefs category (raw tracepoints are attached by event name alone; the category
    /// says where to check that the event exists); "fexit" for fexit programs.
    category: &'static str,
    /// Tracepoints, or for an fexit program its kernel function.
    tracepoints: &'static [&'static str],
    kind: Kind,
    /// The hook sets it belongs to.
    sets: &'static [HookSet],
    /// What else of the kernel decides whether it is attached.
    needs: Needs,
}

/// A condition on the kernel, besides the hook set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    /// BTF names `task_struct`'s pid, tgid and exit_code: the raw lifecycle programs.
    TaskBtf,
    /// The kernel has no such BTF: the classic lifecycle programs instead.
    NoTaskBtf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
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
    const fn new(
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

    fn wanted(&self, set: HookSet, task_btf: bool) -> bool {
        self.sets.contains(&set)
            && match self.needs {
                Needs::Nothing => true,
                Needs::TaskBtf => task_btf,
                Needs::NoTaskBtf => !task_btf,
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
use Needs::{NoTaskBtf, TaskBtf};

const CALIBRATION: Hook = Hook::new(
    "calibration",
    "syscalls",
    &["sys_enter_read"],
    Tracepoint,
    ALL,
);

/// Node-wide discovery: attached only for the selectors that need them. The socket-keyed
/// sets announce listen() from `sock_state` instead of this syscall hook.
const EXEC_DISCOVER: Hook = Hook::new(
    "exec_discover",
    "sched",
    &["sched_process_exec"],
    Tracepoint,
    ALL,
);
const LISTEN_DISCOVER: Hook = Hook::new(
    "listen_discover",
    "syscalls",
    &["sys_exit_listen"],
    Tracepoint,
    SYSCALL,
);

/// The socket events a socket set needs from tracefs.
const SOCKET_EVENTS: [&str; 3] = [
    "sock_recv_length",
    "sock_send_length",
    "inet_sock_set_state",
];

/// Empty programs on each socket-keyed set's events, alone: the cost floor (`--empty-hooks`).
#[rustfmt::skip]
const FLOOR: &[Hook] = &[
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
const HOOKS: &[Hook] = &[
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
const OPENSSL_CALLS: [(&str, &str, bool); 6] = [
    ("ssl_read", "SSL_read", true),
    ("ssl_write", "SSL_write", true),
    ("ssl_read_ex", "SSL_read_ex", false),
    ("ssl_write_ex", "SSL_write_ex", false),
    ("ssl_do_handshake", "SSL_do_handshake", false),
    ("ssl_free", "SSL_free", false),
];

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "tracepoint {category}:{name} keeps `{field}` at offset {found}, where the shared \
         program expects {expected}"
    )]
    LayoutMismatch {
        category: String,
        name: String,
        field: String,
        found: u32,
        expected: u32,
    },
    #[error("loading the eBPF object into the kernel")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no program `{name}`")]
    MissingProgram { name: &'static str },
    #[error("loading program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {category}:{tracepoint}")]
    Attach {
        program: &'static str,
        category: &'static str,
        tracepoint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(transparent)]
    TakeMap(#[from] TakeError),
    #[error("the kernel's BTF has no function {function}: the fentry hooks need it")]
    NoFunction { function: &'static str },
    #[error("{function}({params}) is not what the fentry hooks read")]
    Signature {
        function: &'static str,
        params: String,
    },
    #[error("opening map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

pub struct Limits {
    pub max_connections: u32,
    pub max_processes: u32,
    pub max_request_series: u32,
    /// `--tls`: the OpenSSL maps get their room (one entry each without it).
    pub tls: bool,
}

impl Limits {
    /// (`TLS_CALLS`, `SSL_CONNS`) entries.
    pub fn tls_entries(&self) -> (u32, u32) {
        if self.tls {
            (probe_common::PENDING_ENTRIES, probe_common::MAX_SSL_CONNS)
        } else {
            (1, 1)
        }
    }
}

pub struct Options {
    pub limits: Limits,
    pub hooks: HookSet,
    /// Attach only empty programs on the socket set's events (the benchmark's floor).
    pub empty_hooks: bool,
    /// The syscall set's lifecycle as on a kernel without task_struct BTF (tests).
    pub classic_lifecycle: bool,
    /// Extra tracepoints that must exist, as `category:name`.
    pub required: Vec<String>,
    /// Attach the empty `calibration` program too (benchmarks only).
    pub calibration: bool,
    /// Build access-log records in the kernel (otherwise that code path is skipped).
    pub access_log: bool,
    /// Announce exec of untracked processes (for --comm, --cgroup).
    pub exec_events: bool,
    /// Announce listen() of untracked processes (for --port, --all-listeners).
    pub listen_events: bool,
    /// Maps to pin, reusing what is pinned there already: (map name, path).
    pub pins: Vec<(&'static str, std::path::PathBuf)>,
    /// Load the OpenSSL uprobes (`--tls`); the daemon attaches them per library.
    pub tls: bool,
}

/// Offsets of kernel struct fields the socket-keyed sets read, from the kernel's BTF.
#[derive(Clone, Copy, Debug)]
pub struct SocketOffsets {
    sk_family: u32,
    sk_state: u32,
    sk_num: u32,
    sk_net: u32,
    net_inum: u32,
    sk_protocol: u32,
    inet_sport: u32,
    /// SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (u32::MAX where BTF lacks it).
    listen_overflow: u32,
    task: TaskOffsets,
    /// `pt_regs.si`, followed by `di` and `orig_ax` (the syscall number).
    regs_arg1: u32,
    /// Unix-domain sockets; all 0 where BTF lacks `unix_sock` (af_unix built as a module).
    unix: UnixOffsets,
    /// The syscall's buffer is found through the saved user registers (the socket set on
    /// x86_64).
    peek_regs: bool,
    /// The fentry set's iterator reads.
    iter: Option<IterOffsets>,
}

/// What the raw lifecycle programs read of a task, from BTF.
#[derive(Clone, Copy, Debug)]
struct TaskOffsets {
    exit_code: u32,
    pid: u32,
    tgid: u32,
    flags: u32,
}

impl TaskOffsets {
    fn read(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |path: &str| btf.offset_of("task_struct", &[path]);
        Ok(Self {
            exit_code: field("exit_code")?,
            pid: field("pid")?,
            tgid: field("tgid")?,
            flags: field("flags")?,
        })
    }

    /// The offsets where the kernel has BTF for them, else `None` (the syscall set then
    /// attaches the classic lifecycle programs), and which it is, logged.
    fn probe() -> Option<Self> {
        match Btf::from_sys_fs()
            .map_err(ProbeError::from)
            .and_then(|btf| Self::read(&btf))
        {
            Ok(offsets) => Some(offsets),
            Err(err) => {
                log::info!(
                    "lifecycle: classic sched tracepoints ({err}): every thread a watched \
                     process starts is announced to the daemon, which discards it"
                );
                None
            }
        }
    }
}

/// What the socket-keyed sets read of unix-domain sockets.
#[derive(Clone, Copy, Debug, Default)]
struct UnixOffsets {
    sk_type: u32,
    sk_socket: u32,
    addr: u32,
    /// `socket_alloc.vfs_inode` + `inode.i_ino`: a `struct socket`'s inode number.
    socket_ino: u32,
    socket_sk: u32,
}

impl UnixOffsets {
    fn read(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        Ok(Self {
            sk_type: field("sock", &["sk_type"])?,
            sk_socket: field("sock", &["sk_socket"])?,
            addr: field("unix_sock", &["addr"])?,
            socket_ino: field("socket_alloc", &["vfs_inode"])? + field("inode", &["i_ino"])?,
            socket_sk: field("socket", &["sk"])?,
        })
    }
}

/// The syscall set's way from an accepted fd to its socket's family (TCP or unix), from BTF.
#[derive(Clone, Copy, Debug, Default)]
struct FdOffsets {
    task_files: u32,
    files_fdt: u32,
    fdt_fd: u32,
    file_private_data: u32,
    socket_sk: u32,
    sk_family: u32,
}

impl FdOffsets {
    /// The offsets, or zeros (and a warning) where the kernel has no BTF for them.
    fn probe() -> Self {
        let read = || -> Result<Self, ProbeError> {
            let btf = Btf::from_sys_fs()?;
            let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
            Ok(Self {
                task_files: field("task_struct", &["files"])?,
                files_fdt: field("files_struct", &["fdt"])?,
                fdt_fd: field("fdtable", &["fd"])?,
                file_private_data: field("file", &["private_data"])?,
                socket_sk: field("socket", &["sk"])?,
                sk_family: field("sock_common", &["skc_family"])?,
            })
        };
        read().unwrap_or_else(|err| {
            log::warn!(
                "unix-domain connections accepted without a peer address are counted as tcp: {err}"
            );
            Self::default()
        })
    }
}

/// Where the fentry set finds the data of a `tcp_recvmsg` / `tcp_sendmsg` call.
#[derive(Clone, Copy, Debug)]
struct IterOffsets {
    msg_iter: u32,
    iter_type: u32,
    iov_offset: u32,
    /// The union of `ubuf` and the iovec pointer (`iov` before 6.4, `__iov` since).
    iter_ptr: u32,
    ubuf: u32,
    iovec: u32,
}

impl SocketOffsets {
    /// What the socket set needs, or why this kernel cannot have it: the socket tracepoints
    /// (Linux >= 6.3) and the BTF to read sockets with.
    pub fn probe(tracefs: &Path) -> Result<Self, ProbeError> {
        for event in SOCKET_EVENTS {
            Format::read(tracefs, "sock", event)?;
        }
        let btf = Btf::from_sys_fs()?;
        let mut offsets = Self::fields(&btf)?;
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        // The programs read `si` and `orig_ax` 16 bytes after it: peek only where `si`,
        // `di` and `orig_ax` are adjacent, as the x86_64 ABI lays them out.
        if cfg!(target_arch = "x86_64") {
            let (si, orig_ax) = (field("pt_regs", &["si"])?, field("pt_regs", &["orig_ax"])?);
            let adjacent = field("pt_regs", &["di"])? == si + 8 && orig_ax == si + 16;
            if !adjacent {
                log::warn!(
                    "pt_regs keeps si at {si} and orig_ax at {orig_ax}: method and status \
                     labels are off"
                );
            }
            offsets.regs_arg1 = si;
            offsets.peek_regs = adjacent;
        }
        Ok(offsets)
    }

    /// What the fentry set needs: `inet_sock_set_state`, the BTF of the functions its fexit
    /// programs read (with the parameters where they expect them) and of the iterator.
    /// Whether the kernel lets trampolines attach is only known by trying.
    pub fn probe_fentry(tracefs: &Path) -> Result<Self, ProbeError> {
        Format::read(tracefs, "sock", "inet_sock_set_state")?;
        let btf = Btf::from_sys_fs()?;
        let signature = |function: &'static str, want: &[&str]| match btf.function_params(function)
        {
            Some(params) if params.len() >= want.len() && params[..want.len()] == *want => Ok(()),
            Some(params) => Err(ProbeError::Signature {
                function,
                params: params.join(", "),
            }),
            None => Err(ProbeError::NoFunction { function }),
        };
        // tcp_recvmsg lost its trailing addr_len in 6.16: flags stays fourth, and one of
        // the two programs reads the return value after the 4 or 5 parameters.
        signature("tcp_recvmsg", &["sk", "msg", "len", "flags"])?;
        // Each function's return value is read after its parameters: one of the programs
        // on it must match their number here.
        for (function, counts) in [("tcp_recvmsg", &[4, 5][..]), ("tcp_sendmsg", &[3])] {
            let params = btf.function_params(function).map_or(0, |p| p.len());
            if !counts.contains(&params) {
                return Err(ProbeError::Signature {
                    function,
                    params: format!("{params} parameters"),
                });
            }
        }
        signature("tcp_sendmsg", &["sk", "msg", "size"])?;
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        let iter_ptr = field("iov_iter", &["ubuf"])?;
        let iov = field("iov_iter", &["__iov"]).or_else(|_| field("iov_iter", &["iov"]))?;
        if iov != iter_ptr {
            return Err(ProbeError::Signature {
                function: "iov_iter",
                params: format!("ubuf at {iter_ptr}, iovec pointer at {iov}"),
            });
        }
        let kind = |value: &str| -> Result<u32, ProbeError> {
            Ok(btf.enum_value("iter_type", value)? as u32)
        };
        let mut offsets = Self::fields(&btf)?;
        offsets.iter = Some(IterOffsets {
            msg_iter: field("msghdr", &["msg_iter"])?,
            iter_type: field("iov_iter", &["iter_type"])?,
            iov_offset: field("iov_iter", &["iov_offset"])?,
            iter_ptr,
            ubuf: kind("ITER_UBUF")?,
            iovec: kind("ITER_IOVEC")?,
        });
        Ok(offsets)
    }

    /// The socket and task fields both sets read.
    fn fields(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        Ok(Self {
            sk_family: field("sock_common", &["skc_family"])?,
            sk_state: field("sock_common", &["skc_state"])?,
            sk_num: field("sock_common", &["skc_num"])?,
            sk_net: field("sock_common", &["skc_net", "net"])?,
            net_inum: field("net", &["ns", "inum"])?,
            sk_protocol: field("sock", &["sk_protocol"])?,
            inet_sport: field("inet_sock", &["inet_sport"])?,
            listen_overflow: btf
                .enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
                .map_or(u32::MAX, |v| v as u32),
            task: TaskOffsets::read(btf)?,
            regs_arg1: 0,
            unix: UnixOffsets::read(btf).unwrap_or_else(|err| {
                log::warn!("unix-domain connections are not counted: {err}");
                UnixOffsets::default()
            }),
            peek_regs: false,
            iter: None,
        })
    }
}

/// Offsets in tracepoint records, from tracefs.
struct Offsets {
    fork_child_pid: u32,
    signal_sig: u32,
    signal_pid: u32,
    signal_result: u32,
}

impl Offsets {
    fn read(tracefs: &Path) -> Result<Self, ProbeError> {
        let fork = Format::read(tracefs, "sched", "sched_process_fork")?;
        let signal = Format::read(tracefs, "signal", "signal_generate")?;
        Ok(Self {
            fork_child_pid: fork.offset("child_pid")?,
            signal_sig: signal.offset("sig")?,
            signal_pid: signal.offset("pid")?,
            signal_result: signal.offset("result")?,
        })
    }

    /// The kernel programs read syscall records at the fixed offsets of `syscall_layout` (a
    /// stable ABI): check that this syscall keeps its arguments (or ret) there.
    fn check(tracefs: &Path, category: &str, name: &str) -> Result<(), ProbeError> {
        if category != "syscalls" {
            return Ok(());
        }
        let format = Format::read(tracefs, category, name)?;
        let checks: Vec<(String, u32, usize)> = if name.starts_with("sys_exit_") {
            vec![(
                "ret".to_string(),
                format.offset("ret")?,
                syscall_layout::RET,
            )]
        } else {
            let args = format.args();
            // The first is the descriptor every program reads.
            args.first().ok_or_else(|| TracefsError::MissingField {
                category: category.into(),
                name: name.into(),
                field: "fd".into(),
            })?;
            // Every argument: the recv family's programs read their flags too.
            args.iter()
                .enumerate()
                .map(|(n, (field, offset))| (field.to_string(), *offset, syscall_layout::arg(n)))
                .collect()
        };
        for (field, found, expected) in checks {
            if found as usize != expected {
                return Err(ProbeError::LayoutMismatch {
                    category: category.into(),
                    name: name.into(),
                    field,
                    found,
                    expected: expected as u32,
                });
            }
        }
        Ok(())
    }
}

/// The kernel's ring buffers: lifecycle events, discovery announcements, access-log records.
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub discoveries: RingBuf<MapData>,
    pub access: RingBuf<MapData>,
}

pub struct Probe {
    // Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
    pub links: usize,
    programs: usize,
    pub hooks: HookSet,
    /// The kernel's BTF as aya reads it, for fexit programs, and as flyprobe reads it, for
    /// their functions' parameters (each read once, when first needed).
    btf: Option<aya::Btf>,
    kernel_btf: Option<Btf>,
    /// Programs not attached because this kernel lacks what they read.
    pub skipped: Vec<&'static str>,
    /// BTF names SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (Linux >= 6.15).
    pub listen_overflow_reason: bool,
    /// The data path's HTTP/2 frame walks' arrays, tail-called from here (held: the kernel
    /// empties a program array when its last descriptor closes).
    h2_walk: Vec<ProgramArray<MapData>>,
    /// The OpenSSL plaintext's HTTP/2 walks (`--tls`), held likewise.
    tls_h2_walk: Option<ProgramArray<MapData>>,
}

impl Probe {
    pub fn load(tracefs: &Path, options: &Options) -> Result<Self, ProbeError> {
        let limits = &options.limits;
        let access_log = u32::from(options.access_log);
        for tp in &options.required {
            let (category, name) = tp.split_once(':').unwrap_or(("", tp));
            Format::read(tracefs, category, name)?;
        }
        let offsets = Offsets::read(tracefs)?;
        let targets = pid_slots();
        let socket = match options.hooks {
            HookSet::Fentry => Some(SocketOffsets::probe_fentry(tracefs)?),
            HookSet::Socket => Some(SocketOffsets::probe(tracefs)?),
            HookSet::Syscall => None,
        };
        let task = match &socket {
            Some(o) => Some(o.task),
            None if options.classic_lifecycle => {
                log::info!("lifecycle: classic sched tracepoints (--classic-lifecycle)");
                None
            }
            None => TaskOffsets::probe(),
        };
        let mut loader = EbpfLoader::new();
        if let Some(t) = &task {
            loader
                .override_global(names::TASK_EXIT_CODE_OFFSET, &t.exit_code, true)
                .override_global(names::TASK_PID_OFFSET, &t.pid, true)
                .override_global(names::TASK_TGID_OFFSET, &t.tgid, true)
                .override_global(names::TASK_FLAGS_OFFSET, &t.flags, true);
            log::info!(
                "lifecycle: raw sched_process_fork/exit (task_struct from BTF: threads are not \
                 tracked or announced)"
            );
        }
        for (name, path) in &options.pins {
            loader.map_pin_path(name, path.as_path());
        }
        let announce_listen = u32::from(options.listen_events);
        let peek = u32::from(socket.is_some_and(|o| o.peek_regs));
        if let Some(o) = &socket {
            loader
                .override_global(names::SK_FAMILY_OFFSET, &o.sk_family, true)
                .override_global(names::SK_STATE_OFFSET, &o.sk_state, true)
                .override_global(names::SK_NUM_OFFSET, &o.sk_num, true)
                .override_global(names::SK_NET_OFFSET, &o.sk_net, true)
                .override_global(names::NET_INUM_OFFSET, &o.net_inum, true)
                .override_global(names::SK_PROTOCOL_OFFSET, &o.sk_protocol, true)
                .override_global(names::INET_SPORT_OFFSET, &o.inet_sport, true)
                .override_global(names::DROP_REASON_LISTEN_OVERFLOW, &o.listen_overflow, true)
                .override_global(names::REGS_ARG1_OFFSET, &o.regs_arg1, true)
                .override_global(names::PEEK_REGS, &peek, true)
                .override_global(names::SK_TYPE_OFFSET, &o.unix.sk_type, true)
                .override_global(names::SK_SOCKET_OFFSET, &o.unix.sk_socket, true)
                .override_global(names::UNIX_ADDR_OFFSET, &o.unix.addr, true)
                .override_global(names::SOCKET_INO_OFFSET, &o.unix.socket_ino, true)
                .override_global(names::SOCKET_SK_OFFSET, &o.unix.socket_sk, true)
                .override_global(names::ANNOUNCE_LISTEN, &announce_listen, true);
            if let Some(i) = &o.iter {
                loader
                    .override_global(names::MSG_ITER_OFFSET, &i.msg_iter, true)
                    .override_global(names::ITER_TYPE_OFFSET, &i.iter_type, true)
                    .override_global(names::ITER_OFFSET_OFFSET, &i.iov_offset, true)
                    .override_global(names::ITER_PTR_OFFSET, &i.iter_ptr, true)
                    .override_global(names::ITER_UBUF, &i.ubuf, true)
                    .override_global(names::ITER_IOVEC, &i.iovec, true);
            }
        }
        let fd_offsets = match options.hooks {
            HookSet::Syscall => Some(FdOffsets::probe()),
            _ => None,
        };
        if let Some(f) = &fd_offsets {
            loader
                .override_global(names::TASK_FILES_OFFSET, &f.task_files, true)
                .override_global(names::FILES_FDT_OFFSET, &f.files_fdt, true)
                .override_global(names::FDT_FD_OFFSET, &f.fdt_fd, true)
                .override_global(names::FILE_PRIVATE_DATA_OFFSET, &f.file_private_data, true)
                .override_global(names::SOCKET_SK_OFFSET, &f.socket_sk, true)
                .override_global(names::SK_FAMILY_OFFSET, &f.sk_family, true);
        }
        let ebpf = loader
            .override_global(names::FORK_CHILD_PID_OFFSET, &offsets.fork_child_pid, true)
            .override_global(names::SIGNAL_SIG_OFFSET, &offsets.signal_sig, true)
            .override_global(names::SIGNAL_PID_OFFSET, &offsets.signal_pid, true)
            .override_global(names::SIGNAL_RESULT_OFFSET, &offsets.signal_result, true)
            .map_max_entries(names::CONNS, limits.max_connections)
            .map_max_entries(names::STATS, limits.max_processes)
            .map_max_entries(names::TARGETS, targets)
            .map_max_entries(names::EXITS, limits.max_processes)
            .map_max_entries(names::LINEAGE, limits.max_processes)
            .map_max_entries(names::REQS, limits.max_request_series)
            .map_max_entries(names::TLS_CALLS, limits.tls_entries().0)
            .map_max_entries(names::SSL_CONNS, limits.tls_entries().1)
            .override_global(names::ACCESS_LOG_ENABLED, &access_log, true)
            .override_global(names::TLS_ENABLED, &u32::from(options.tls), true)
            .load(OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let mut probe = Self {
            ebpf,
            links: 0,
            programs: 0,
            hooks: options.hooks,
            btf: None,
            kernel_btf: None,
            skipped: Vec::new(),
            listen_overflow_reason: socket.is_some_and(|o| o.listen_overflow != u32::MAX),
            h2_walk: Vec::new(),
            tls_h2_walk: None,
        };
        let set = options.hooks;
        if options.empty_hooks {
            for hook in FLOOR.iter().filter(|h| h.wanted(set, task.is_some())) {
                probe.attach(tracefs, hook)?;
            }
            return Ok(probe);
        }
        for hook in HOOKS.iter().filter(|h| h.wanted(set, task.is_some())) {
            probe.attach(tracefs, hook)?;
        }
        probe.data_walks();
        if options.tls {
            probe.tls_programs()?;
            probe.tls_h2_walks();
        }
        if options.calibration {
            probe.attach(tracefs, &CALIBRATION)?;
        }
        if options.exec_events {
            probe.attach(tracefs, &EXEC_DISCOVER)?;
        }
        if options.listen_events && LISTEN_DISCOVER.sets.contains(&set) {
            probe.attach(tracefs, &LISTEN_DISCOVER)?;
        }
        Ok(probe)
    }

    fn attach(&mut self, tracefs: &Path, hook: &Hook) -> Result<(), ProbeError> {
        let name = hook.program;
        let program_error = |e| program_error(name, e);
        let attach_error = |tp: &str, e| ProbeError::Attach {
            program: name,
            category: hook.category,
            tracepoint: tp.into(),
            source: Box::new(e),
        };
        if let FExit(params) = hook.kind {
            let function = hook.tracepoints[0];
            let found = self.params_of(function)?;
            if found != Some(params) {
                log::debug!("{function} has {found:?} parameters here: {name} not attached");
                return Ok(());
            }
            self.read_btf(name)?;
            let btf = self.btf.as_ref().expect("read above");
            let program = program_of::<FExitProgram>(&mut self.ebpf, name)?;
            program.load(function, btf).map_err(program_error)?;
            program.attach().map_err(|e| attach_error(function, e))?;
            self.programs += 1;
            self.links += 1;
            log::debug!("attached {name} to fexit {function}");
            return Ok(());
        }
        if let RawWith(field) = hook.kind {
            let has = |tp: &str| {
                Format::read(tracefs, hook.category, tp).is_ok_and(|f| f.offset(field).is_ok())
            };
            if !hook.tracepoints.iter().all(|tp| has(tp)) {
                log::info!(
                    "{}:{} has no {field} here: {name} not attached",
                    hook.category,
                    hook.tracepoints.join(",")
                );
                self.skipped.push(name);
                return Ok(());
            }
        }
        self.programs += 1;
        if matches!(hook.kind, Raw | RawWith(_)) {
            let program = program_of::<RawTracePoint>(&mut self.ebpf, name)?;
            program.load().map_err(program_error)?;
            for &tp in hook.tracepoints {
                Format::read(tracefs, hook.category, tp)?;
                program.attach(tp).map_err(|e| attach_error(tp, e))?;
                self.links += 1;
                log::debug!("attached {name} to raw tracepoint {tp}");
            }
        } else {
            let program = program_of::<TracePoint>(&mut self.ebpf, name)?;
            program.load().map_err(program_error)?;
            for &tp in hook.tracepoints {
                Offsets::check(tracefs, hook.category, tp)?;
                program
                    .attach(hook.category, tp)
                    .map_err(|e| attach_error(tp, e))?;
                self.links += 1;
                log::debug!("attached {name} to {}:{tp}", hook.category);
            }
        }
        Ok(())
    }

    /// The maps and the rings.
    pub fn take_maps(&mut self) -> Result<(KernelMaps, Rings), ProbeError> {
        let mut maps = KernelMaps::take(&mut self.ebpf)?;
        if self.hooks != HookSet::Syscall {
            maps.unix = Some(self.unix_sweep()?);
        }
        let rings = Rings {
            events: take(&mut self.ebpf, names::EVENTS)?,
            discoveries: take(&mut self.ebpf, names::DISCOVERIES)?,
            access: take(&mut self.ebpf, names::ACCESS)?,
        };
        Ok((maps, rings))
    }

    /// The program that ends unix connections whose socket is gone, loaded, not attached:
    /// the daemon runs it.
    fn unix_sweep(&mut self) -> Result<UnixSweep, ProbeError> {
        Ok(UnixSweep::new(self.load_unattached(names::UNIX_SWEEP)?))
    }

    /// Loads raw tracepoint program `name` without attaching it: its descriptor, for the
    /// daemon to run it or for a program array.
    fn load_unattached(&mut self, name: &'static str) -> Result<ProgramFd, ProbeError> {
        let program = program_of::<RawTracePoint>(&mut self.ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        descriptor(name, program.fd())
    }

    /// The data path's HTTP/2 frame walks, loaded, not attached: the set's data programs
    /// tail-call them for an h2 connection's reads and writes. They use `bpf_loop` (Linux
    /// >= 5.17): a kernel that refuses them counts h2 by exchanges, and the log says so.
    fn data_walks(&mut self) {
        match self.load_data_walks() {
            Ok(walks) => log::info!(
                "HTTP/2: {} loaded, tail-called by the {} hooks for h2 connections (streams \
                 are requests)",
                walks.join(", "),
                self.hooks.name()
            ),
            Err(e) => log::warn!(
                "HTTP/2: the frame walks did not load ({}): h2 connections are counted by \
                 exchanges, not requests",
                first_line(&e)
            ),
        }
    }

    fn load_data_walks(&mut self) -> Result<Vec<&'static str>, ProbeError> {
        let mut loaded = Vec::new();
        match self.hooks {
            set @ (HookSet::Socket | HookSet::Syscall) => {
                let socket = set == HookSet::Socket;
                let pair = if socket {
                    ["h2_recv", "h2_send"]
                } else {
                    ["io_h2_recv", "io_h2_send"]
                };
                let mut walks = Vec::new();
                for (direction, name) in [dir::READ, dir::WRITE].into_iter().zip(pair) {
                    let fd = if socket {
                        self.load_unattached(name)?
                    } else {
                        self.load_tracepoint(name)?
                    };
                    walks.push((direction, fd));
                }
                let array = self.program_array(names::H2_WALK, &walks)?;
                self.h2_walk.push(array);
                loaded.extend(pair);
            }
            HookSet::Fentry => {
                // One per function, for the data program attached there (by its parameters).
                let walks = [
                    ("tcp_h2_recv", "tcp_recvmsg", 5, names::FEXIT_RECV_WALK),
                    ("tcp_h2_recv4", "tcp_recvmsg", 4, names::FEXIT_RECV_WALK),
                    ("tcp_h2_send", "tcp_sendmsg", 3, names::FEXIT_SEND_WALK),
                    (
                        "tcp_h2_sendpage",
                        "tcp_sendpage",
                        5,
                        names::FEXIT_SENDPAGE_WALK,
                    ),
                ];
                for (walk, function, params, array) in walks {
                    if self.params_of(function)? != Some(params) {
                        continue;
                    }
                    let fd = self.load_fexit(walk, function)?;
                    let array = self.program_array(array, &[(0, fd)])?;
                    self.h2_walk.push(array);
                    loaded.push(walk);
                }
            }
        }
        let name = names::DATA_WALKS;
        let mut on: Array<MapData, u32> = take(&mut self.ebpf, name)?;
        on.set(0, 1, 0)
            .map_err(|source| ProbeError::Map { name, source })?;
        Ok(loaded)
    }

    /// How many parameters kernel function `function` has, from the kernel's BTF (None:
    /// no such function).
    fn params_of(&mut self, function: &str) -> Result<Option<usize>, ProbeError> {
        if self.kernel_btf.is_none() {
            self.kernel_btf = Some(Btf::from_sys_fs()?);
        }
        Ok(self
            .kernel_btf
            .as_ref()
            .and_then(|btf| btf.function_params(function))
            .map(|p| p.len()))
    }

    /// Loads fexit program `name` on `function` without attaching it, for a program array.
    fn load_fexit(
        &mut self,
        name: &'static str,
        function: &'static str,
    ) -> Result<ProgramFd, ProbeError> {
        self.read_btf(name)?;
        let btf = self.btf.as_ref().expect("read above");
        let program = program_of::<FExitProgram>(&mut self.ebpf, name)?;
        program
            .load(function, btf)
            .map_err(|e| program_error(name, e))?;
        self.programs += 1;
        descriptor(name, program.fd())
    }

    /// The kernel's BTF as aya reads it, for loading fexit programs (`name`'s, for the
    /// error).
    fn read_btf(&mut self, name: &'static str) -> Result<(), ProbeError> {
        if self.btf.is_none() {
            let btf = aya::Btf::from_sys_fs().map_err(|e| program_error(name, e.into()))?;
            self.btf = Some(btf);
        }
        Ok(())
    }

    /// Loads tracepoint program `name` without attaching it, for a program array.
    fn load_tracepoint(&mut self, name: &'static str) -> Result<ProgramFd, ProbeError> {
        let program = program_of::<TracePoint>(&mut self.ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        self.programs += 1;
        descriptor(name, program.fd())
    }

    /// The OpenSSL uprobes, loaded (attached per library by `attach_openssl`).
    fn tls_programs(&mut self) -> Result<(), ProbeError> {
        let names = OPENSSL_CALLS.iter().map(|(p, _, _)| *p);
        for name in names.chain(["ssl_return"]) {
            self.load_uprobe(name)?;
        }
        Ok(())
    }

    /// Loads uprobe program `name`, to attach or tail-call: its descriptor.
    fn load_uprobe(&mut self, name: &'static str) -> Result<ProgramFd, ProbeError> {
        let program = program_of::<UProbe>(&mut self.ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        self.programs += 1;
        descriptor(name, program.fd())
    }

    /// Program array `name`, holding `walks` (index, program).
    fn program_array(
        &mut self,
        name: &'static str,
        walks: &[(u32, ProgramFd)],
    ) -> Result<ProgramArray<MapData>, ProbeError> {
        let mut array: ProgramArray<MapData> = take(&mut self.ebpf, name)?;
        for (index, fd) in walks {
            array
                .set(*index, fd, 0)
                .map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(array)
    }

    /// The HTTP/2 walks of the OpenSSL plaintext, which `ssl_return` tail-calls. They use
    /// `bpf_loop` (Linux >= 5.17): a kernel that refuses them counts h2 over TLS by
    /// nothing but its connection and bytes, and says so.
    fn tls_h2_walks(&mut self) {
        match self.load_tls_h2_walks() {
            Ok(()) => log::info!(
                "TLS: ssl_h2_recv and ssl_h2_send loaded, tail-called by ssl_return for \
                 HTTP/2 over TLS (streams are requests)"
            ),
            Err(e) => log::warn!(
                "TLS: the HTTP/2 walks did not load ({}): HTTP/2 over TLS is counted by \
                 exchanges, not requests",
                first_line(&e)
            ),
        }
    }

    fn load_tls_h2_walks(&mut self) -> Result<(), ProbeError> {
        let walks = [
            (dir::READ, self.load_uprobe("ssl_h2_recv")?),
            (dir::WRITE, self.load_uprobe("ssl_h2_send")?),
        ];
        self.tls_h2_walk = Some(self.program_array(names::TLS_H2_WALK, &walks)?);
        let name = names::TLS_WALKS;
        let mut walks: Array<MapData, u32> = take(&mut self.ebpf, name)?;
        walks
            .set(0, 1, 0)
            .map_err(|source| ProbeError::Map { name, source })?;
        Ok(())
    }

    fn uprobe(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        program_of(&mut self.ebpf, name)
    }

    /// Attaches the OpenSSL uprobes to `library` (a libssl, as a path this process can
    /// open), for every process that maps it; the number of probes attached. Each call is
    /// an entry probe and the return probe together, or neither. `SSL_read` and `SSL_write`
    /// are required (without either the library is left alone: an error); `SSL_read_ex`,
    /// `SSL_write_ex` (OpenSSL >= 1.1.1), `SSL_do_handshake` and `SSL_free` are taken where
    /// the library has them.
    pub fn attach_openssl(&mut self, library: &Path) -> Result<usize, ProbeError> {
        let mut links: Vec<(&'static str, UProbeLinkId)> = Vec::new();
        let mut outcome = Ok(());
        for (entry, symbol, required) in OPENSSL_CALLS {
            let pair: &[&'static str] = if entry == "ssl_free" {
                &[entry]
            } else {
                &[entry, "ssl_return"]
            };
            let mut attached = Vec::new();
            let mut failed = None;
            for &name in pair {
                match self
                    .uprobe(name)?
                    .attach(symbol, library, UProbeScope::AllProcesses)
                {
                    Ok(link) => attached.push((name, link)),
                    Err(e) => {
                        failed = Some(ProbeError::Program {
                            name,
                            source: Box::new(e),
                        });
                        break;
                    }
                }
            }
            match failed {
                None => links.extend(attached),
                Some(e) => {
                    log::debug!("{symbol} of {} not attached: {e}", library.display());
                    self.detach(attached);
                    if required {
                        outcome = Err(e);
                        break;
                    }
                }
            }
        }
        if let Err(e) = outcome {
            self.detach(links);
            return Err(e);
        }
        self.links += links.len();
        Ok(links.len())
    }

    fn detach(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (name, link) in links {
            if let Ok(program) = self.uprobe(name) {
                let _ = program.detach(link);
            }
        }
    }

    /// Programs loaded and attached.
    pub fn program_count(&self) -> usize {
        self.programs
    }
}

/// Program `name` of the object, as its type `T`.
fn program_of<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn program_error(name: &'static str, e: ProgramError) -> ProbeError {
    ProbeError::Program {
        name,
        source: Box::new(e),
    }
}

/// A loaded program's descriptor, for its holder to keep (a program array, the daemon).
fn descriptor(
    name: &'static str,
    fd: Result<&ProgramFd, ProgramError>,
) -> Result<ProgramFd, ProbeError> {
    fd.map_err(|e| program_error(name, e))?
        .try_clone()
        .map_err(|e| program_error(name, ProgramError::IOError(e)))
}

/// `e` and every error under it, on one line.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// The first line of `e` and its causes (a verifier's log is long), and the verifier's
/// verdict from its end.
fn first_line(e: &dyn std::error::Error) -> String {
    let text = causes(e);
    let line = text.lines().next().unwrap_or_default();
    // The verifier's verdict is the line before its closing statistics ("R2 unbounded
    // memory access, …" on 6.1); matching words missed that one.
    let lines: Vec<&str> = text.lines().collect();
    let verdict = lines
        .iter()
        .position(|l| l.trim_start().starts_with("verification time"))
        .and_then(|at| lines[..at].iter().rev().find(|l| !l.trim().is_empty()))
        .copied()
        .unwrap_or_default();
    format!("{line} … {verdict}")
}

/// The target set is indexed by PID: as many slots as PIDs can be (the kernel's pid_max).
pub fn pid_slots() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(probe_common::MAX_PID_SLOTS)
        .clamp(probe_common::DEFAULT_PID_SLOTS, probe_common::MAX_PID_SLOTS)
}
