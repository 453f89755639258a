//! `flyprobe-bench`, run by `cargo xtask bench` (which builds it and what it measures first):
//! what flyprobe costs, measured side by side in one run. Variants are
//! interleaved within every round (in a shuffled order), so drift on a noisy machine hits
//! all of them; every figure is a median of per-round ratios to the same round's `none`,
//! with a bootstrap 95% interval, and a target is PASS only when the whole interval meets
//! it. The primary figure (section 1) is the server's CPU time per request with the server
//! pinned to its own CPU; saturation throughput, accuracy, per-hook cost and the daemon's
//! footprint follow. The report (markdown) goes to bench/results.md, or `--out`.

mod cpu;
mod paired;
mod profile;
mod server;
mod soak;
mod stats;

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use flyprobe_tests::{client::Conn, eventually, flyprobe::Flyprobe, workspace};
use server::Server;
use stats::{Interval, Rng, Verdict};

/// The sections `--only` selects, in the order they run.
const SECTIONS: [&str; 21] = [
    "cpu",
    "cpu-nginx",
    "cpu-nginx-tls",
    "cpu-axum",
    "cpu-uvicorn",
    "windows",
    "windows-nginx",
    "windows-axum",
    "windows-uvicorn",
    "profile",
    "profile-nginx",
    "profile-axum",
    "profile-uvicorn",
    "hyper",
    "nginx",
    "uvicorn",
    "untracked",
    "hooks",
    "idle",
    "scrape",
    "soak",
];

/// Sections that run only when `--only` names them (long, and not a cost comparison).
const ON_REQUEST: [&str; 1] = ["soak"];

/// Measure flyprobe's overhead side by side (see README, Benchmarks). Run it with `cargo
/// xtask bench`, which builds the binaries it measures first.
#[derive(Parser)]
#[command(name = "flyprobe-bench")]
pub struct BenchArgs {
    /// Interleaved rounds (each round measures every variant of a section once).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Seconds of load per measurement (section 1 wants >= 5).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Section 1: where wrk runs; the server is on CPU 0 and flyprobe on CPU 1 either way.
    #[arg(long, value_enum, default_value_t = cpu::Layout::Split)]
    layout: cpu::Layout,
    /// Section 1: each wrk connection waits this many ms after a response before its next
    /// request (0: none, wrk closed-loop as fast as it can).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    think_ms: u64,
    /// Section 1w: pairs of windows per variant (each pair ~1.3 s).
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// wrk connections for the saturation sections (section 1 uses -t1 -c32, pinned).
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Run only these sections: cpu (= cpu-nginx, cpu-nginx-tls, cpu-axum, cpu-uvicorn),
    /// windows (= windows-nginx, windows-axum, windows-uvicorn), profile (= profile-nginx,
    /// profile-axum, profile-uvicorn), hyper, nginx,
    /// uvicorn, untracked, hooks, idle, scrape; and soak, which runs only when named here.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Length of the soak (`--only soak`).
    #[arg(long, default_value_t = 10, value_name = "MINUTES")]
    soak_minutes: u64,
    /// Where the report goes (default: bench/results.md in the workspace; bench/soak.md
    /// for `--only soak`, with its plot beside it as soak.svg).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Seed of the round orders (the bootstrap has a fixed seed of its own).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measure this flyprobe binary (e.g. a saved baseline) instead of target/release's.
    #[arg(long, value_name = "FILE")]
    flyprobe: Option<PathBuf>,
}

/// wrk's view of one load.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p99_ms: f64,
    completed: u64,
    /// Connect, read, write, timeout errors and non-2xx/3xx responses.
    errors: u64,
}

/// A wrk Lua script, written to target/xtask/<name>.
struct Script {
    name: &'static str,
    body: &'static str,
}

const DONE: &str = r#"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FLYPROBE_COMPLETED %d\nFLYPROBE_P99_US %.1f\nFLYPROBE_ERRORS %d\n",
    summary.requests, latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

impl Script {
    /// wrk's own request generation, plus its count, p99 and errors in parseable lines.
    const THROUGHPUT: Self = Self {
        name: "bench-throughput.lua",
        body: "",
    };
    /// Each wrk thread sends a fixed budget of requests, then goes quiet, so when wrk stops
    /// no request is half-way and its count of completed requests is exact.
    const BUDGET: Self = Self {
        name: "bench-budget.lua",
        body: r#"
budget = 5000
sent = 0
function request()
  if sent >= budget then return "" end
  sent = sent + 1
  return wrk.format(nil, nil)
end
"#,
    };
}

/// One wrk invocation.
struct WrkRun<'a> {
    /// `taskset -c CPU`, or unpinned.
    pin: Option<u32>,
    threads: u32,
    connections: u32,
    seconds: u64,
    script: &'a Script,
    /// Each connection waits this long after a response before its next request (wrk's
    /// `delay()`), 0 for none.
    think_ms: u64,
}

