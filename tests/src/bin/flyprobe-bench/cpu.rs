//! Section 1, the primary figure: the server's CPU time per request, pinned. The server runs
//! alone on CPU 0 and flyprobe on CPU 1, so flyprobe's daemon work never lands on the
//! server's CPU and what changes on CPU 0 is what the hooks add to the server's own work;
//! wrk (`-t1 -c32`) runs on CPU 1 too (`--layout split`, the default) or beside the server
//! (`--layout shared`). Per measurement: the CPU time of the server's processes over the
//! load, divided by the requests wrk completed. Every round measures every variant once, in
//! a shuffled order, and each variant is judged by its per-round ratio to the same round's
//! `none`: the median over rounds and a bootstrap 95% interval of it. An A/A control (`none`
//! measured twice per round) shows the run's resolution.

use std::{path::Path, process::Command, process::Stdio, time::Duration, time::Instant};

use anyhow::{Result, bail};
use flyprobe_tests::{flyprobe::Flyprobe, procs::Guard};

use super::{
    BenchArgs, Report, Script, WrkRun,
    server::{self, Server},
    stats::{self, Interval, Rng, Verdict},
    wrk,
};

/// The CPU the server is pinned to, and flyprobe's (wrk's depends on the layout).
pub const SERVER_CPU: u32 = 0;
pub const PROBE_CPU: u32 = 1;
const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 32;
/// Pause before each measurement, so a variant's start (or the previous one's exit) is
/// over when the load begins.
const SETTLE: Duration = Duration::from_secs(1);
/// A measurement is flagged when other work took more than this share of a CPU.
const NOISE_PCT: f64 = 2.0;

/// Where wrk runs. flyprobe always runs on CPU 1, away from the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Layout {
    /// wrk on CPU 1 with flyprobe: every request and response crosses CPUs (a wakeup IPI,
    /// in a VM a VM exit, whose cost varies with the host).
    Split,
    /// wrk on CPU 0 with the server: wakeups stay on the CPU.
    Shared,
}

