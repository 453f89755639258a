//! Userspace access to the kernel's state: the target set, connections, per-process and
//! per-label counters (summed over CPUs) and drop counters.

use std::collections::BTreeMap;

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::ProgramFd,
};
use probe_common::{
    ConnKey, ConnState, ListenKey, PendingIo, PortStats, ProcStats, ReqKey, ReqStats, SslKey,
    Stream, StreamKey, TlsCall, conn_flags, drop_reason,
    h2::H2,
    http::{METHOD_OTHER, PROTO_H2, STATUS_ABORTED, has_requests, label_of},
    names, phase, target, transport,
};

use thiserror::Error;

/// A map the object should have: missing, or not of the type asked for.
#[derive(Debug, Error)]
pub enum TakeError {
    #[error("the eBPF object has no map `{name}`")]
    Missing { name: &'static str },
    #[error("opening map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Take a map out of the object, typed.
pub fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, TakeError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(TakeError::Missing { name })?;
    T::try_from(map).map_err(|source| TakeError::Map { name, source })
}

/// Removes the entries of `map` whose key `doomed` names.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    doomed: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(doomed).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

pub struct KernelMaps {
    targets: Array<MapData, u8>,
    conns: HashMap<MapData, ConnKey, ConnState>,
    h2_conns: HashMap<MapData, ConnKey, H2>,
    streams: HashMap<MapData, StreamKey, Stream>,
    listen_ports: HashMap<MapData, ListenKey, u8>,
    ports: PerCpuHashMap<MapData, ListenKey, PortStats>,
    pending: HashMap<MapData, u64, PendingIo>,
    tls_calls: HashMap<MapData, u64, TlsCall>,
    ssl_conns: HashMap<MapData, SslKey, ConnKey>,
    stats: PerCpuHashMap<MapData, u32, ProcStats>,
    reqs: PerCpuHashMap<MapData, ReqKey, ReqStats>,
    drops: PerCpuArray<MapData, u64>,
    lineage: HashMap<MapData, u32, u32>,
    /// Ends unix connections whose socket is gone (socket-keyed sets).
    pub unix: Option<UnixSweep>,
}

/// What the sweep reads of the maps as a whole.
#[derive(Debug, Default)]
pub struct Census {
    pub entries: Vec<(&'static str, u64)>,
    /// Established connections on watched listeners, not yet read, written or closed by a
    /// watched process, by (network namespace, port).
    pub queued: BTreeMap<(u32, u16), u64>,
}

/// What is left of an exited process: its counters and its labelled requests, with the
/// requests it was still reading counted as aborted.
#[derive(Debug, Default)]
pub struct Remains {
    pub stats: ProcStats,
    pub requests: Vec<(ReqKey, ReqStats)>,
    /// The connections it still held, to free with the rest (`forget`).
    pub held: Vec<ConnKey>,
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, TakeError> {
        Ok(Self {
            targets: take(ebpf, names::TARGETS)?,
            conns: take(ebpf, names::CONNS)?,
            h2_conns: take(ebpf, names::H2_CONNS)?,
            streams: take(ebpf, names::STREAMS)?,
            listen_ports: take(ebpf, names::LISTEN_PORTS)?,
            ports: take(ebpf, names::PORT_STATS)?,
            pending: take(ebpf, names::PENDING_IO)?,
            tls_calls: take(ebpf, names::TLS_CALLS)?,
            ssl_conns: take(ebpf, names::SSL_CONNS)?,
            stats: take(ebpf, names::STATS)?,
            reqs: take(ebpf, names::REQS)?,
            drops: take(ebpf, names::DROPS)?,
            lineage: take(ebpf, names::LINEAGE)?,
            unix: None,
        })
    }

    /// Add a process to the kernel's target set.
    pub fn track(&mut self, pid: u32) -> Result<(), MapError> {
        self.targets.set(pid, target::TRACKED, 0)
    }