fn wrk(url: &str, w: &WrkRun) -> Result<Load> {
    let path = workspace().join("target/xtask").join(w.script.name);
    fs::create_dir_all(path.parent().unwrap())?;
    let think = if w.think_ms > 0 {
        format!("function delay() return {} end\n", w.think_ms)
    } else {
        String::new()
    };
    fs::write(&path, format!("{}\n{think}{DONE}", w.script.body))?;
    let mut cmd = match w.pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "wrk"]);
            c
        }
        None => Command::new("wrk"),
    };
    let out = cmd
        .args([format!("-t{}", w.threads), format!("-c{}", w.connections)])
        .args([format!("-d{}s", w.seconds), "-s".into()])
        .arg(&path)
        .arg(url)
        .output()
        .context("running wrk (installed by `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "wrk failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("wrk printed no {key}:\n{text}"))
    };
    Ok(Load {
        rps: field("Requests/sec:")?,
        p99_ms: field("FLYPROBE_P99_US")? / 1000.0,
        completed: field("FLYPROBE_COMPLETED")? as u64,
        errors: field("FLYPROBE_ERRORS")? as u64,
    })
}

/// The saturation load: `wrk -t2 -c<connections>`, unpinned.
fn saturate(server: &Server, args: &BenchArgs) -> Result<Load> {
    saturate_url(&server.url(), args)
}

fn saturate_url(url: &str, args: &BenchArgs) -> Result<Load> {
    wrk(
        url,
        &WrkRun {
            pin: None,
            threads: 2,
            connections: args.connections,
            seconds: args.seconds,
            script: &Script::THROUGHPUT,
            think_ms: 0,
        },
    )
}

fn status_kb(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The report: markdown prose and tables, with measurement lines in code blocks. The
/// terminal gets the same lines without the fences.
struct Report {
    text: String,
    fenced: bool,
    passed: usize,
    failed: Vec<String>,
    undecided: Vec<String>,
    skipped: Vec<String>,
}

impl Report {
    fn new() -> Self {
        Self {
            text: String::new(),
            fenced: false,
            passed: 0,
            failed: Vec::new(),
            undecided: Vec::new(),
            skipped: Vec::new(),
        }
    }

    fn fence(&mut self, open: bool) {
        if self.fenced != open {
            self.text.push_str("```\n");
            self.fenced = open;
        }
    }

    /// A markdown line.
    fn md(&mut self, s: impl AsRef<str>) {
        self.fence(false);
        println!("{}", s.as_ref());
        let _ = writeln!(self.text, "{}", s.as_ref());
    }

    /// A line in a code block.
    fn code(&mut self, s: impl AsRef<str>) {
        self.fence(true);
        println!("  {}", s.as_ref());
        let _ = writeln!(self.text, "{}", s.as_ref());
    }

    fn record(&mut self, what: &str, verdict: Verdict) {
        match verdict {
            Verdict::Pass => self.passed += 1,
            Verdict::Fail => self.failed.push(what.to_string()),
            Verdict::Undecided => self.undecided.push(what.to_string()),
        }
    }

    fn skip(&mut self, what: &str) {
        self.skipped.push(what.to_string());
    }

    /// A target judged on a single value (exact counts, footprints).
    fn target(&mut self, what: &str, value: f64, ok: bool, target: &str) {
        let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
        self.code(format!(
            "{}  {what}: {value:.4} (target {target})",
            verdict.label()
        ));
        self.record(what, verdict);
    }

    /// A target judged on a median's interval: `value >= target` (`at_least`) or `<=`.
    fn judged(&mut self, what: &str, iv: Interval, at_least: bool, target: f64) {
        let (verdict, op) = if at_least {
            (Verdict::at_least(iv, target), ">=")
        } else {
            (Verdict::at_most(iv, target), "<=")
        };
        self.code(format!(
            "{}  {what}: median {:.4} [95% CI {:.4}, {:.4}] (target {op} {target})",
            verdict.label(),
            iv.median,
            iv.lo,
            iv.hi
        ));
        self.record(what, verdict);
    }

    fn finish(mut self) -> (String, Vec<String>) {
        self.fence(false);
        let mut summary = format!(
            "targets: {} PASS, {} FAIL, {} UNDECIDED, {} SKIPPED",
            self.passed,
            self.failed.len(),
            self.undecided.len(),
            self.skipped.len()
        );
        let mut missed = Vec::new();
        for (label, list) in [
            ("FAIL", &self.failed),
            ("UNDECIDED", &self.undecided),
            ("SKIPPED", &self.skipped),
        ] {
            for what in list {
                let _ = write!(summary, "\n- {label}: {what}");
                missed.push(format!("{what} ({label})"));
            }
        }
        println!("\n{summary}");
        let text = format!("{}\n## Summary\n\n{summary}\n", self.text);
        (text, missed)
    }
}

fn main() {
    let args = BenchArgs::parse();
    if let Err(err) = run(&args) {
        eprintln!("flyprobe-bench: error: {err:#}");
        std::process::exit(1);
    }
}

/// The workspace's release build of `name`.
fn artifact(name: &str) -> PathBuf {
    workspace().join("target/release").join(name)
}

/// What `cmd` printed, trimmed, if it ran and succeeded.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run(args: &BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and needs root: run `sudo -E cargo xtask bench`");
    }
    for o in &args.only {
        anyhow::ensure!(
            SECTIONS.contains(&o.as_str()),
            "unknown section `{o}` in --only (known: {})",
            SECTIONS.join(", ")
        );
    }
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(args.soak_minutes >= 1, "--soak-minutes must be at least 1");
    // Measure copies, so a rebuild during the run cannot swap the binaries under it.
    let bins = workspace().join("target/xtask/bench-bin");
    fs::create_dir_all(&bins)?;
    let copy = |name: &str, from: Option<&PathBuf>| -> Result<PathBuf> {
        let from = from.cloned().unwrap_or_else(|| artifact(name));
        let to = bins.join(name);
        let _ = fs::remove_file(&to);
        fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(to)
    };
    let flyprobe_bin = copy("flyprobe", args.flyprobe.as_ref())?;
    let test_server = copy("flyprobe-test-server", None)?;
    let hooks_env = std::env::var_os("FLYPROBE_HOOKS");
    // SAFETY (of the env): single-threaded here; the harness reads these variables.
    unsafe {
        std::env::set_var("FLYPROBE_BIN", &flyprobe_bin);
        std::env::set_var("FLYPROBE_TEST_SERVER", &test_server);
        std::env::set_var(
            "FLYPROBE_PYTHON",
            workspace().join("target/venv/bin/python"),
        );
        // Every variant passes its own --hooks; the harness would append a second one.
        std::env::remove_var("FLYPROBE_HOOKS");
    }
    if let Some(h) = hooks_env {
        eprintln!(
            "note: FLYPROBE_HOOKS={} ignored: the benchmark chooses each variant's hooks",
            h.to_string_lossy()
        );
    }
    raise_fd_limit();

    let mut r = Report::new();
    r.md("# flyprobe benchmark\n");
    machine(&mut r, &flyprobe_bin, args.flyprobe.as_deref());
    // A section that fails (or a harness assertion that panics) ends the run, but what was
    // measured until then is still written, marked as cut short.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sections(&mut r, args, &flyprobe_bin)
    }));
    let stopped = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(panic) => Some(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into()),
        ),
    };
    if let Some(why) = &stopped {
        r.md("\n**The run stopped early:**\n");
        for line in why.lines() {
            r.code(line);
        }
    }

    let (text, missed) = r.finish();
    let path = report_path(args);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, with_kept_notes(&path, text))?;
    println!("\nwritten to {}", path.display());
    if let Some(why) = stopped {
        bail!("the run stopped early: {why}");
    }
    if missed.is_empty() {
        println!("all targets met");
        Ok(())
    } else {
        bail!("targets not met: {}", missed.join(", "))
    }
}

