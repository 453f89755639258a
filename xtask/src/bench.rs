//! `cargo xtask bench`: what flyprobe costs, measured side by side in one run. Rounds are
//! interleaved (none, probe, none, probe, …) so drift on a noisy machine hits both sides;
//! every figure is a median, every target a ratio. Prints PASS/FAIL per target and writes
//! the report to bench/results.md with the machine it ran on.

use std::{
    fmt::Write as _,
    fs,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use flyprobe_tests::{client::Conn, eventually, flyprobe::Flyprobe, servers};

use crate::{build, cmd::workspace_root, setup};

#[derive(Args)]
pub struct BenchArgs {
    /// Interleaved rounds per variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of load per round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Run only these sections (hyper, uvicorn, untracked, hooks, idle, scrape).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// wrk's view of one round.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p99_ms: f64,
    completed: u64,
}

/// Throughput rounds: wrk's own request generation, plus its p99 in a parseable line.
const THROUGHPUT: &str = r#"
function done(summary, latency, requests)
  io.write(string.format("FLYPROBE_COMPLETED %d\nFLYPROBE_P99_US %.1f\n",
    summary.requests, latency:percentile(99)))
end
"#;

/// Accuracy rounds: each wrk thread sends a fixed budget of requests, then goes quiet, so
/// when wrk stops no request is half-way and its count of completed requests is exact.
const BUDGET: &str = r#"
budget = 5000
sent = 0
function request()
  if sent >= budget then return "" end
  sent = sent + 1
  return wrk.format(nil, "/")
end
function done(summary, latency, requests)
  io.write(string.format("FLYPROBE_COMPLETED %d\nFLYPROBE_P99_US %.1f\n",
    summary.requests, latency:percentile(99)))
end
"#;

fn wrk(port: u16, args: &BenchArgs) -> Result<Load> {
    wrk_script(port, args, THROUGHPUT, args.seconds)
}

fn wrk_script(port: u16, args: &BenchArgs, script: &str, seconds: u64) -> Result<Load> {
    let path = workspace_root().join("target/xtask/bench.lua");
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(&path, script)?;
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{}", args.connections)])
        .args([&format!("-d{seconds}s"), "-s"])
        .arg(&path)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (installed by `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
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
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64)
        .unwrap_or(0.0)
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

struct Report {
    text: String,
    failed: Vec<String>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        let _ = writeln!(self.text, "{}", s.as_ref());
    }

    fn target(&mut self, what: &str, value: f64, ok: bool, target: &str) {
        let verdict = if ok { "PASS" } else { "FAIL" };
        self.line(format!("  {verdict}  {what}: {value:.4} (target {target})"));
        if !ok {
            self.failed.push(what.to_string());
        }
    }
}

/// One round with flyprobe watching `pid`: the throughput load, the daemon's CPU and peak
/// RSS during it, then an accuracy load: flyprobe's count of it against wrk's.
struct ProbeRound {
    load: Load,
    cpu_pct: f64,
    peak_rss_kb: u64,
    counted: u64,
    wrk_completed: u64,
}

fn probe_round(pid: u32, server: &str, port: u16, args: &BenchArgs) -> Result<ProbeRound> {
    let fp = Flyprobe::watch(pid);
    let cpu0 = cpu_seconds(fp.pid());
    let t0 = Instant::now();
    let load = wrk(port, args)?;
    let cpu_pct = (cpu_seconds(fp.pid()) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let peak_rss_kb = status_kb(fp.pid(), "VmHWM:");
    let total = || {
        eventually("flyprobe to settle", Duration::from_secs(10), || {
            let m = fp.scrape();
            let active = m.total("server_active_connections", &[("server", server)]);
            let total = m.total(
                "server_requests_total",
                &[("server", server), ("status", "2xx")],
            );
            if active == 0 { Ok(total) } else { Err(active) }
        })
    };
    let before = total();
    let exact = wrk_script(port, args, BUDGET, 3)?;
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

pub fn run(args: &BenchArgs) -> Result<()> {
    build::require_root("bench")?;
    build::release(&["probe-user", "flyprobe-tests"])?;
    // SAFETY (of the env): single-threaded here; the harness reads these paths.
    unsafe {
        std::env::set_var("FLYPROBE_BIN", build::artifact("flyprobe"));
        std::env::set_var(
            "FLYPROBE_TEST_SERVER",
            build::artifact("flyprobe-test-server"),
        );
        std::env::set_var("FLYPROBE_PYTHON", setup::venv_python());
    }
    raise_fd_limit();
    let mut r = Report {
        text: String::new(),
        failed: Vec::new(),
    };
    machine(&mut r);
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    if wanted("hyper") {
        hyper(&mut r, args)?;
    }
    if wanted("uvicorn") {
        uvicorn(&mut r, args)?;
    }
    if wanted("untracked") {
        untracked(&mut r, args)?;
    }
    if wanted("hooks") {
        hooks(&mut r, args)?;
    }
    if wanted("idle") {
        idle_connections(&mut r)?;
    }
    if wanted("scrape") {
        scrape_latency(&mut r)?;
    }

    let path = workspace_root().join("bench/results.md");
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(
        &path,
        format!("# flyprobe benchmark\n\n```\n{}```\n", r.text),
    )?;
    println!("\nwritten to {}", path.display());
    if r.failed.is_empty() {
        println!("all targets met");
        Ok(())
    } else {
        bail!("targets missed: {}", r.failed.join(", "))
    }
}

fn machine(r: &mut Report) {
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
    r.line(format!(
        "machine: {cpu}, {cores} cores, kernel {}, date {}",
        kernel.trim(),
        crate::cmd::output(Command::new("date").arg("-u").arg("+%F %T UTC")).unwrap_or_default()
    ));
}

fn hyper(r: &mut Report, args: &BenchArgs) -> Result<()> {
    r.line(format!(
        "\n== 1. axum/hyper server, wrk -t2 -c{} -d{}s, {} interleaved rounds",
        args.connections, args.seconds, args.rounds
    ));
    let server = servers::rust_server();
    wrk(server.port, args)?; // warm-up
    let (mut none, mut probe) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        none.push(wrk(server.port, args)?);
        let p = probe_round(server.pid(), "flyprobe-test-server", server.port, args)?;
        r.line(format!(
            "  round {round}: none {:.0} r/s p99 {:.2} ms | flyprobe {:.0} r/s p99 {:.2} ms, daemon {:.2}% CPU, {} kB peak RSS; accuracy run: flyprobe {} == wrk {}",
            none[round].rps, none[round].p99_ms, p.load.rps, p.load.p99_ms, p.cpu_pct, p.peak_rss_kb, p.counted, p.wrk_completed
        ));
        r.target(
            "accuracy: flyprobe requests == requests wrk completed",
            p.counted as f64,
            p.counted == p.wrk_completed,
            "exact",
        );
        probe.push(p);
    }
    let thr = median(probe.iter().map(|p| p.load.rps).collect())
        / median(none.iter().map(|l| l.rps).collect());
    let p99 = median(probe.iter().map(|p| p.load.p99_ms).collect())
        / median(none.iter().map(|l| l.p99_ms).collect());
    r.target(
        "hyper throughput ratio flyprobe/none (median)",
        thr,
        thr >= 0.99,
        ">= 0.99",
    );
    r.line(format!(
        "  hyper p99 latency ratio flyprobe/none (median): {p99:.4}"
    ));
    let cpu = median(probe.iter().map(|p| p.cpu_pct).collect());
    r.target(
        "daemon CPU, % of one core, at the hyper load (median)",
        cpu,
        cpu <= 1.0,
        "<= 1%",
    );
    let rss = probe.iter().map(|p| p.peak_rss_kb).max().unwrap_or(0);
    r.line(format!("  daemon peak RSS under load: {rss} kB"));
    Ok(())
}

fn uvicorn(r: &mut Report, args: &BenchArgs) -> Result<()> {
    r.line(format!(
        "\n== 2. uvicorn --workers 2 (Starlette app): none vs flyprobe vs starlette-exporter, {} rounds",
        args.rounds
    ));
    let plain = servers::uvicorn_app(2, "bench_app:app", &[], &[]);
    let exporter =
        servers::uvicorn_app(2, "bench_app:app", &[("FLYPROBE_BENCH_EXPORTER", "1")], &[]);
    wrk(plain.port, args)?;
    wrk(exporter.port, args)?;
    let (mut none, mut probe, mut inproc) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let n = wrk(plain.port, args)?;
        let p = probe_round(plain.pid(), "uvicorn", plain.port, args)?;
        let e = wrk(exporter.port, args)?;
        r.line(format!(
            "  round {round}: none {:.0} r/s | flyprobe {:.0} r/s | starlette-exporter {:.0} r/s; accuracy run: flyprobe {} == wrk {}",
            n.rps, p.load.rps, e.rps, p.counted, p.wrk_completed
        ));
        r.target(
            "accuracy: flyprobe requests == requests wrk completed",
            p.counted as f64,
            p.counted == p.wrk_completed,
            "exact",
        );
        none.push(n.rps);
        probe.push(p.load.rps);
        inproc.push(e.rps);
    }
    let base = median(none);
    let thr = median(probe) / base;
    let exp = median(inproc) / base;
    let (loss_probe, loss_exp) = (1.0 - thr, 1.0 - exp);
    r.target(
        "uvicorn throughput ratio flyprobe/none (median)",
        thr,
        thr >= 0.995,
        ">= 0.995",
    );
    r.line(format!("  starlette-exporter throughput ratio: {exp:.4}; losses: flyprobe {:.2}%, starlette-exporter {:.2}%", loss_probe * 100.0, loss_exp * 100.0));
    let share = loss_probe.max(0.0) / loss_exp.max(f64::EPSILON);
    r.target(
        "flyprobe's loss / starlette-exporter's loss",
        share,
        share <= 0.2,
        "<= 0.2",
    );
    Ok(())
}

fn untracked(r: &mut Report, args: &BenchArgs) -> Result<()> {
    r.line(format!(
        "\n== 6. untracked traffic: a server flyprobe does NOT watch, {} rounds",
        args.rounds
    ));
    let watched = servers::rust_server();
    let other = servers::rust_server();
    wrk(other.port, args)?;
    let (mut none, mut with) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let n = wrk(other.port, args)?;
        let fp = Flyprobe::watch(watched.pid());
        let w = wrk(other.port, args)?;
        fp.stop();
        r.line(format!(
            "  round {round}: no flyprobe {:.0} r/s | flyprobe watching another server {:.0} r/s",
            n.rps, w.rps
        ));
        none.push(n.rps);
        with.push(w.rps);
    }
    let ratio = median(with) / median(none);
    r.target(
        "untracked throughput ratio (median)",
        ratio,
        ratio >= 0.995,
        ">= 0.995",
    );
    Ok(())
}

/// ns per run of each program, from kernel.bpf_stats_enabled, over one load round.
fn hook_costs(watch: u32, load_port: u16, args: &BenchArgs) -> Result<Vec<(String, u64, f64)>> {
    let fp = Flyprobe::start(&["--pid-tree", &watch.to_string(), "--calibration-probe"]);
    let before = prog_stats()?;
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let load = wrk(load_port, args);
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "0")?;
    load?;
    let after = prog_stats()?;
    fp.stop();
    let mut out: Vec<(String, u64, f64)> = after
        .into_iter()
        .filter_map(|(id, (name, ns, cnt))| {
            let (_, ns0, cnt0) = before.get(&id).cloned().unwrap_or_default();
            let runs = cnt.checked_sub(cnt0)?;
            (runs > 0).then(|| (name, runs, (ns - ns0) as f64 / runs as f64))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Our programs' (name, run_time_ns, run_cnt) by id, from bpftool.
fn prog_stats() -> Result<std::collections::BTreeMap<u64, (String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    const OURS: [&str; 16] = [
        "calibration",
        "accept_enter",
        "accept_exit",
        "close_enter",
        "read_enter",
        "readv_enter",
        "recvmsg_enter",
        "write_enter",
        "writev_enter",
        "sendmsg_enter",
        "sendfile_enter",
        "io_exit",
        "process_fork",
        "process_exit",
        "exit_group_ente",
        "signal_generate",
    ];
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "tracepoint")
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            OURS.contains(&name).then(|| {
                let n = |k: &str| p[k].as_u64().unwrap_or(0);
                (n("id"), (name.to_string(), n("run_time_ns"), n("run_cnt")))
            })
        })
        .collect())
}

fn hooks(r: &mut Report, args: &BenchArgs) -> Result<()> {
    r.line("\n== 3. per-hook cost (kernel.bpf_stats_enabled=1), ns per run during the hyper load");
    let watched = servers::rust_server();
    let other = servers::rust_server();
    let tracked = hook_costs(watched.pid(), watched.port, args)?;
    let untracked = hook_costs(watched.pid(), other.port, args)?;
    r.line("  tracked traffic (flyprobe watches the loaded server):");
    for (name, runs, ns) in &tracked {
        r.line(format!("    {name:<16} {runs:>10} runs  {ns:>7.1} ns/run"));
    }
    r.line("  untracked traffic (flyprobe watches another, idle server):");
    for (name, runs, ns) in &untracked {
        r.line(format!("    {name:<16} {runs:>10} runs  {ns:>7.1} ns/run"));
    }
    // The hot hooks (one run per syscall), net of what an empty program costs here.
    const HOT: [&str; 5] = [
        "read_enter",
        "write_enter",
        "writev_enter",
        "io_exit",
        "close_enter",
    ];
    let floor =
        |v: &[(String, u64, f64)]| v.iter().find(|x| x.0 == "calibration").map_or(0.0, |x| x.2);
    let hot = |v: &[(String, u64, f64)], minus: f64| {
        median(
            v.iter()
                .filter(|x| HOT.contains(&x.0.as_str()))
                .map(|x| x.2 - minus)
                .collect(),
        )
    };
    r.line(format!(
        "  empty-program floor: {:.1} ns/run (tracked run), {:.1} ns/run (untracked run)",
        floor(&tracked),
        floor(&untracked)
    ));
    r.line(format!(
        "  hot hooks, raw median: tracked {:.1} ns/run, untracked {:.1} ns/run",
        hot(&tracked, 0.0),
        hot(&untracked, 0.0)
    ));
    let (t, u) = (
        hot(&tracked, floor(&tracked)),
        hot(&untracked, floor(&untracked)),
    );
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
    r.line("\n== 4b. daemon RSS with 10,000 open idle connections");
    let server = servers::rust_server();
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
    r.line("\n== 4c. /metrics scrape latency, gunicorn with 16 workers, 200 scrapes (keep-alive)");
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
    r.line(format!("  p50 {p50:.2} ms"));
    r.target("scrape p99, ms", p99, p99 <= 10.0, "<= 10 ms");
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