impl Layout {
    pub fn wrk_cpu(self) -> u32 {
        match self {
            Self::Split => PROBE_CPU,
            Self::Shared => SERVER_CPU,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    None,
    /// `none` again: the A/A control.
    Again,
    Floor,
    Socket,
    /// The socket hooks without reading any payload byte (`--no-peek`): what the peeks cost.
    NoPeek,
    Syscall,
    Unwatched,
    /// The socket hooks with the OpenSSL uprobes (`--tls`): the TLS servers only.
    Tls,
}

impl Variant {
    pub const ALL: [Self; 8] = [
        Self::None,
        Self::Again,
        Self::Floor,
        Self::Socket,
        Self::NoPeek,
        Self::Syscall,
        Self::Unwatched,
        Self::Tls,
    ];

    /// Whether a server of `kind` is measured with this variant: a TLS server with the
    /// baseline, the control and the socket hooks with and without `--tls`; the others
    /// with everything but `--tls`.
    fn applies(self, kind: &Kind) -> bool {
        if kind.tls {
            matches!(self, Self::None | Self::Again | Self::Socket | Self::Tls)
        } else {
            self != Self::Tls
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Again => "a/a",
            Self::Floor => "floor",
            Self::Socket => "socket",
            Self::NoPeek => "no-peek",
            Self::Syscall => "syscall",
            Self::Unwatched => "unwatched",
            Self::Tls => "tls",
        }
    }

    fn legend(self) -> &'static str {
        match self {
            Self::None => "no flyprobe",
            Self::Again => {
                "no flyprobe, measured a second time in the round: the A/A control, whose \
                 interval is this run's resolution (its true added cost is 0)"
            }
            Self::Floor => {
                "`flyprobe --empty-hooks`: empty raw-tracepoint programs on sock_recv_length, \
                 sock_send_length and inet_sock_set_state (the cost floor of hooking them)"
            }
            Self::Socket => "`flyprobe --hooks socket --pid-tree SERVER`",
            Self::NoPeek => {
                "`flyprobe --hooks socket --no-peek --pid-tree SERVER`: the socket set reading no \
                 payload byte (method, status and protocol unknown): `socket` \
                 minus this is what the payload peeks cost"
            }
            Self::Syscall => "`flyprobe --hooks syscall --pid-tree SERVER`",
            Self::Unwatched => {
                "`flyprobe --hooks auto --pid-tree IDLE`: flyprobe watching an idle `sleep`, \
                 not the loaded server"
            }
            Self::Tls => {
                "`flyprobe --hooks socket --tls --pid-tree SERVER`: HTTPS requests seen through \
                 OpenSSL uprobes (TLS servers only)"
            }
        }
    }

    /// flyprobe's arguments for this variant (None: no flyprobe).
    fn flyprobe_args(self, server: u32, idle: u32) -> Option<Vec<String>> {
        let args: &[&str] = match self {
            Self::None | Self::Again => return None,
            Self::Floor => &["--empty-hooks", "--pid-tree"],
            Self::Socket => &["--hooks", "socket", "--pid-tree"],
            Self::NoPeek => &["--hooks", "socket", "--no-peek", "--pid-tree"],
            Self::Syscall => &["--hooks", "syscall", "--pid-tree"],
            Self::Unwatched => &["--hooks", "auto", "--pid-tree"],
            Self::Tls => &["--hooks", "socket", "--tls", "--pid-tree"],
        };
        let pid = if self == Self::Unwatched {
            idle
        } else {
            server
        };
        Some(
            args.iter()
                .map(|a| a.to_string())
                .chain([pid.to_string()])
                .collect(),
        )
    }
}

/// Whether `bin` accepts each variant's arguments. `--empty-hooks` is hidden from `--help`,
/// so rather than searching the help text, each variant's own arguments are given with
/// `--help` after them: clap parses (and validates the values of) what precedes `--help`,
/// then prints help and exits 0, or exits 2 on an argument it does not know.
pub fn supported(bin: &Path) -> Vec<(Variant, bool)> {
    Variant::ALL
        .iter()
        .map(|&v| {
            let ok = v.flyprobe_args(1, 1).is_none_or(|args| accepts(bin, &args));
            (v, ok)
        })
        .collect()
}

/// Whether `bin` accepts `args` (see `supported`).
pub fn accepts(bin: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> bool {
    Command::new(bin)
        .args(args)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A server measured in this section, and its targets (added CPU per request, %).
pub struct Kind {
    /// The `--only` name is `cpu-<key>`.
    pub key: &'static str,
    pub title: &'static str,
    pub start: fn() -> Result<Server>,
    pub socket_max: f64,
    /// socket's added cost must be at most this multiple of the floor's.
    pub floor_factor: Option<f64>,
    pub unwatched_max: Option<f64>,
    /// Served over TLS: measured with and without `--tls` (no target: `--tls` is opt-in,
    /// and this is its price).
    pub tls: bool,
}

pub const KINDS: [Kind; 4] = [
    Kind {
        key: "nginx",
        title: "nginx, 1 worker, small static file, keep-alive",
        start: || server::nginx(1, Some(SERVER_CPU)),
        socket_max: 3.0,
        floor_factor: Some(1.5),
        unwatched_max: Some(1.0),
        tls: false,
    },
    Kind {
        key: "nginx-tls",
        title: "nginx, 1 worker, small static file over TLS 1.3, keep-alive",
        start: || server::nginx_tls(1, Some(SERVER_CPU)),
        socket_max: 3.0,
        floor_factor: None,
        unwatched_max: None,
        tls: true,
    },
    Kind {
        key: "axum",
        title: "the workspace's axum server (tokio, 2 threads, both on CPU 0)",
        start: || server::axum(Some(SERVER_CPU)),
        socket_max: 3.0,
        floor_factor: Some(1.5),
        unwatched_max: None,
        tls: false,
    },
    Kind {
        key: "uvicorn",
        title: "uvicorn, 1 worker (tests/apps/bench_app.py, Starlette)",
        start: || server::uvicorn_single(Some(SERVER_CPU)),
        socket_max: 0.5,
        floor_factor: None,
        unwatched_max: None,
        tls: false,
    },
];

/// One measurement: a variant's load on the server.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Server CPU (user + system, all its processes), from the process CPU clocks.
    cpu_s: f64,
    /// The same from /proc/PID/stat, in whole clock ticks: the cross-check.
    tick_s: f64,
    requests: u64,
    wall_s: f64,
    /// flyprobe's own CPU (on CPU 1).
    daemon_s: f64,
    /// wrk's CPU (on CPU 1).
    wrk_s: f64,
    /// CPU 0's other work (tasks other than the server, and interrupts outside its
    /// context); its interrupts and softirqs, wherever charged; steal.
    other0_s: f64,
    irq0_s: f64,
    steal0_s: f64,
    /// CPU 1's tasks other than wrk and flyprobe.
    other1_s: f64,
    /// Tracing BPF programs loaded by someone else around the measurement.
    foreign_bpf: usize,
    errors: u64,
    /// Its position in the round's order.
    slot: usize,
}

impl Sample {
    fn us_per_req(&self) -> f64 {
        self.cpu_s * 1e6 / self.requests.max(1) as f64
    }

    fn pct(&self, s: f64) -> f64 {
        s.max(0.0) / self.wall_s * 100.0
    }

    /// Disturbed: other work on either CPU above the threshold, or someone else's tracing
    /// programs loaded (they would run in the server's syscalls too).
    fn noisy(&self) -> bool {
        self.pct(self.other0_s + self.steal0_s) > NOISE_PCT
            || self.pct(self.other1_s) > NOISE_PCT
            || self.foreign_bpf > 0
    }
}

fn tree_cpu(pids: &[u32]) -> Result<(u64, u64)> {
    let mut ns = 0;
    let mut ticks = 0;
    for &pid in pids {
        match (server::cpu_ns(pid), server::cpu_ticks(pid)) {
            (Some(n), Some(t)) => {
                ns += n;
                ticks += t;
            }
            _ => bail!("server process {pid} is gone"),
        }
    }
    Ok((ns, ticks))
}

/// CPU time of this process's waited-for children, in s: around one wrk run, wrk's own.
fn children_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Tracing programs loaded by anyone but `daemon` (our flyprobe, if any).
fn foreign_progs(daemon: Option<u32>) -> usize {
    let ours = daemon.map(server::owned_prog_ids).unwrap_or_default();
    server::tracing_prog_ids().difference(&ours).count()
}

fn measure(server: &Server, pids: &[u32], daemon: Option<u32>, args: &BenchArgs) -> Result<Sample> {
    let (layout, seconds, think_ms) = (args.layout, args.seconds, args.think_ms);
    let tck = server::ticks_per_second();
    let daemon_ns = || daemon.and_then(server::cpu_ns).unwrap_or(0);
    let foreign_before = foreign_progs(daemon);
    let (busy0, irq0, steal0) = server::cpu_stat(SERVER_CPU);
    let (busy1, irq1, steal1) = server::cpu_stat(PROBE_CPU);
    let (ns0, ticks0) = tree_cpu(pids)?;
    let d0 = daemon_ns();
    let w0 = children_cpu_s();
    let t0 = Instant::now();
    let load = wrk(
        &server.url(),
        &WrkRun {
            pin: Some(layout.wrk_cpu()),
            threads: WRK_THREADS,
            connections: WRK_CONNECTIONS,
            seconds,
            script: &Script::THROUGHPUT,
            think_ms,
        },
    )?;
    let wall_s = t0.elapsed().as_secs_f64();
    let wrk_s = children_cpu_s() - w0;
    let (ns1, ticks1) = tree_cpu(pids)?;
    let daemon_s = daemon_ns().saturating_sub(d0) as f64 / 1e9;
    let (busy0b, irq0b, steal0b) = server::cpu_stat(SERVER_CPU);
    let (busy1b, irq1b, steal1b) = server::cpu_stat(PROBE_CPU);
    let foreign_bpf = foreign_before.max(foreign_progs(daemon));
    let ticks = |a: u64, b: u64| b.saturating_sub(a) as f64 / tck;
    let wrk_on = |cpu: u32| if layout.wrk_cpu() == cpu { wrk_s } else { 0.0 };
    let cpu_s = (ns1 - ns0) as f64 / 1e9;
    Ok(Sample {
        cpu_s,
        tick_s: ticks(ticks0, ticks1),
        requests: load.completed,
        wall_s,
        daemon_s,
        wrk_s,
        // Interrupt time in a task's context is charged to the task (no
        // IRQ_TIME_ACCOUNTING here) but counted apart in /proc/stat: add it back.
        other0_s: ticks(busy0, busy0b) + ticks(irq0, irq0b) - cpu_s - wrk_on(SERVER_CPU),
        irq0_s: ticks(irq0, irq0b),
        steal0_s: ticks(steal0, steal0b),
        other1_s: ticks(busy1, busy1b) + ticks(irq1, irq1b) - wrk_on(PROBE_CPU) - daemon_s
            + ticks(steal1, steal1b),
        foreign_bpf,
        slot: 0,
        errors: load.errors,
    })
}

fn run_variant(
    v: Variant,
    server: &Server,
    pids: &[u32],
    idle: u32,
    args: &BenchArgs,
) -> Result<Sample> {
    let fp = v.flyprobe_args(server.pid(), idle).map(|fp_args| {
        let fp_args: Vec<&str> = fp_args.iter().map(String::as_str).collect();
        let cpu = PROBE_CPU.to_string();
        Flyprobe::start_via(&["taskset", "-c", &cpu], &fp_args)
    });
    std::thread::sleep(SETTLE);
    let sample = measure(server, pids, fp.as_ref().map(Flyprobe::pid), args);
    if let Some(fp) = fp {
        fp.stop();
    }
    sample
}

/// Every measurement, for a closer look: target/xtask/bench-cpu-<server>.csv.
fn write_csv(kind: &Kind, variants: &[Variant], samples: &[Vec<Sample>]) -> Result<()> {
    use std::fmt::Write as _;
    let mut csv = String::from(
        "round,slot,variant,us_per_req,requests,wall_s,cpu_s,tick_s,wrk_s,daemon_s,\
         cpu0_other_s,cpu0_irq_s,cpu0_steal_s,cpu1_other_s,foreign_bpf,errors\n",
    );
    for (v, rounds) in variants.iter().zip(samples) {
        for (k, s) in rounds.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{k},{},{},{:.4},{},{:.4},{:.6},{:.2},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{},{}",
                s.slot,
                v.name(),
                s.us_per_req(),
                s.requests,
                s.wall_s,
                s.cpu_s,
                s.tick_s,
                s.wrk_s,
                s.daemon_s,
                s.other0_s,
                s.irq0_s,
                s.steal0_s,
                s.other1_s,
                s.foreign_bpf,
                s.errors
            );
        }
    }
    let path = flyprobe_tests::workspace()
        .join("target/xtask")
        .join(format!("bench-cpu-{}.csv", kind.key));
    std::fs::write(&path, csv)?;
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{x:+.2}%")
}