/// Where the report goes: `--out`, else bench/soak.md for the soak alone, else
/// bench/results.md.
fn report_path(args: &BenchArgs) -> PathBuf {
    let default = if args.only == ["soak"] {
        "bench/soak.md"
    } else {
        "bench/results.md"
    };
    args.out
        .clone()
        .unwrap_or_else(|| workspace().join(default))
}

/// The sections `--only` selects, in order.
fn sections(r: &mut Report, args: &BenchArgs, flyprobe_bin: &std::path::Path) -> Result<()> {
    let wanted = |s: &str| {
        (args.only.is_empty() && !ON_REQUEST.contains(&s))
            || args.only.iter().any(|o| o == s)
            || (s.starts_with("cpu-") && args.only.iter().any(|o| o == "cpu"))
            || (s.starts_with("windows-") && args.only.iter().any(|o| o == "windows"))
            || (s.starts_with("profile-") && args.only.iter().any(|o| o == "profile"))
    };

    let cpu_kinds: Vec<&cpu::Kind> = cpu::KINDS
        .iter()
        .filter(|k| wanted(&format!("cpu-{}", k.key)))
        .collect();
    if !cpu_kinds.is_empty() {
        let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        anyhow::ensure!(
            cpus >= 2,
            "section 1 pins the server to CPU 0 and the load to CPU 1: needs 2 CPUs (online: {})",
            online.trim()
        );
        if args.seconds < 5 {
            eprintln!(
                "note: --seconds {} is short for section 1 (>= 5 keeps the cross-check's clock \
                 ticks under 0.5% of a round)",
                args.seconds
            );
        }
        let support = cpu::supported(flyprobe_bin);
        let n = support.iter().filter(|(_, ok)| *ok).count() as u64;
        eprintln!(
            "section 1: {} server(s) x {} rounds x {n} variants x ~{} s: about {} min",
            cpu_kinds.len(),
            args.rounds,
            args.seconds + 2,
            cpu_kinds.len() as u64 * args.rounds as u64 * n * (args.seconds + 2) / 60 + 1
        );
        cpu::intro(r, args, &support);
        for kind in cpu_kinds {
            cpu::section(r, args, kind, &support)?;
        }
    }
    let window_kinds: Vec<&cpu::Kind> = paired::kinds()
        .filter(|k| wanted(&format!("windows-{}", k.key)))
        .collect();
    if !window_kinds.is_empty() {
        paired::intro(r, args.pairs);
        if paired::supported(flyprobe_bin) {
            for kind in window_kinds {
                paired::section(r, kind, args.seed, args.pairs)?;
            }
        } else {
            let msg = "NOTE: section 1w SKIPPED: the flyprobe binary does not accept \
                       --bench-toggle; its targets are not judged in this run";
            eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
            r.md(format!("\n**{msg}.**"));
            for kind in window_kinds {
                r.skip(&format!(
                    "{} (1w, paired windows): added CPU per request",
                    kind.key
                ));
            }
        }
    }
    let profile_kinds: Vec<&cpu::Kind> = paired::kinds()
        .filter(|k| wanted(&format!("profile-{}", k.key)))
        .collect();
    if !profile_kinds.is_empty() {
        profile::intro(r);
        anyhow::ensure!(
            paired::supported(flyprobe_bin),
            "section 1p needs a flyprobe with --bench-toggle (this one does not accept it): \
             leave it out with --only"
        );
        for kind in profile_kinds {
            profile::section(r, kind, args.seed)?;
        }
    }
    let mut rng = Rng::new(args.seed);
    if wanted("hyper") {
        let server = server::axum(None)?;
        saturation(
            r,
            args,
            &mut rng,
            "axum/hyper server (2 threads)",
            &server,
            0.97,
        )?;
    }
    if wanted("nginx") {
        let server = server::nginx(2, None)?;
        saturation(r, args, &mut rng, "nginx (2 workers)", &server, 0.97)?;
    }
    if wanted("uvicorn") {
        uvicorn(r, args, &mut rng)?;
    }
    if wanted("untracked") {
        untracked(r, args, &mut rng)?;
    }
    if wanted("hooks") {
        hooks(r, args, flyprobe_bin)?;
    }
    if wanted("idle") {
        idle_connections(r)?;
    }
    if wanted("scrape") {
        scrape_latency(r)?;
    }
    if wanted("soak") {
        soak::section(r, args.soak_minutes, &report_path(args))?;
    }

    Ok(())
}

