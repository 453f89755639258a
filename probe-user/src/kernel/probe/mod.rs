//! Loads the embedded kernel object, fills in record offsets and map sizes, and attaches every
//! program to its tracepoints. Dropping `Probe` detaches them all.
//!
//! - `hooks`: the table of programs and the events each serves, per hook set.
//! - `offsets`: where the programs read, from the kernel's BTF and tracefs.
//! - `error`: why loading or attaching failed.

mod error;
mod hooks;
mod offsets;

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, ProgramArray, RingBuf},
    programs::{
        FExit as FExitProgram, ProgramError, ProgramFd, RawTracePoint, TracePoint, UProbe,
        raw_trace_point::RawTracePointLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use probe_common::{dir, names};

pub use self::{
    error::{ProbeError, causes},
    hooks::HookSet,
    offsets::{ListenOverflow, SocketOffsets},
};
use self::{
    error::{first_line, program_error},
    hooks::{
        CALIBRATION, EXEC_DISCOVER, FLOOR, HOOKS, Hook,
        Kind::{FExit, Raw, RawWith},
        LISTEN_DISCOVER, OPENSSL_CALLS, SOCKET_EVENTS,
    },
    offsets::{FdOffsets, Offsets, TaskOffsets},
};
use crate::kernel::{
    btf::Btf,
    maps::{KernelMaps, UnixSweep, take},
    tracefs::Format,
};

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flyprobe"));

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
    /// Socket set: leave the syscall's buffer unread (`--no-peek`, the benchmark's).
    pub no_peek: bool,
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

/// The kernel's ring buffers: lifecycle events, discovery announcements, access-log records.
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub discoveries: RingBuf<MapData>,
    pub access: RingBuf<MapData>,
}

/// Where the kernel counts the handshakes a listener dropped at a full accept queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeDrops {
    /// `skb:kfree_skb` on a listener (`rx_sk`, Linux >= 6.11), with reason NOT_SPECIFIED or
    /// TCP_LISTEN_OVERFLOW (`named`, 6.15 on).
    FreedOnListener { named: bool },
    /// fexit on `tcp_check_req` returning no child, the packet then discarded on the
    /// listener (the fentry set, before 6.11).
    NoChild,
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
    /// The drop reason that marks a handshake dropped at a full accept queue, where BTF
    /// names one.
    listen_overflow: Option<ListenOverflow>,
    /// Where the kernel programs count the handshakes a listener dropped (which its drop
    /// counter holds twice), if anywhere.
    pub handshake_drops: Option<HandshakeDrops>,
    /// The data path's HTTP/2 frame walks' arrays, tail-called from here (held: the kernel
    /// empties a program array when its last descriptor closes).
    h2_walk: Vec<ProgramArray<MapData>>,
    /// The OpenSSL plaintext's HTTP/2 walks (`--tls`), held likewise.
    tls_h2_walk: Option<ProgramArray<MapData>>,
    /// The raw programs on the socket events (`SOCKET_EVENTS`) and their links, None while
    /// detached (`set_data_path`, the benchmark's `--bench-toggle`).
    data_links: Vec<DataLink>,
}