pub fn interval_pct(iv: Interval) -> String {
    format!("{} [{}, {}]", pct(iv.median), pct(iv.lo), pct(iv.hi))
}

/// Markdown table rows, padded so the terminal shows aligned columns too.
pub fn table(r: &mut Report, rows: &[Vec<String>]) {
    let cols = rows[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&width)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        r.md(format!("| {} |", cells.join(" | ")));
        if i == 0 {
            let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
            r.md(format!("|-{}-|", rule.join("-|-")));
        }
    }
}

pub fn intro(r: &mut Report, args: &BenchArgs, support: &[(Variant, bool)]) {
    r.md(format!(
        "\n## 1. Server CPU per request, pinned ({} interleaved rounds of {} s per variant)\n",
        args.rounds, args.seconds
    ));
    let wrk = if args.think_ms > 0 {
        format!(
            "`wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}` (each connection pausing {} ms between \
             a response and its next request, `--think-ms`)",
            args.think_ms
        )
    } else {
        format!("`wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}`")
    };
    let placement = match args.layout {
        Layout::Split => format!(
            "The server runs alone on CPU {SERVER_CPU}; {wrk} and flyprobe run on CPU \
             {PROBE_CPU} (taskset; `--layout split`)."
        ),
        Layout::Shared => format!(
            "The server and {wrk} run on CPU {SERVER_CPU}, flyprobe on CPU {PROBE_CPU} \
             (taskset; `--layout shared`: no cross-CPU wakeups)."
        ),
    };
    r.md(format!(
        "{placement} A measurement is {} s of load (one wrk run): the server's CPU time (user \
         + system of all its processes, read at ns precision from their process CPU clocks; the \
         same sum /proc/PID/stat gives as utime + stime in ticks, shown as a cross-check) over \
         the load, divided by the requests wrk completed. Every round measures every variant \
         once, in shuffled order (seed {}); a variant's added cost is the median over rounds of \
         its ratio to the same round's `none`, with a bootstrap 95% interval of that median \
         ({} resamples of the rounds). A target is PASS only if the whole interval meets it, \
         FAIL if none of it does, else UNDECIDED. Measurements where other work took more than \
         {NOISE_PCT}% of a CPU, or someone else's tracing BPF programs were loaded, are marked \
         `!`.\n",
        args.seconds,
        args.seed,
        stats::RESAMPLES
    ));
    if args.rounds < 10 {
        r.md(format!(
            "**Only {} rounds: bootstrap intervals from so few rounds are not reliable (a smoke \
             run); the default is 15.**\n",
            args.rounds
        ));
    }
    for (v, ok) in support {
        let note = if *ok {
            String::new()
        } else {
            " — **SKIPPED: this flyprobe binary does not accept these arguments**".to_string()
        };
        r.md(format!("- `{}`: {}{note}", v.name(), v.legend()));
    }
    let missing: Vec<&str> = support
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(v, _)| v.name())
        .collect();
    if !missing.is_empty() {
        let msg = format!(
            "NOTE: variants {} SKIPPED: the flyprobe binary does not accept their flags \
             (--hooks / --empty-hooks); their targets are not judged in this run",
            missing.join(", ")
        );
        eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
        r.md(format!("\n**{msg}.**"));
    }
}