/// Everything after this line of the report file is kept when the report is rewritten.
const KEEP_MARKER: &str =
    "<!-- Notes below this line are kept when `cargo xtask bench` rewrites this file. -->";

/// `text`, then the marker and the notes the existing file at `path` keeps below it (or,
/// in a file from before the marker, from its first `## Experiment` heading on).
fn with_kept_notes(path: &std::path::Path, text: String) -> String {
    let old = fs::read_to_string(path).unwrap_or_default();
    let kept = match old.find(KEEP_MARKER) {
        Some(at) => old[at + KEEP_MARKER.len()..].trim_start_matches('\n'),
        None => old.find("\n## Experiment").map_or("", |at| &old[at + 1..]),
    };
    if kept.trim().is_empty() {
        return text;
    }
    format!("{text}\n{KEEP_MARKER}\n\n{kept}")
}

fn machine(r: &mut Report, flyprobe: &std::path::Path, given: Option<&std::path::Path>) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let out = |cmd: &mut Command| output(cmd).unwrap_or_default();
    let root = workspace();
    let head = out(Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--short", "HEAD"]));
    let dirty = !out(Command::new("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "--",
        "probe-common",
        "probe-ebpf",
        "probe-user",
    ]))
    .is_empty();
    let version = out(Command::new(flyprobe).arg("--version"));
    let sha = out(Command::new("sha256sum").arg(flyprobe));
    let command: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect();
    r.md(format!(
        "- machine: {cpu}, {cores} cores (online CPUs {}), kernel {}",
        online.trim(),
        kernel.trim()
    ));
    r.md(format!(
        "- date: {}",
        out(Command::new("date").arg("-u").arg("+%F %T UTC"))
    ));
    let origin = match given {
        Some(path) => format!("the binary {}", path.display()),
        None if dirty => format!("built from {head} with uncommitted changes to probe-*"),
        None => format!("built from {head}"),
    };
    r.md(format!(
        "- flyprobe: {version}, {origin}, sha256 {}",
        sha.get(..12).unwrap_or("?")
    ));
    // As run through xtask: its own --no-build is not passed on.
    let command = std::iter::once("bench".to_string()).chain(command);
    r.md(format!(
        "- command: `cargo xtask {}`",
        command.collect::<Vec<_>>().join(" ")
    ));
}

/// One round with flyprobe watching `server`: the saturation load, the daemon's CPU and
/// peak RSS during it, then an accuracy load: flyprobe's count of it against wrk's.
struct ProbeRound {
    load: Load,
    cpu_pct: f64,
    peak_rss_kb: u64,
    counted: u64,
    wrk_completed: u64,
}

