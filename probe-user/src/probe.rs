//! Loads the embedded kernel object, fills in record offsets and map sizes, and attaches every
//! program to its tracepoints. Dropping `Probe` detaches them all.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use probe_common::{names, syscall_layout};
use thiserror::Error;

use crate::{
    btf::{Btf, BtfError},
    kernel_maps::KernelMaps,
    tracefs::{Format, TracefsError},
};

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flyprobe"));

/// A program and the tracepoints it serves. Syscall families share one program each: their
/// records agree on where the first argument and the return value are (checked at attach).
struct Hook {
    program: &'static str,
    /// The tracefs category (raw tracepoints are attached by event name alone; the category
    /// says where to check that the event exists).
    category: &'static str,
    tracepoints: &'static [&'static str],
    /// A raw tracepoint (BPF_PROG_TYPE_RAW_TRACEPOINT: the event's arguments, none of the
    /// perf-event glue), or a classic perf-event tracepoint.
    raw: bool,
    /// The hook sets it belongs to.
    sets: &'static [HookSet],
}

/// Which programs carry the requests and connections (`--hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSet {
    /// Raw tracepoints on the socket layer (Linux >= 6.3): nothing on the syscall path.
    Socket,
    /// syscalls:* tracepoints: every syscall of every task on the node takes the tracing
    /// slow path while they are attached. The fallback for older kernels.
    Syscall,
}

impl HookSet {
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Syscall => "syscall",
        }
    }
}

const BOTH: &[HookSet] = &[HookSet::Socket, HookSet::Syscall];
const SOCKET: &[HookSet] = &[HookSet::Socket];
const SYSCALL: &[HookSet] = &[HookSet::Syscall];

const CALIBRATION: Hook = Hook {
    program: "calibration",
    category: "syscalls",
    tracepoints: &["sys_enter_read"],
    raw: false,
    sets: BOTH,
};

/// Node-wide discovery: attached only for the selectors that need them. The socket set
/// announces listen() from `sock_state` instead of this syscall hook.
const EXEC_DISCOVER: Hook = Hook {
    program: "exec_discover",
    category: "sched",
    tracepoints: &["sched_process_exec"],
    raw: false,
    sets: BOTH,
};

const LISTEN_DISCOVER: Hook = Hook {
    program: "listen_discover",
    category: "syscalls",
    tracepoints: &["sys_exit_listen"],
    raw: false,
    sets: SYSCALL,
};

/// The socket events a socket set needs from tracefs.
const SOCKET_EVENTS: [&str; 3] = [
    "sock_recv_length",
    "sock_send_length",
    "inet_sock_set_state",
];

/// Empty programs on the socket set's events, alone: the cost floor (`--empty-hooks`).
const FLOOR: &[Hook] = &[
    Hook {
        program: "empty_recv",
        category: "sock",
        tracepoints: &["sock_recv_length"],
        raw: true,
        sets: SOCKET,
    },
    Hook {
        program: "empty_send",
        category: "sock",
        tracepoints: &["sock_send_length"],
        raw: true,
        sets: SOCKET,
    },
    Hook {
        program: "empty_state",
        category: "sock",
        tracepoints: &["inet_sock_set_state"],
        raw: true,
        sets: SOCKET,
    },
];