pub fn section(
    r: &mut Report,
    args: &BenchArgs,
    kind: &Kind,
    support: &[(Variant, bool)],
) -> Result<()> {
    let variants: Vec<Variant> = support
        .iter()
        .filter(|(v, ok)| *ok && v.applies(kind))
        .map(|(v, _)| *v)
        .collect();
    r.md(format!("\n### 1.{} {}\n", kind.key, kind.title));
    let server = (kind.start)()?;
    let idle = Guard::spawn("sleep", Command::new("sleep").arg("infinity"));
    // Warm-up: caches, lazily built state, the first connections.
    wrk(
        &server.url(),
        &WrkRun {
            pin: Some(args.layout.wrk_cpu()),
            threads: WRK_THREADS,
            connections: WRK_CONNECTIONS,
            seconds: 2,
            script: &Script::THROUGHPUT,
            think_ms: args.think_ms,
        },
    )?;
    let pids = server.tree();
    let seed = args.seed
        ^ kind
            .key
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(8) ^ u64::from(b));
    let mut rng = Rng::new(seed);
    // samples[i][round] for variants[i]
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    let mut noisy = 0;
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        rng.shuffle(&mut order);
        for (slot, &i) in order.iter().enumerate() {
            let s = run_variant(variants[i], &server, &pids, idle.pid(), args)?;
            samples[i].push(Sample { slot, ..s });
        }
        let base = samples[0][round].us_per_req();
        let cells: Vec<String> = variants
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = &samples[i][round];
                let mark = if s.noisy() { "!" } else { "" };
                if s.noisy() {
                    noisy += 1;
                }
                let err = if s.errors > 0 {
                    format!(" {} wrk errors", s.errors)
                } else {
                    String::new()
                };
                if i == 0 {
                    format!("{} {:.2}{mark}{err}", v.name(), s.us_per_req())
                } else {
                    format!(
                        "{} {:.2} {}{mark}{err}",
                        v.name(),
                        s.us_per_req(),
                        pct((s.us_per_req() / base - 1.0) * 100.0)
                    )
                }
            })
            .collect();
        let order_names: Vec<&str> = order.iter().map(|&i| variants[i].name()).collect();
        r.code(format!(
            "round {round:>2} µs/req: {}   (order {})",
            cells.join(" | "),
            order_names.join(",")
        ));
    }
    write_csv(kind, &variants, &samples)?;
    anyhow::ensure!(
        server.tree() == pids,
        "the server's processes changed during the rounds: {pids:?} -> {:?}",
        server.tree()
    );

    // Per-variant figures.
    let per = |i: usize, f: &dyn Fn(&Sample) -> f64| -> f64 {
        stats::median(&samples[i].iter().map(f).collect::<Vec<_>>())
    };
    let ratios = |i: usize| -> Vec<f64> {
        (0..args.rounds)
            .map(|k| samples[i][k].us_per_req() / samples[0][k].us_per_req())
            .collect()
    };
    let added = |i: usize| stats::bootstrap_median(&ratios(i)).map(|x| (x - 1.0) * 100.0);
    let index = |v: Variant| variants.iter().position(|&x| x == v);

    let mut rows = vec![
        [
            "variant",
            "CPU µs/req (median)",
            "added % (median, 95% CI)",
            "target",
            "verdict",
            "req/s (median)",
            "server CPU %",
            "wrk CPU %",
            "flyprobe µs/req",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in Variant::ALL.into_iter().filter(|v| v.applies(kind)) {
        let target = match v {
            Variant::Socket => Some(kind.socket_max),
            Variant::Unwatched => kind.unwatched_max,
            _ => None,
        };
        let target_cell = target.map_or("—".to_string(), |t| format!("≤ {t}%"));
        let what = format!("{}: {} added CPU per request", kind.key, v.name());
        let Some(i) = index(v) else {
            if target.is_some() {
                r.skip(&what);
            }
            let verdict = if target.is_some() {
                "SKIPPED"
            } else {
                "skipped"
            };
            rows.push(vec![
                v.name().into(),
                "—".into(),
                "—".into(),
                target_cell,
                verdict.into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ]);
            continue;
        };
        let (added_cell, verdict_cell) = if v == Variant::None {
            ("(baseline)".to_string(), String::new())
        } else {
            let iv = added(i);
            let verdict = target.map_or(String::new(), |t| {
                let verdict = Verdict::at_most(iv, t);
                r.record(&what, verdict);
                verdict.label().to_string()
            });
            (interval_pct(iv), verdict)
        };
        rows.push(vec![
            v.name().into(),
            format!("{:.3}", per(i, &|s| s.us_per_req())),
            added_cell,
            target_cell,
            verdict_cell,
            format!("{:.0}", per(i, &|s| s.requests as f64 / s.wall_s)),
            format!("{:.1}", per(i, &|s| s.pct(s.cpu_s))),
            format!("{:.1}", per(i, &|s| s.pct(s.wrk_s))),
            if matches!(v, Variant::None | Variant::Again) {
                "—".into()
            } else {
                format!(
                    "{:.3}",
                    per(i, &|s| s.daemon_s * 1e6 / s.requests.max(1) as f64)
                )
            },
        ]);
    }
    r.md("");
    table(r, &rows);
    r.md("");
    if let Some(i) = index(Variant::Again) {
        let iv = added(i);
        // The interval narrows with the square root of the rounds.
        let half = (iv.hi - iv.lo) / 2.0;
        let for_half_pct = (args.rounds as f64 * (half / 0.5).powi(2)).ceil();
        r.code(format!(
            "resolution: the A/A control (no flyprobe either time) reads {} [{}, {}]: \
             intervals this wide come from the machine, not from flyprobe; ±0.5% would take \
             about {for_half_pct:.0} rounds",
            pct(iv.median),
            pct(iv.lo),
            pct(iv.hi)
        ));
        if iv.lo > 0.0 || iv.hi < 0.0 {
            r.code(
                "WARNING: the A/A interval excludes 0, which no real difference explains: this \
                 run's intervals understate its noise (too few rounds, or drift); do not trust \
                 its verdicts",
            );
        }
    }

    // socket against the floor: per round, socket's added % minus factor x floor's.
    if let Some(factor) = kind.floor_factor {
        let what = format!("{}: socket added <= {factor} x floor added", kind.key);
        match (index(Variant::Socket), index(Variant::Floor)) {
            (Some(s), Some(f)) => {
                let (rs, rf) = (ratios(s), ratios(f));
                let d: Vec<f64> = rs
                    .iter()
                    .zip(&rf)
                    .map(|(a, b)| (a - 1.0) * 100.0 - factor * (b - 1.0) * 100.0)
                    .collect();
                let iv = stats::bootstrap_median(&d);
                let verdict = Verdict::at_most(iv, 0.0);
                r.record(&what, verdict);
                r.code(format!(
                    "{}  {what}: socket added − {factor} × floor added, per round, median {:+.2} \
                     points [{:+.2}, {:+.2}] (target ≤ 0)",
                    verdict.label(),
                    iv.median,
                    iv.lo,
                    iv.hi
                ));
            }
            _ => {
                r.skip(&what);
                r.code(format!(
                    "SKIPPED  {what}: needs the socket and floor variants"
                ));
            }
        }
    }

    // What the payload peeks cost: per round, socket's CPU per request over no-peek's.
    if let (Some(s), Some(n)) = (index(Variant::Socket), index(Variant::NoPeek)) {
        let d: Vec<f64> = (0..args.rounds)
            .map(|k| (samples[s][k].us_per_req() / samples[n][k].us_per_req() - 1.0) * 100.0)
            .collect();
        let iv = stats::bootstrap_median(&d);
        r.code(format!(
            "peeks: socket over no-peek, per round, median {:+.2}% [{:+.2}, {:+.2}] (the CPU per \
             request that reading the method and status adds; informational)",
            iv.median, iv.lo, iv.hi
        ));
    }

    // Cross-check against /proc/PID/stat's ticks, and the noise on CPU 0.
    let tck = server::ticks_per_second();
    let tick_us = stats::median(
        &samples[0]
            .iter()
            .map(|s| s.tick_s * 1e6 / s.requests.max(1) as f64)
            .collect::<Vec<_>>(),
    );
    let ticks_per_round = per(0, &|s| s.tick_s * tck);
    r.code(format!(
        "cross-check: none from /proc/PID/stat utime+stime ({tck} ticks/s): median {tick_us:.3} \
         µs/req vs {:.3} from the CPU clocks; one tick is {:.2}% of a round's server CPU ({:.0} ticks)",
        per(0, &|s| s.us_per_req()),
        100.0 / ticks_per_round.max(1.0),
        ticks_per_round
    ));
    let all: Vec<&Sample> = samples.iter().flatten().collect();
    let med =
        |f: &dyn Fn(&Sample) -> f64| stats::median(&all.iter().map(|s| f(s)).collect::<Vec<_>>());
    r.code(format!(
        "medians over all measurements: CPU {SERVER_CPU}: server {:.1}%, other tasks {:.2}%, \
         irq+softirq {:.2}%, steal {:.2}% | wrk (CPU {}) {:.1}% | CPU {PROBE_CPU}: flyprobe \
         {:.2}%, other tasks and steal {:.2}%",
        med(&|s| s.pct(s.cpu_s)),
        med(&|s| s.pct(s.other0_s)),
        med(&|s| s.pct(s.irq0_s)),
        med(&|s| s.pct(s.steal0_s)),
        args.layout.wrk_cpu(),
        med(&|s| s.pct(s.wrk_s)),
        med(&|s| s.pct(s.daemon_s)),
        med(&|s| s.pct(s.other1_s)),
    ));
    let foreign = all.iter().filter(|s| s.foreign_bpf > 0).count();
    r.code(format!(
        "{noisy} of {} measurements disturbed (`!`: other work over {NOISE_PCT}% of a CPU, or \
         someone else's tracing BPF programs loaded: {foreign})",
        all.len()
    ));
    let errors: u64 = all.iter().map(|s| s.errors).sum();
    if errors > 0 {
        r.code(format!(
            "WARNING: wrk reported {errors} errors over the rounds"
        ));
    }
    drop(idle);
    drop(server);
    Ok(())
}