fn probe_round(pid: u32, url: &str, args: &BenchArgs) -> Result<ProbeRound> {
    let fp = Flyprobe::watch(pid);
    let cpu0 = server::cpu_ns(fp.pid()).unwrap_or(0);
    let t0 = Instant::now();
    let load = saturate_url(url, args)?;
    let cpu_pct = server::cpu_ns(fp.pid()).unwrap_or(0).saturating_sub(cpu0) as f64
        / 1e9
        / t0.elapsed().as_secs_f64()
        * 100.0;
    let peak_rss_kb = status_kb(fp.pid(), "VmHWM:");
    // flyprobe watches only this server's tree: every series is this server's.
    let total = || {
        eventually("flyprobe to settle", Duration::from_secs(10), || {
            let m = fp.scrape();
            let active = m.total("server_active_connections", &[]);
            let total = m.total("server_requests_total", &[("status", "2xx")]);
            if active == 0 { Ok(total) } else { Err(active) }
        })
    };
    let before = total();
    let exact = wrk(
        url,
        &WrkRun {
            pin: None,
            threads: 2,
            connections: args.connections,
            seconds: 3,
            script: &Script::BUDGET,
            think_ms: 0,
        },
    )?;
    let counted = total() - before;
    fp.stop();
    Ok(ProbeRound {
        load,
        cpu_pct,
        peak_rss_kb,
        counted,
        wrk_completed: exact.completed,
    })
}

/// Paired per-round ratios `a[k] / b[k]`.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Saturation throughput of `server`, none vs flyprobe, with the accuracy check per round.
fn saturation(
    r: &mut Report,
    args: &BenchArgs,
    rng: &mut Rng,
    title: &str,
    server: &Server,
    target: f64,
) -> Result<()> {
    r.md(format!(
        "\n## 2. Saturation throughput: {title}, wrk -t2 -c{} -d{}s unpinned, {} interleaved rounds\n",
        args.connections, args.seconds, args.rounds
    ));
    saturate(server, args)?; // warm-up
    let (mut none, mut probe) = (Vec::new(), Vec::new());
    let mut accurate = 0;
    for round in 0..args.rounds {
        let probe_first = rng.below(2) == 1;
        let (n, p) = if probe_first {
            let p = probe_round(server.pid(), &server.url(), args)?;
            (saturate(server, args)?, p)
        } else {
            let n = saturate(server, args)?;
            (n, probe_round(server.pid(), &server.url(), args)?)
        };
        r.code(format!(
            "round {round:>2}: none {:.0} r/s p99 {:.2} ms | flyprobe {:.0} r/s p99 {:.2} ms ({:.4}), daemon {:.2}% CPU, {} kB peak RSS; accuracy: flyprobe {} {} wrk {}",
            n.rps,
            n.p99_ms,
            p.load.rps,
            p.load.p99_ms,
            p.load.rps / n.rps,
            p.cpu_pct,
            p.peak_rss_kb,
            p.counted,
            if p.counted == p.wrk_completed { "==" } else { "!=" },
            p.wrk_completed
        ));
        if p.counted == p.wrk_completed {
            accurate += 1;
        }
        none.push(n);
        probe.push(p);
    }
    let rps = |v: &[Load]| v.iter().map(|l| l.rps).collect::<Vec<_>>();
    let thr = ratios(
        &probe.iter().map(|p| p.load.rps).collect::<Vec<_>>(),
        &rps(&none),
    );
    r.judged(
        &format!("{title}: throughput ratio flyprobe/none"),
        stats::bootstrap_median(&thr),
        true,
        target,
    );
    r.target(
        &format!("{title}: accuracy, rounds where flyprobe's count == wrk's"),
        f64::from(accurate),
        accurate == args.rounds as u32,
        &format!("every round, {}", args.rounds),
    );
    let p99 = ratios(
        &probe.iter().map(|p| p.load.p99_ms).collect::<Vec<_>>(),
        &none.iter().map(|l| l.p99_ms).collect::<Vec<_>>(),
    );
    let iv = stats::bootstrap_median(&p99);
    r.code(format!(
        "p99 latency ratio flyprobe/none: median {:.4} [95% CI {:.4}, {:.4}]",
        iv.median, iv.lo, iv.hi
    ));
    let cpu: Vec<f64> = probe.iter().map(|p| p.cpu_pct).collect();
    r.target(
        &format!("{title}: daemon CPU, % of one core, under load (median)"),
        stats::median(&cpu),
        stats::median(&cpu) <= 1.0,
        "<= 1%",
    );
    let rss = probe.iter().map(|p| p.peak_rss_kb).max().unwrap_or(0);
    r.code(format!("daemon peak RSS under load: {rss} kB"));
    Ok(())
}