/// A raw program on one of the socket events, and its link while attached.
struct DataLink {
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    link: Option<RawTracePointLinkId>,
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
        let peek = u32::from(!options.no_peek && socket.is_some_and(|o| o.peek_regs));
        if let Some(o) = &socket {
            loader
                .override_global(names::SK_FAMILY_OFFSET, &o.sk_family, true)
                .override_global(names::SK_STATE_OFFSET, &o.sk_state, true)
                .override_global(names::SK_NUM_OFFSET, &o.sk_num, true)
                .override_global(names::SK_NET_OFFSET, &o.sk_net, true)
                .override_global(names::NET_INUM_OFFSET, &o.net_inum, true)
                .override_global(names::SK_PROTOCOL_OFFSET, &o.sk_protocol, true)
                .override_global(names::INET_SPORT_OFFSET, &o.inet_sport, true)
                .override_global(
                    names::DROP_REASON_LISTEN_OVERFLOW,
                    &o.listen_overflow.overflow,
                    true,
                )
                .override_global(
                    names::DROP_REASON_NOT_SPECIFIED,
                    &o.listen_overflow.not_specified,
                    true,
                )
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
            listen_overflow: socket
                .map(|o| o.listen_overflow)
                .filter(ListenOverflow::known),
            handshake_drops: None,
            h2_walk: Vec::new(),
            tls_h2_walk: None,
            data_links: Vec::new(),
        };
        let set = options.hooks;
        if options.empty_hooks {
            for hook in FLOOR.iter().filter(|h| h.wanted(set, task.is_some(), &[])) {
                probe.attach(tracefs, hook)?;
            }
            return Ok(probe);
        }
        for hook in HOOKS {
            if !hook.wanted(set, task.is_some(), &probe.skipped) {
                continue;
            }
            if !hook.optional() {
                probe.attach(tracefs, hook)?;
            } else if let Err(err) = probe.attach(tracefs, hook) {
                // As the refused walks are told: the first line and the verifier's verdict.
                log::warn!("{} not attached: {}", hook.program, first_line(&err));
                probe.skipped.push(hook.program);
            }
        }
        probe.handshake_drops = probe.handshake_drops_source(set, task.is_some());
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
        let attach_error = |tp: &str, e| attach_error(name, hook.category, tp, e);
        if let FExit(params) = hook.kind {
            let function = hook.tracepoints[0];
            let found = self.params_of(function)?;
            if found != Some(params) {
                log::debug!("{function} has {found:?} parameters here: {name} not attached");
                self.skipped.push(name);
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
                let link = program.attach(tp).map_err(|e| attach_error(tp, e))?;
                if SOCKET_EVENTS.contains(&tp) {
                    self.data_links.push(DataLink {
                        program: name,
                        category: hook.category,
                        tracepoint: tp,
                        link: Some(link),
                    });
                }
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

    /// Which attached programs count a listener's dropped handshakes.
    fn handshake_drops_source(&self, set: HookSet, task_btf: bool) -> Option<HandshakeDrops> {
        let attached = |name: &str| {
            HOOKS
                .iter()
                .any(|h| h.program == name && h.wanted(set, task_btf, &self.skipped))
                && !self.skipped.contains(&name)
        };
        if attached("packet_dropped") {
            let reason = self.listen_overflow?;
            Some(HandshakeDrops::FreedOnListener {
                named: reason.named,
            })
        } else if attached("check_req_exit") {
            Some(HandshakeDrops::NoChild)
        } else {
            None
        }
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

    /// How many raw programs are on the socket events (`set_data_path`'s).
    pub fn data_path_links(&self) -> usize {
        self.data_links.len()
    }

    /// Detach (`attached` false) or attach again the raw programs on the socket events, for
    /// the benchmark to compare one daemon with and without them in alternating windows of
    /// one load. Returns how many links changed. An error leaves the links changed so far
    /// as they are (the daemon then exits: a benchmark must not go on half-toggled).
    pub fn set_data_path(&mut self, attached: bool) -> Result<usize, ProbeError> {
        let mut changed = 0;
        for data in &mut self.data_links {
            let program = program_of::<RawTracePoint>(&mut self.ebpf, data.program)?;
            if attached && data.link.is_none() {
                let link = program
                    .attach(data.tracepoint)
                    .map_err(|e| attach_error(data.program, data.category, data.tracepoint, e))?;
                data.link = Some(link);
                changed += 1;
            } else if !attached && let Some(link) = data.link.take() {
                program
                    .detach(link)
                    .map_err(|e| program_error(data.program, e))?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Programs loaded and attached.
    pub fn program_count(&self) -> usize {
        self.programs
    }
}

/// Attaching `program` to `category:tracepoint` failed.
fn attach_error(
    program: &'static str,
    category: &'static str,
    tracepoint: &str,
    e: ProgramError,
) -> ProbeError {
    ProbeError::Attach {
        program,
        category,
        tracepoint: tracepoint.into(),
        source: Box::new(e),
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

/// A loaded program's descriptor, for its holder to keep (a program array, the daemon).
fn descriptor(
    name: &'static str,
    fd: Result<&ProgramFd, ProgramError>,
) -> Result<ProgramFd, ProbeError> {
    fd.map_err(|e| program_error(name, e))?
        .try_clone()
        .map_err(|e| program_error(name, ProgramError::IOError(e)))
}

/// The target set is indexed by PID: as many slots as PIDs can be (the kernel's pid_max).
pub fn pid_slots() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(probe_common::MAX_PID_SLOTS)
        .clamp(probe_common::DEFAULT_PID_SLOTS, probe_common::MAX_PID_SLOTS)
}