    /// Mark tracked `pid` as one whose libssl has the OpenSSL uprobes (`--tls`), or not:
    /// its TLS handshakes are no exchanges, or are again (it exec'd a program without that
    /// libssl; the mark had come with fork). Left alone if it is not tracked (any more).
    pub fn mark_openssl(&mut self, pid: u32, openssl: bool) {
        let (from, to) = if openssl {
            (target::TRACKED, target::OPENSSL)
        } else {
            (target::OPENSSL, target::TRACKED)
        };
        if self.targets.get(&pid, 0).is_ok_and(|t| t == from) {
            let _ = self.targets.set(pid, to, 0);
        }
    }

    /// Take a process out of the target set: only for one whose exit the kernel did not see
    /// (it exited before it was seeded); otherwise the kernel clears it at exit, and clearing
    /// here could untrack a new process that reused the PID.
    pub fn untrack(&mut self, pid: u32) {
        let _ = self.targets.set(pid, 0, 0);
    }

    /// Tell the kernel of a watched listener (one that listened before the programs were
    /// attached, or in a process tracked after it listened): connections on it are served.
    pub fn listen(&mut self, key: ListenKey) -> Result<(), MapError> {
        if self.listen_ports.get(&key, 0).is_ok() {
            return Ok(());
        }
        self.listen_ports.insert(key, 1, 0)
    }

    /// Forget a listener that is gone: its port may become an ephemeral one, and an outbound
    /// connection from it must not look served. Returns what the kernel counted on it.
    pub fn unlisten(&mut self, key: &ListenKey) -> Option<PortStats> {
        let _ = self.listen_ports.remove(key);
        let counted = self.port(key.netns, key.port);
        let _ = self.ports.remove(key);
        counted
    }

    /// What the kernel counted on one watched listening port so far.
    pub fn port(&self, netns: u32, port: u16) -> Option<PortStats> {
        let key = ListenKey {
            netns,
            port,
            _pad: 0,
        };
        self.ports.get(&key, 0).ok().map(|per_cpu| {
            let mut total = PortStats::default();
            per_cpu.iter().for_each(|s| total.add(s));
            total
        })
    }

    /// What the kernel counted per watched listening port: (network namespace, port).
    pub fn ports(&self) -> BTreeMap<(u32, u16), PortStats> {
        summed(&self.ports, PortStats::add)
            .into_iter()
            .map(|(key, stats)| ((key.netns, key.port), stats))
            .collect()
    }

    /// The process that forked `pid`, as the kernel recorded it at the fork (recent forks
    /// of tracked processes only).
    pub fn parent_of(&self, pid: u32) -> Option<u32> {
        self.lineage.get(&pid, 0).ok()
    }

    /// Drop `pid`'s lineage entry if it still says `parent` forked it (a retired process's;
    /// a new process with the same PID and another parent keeps its own).
    pub fn forget_lineage(&mut self, pid: u32, parent: u32) {
        if self.parent_of(pid) == Some(parent) {
            let _ = self.lineage.remove(&pid);
        }
    }

    /// Counters of every process the kernel has seen accept, summed over CPUs.
    pub fn stats(&self) -> BTreeMap<u32, ProcStats> {
        summed(&self.stats, ProcStats::add)
    }

    /// One process's counters, summed over CPUs.
    pub fn stats_of(&self, pid: u32) -> ProcStats {
        let mut total = ProcStats::default();
        if let Ok(per_cpu) = self.stats.get(&pid, 0) {
            per_cpu.iter().for_each(|s| total.add(s));
        }
        total
    }

    /// Completed requests by labels, summed over CPUs.
    pub fn requests(&self) -> BTreeMap<ReqKey, ReqStats> {
        summed(&self.reqs, ReqStats::add)
    }

    /// Everything the kernel kept for an exited process, removed from the maps.
    pub fn retire(&mut self, pid: u32) -> Remains {
        let remains = self.remains(&[pid]).pop().unwrap_or_default();
        self.forget(pid, &remains);
        let _ = self.lineage.remove(&pid);
        remains
    }