fn uvicorn(r: &mut Report, args: &BenchArgs, rng: &mut Rng) -> Result<()> {
    use flyprobe_tests::servers;
    r.md(format!(
        "\n## 2. Saturation throughput: uvicorn --workers 2 (Starlette app), none vs flyprobe vs starlette-exporter, wrk -t2 -c{} -d{}s, {} interleaved rounds\n",
        args.connections, args.seconds, args.rounds
    ));
    let plain = servers::uvicorn_app(2, "bench_app:app", &[], &[]);
    let exporter =
        servers::uvicorn_app(2, "bench_app:app", &[("FLYPROBE_BENCH_EXPORTER", "1")], &[]);
    let url = |s: &servers::Server| format!("http://127.0.0.1:{}/", s.port);
    let (plain_url, exporter_url) = (url(&plain), url(&exporter));
    saturate_url(&plain_url, args)?;
    saturate_url(&exporter_url, args)?;
    let (mut none, mut probe, mut inproc) = (Vec::new(), Vec::new(), Vec::new());
    let mut accurate = 0;
    for round in 0..args.rounds {
        let mut order = [0, 1, 2];
        rng.shuffle(&mut order);
        let (mut n, mut p, mut e) = (None, None, None);
        for which in order {
            match which {
                0 => n = Some(saturate_url(&plain_url, args)?),
                1 => p = Some(probe_round(plain.pid(), &plain_url, args)?),
                _ => e = Some(saturate_url(&exporter_url, args)?),
            }
        }
        let (n, p, e) = (n.unwrap(), p.unwrap(), e.unwrap());
        r.code(format!(
            "round {round:>2}: none {:.0} r/s | flyprobe {:.0} r/s | starlette-exporter {:.0} r/s; accuracy: flyprobe {} {} wrk {}",
            n.rps,
            p.load.rps,
            e.rps,
            p.counted,
            if p.counted == p.wrk_completed { "==" } else { "!=" },
            p.wrk_completed
        ));
        if p.counted == p.wrk_completed {
            accurate += 1;
        }
        none.push(n.rps);
        probe.push(p.load.rps);
        inproc.push(e.rps);
    }
    let thr = ratios(&probe, &none);
    let exp = ratios(&inproc, &none);
    r.judged(
        "uvicorn: throughput ratio flyprobe/none",
        stats::bootstrap_median(&thr),
        true,
        0.995,
    );
    let ei = stats::bootstrap_median(&exp);
    r.code(format!(
        "starlette-exporter throughput ratio: median {:.4} [95% CI {:.4}, {:.4}]",
        ei.median, ei.lo, ei.hi
    ));
    // Per round: flyprobe's loss as a share of starlette-exporter's.
    let share: Vec<f64> = thr
        .iter()
        .zip(&exp)
        .map(|(t, e)| (1.0 - t) / (1.0 - e).max(f64::EPSILON))
        .collect();
    r.judged(
        "uvicorn: flyprobe's loss / starlette-exporter's loss",
        stats::bootstrap_median(&share),
        false,
        0.2,
    );
    r.target(
        "uvicorn: accuracy, rounds where flyprobe's count == wrk's",
        f64::from(accurate),
        accurate == args.rounds as u32,
        &format!("every round, {}", args.rounds),
    );
    Ok(())
}

fn untracked(r: &mut Report, args: &BenchArgs, rng: &mut Rng) -> Result<()> {
    r.md(format!(
        "\n## 3. Untracked traffic: the saturation throughput of a server flyprobe does NOT watch, {} rounds\n",
        args.rounds
    ));
    r.md("Informational: the judged figure for unwatched servers is `unwatched` in section 1.\n");
    let watched = server::axum(None)?;
    let other = server::axum(None)?;
    saturate(&other, args)?;
    let (mut none, mut with) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let probe_first = rng.below(2) == 1;
        let measure_with = || -> Result<Load> {
            let fp = Flyprobe::watch(watched.pid());
            let w = saturate(&other, args);
            fp.stop();
            w
        };
        let (n, w) = if probe_first {
            let w = measure_with()?;
            (saturate(&other, args)?, w)
        } else {
            let n = saturate(&other, args)?;
            (n, measure_with()?)
        };
        r.code(format!(
            "round {round:>2}: no flyprobe {:.0} r/s | flyprobe watching another server {:.0} r/s ({:.4})",
            n.rps,
            w.rps,
            w.rps / n.rps
        ));
        none.push(n.rps);
        with.push(w.rps);
    }
    let iv = stats::bootstrap_median(&ratios(&with, &none));
    r.code(format!(
        "untracked throughput ratio: median {:.4} [95% CI {:.4}, {:.4}]",
        iv.median, iv.lo, iv.hi
    ));
    Ok(())
}

/// One program's runs and ns per run over a load.
type HookCost = (String, u64, f64);

/// One load's per-program costs under `title`, a line a program.
fn cost_table(r: &mut Report, title: &str, costs: &[HookCost]) {
    r.code(title);
    for (name, runs, ns) in costs {
        r.code(format!("  {name:<16} {runs:>10} runs  {ns:>7.1} ns/run"));
    }
}

/// Every program's run time over a load, per request the load completed. The load
/// generator's own socket events run the programs too (as untracked runs), so per-run
/// figures blend the server's runs with the client's; per request, the difference between
/// two runs of the same load is the server's alone.
fn ns_per_request(costs: &[HookCost], requests: u64) -> f64 {
    let ns: f64 = costs.iter().map(|x| x.2 * x.1 as f64).sum();
    ns / requests.max(1) as f64
}

