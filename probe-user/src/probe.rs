//! Loads the embedded kernel object, fills in record offsets and map sizes, and attaches every
//! program to its tracepoints. Dropping `Probe` detaches them all.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{ProgramError, TracePoint},
};
use probe_common::{names, syscall_layout};
use thiserror::Error;

use crate::{
    kernel_maps::KernelMaps,
    tracefs::{Format, TracefsError},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flyprobe"));

/// A program and the tracepoints it serves. Syscall families share one program each: their
/// records agree on where the first argument and the return value are (checked at attach).
struct Hook {
    program: &'static str,
    category: &'static str,
    tracepoints: &'static [&'static str],
}

const CALIBRATION: Hook = Hook {
    program: "calibration",
    category: "syscalls",
    tracepoints: &["sys_enter_read"],
};

/// Node-wide discovery: attached only for the selectors that need them.
const EXEC_DISCOVER: Hook = Hook {
    program: "exec_discover",
    category: "sched",
    tracepoints: &["sched_process_exec"],
};

const LISTEN_DISCOVER: Hook = Hook {
    program: "listen_discover",
    category: "syscalls",
    tracepoints: &["sys_exit_listen"],
};

const HOOKS: &[Hook] = &[
    Hook {
        program: "process_fork",
        category: "sched",
        tracepoints: &["sched_process_fork"],
    },
    Hook {
        program: "process_exit",
        category: "sched",
        tracepoints: &["sched_process_exit"],
    },
    Hook {
        program: "exit_group_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_exit_group"],
    },
    Hook {
        program: "signal_generate",
        category: "signal",
        tracepoints: &["signal_generate"],
    },
    Hook {
        program: "accept_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_accept", "sys_enter_accept4"],
    },
    Hook {
        program: "accept_exit",
        category: "syscalls",
        tracepoints: &["sys_exit_accept", "sys_exit_accept4"],
    },
    Hook {
        program: "close_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_close"],
    },
    Hook {
        program: "read_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_read", "sys_enter_recvfrom"],
    },
    Hook {
        program: "readv_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_readv"],
    },
    Hook {
        program: "recvmsg_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_recvmsg"],
    },
    Hook {
        program: "write_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_write", "sys_enter_sendto"],
    },
    Hook {
        program: "writev_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_writev"],
    },
    Hook {
        program: "sendmsg_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_sendmsg"],
    },
    Hook {
        program: "sendfile_enter",
        category: "syscalls",
        tracepoints: &["sys_enter_sendfile64"],
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
    },
];

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
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
        // The target set is indexed by PID: as many slots as PIDs can be.
        let targets = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(probe_common::MAX_PID_SLOTS)
            .clamp(probe_common::DEFAULT_PID_SLOTS, probe_common::MAX_PID_SLOTS);
        let mut loader = EbpfLoader::new();
        for (name, path) in &options.pins {
            loader.map_pin_path(name, path.as_path());
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
        let mut probe = Self { ebpf, links: 0 };
        for hook in HOOKS {
            probe.attach(tracefs, hook)?;
        }
        if options.calibration {
            probe.attach(tracefs, &CALIBRATION)?;
        }
        if options.exec_events {
            probe.attach(tracefs, &EXEC_DISCOVER)?;
        }
        if options.listen_events {
            probe.attach(tracefs, &LISTEN_DISCOVER)?;
        }
        Ok(probe)
    }

    fn attach(&mut self, tracefs: &Path, hook: &Hook) -> Result<(), ProbeError> {
        let name = hook.program;
        let program: &mut TracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram { name })?
            .try_into()
            .map_err(|e| ProbeError::Program {
                name,
                source: Box::new(e),
            })?;
        program.load().map_err(|e| ProbeError::Program {
            name,
            source: Box::new(e),
        })?;
        for &tp in hook.tracepoints {
            Offsets::check(tracefs, hook.category, tp)?;
            program
                .attach(hook.category, tp)
                .map_err(|e| ProbeError::Attach {
                    program: name,
                    category: hook.category,
                    tracepoint: tp.into(),
                    source: Box::new(e),
                })?;
            self.links += 1;
            log::debug!("attached {name} to {}:{tp}", hook.category);
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

    pub fn program_count(&self) -> usize {
        self.ebpf.programs().count()
    }
}

/// Take a map out of the object, typed.
pub fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap { name })?;
    T::try_from(map).map_err(|source| ProbeError::Map { name, source })
}