    /// What the kernel kept for each of `pids` (exited processes), left in the maps: the
    /// connections each still held are closed, and the request each was reading is
    /// aborted. One walk of each map for all of them: retiring a batch of recycled workers
    /// holds the daemon's lock for one walk, not one per process.
    pub fn remains(&self, pids: &[u32]) -> Vec<Remains> {
        let index: BTreeMap<u32, usize> = pids.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut out: Vec<Remains> = pids
            .iter()
            .map(|&pid| Remains {
                stats: self.stats_of(pid),
                ..Default::default()
            })
            .collect();
        for (key, stats) in self.requests() {
            if let Some(&i) = index.get(&key.tgid) {
                out[i].requests.push((key, stats));
            }
        }
        // A key can be listed twice when other keys are deleted mid-walk: count it once.
        let held: std::collections::HashMap<ConnKey, ConnState> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| index.contains_key(&state.owner))
            .collect();
        for (key, state) in held {
            let r = &mut out[index[&state.owner]];
            r.held.push(key);
            // The kernel closed it with the process: what it was reading is aborted (the
            // request of an HTTP/1 turn, the open streams of an h2 connection).
            let (method, count) = if state.protocol == PROTO_H2 {
                let open = self.h2_conns.get(&key, 0).map_or(0, |h2| h2.streams.open());
                (METHOD_OTHER, u64::from(open))
            } else if state.phase == phase::REQUEST && has_requests(state.protocol) {
                (state.method, 1)
            } else {
                (state.method, 0)
            };
            if count > 0 {
                let labels = ReqKey {
                    tgid: state.owner,
                    method,
                    status: STATUS_ABORTED,
                    protocol: label_of(state.protocol, state.flags),
                    transport: transport::of(state.flags),
                };
                let aborted = ReqStats {
                    count,
                    ..Default::default()
                };
                r.requests.push((labels, aborted));
            }
        }
        out
    }

    /// Free the entries `remains` was read from, once it is kept. Keys, not a second walk of
    /// the maps: the walk was done by `remains`.
    pub fn forget(&mut self, pid: u32, remains: &Remains) {
        // The aborted requests added to `remains` name no entry: removing them is a no-op.
        for (key, _) in &remains.requests {
            let _ = self.reqs.remove(key);
        }
        for key in &remains.held {
            let _ = self.conns.remove(key);
            let _ = self.h2_conns.remove(key);
        }
        let _ = self.stats.remove(&pid);
        // Slots of its threads (keyed by pid_tgid) that outlived the process: pending
        // syscalls, OpenSSL calls; and its `SSL *`s' connections (`--tls`).
        let of_pid = |id: &u64| (id >> 32) as u32 == pid;
        remove_where(&mut self.pending, of_pid);
        remove_where(&mut self.tls_calls, of_pid);
        remove_where(&mut self.ssl_conns, |k: &SslKey| k.tgid == pid);
    }

    /// Entries in the bounded maps, by `flyprobe_map_entries` label, and the connections
    /// no watched process has touched yet, by listening port (`conn_flags::QUEUED`). Walks
    /// the maps, so it runs in the 1 s sweep, not at scrape time.
    /// Unix connections whose socket is gone are ended on the way (no kernel event marks
    /// their close).
    pub fn census(&mut self) -> Census {
        let mut queued: BTreeMap<(u32, u16), u64> = BTreeMap::new();
        let mut connections = 0;
        let mut unix = Vec::new();
        // Walk first, sweep after: a key deleted mid-walk restarts the kernel's iteration.
        for (sk, state) in self.conns.iter().filter_map(Result::ok) {
            if state.flags & conn_flags::UNIX != 0 {
                unix.push(sk);
            }
            connections += 1;
            if state.flags & conn_flags::QUEUED != 0 {
                *queued.entry((state.netns, state.port)).or_default() += 1;
            }
        }
        let mut unix_ended = 0;
        if let Some(sweep) = &self.unix {
            for sk in unix {
                if sweep.ended(sk) {
                    unix_ended += 1;
                }
            }
        }
        connections -= unix_ended;
        if unix_ended > 0 {
            log::debug!("{unix_ended} unix connections ended (their sockets are gone)");
        }
        let (h2_connections, h2_streams) = self.sweep_h2();
        Census {
            entries: vec![
                ("connections", connections),
                ("processes", self.stats.keys().count() as u64),
                ("request_series", self.reqs.keys().count() as u64),
                ("h2_connections", h2_connections),
                ("h2_streams", h2_streams),
                ("tls_threads", self.tls_calls.keys().count() as u64),
                ("tls_connections", self.ssl_conns.keys().count() as u64),
            ],
            queued,
        }
    }