/// ns per run of each of flyprobe's programs, from kernel.bpf_stats_enabled, over one
/// saturation load of `load`.
fn hook_costs(fp_args: &[&str], load: &Server, args: &BenchArgs) -> Result<(Vec<HookCost>, u64)> {
    let first_id = prog_stats(None)?.keys().max().map_or(0, |id| id + 1);
    let fp = Flyprobe::start(fp_args);
    let owner = (fp.pid(), first_id);
    let before = prog_stats(Some(owner))?;
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let out = saturate(load, args);
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "0")?;
    let requests = out?.completed;
    let after = prog_stats(Some(owner))?;
    fp.stop();
    let mut out: Vec<HookCost> = after
        .into_iter()
        .filter_map(|(id, (name, ns, cnt))| {
            let (_, ns0, cnt0) = before.get(&id).cloned().unwrap_or_default();
            let runs = cnt.checked_sub(cnt0)?;
            (runs > 0).then(|| (name, runs, (ns - ns0) as f64 / runs as f64))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, requests))
}

/// Programs' (name, run_time_ns, run_cnt) by id, from bpftool. With `owner` (flyprobe's
/// pid, and the first id it can have loaded): only that flyprobe's programs, by the fds it
/// holds (/proc/PID/fdinfo), else by id (loaded after its start).
fn prog_stats(
    owner: Option<(u32, u64)>,
) -> Result<std::collections::BTreeMap<u64, (String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let held = owner
        .map(|(pid, _)| server::owned_prog_ids(pid))
        .unwrap_or_default();
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str().unwrap_or("").to_string();
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            let ours = match owner {
                None => true,
                Some(_) if !held.is_empty() => held.contains(&n("id")),
                Some((_, first_id)) => n("id") >= first_id,
            };
            ours.then(|| (n("id"), (name, n("run_time_ns"), n("run_cnt"))))
        })
        .collect())
}