const HOOKS: &[Hook] = &[
    Hook {
        program: "process_fork",
        category: "sched",
        tracepoints: &["sched_process_fork"],
        raw: false,
        sets: BOTH,
    },
    Hook {
        program: "process_exit",
        category: "sched",
        tracepoints: &["sched_process_exit"],
        raw: false,
        sets: BOTH,
    },
    // The socket set
    Hook {
        program: "sock_recv",
        category: "sock",
        tracepoints: &["sock_recv_length"],
        raw: true,
        sets: SOCKET,
    },
    Hook {
        program: "sock_send",
        category: "sock",
        tracepoints: &["sock_send_length"],
        raw: true,
        sets: SOCKET,
    },
    Hook {
        program: "sock_state",
        category: "sock",
        tracepoints: &["inet_sock_set_state"],
        raw: true,
        sets: SOCKET,
    },
    // The syscall set
    Hook {
        program: "exit_group_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_exit_group"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "signal_generate",
        category: "signal",
        tracepoints: &["signal_generate"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "accept_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_accept", "sys_enter_accept4"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "accept_exit",
        category: "syscalls",
        tracepoints: &["sys_exit_accept", "sys_exit_accept4"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "close_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_close"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "read_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_read", "sys_enter_recvfrom"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "readv_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_readv"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "recvmsg_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_recvmsg"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "write_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_write", "sys_enter_sendto"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "writev_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_writev"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "sendmsg_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_sendmsg"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "sendfile_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_sendfile64"],
        raw: false,
        sets: SYSCALL,
    },
    Hook {
        program: "io_exit",
        category: "syscalls",
        tracepoints: &[
            "sys_exit_read",
            "sys_exit_readv",
            "sys_exit_recvfrom",
            "sys_exit_recvmsg",
            "sys_exit_write",
            "sys_exit_writev",
            "sys_exit_sendto",
            "sys_exit_sendmsg",
            "sys_exit_sendfile64",
        ],
        raw: false,
        sets: SYSCALL,
    },
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
    #[error("the eBPF object has no map `{name}`")]
    MissingMap { name: &'static str },
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
}

pub struct Options {
    pub limits: Limits,
    pub hooks: HookSet,
    /// Attach only empty programs on the socket set's events (the benchmark's floor).
    pub empty_hooks: bool,
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
}

/// Offsets of kernel struct fields the socket set reads, from the kernel's BTF.
#[derive(Clone, Copy, Debug)]
pub struct SocketOffsets {
    sk_family: u32,
    sk_state: u32,
    sk_num: u32,
    sk_net: u32,
    net_inum: u32,
    sk_protocol: u32,
    task_exit_code: u32,
    /// `pt_regs.si`, followed by `di` and `orig_ax` (the syscall number).
    regs_arg1: u32,
    /// The syscall's buffer is found through the saved user registers (x86_64 only).
    peek_regs: bool,
}

impl SocketOffsets {
    /// What the socket set needs, or why this kernel cannot have it: the socket tracepoints
    /// (Linux >= 6.3) and the BTF to read sockets with.
    pub fn probe(tracefs: &Path) -> Result<Self, ProbeError> {
        for event in SOCKET_EVENTS {
            Format::read(tracefs, "sock", event)?;
        }
        let btf = Btf::from_sys_fs()?;
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        // The programs read `si`, `di` and `orig_ax` in one go: peek only where they are
        // adjacent, as the x86_64 ABI lays them out.
        let (regs_arg1, peek_regs) = if cfg!(target_arch = "x86_64") {
            let (si, orig_ax) = (field("pt_regs", &["si"])?, field("pt_regs", &["orig_ax"])?);
            let adjacent = field("pt_regs", &["di"])? == si + 8 && orig_ax == si + 16;
            if !adjacent {
                log::warn!(
                    "pt_regs keeps si at {si} and orig_ax at {orig_ax}: method and status \
                     labels are off"
                );
            }
            (si, adjacent)
        } else {
            (0, false)
        };
        Ok(Self {
            sk_family: field("sock_common", &["skc_family"])?,
            sk_state: field("sock_common", &["skc_state"])?,
            sk_num: field("sock_common", &["skc_num"])?,
            sk_net: field("sock_common", &["skc_net", "net"])?,
            net_inum: field("net", &["ns", "inum"])?,
            sk_protocol: field("sock", &["sk_protocol"])?,
            task_exit_code: field("task_struct", &["exit_code"])?,
            regs_arg1,
            peek_regs,
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
    /// stable ABI): check that this syscall keeps arg0 and arg1 (or ret) there.
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
            let first = args.first().ok_or_else(|| TracefsError::MissingField {
                category: category.into(),
                name: name.into(),
                field: "fd".into(),
            })?;
            let mut checks = vec![(first.0.to_string(), first.1, syscall_layout::ARG0)];
            if let Some(second) = args.get(1) {
                checks.push((second.0.to_string(), second.1, syscall_layout::ARG1));
            }
            checks
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
            HookSet::Socket => Some(SocketOffsets::probe(tracefs)?),
            HookSet::Syscall => None,
        };
        let mut loader = EbpfLoader::new();
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
                .override_global(names::TASK_EXIT_CODE_OFFSET, &o.task_exit_code, true)
                .override_global(names::REGS_ARG1_OFFSET, &o.regs_arg1, true)
                .override_global(names::PEEK_REGS, &peek, true)
                .override_global(names::ANNOUNCE_LISTEN, &announce_listen, true);
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
            .map_max_entries(names::REQS, limits.max_request_series)
            .override_global(names::ACCESS_LOG_ENABLED, &access_log, true)
            .load(OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let mut probe = Self {
            ebpf,
            links: 0,
            programs: 0,
            hooks: options.hooks,
        };
        if options.empty_hooks {
            for hook in FLOOR {
                probe.attach(tracefs, hook)?;
            }
            return Ok(probe);
        }
        let set = options.hooks;
        for hook in HOOKS.iter().filter(|h| h.sets.contains(&set)) {
            probe.attach(tracefs, hook)?;
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
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram { name })?;
        self.programs += 1;
        let program_error = |e| ProbeError::Program {
            name,
            source: Box::new(e),
        };
        let attach_error = |tp: &str, e| ProbeError::Attach {
            program: name,
            category: hook.category,
            tracepoint: tp.into(),
            source: Box::new(e),
        };
        if hook.raw {
            let program: &mut RawTracePoint = program.try_into().map_err(program_error)?;
            program.load().map_err(program_error)?;
            for &tp in hook.tracepoints {
                Format::read(tracefs, hook.category, tp)?;
                program.attach(tp).map_err(|e| attach_error(tp, e))?;
                self.links += 1;
                log::debug!("attached {name} to raw tracepoint {tp}");
            }
        } else {
            let program: &mut TracePoint = program.try_into().map_err(program_error)?;
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
        let maps = KernelMaps::take(&mut self.ebpf)?;
        let rings = Rings {
            events: take(&mut self.ebpf, names::EVENTS)?,
            discoveries: take(&mut self.ebpf, names::DISCOVERIES)?,
            access: take(&mut self.ebpf, names::ACCESS)?,
        };
        Ok((maps, rings))
    }

    /// Programs loaded and attached.
    pub fn program_count(&self) -> usize {
        self.programs
    }
}

/// The target set is indexed by PID: as many slots as PIDs can be (the kernel's pid_max).
pub fn pid_slots() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(probe_common::MAX_PID_SLOTS)
        .clamp(probe_common::DEFAULT_PID_SLOTS, probe_common::MAX_PID_SLOTS)
}

/// Take a map out of the object, typed.
pub fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap { name })?;
    T::try_from(map).map_err(|source| ProbeError::Map { name, source })
}