    /// Frees HTTP/2 state whose connection is gone, which the kernel could not free with
    /// it: the walk's entry of a connection ended without a kernel event (a unix socket the
    /// sweep ended, an exited worker's), and open streams of ended connections beyond the
    /// newest eight the kernel looks up. Returns what is left: (connections, streams).
    fn sweep_h2(&mut self) -> (u64, u64) {
        let (mut connections, mut gone) = (0, Vec::new());
        for key in self.h2_conns.keys().filter_map(Result::ok) {
            if self.conns.get(&key, 0).is_ok() {
                connections += 1;
            } else {
                gone.push(key);
            }
        }
        for key in &gone {
            let _ = self.h2_conns.remove(key);
        }
        let h2_conns = &self.h2_conns;
        let (mut open, mut stale) = (0, Vec::new());
        for key in self.streams.keys().filter_map(Result::ok) {
            if h2_conns.get(&key.conn, 0).is_ok() {
                open += 1;
            } else {
                stale.push(key);
            }
        }
        for key in &stale {
            let _ = self.streams.remove(key);
        }
        (connections, open)
    }

    pub fn drops(&self) -> [u64; drop_reason::COUNT as usize] {
        let mut out = [0; drop_reason::COUNT as usize];
        for (reason, slot) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.drops.get(&(reason as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// The kernel program that ends a unix connection whose socket is gone, run on demand with
/// BPF_PROG_TEST_RUN (its bookkeeping must be the kernel's: the connection's counters are
/// per-CPU values the kernel programs write).
#[derive(Debug)]
pub struct UnixSweep {
    program: ProgramFd,
}

impl UnixSweep {
    pub fn new(program: ProgramFd) -> Self {
        Self { program }
    }

    /// Whether the connection of socket `sk` ended (and is now counted closed).
    pub fn ended(&self, sk: ConnKey) -> bool {
        match test_run_raw_tp(self.program.as_fd().as_raw_fd(), &[sk]) {
            Ok(ret) => ret == 1,
            Err(err) => {
                log::warn!("cannot run {}: {err}", names::UNIX_SWEEP);
                false
            }
        }
    }
}

/// BPF_PROG_TEST_RUN of a raw-tracepoint program with `args` as its arguments; its return
/// value. (aya runs a test only through the program object, which the probe keeps.)
fn test_run_raw_tp(prog_fd: i32, args: &[u64]) -> std::io::Result<u32> {
    /// `union bpf_attr`'s `test` member (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut attr = TestRun {
        prog_fd: prog_fd as u32,
        ctx_size_in: std::mem::size_of_val(args) as u32,
        ctx_in: args.as_ptr() as u64,
        ..TestRun::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size given; ctx_in points at `args`,
    // which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRun,
            std::mem::size_of::<TestRun>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.retval)
}

/// Every entry of a per-CPU hash, its CPUs' values added up with `add`.
fn summed<K: Pod + Ord, V: Pod + Default>(
    map: &PerCpuHashMap<MapData, K, V>,
    add: fn(&mut V, &V),
) -> BTreeMap<K, V> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| {
            let mut total = V::default();
            per_cpu.iter().for_each(|v| add(&mut total, v));
            (key, total)
        })
        .collect()
}