fn hooks(r: &mut Report, args: &BenchArgs, bin: &std::path::Path) -> Result<()> {
    r.md("\n## 4. Per-hook cost (kernel.bpf_stats_enabled=1), ns per run under the axum saturation load\n");
    let accepts = |extra: &[&str]| {
        Command::new(bin)
            .args(extra)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let watched = server::axum(None)?;
    let other = server::axum(None)?;
    let pid = watched.pid().to_string();
    // The empty-program floor: the empty raw-tracepoint programs of `--empty-hooks` (the
    // same kind as the socket set's) over the same load, else flyprobe's calibration program
    // (an empty syscall tracepoint program) beside ours.
    let empty_hooks = accepts(&["--empty-hooks"]);
    let calibration = !empty_hooks && accepts(&["--calibration-probe"]);
    let mut fp_args = vec!["--pid-tree", pid.as_str()];
    if calibration {
        fp_args.push("--calibration-probe");
    }
    let (tracked, tracked_req) = hook_costs(&fp_args, &watched, args)?;
    let (untracked, untracked_req) = hook_costs(&fp_args, &other, args)?;
    cost_table(
        r,
        "tracked traffic (flyprobe watches the loaded server):",
        &tracked,
    );
    cost_table(
        r,
        "untracked traffic (flyprobe watches another, idle server):",
        &untracked,
    );
    let calib = |v: &[HookCost]| v.iter().find(|x| x.0 == "calibration").map(|x| x.2);
    let (floor_t, floor_u) = if empty_hooks {
        let (empty, empty_req) =
            hook_costs(&["--empty-hooks", "--pid-tree", &pid], &watched, args)?;
        cost_table(r, "empty programs (--empty-hooks), same load:", &empty);
        let (t, u, e) = (
            ns_per_request(&tracked, tracked_req),
            ns_per_request(&untracked, untracked_req),
            ns_per_request(&empty, empty_req),
        );
        r.code(format!(
            "program time per request (server's and wrk's runs): empty {e:.0} ns, untracked {u:.0} ns, \
             tracked {t:.0} ns; watching the server adds {:.0} ns per request to the empty programs",
            t - e
        ));
        // The same watched load reading no payload byte: what the peeks add (informational).
        if accepts(&["--hooks", "socket", "--no-peek"]) {
            let (bare, bare_req) = hook_costs(
                &["--hooks", "socket", "--no-peek", "--pid-tree", &pid],
                &watched,
                args,
            )?;
            cost_table(
                r,
                "tracked traffic without payload peeks (--hooks socket --no-peek), same load:",
                &bare,
            );
            let b = ns_per_request(&bare, bare_req);
            r.code(format!(
                "program time per request without peeks: {b:.0} ns (adds {:.0} ns to the empty \
                 programs); the method and status peeks: {:.0} ns per request",
                b - e,
                t - b
            ));
        }
        // ns per run over all of them: the busy ones dominate.
        let runs: u64 = empty.iter().map(|x| x.1).sum();
        let ns: f64 = empty.iter().map(|x| x.2 * x.1 as f64).sum();
        let f = (runs > 0).then(|| ns / runs as f64);
        (f, f)
    } else {
        (calib(&tracked), calib(&untracked))
    };
    // The hot hooks: the per-syscall programs of the syscall set, else whichever ran at
    // least a tenth as often as the busiest.
    const HOT: [&str; 5] = [
        "read_enter",
        "write_enter",
        "writev_enter",
        "io_exit",
        "close_enter",
    ];
    let hot = |v: &[HookCost], minus: f64| {
        let named: Vec<f64> = v
            .iter()
            .filter(|x| HOT.contains(&x.0.as_str()))
            .map(|x| x.2 - minus)
            .collect();
        if !named.is_empty() {
            return stats::median(&named);
        }
        let busiest = v
            .iter()
            .filter(|x| x.0 != "calibration")
            .map(|x| x.1)
            .max()
            .unwrap_or(0);
        stats::median(
            &v.iter()
                .filter(|x| x.0 != "calibration" && x.1 * 10 >= busiest)
                .map(|x| x.2 - minus)
                .collect::<Vec<_>>(),
        )
    };
    r.code(format!(
        "hot hooks, raw median: tracked {:.1} ns/run, untracked {:.1} ns/run",
        hot(&tracked, 0.0),
        hot(&untracked, 0.0)
    ));
    let (Some(ft), Some(fu)) = (floor_t, floor_u) else {
        r.code("SKIPPED  hot-hook targets: no empty-program floor (neither --calibration-probe nor --empty-hooks)");
        r.skip("hot-hook ns/run above the empty-program floor");
        return Ok(());
    };
    r.code(format!(
        "empty-program floor: {ft:.1} ns/run (tracked run), {fu:.1} ns/run (untracked run)"
    ));
    let (t, u) = (hot(&tracked, ft), hot(&untracked, fu));
    r.target(
        "hot-hook median ns/run above the empty-program floor, tracked",
        t,
        t <= 150.0,
        "<= 150 ns",
    );
    r.target(
        "hot-hook median ns/run above the empty-program floor, untracked",
        u,
        u <= 50.0,
        "<= 50 ns",
    );
    Ok(())
}

fn idle_connections(r: &mut Report) -> Result<()> {
    r.md("\n## 5. Daemon RSS with 10,000 open idle connections\n");
    let server = server::axum(None)?;
    let fp = Flyprobe::watch(server.pid());
    let conns: Vec<Conn> = (0..10_000)
        .map(|_| Conn::connect(server.port))
        .collect::<Result<_, _>>()
        .context("opening 10,000 connections")?;
    eventually("10,000 active connections", Duration::from_secs(60), || {
        let n = fp.scrape().total("server_active_connections", &[]);
        if n == 10_000 { Ok(()) } else { Err(n) }
    });
    let rss = status_kb(fp.pid(), "VmRSS:");
    let mb = rss as f64 / 1024.0;
    r.target(
        "daemon RSS, MB, 10k idle connections tracked",
        mb,
        mb <= 30.0,
        "<= 30 MB",
    );
    drop(conns);
    fp.stop();
    Ok(())
}

fn scrape_latency(r: &mut Report) -> Result<()> {
    use flyprobe_tests::servers;
    r.md("\n## 6. /metrics scrape latency, gunicorn with 16 workers, 200 scrapes (keep-alive)\n");
    let server = servers::gunicorn(16);
    let fp = Flyprobe::watch(server.pid());
    eventually("16 workers classified", Duration::from_secs(60), || {
        let n = fp
            .scrape()
            .total("server_workers", &[("server", "gunicorn")]);
        if n == 16 { Ok(()) } else { Err(n) }
    });
    std::thread::sleep(Duration::from_secs(2)); // let the workers finish starting
    let mut conn = Conn::connect(fp.port)?;
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let resp = conn.get("/metrics")?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(resp.status == 200, "scrape failed: {}", resp.status);
    }
    drop(conn);
    fp.stop();
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    r.code(format!("p50 {p50:.2} ms"));
    r.target("scrape p99, ms", p99, p99 <= 10.0, "<= 10 ms");
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_below_the_marker_or_an_experiment_heading_are_kept() {
        let path = std::env::temp_dir().join(format!("bench-notes-{}.md", std::process::id()));
        let _ = fs::remove_file(&path);
        assert_eq!(with_kept_notes(&path, "new\n".into()), "new\n");
        fs::write(&path, "# old\n```\nx\n```\n\n## Experiment (2)\n\nnotes\n").unwrap();
        let once = with_kept_notes(&path, "new\n".into());
        assert_eq!(
            once,
            format!("new\n\n{KEEP_MARKER}\n\n## Experiment (2)\n\nnotes\n")
        );
        fs::write(&path, &once).unwrap();
        assert_eq!(
            with_kept_notes(&path, "newer\n".into()),
            once.replacen("new", "newer", 1)
        );
        let _ = fs::remove_file(&path);
    }
}
