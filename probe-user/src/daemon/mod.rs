//! Start-up in the order that fails fastest on bad input, then the run loop.

mod selftest;
mod ticker;

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use aya::maps::{MapData, RingBuf};

use crate::{
    cli::{Cli, Hooks},
    error::StartError,
    expose::access_log,
    expose::endpoint,
    expose::metrics,
    expose::web_config::WebConfig,
    kernel::borrowed,
    kernel::maps::KernelMaps,
    kernel::memory,
    kernel::openssl::OpenSsl,
    kernel::probe::{
        HandshakeDrops, HookSet, Limits, Options, Probe, Rings, SocketOffsets, pid_slots,
    },
    kernel::tracefs,
    model::persist::PinDir,
    model::state::{Shared, State},
    model::watched::Watched,
    privileges,
    processes::selectors::Selectors,
};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The other sets read the payload another way, which the flag does not turn off.
    if cli.no_peek && cli.hooks != Hooks::Socket {
        anyhow::bail!("--no-peek applies to the socket set only: add --hooks socket");
    }
    // The fentry and syscall sets have no raw programs on the socket events to toggle.
    if cli.bench_toggle && !matches!(cli.hooks, Hooks::Socket | Hooks::Auto) {
        anyhow::bail!("--bench-toggle applies to the socket set only: add --hooks socket");
    }
    check_pid_namespace()?;
    raise_fd_limit();
    crate::processes::kubelet::set_log_dir(cli.kubelet_log_dir.clone());
    let mut watched = Watched::discover(&cli.pid_tree, cli.server_name.as_deref())?;
    let selectors = Selectors::new(&cli.port, &cli.comm, &cli.cgroup, cli.all_listeners);
    privileges::check()?;
    let web = match &cli.web_config {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::none(),
    };
    let listener = bind(cli.listen)?;
    tracefs::ensure_mounted(&cli.tracefs)?;

    let limits = Limits {
        max_connections: cli.max_connections,
        max_processes: cli.max_processes,
        max_request_series: cli.max_request_series,
        tls: cli.tls,
    };
    let pins = cli
        .pin_path
        .as_deref()
        .map(|dir| PinDir::prepare(dir, &limits))
        .transpose()?;

    let access_log = cli
        .access_log
        .as_deref()
        .map(access_log::open)
        .transpose()?;

    let options = |hooks| Options {
        limits: Limits {
            max_connections: cli.max_connections,
            max_processes: cli.max_processes,
            max_request_series: cli.max_request_series,
            tls: cli.tls,
        },
        hooks,
        empty_hooks: cli.empty_hooks,
        no_peek: cli.no_peek,
        classic_lifecycle: cli.classic_lifecycle,
        access_log: access_log.is_some(),
        calibration: cli.calibration_probe,
        required: cli.require_tracepoint.clone(),
        exec_events: selectors.wants_exec_events(),
        listen_events: selectors.wants_listen_events(),
        pins: pins.as_ref().map(PinDir::maps).unwrap_or_default(),
        tls: cli.tls,
    };
    let (probe, mut maps, rings) = attach(&cli, options)?;
    let cpus = memory::possible_cpus();
    let bounds = memory::bounds(&limits, pid_slots());
    let bound = memory::bound_bytes(&bounds, cpus);
    let largest = bounds
        .iter()
        .max_by_key(|b| b.bytes(cpus))
        .map_or("", |b| b.name);
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    log::info!(
        "kernel maps: at most {:.1} MiB with {cpus} possible CPUs, most of it {largest} \
         (--max-connections {}, --max-processes {}, --max-request-series {}, pid_max {})",
        mib(bound),
        limits.max_connections,
        limits.max_processes,
        limits.max_request_series,
        pid_slots()
    );

    // Programs are attached, so forks from here on are tracked by the kernel. Seed the ones
    // that exist, then scan once more for any forked before their parent was seeded.
    let mut seeded = 0;
    for pid in watched.members().keys().copied().collect::<Vec<_>>() {
        maps.track(pid).context("seeding the target set")?;
        seeded += 1;
    }
    for pid in watched.rescan() {
        maps.track(pid).context("seeding the target set")?;
        seeded += 1;
    }
    // A root that died before its programs were attached left no exit event: say so now
    // rather than serve a server that never was.
    if let Some(pid) = watched.exited_root() {
        return Err(StartError::ExitedDuringStartup { pid }.into());
    }
    for root in watched.roots() {
        log::info!(
            "watching {} (pid {}) and its descendants",
            root.server,
            root.pid
        );
    }
    log::info!(
        "attached {} programs ({} hooks) to {} tracepoints and kernel functions; tracking \
         {seeded} processes",
        probe.program_count(),
        probe.hooks.name(),
        probe.links,
    );

    let borrow_refused = borrowed::refused_here();
    let mut state = State {
        maps,
        watched,
        map_entries: Vec::new(),
        listeners: Default::default(),
        queued: Default::default(),
        retired_ports: Default::default(),
        overflows: Default::default(),
        map_memory: Default::default(),
        map_names: Default::default(),
        unknown_since: Default::default(),
        selectors,
        server_name: cli.server_name.clone(),
        since_scan: 0,
        pins,
        hooks: probe.hooks.name(),
        retention: cli.worker_retention,
        kernel_events: [0; 3],
        overflow_correction: probe.handshake_drops.is_some(),
        probe: None,
        openssl: cli.tls.then(OpenSsl::new),
        announced: Default::default(),
        borrow_listeners: borrow_refused.is_none(),
    };
    if !state.overflow_correction {
        log::info!(
            "server_listen_overflows_total per listener needs skb:kfree_skb with rx_sk \
             (Linux >= 6.11, fentry or socket hooks) or, before, the fentry hooks' fexit on \
             tcp_check_req: here it is exported only where a server's port is the only one \
             listening in its network namespace (a pod), from that namespace's ListenDrops"
        );
    } else {
        log::info!(
            "packets discarded on a listener, which its drop counter holds besides the \
             overflows: {}",
            match probe.handshake_drops {
                Some(HandshakeDrops::FreedOnListener { named: true }) =>
                    "skb:kfree_skb on a listener with reason TCP_LISTEN_OVERFLOW or \
                     NOT_SPECIFIED",
                Some(HandshakeDrops::FreedOnListener { named: false }) =>
                    "skb:kfree_skb on a listener with reason NOT_SPECIFIED (TCP_LISTEN_OVERFLOW \
                     too from Linux 6.15)",
                Some(HandshakeDrops::NoChild) | None =>
                    "fexit on tcp_check_req returning no child, the packet then discarded on \
                     the listener (skb:kfree_skb has no rx_sk before Linux 6.11)",
            }
        );
    }
    if state.borrow_listeners {
        log::info!(
            "accept queues of servers in other network namespaces: read from their \
             listening sockets, borrowed for a moment (pidfd_getfd)"
        );
    } else if let Some(why) = &borrow_refused {
        log::info!(
            "accept queues of servers in other network namespaces: from /proc, without \
             their limit ({why})"
        );
    }
    state.seed_listeners();
    if !state.selectors.is_empty() {
        // Discovery events flow from here on; catch what runs already.
        let found = state.scan();
        log::info!("node-wide selectors matched {found} running servers");
    }
    if let Some(pins) = &state.pins {
        match pins.load() {
            Some(ledger) => {
                let (n, alive) = state.watched.restore(&ledger, std::time::Instant::now());
                for pid in alive {
                    state.maps.track(pid).context("seeding the target set")?;
                }
                log::info!(
                    "continuing from the maps pinned under {} and {}: {n} watched roots carried over",
                    pins.dir().display(),
                    pins.ledger_path().display()
                );
            }
            None => log::info!("pinning maps under {}", pins.dir().display()),
        }
    }
    if cli.tls {
        log::info!(
            "TLS: OpenSSL uprobes loaded; attached to each libssl the watched processes map \
             (HTTPS plaintext is counted as http1 over TLS, protocol=\"https\", or h2)"
        );
    }
    if cli.bench_toggle {
        // auto may have taken the fentry set, whose data path is fexit programs: toggling
        // only its connection program would measure something else.
        if probe.hooks != HookSet::Socket {
            anyhow::bail!(
                "--bench-toggle applies to the socket set only ({} hooks attached): add --hooks \
                 socket",
                probe.hooks.name()
            );
        }
        log::warn!(
            "--bench-toggle: SIGUSR1 detaches the {} programs on the socket events, SIGUSR2 \
             attaches them again (benchmarks only: counts are not exact meanwhile)",
            probe.data_path_links()
        );
    }
    state.probe = Some(probe);
    state.sweep(); // classify workers before the first scrape (and find their libssl)
    let kept =
        privileges::drop_unneeded(cli.tls).context("giving up capabilities after attaching")?;
    let mut kept: Vec<String> = kept.iter().map(ToString::to_string).collect();
    kept.sort();
    log::info!(
        "programs attached; capabilities dropped to [{}]",
        kept.join(", ")
    );
    // Start-up's BTF parses are freed: their pages go back to the system, not into RSS.
    ticker::release_free_heap();
    let state = Shared::new(state);
    let shared_for_exit = state.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let Rings {
        events: ring,
        discoveries,
        access: access_ring,
    } = rings;
    let access = access_log.map(|sink| (access_ring, sink));
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    log::info!(
        "serving {scheme}://{}/ (dashboard), /metrics, /api/v1/snapshot{}",
        cli.listen,
        if web.auth.is_some() {
            "; authentication required"
        } else {
            ""
        }
    );
    let result = runtime.block_on(serve(
        listener,
        web,
        (ring, discoveries),
        access,
        state,
        cli.exit_with_target,
        cli.bench_toggle,
    ));
    shared_for_exit.save_ledger();
    let probe = shared_for_exit.take_probe();
    let links = probe.as_ref().map_or(0, |p| p.links);
    drop(probe);
    if result.is_ok() {
        log::info!("detached {links} tracepoint links; bye");
    }
    result
}

async fn serve(
    listener: std::net::TcpListener,
    web: WebConfig,
    (ring, discoveries): (RingBuf<MapData>, RingBuf<MapData>),
    access: Option<(RingBuf<MapData>, access_log::Sink)>,
    state: Shared,
    exit_with_target: bool,
    bench_toggle: bool,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).context("listening socket")?;
    let registry = metrics::registry(state.clone()).context("building the metrics registry")?;
    let router = endpoint::router(registry, state.clone(), web.auth.clone());
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let access_log = async move {
        match access {
            Some((ring, sink)) => access_log::pump(ring, sink).await,
            None => std::future::pending().await,
        }
    };
    let toggled = state.clone();
    let toggle = async move {
        if bench_toggle {
            toggle_data_path(toggled).await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        r = endpoint::serve(listener, router, web) => r.context("serving metrics")?,
        r = toggle => r.context("--bench-toggle")?,
        r = ticker::pump(discoveries, state.clone()) => r.context("reading discovery events")?,
        r = access_log => r.context("writing the access log")?,
        r = ticker::run(ring, state, |s| exit_with_target && s.all_roots_exited()) => {
            r.context("reading kernel events")?;
            log::info!("every watched root has exited (--exit-with-target): shutting down");
        }
        _ = sigterm.recv() => log::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => log::info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// `--bench-toggle`: SIGUSR1 detaches the programs on the socket events, SIGUSR2 attaches
/// them again, each logged (the benchmark waits for the line before it measures). The
/// handlers exist from the first poll of `serve`, before the first scrape is answered: a
/// caller that waits for /metrics cannot signal too early. The state's lock is held over
/// the three link calls (a few ms; benchmarks only).
async fn toggle_data_path(state: Shared) -> anyhow::Result<()> {
    let mut off = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let mut on = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    loop {
        let attached = tokio::select! {
            _ = off.recv() => false,
            _ = on.recv() => true,
        };
        let changed = state.set_data_path(attached)?;
        let now = if attached { "attached" } else { "detached" };
        log::info!("--bench-toggle: programs on the socket events {now} ({changed} links)");
    }
}

/// Load and attach the hook set `--hooks` asks for. `auto` takes the first of fentry, socket
/// that the kernel has and that passes its self-test, else the syscall hooks, and says why.
fn attach(
    cli: &Cli,
    options: impl Fn(HookSet) -> Options,
) -> anyhow::Result<(Probe, KernelMaps, Rings)> {
    let load = |hooks: HookSet| -> anyhow::Result<(Probe, KernelMaps, Rings)> {
        let mut probe = Probe::load(&cli.tracefs, &options(hooks))
            .with_context(|| format!("starting the eBPF probe ({} hooks)", hooks.name()))?;
        let (maps, rings) = probe.take_maps().context("opening the probe's maps")?;
        Ok((probe, maps, rings))
    };
    // A socket-keyed set: what the kernel must have, then a load, then the self-test.
    let socket_keyed = |set: HookSet| -> anyhow::Result<(Probe, KernelMaps, Rings)> {
        let (probe, mut maps, rings) = match set {
            HookSet::Fentry => SocketOffsets::probe_fentry(&cli.tracefs).map(|_| ()),
            _ => SocketOffsets::probe(&cli.tracefs).map(|_| ()),
        }
        .map_err(anyhow::Error::new)
        .and_then(|()| load(set))?;
        if cli.empty_hooks {
            log::info!(
                "hooks: empty programs on the {} set's events only (--empty-hooks)",
                set.name()
            );
            return Ok((probe, maps, rings));
        }
        if cli.no_peek {
            log::warn!(
                "hooks: {} set without payload peeks (--no-peek): no self-test; method, status \
                 and protocol are not read",
                set.name()
            );
            return Ok((probe, maps, rings));
        }
        selftest::run(&mut maps).context("the self-test failed")?;
        let how = match set {
            HookSet::Fentry => "fexit on tcp_recvmsg and tcp_sendmsg",
            _ => "raw socket tracepoints",
        };
        log::info!(
            "hooks: {} ({how}; self-test passed: one loopback GET seen with its method and \
             status)",
            set.name()
        );
        Ok((probe, maps, rings))
    };
    match cli.hooks {
        Hooks::Syscall => {
            log::info!("hooks: syscall (--hooks syscall)");
            load(HookSet::Syscall)
        }
        Hooks::Fentry => socket_keyed(HookSet::Fentry).context(
            "--hooks fentry (use --hooks auto to fall back to the socket or syscall hooks)",
        ),
        Hooks::Socket => socket_keyed(HookSet::Socket)
            .context("--hooks socket (use --hooks auto to fall back to the syscall hooks)"),
        Hooks::Auto => {
            for set in [HookSet::Fentry, HookSet::Socket] {
                match socket_keyed(set) {
                    Ok(attached) => return Ok(attached),
                    Err(err) => {
                        log::info!("hooks: not {} ({})", set.name(), why_not(&err));
                        log::debug!("hooks: {} failed with: {err:#}", set.name());
                    }
                }
            }
            log::info!("hooks: syscall (neither the fentry nor the socket hooks work here)");
            load(HookSet::Syscall)
        }
    }
}

/// The kernel's programs report PIDs of the initial PID namespace; from a child namespace
/// (a sidecar without hostPID, `unshare --pid`) the daemon would look them up in the wrong
/// one and report nothing. Refuse rather than serve zeros that look like an idle server.
fn check_pid_namespace() -> Result<(), StartError> {
    // PROC_PID_INIT_INO: the initial PID namespace's fixed inode (include/linux/proc_ns.h).
    const INITIAL: &str = "pid:[4026531836]";
    match std::fs::read_link("/proc/self/ns/pid") {
        Ok(link) if link.as_os_str() != INITIAL => Err(StartError::PidNamespace {
            ns: link.display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// Why `auto` passed over a hook set, in one short clause (the whole chain is at debug level):
/// an expected refusal is not an error line in the log.
fn why_not(err: &anyhow::Error) -> String {
    let full = format!("{err:#}");
    if full.contains("Operation not permitted") {
        return "the kernel refused to load its programs: EPERM".into();
    }
    let reason = full.split(". Verifier output").next().unwrap_or(&full);
    reason.replace(" (os error ", " (errno ")
}

/// Scrapers, dashboards and /proc walks all take descriptors: use the hard limit, not the
/// soft default of 1024, so a burst of connections does not starve the /proc reads.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        log::debug!("raising the open-file limit to {hard}: {err}");
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartError::ListenInUse { addr }
        } else {
            StartError::Listen { addr, source }
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Listen { addr, source })?;
    Ok(listener)
}
