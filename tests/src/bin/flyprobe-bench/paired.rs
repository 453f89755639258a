//! Section 1w: the server's CPU time per request, pinned as in section 1, but paired within
//! one load. Section 1 starts and stops flyprobe between 5 s runs, so each pair of runs it
//! compares lies up to a minute apart, and this VM's speed drifts more than a target's width
//! over a minute (its A/A interval is ±5–12%). Here one flyprobe runs through one wrk load
//! and its programs on the socket events are detached and attached again
//! (`--bench-toggle`: SIGUSR1, SIGUSR2) for alternating half-second windows, each pair in a
//! random order: the two halves of a pair are a second apart. Detached, those events are
//! off in the kernel (no program, the tracepoint's static key off): what a server pays
//! without flyprobe. The ratio of a pair is the server's CPU per request with the programs
//! over without; a variant's added cost is the median of its pairs' ratios, with a
//! bootstrap 95% interval.
//!
//! Requests per window come from the kernel: the bytes the server's sockets received
//! (`ss`, `bytes_received`), divided by the size of wrk's request, which is the same for
//! every request.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use flyprobe_tests::{flyprobe::Flyprobe, procs::Guard};

use super::{
    Report,
    cpu::{KINDS, Kind, PROBE_CPU},
    server::{self, Server},
    stats::{self, Interval, Rng, Verdict},
};

/// After a toggle, before the window: the daemon has handled the signal and the kernel
/// has patched the tracepoint (a few ms), and the CPUs have settled.
const SETTLE: Duration = Duration::from_millis(100);
const WINDOW: Duration = Duration::from_millis(500);
/// Pairs per variant: ~1.2 s each.
const PAIRS: usize = 50;
const WRK_CONNECTIONS: u32 = 32;

/// What is compared within each pair of windows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// Nothing changes between the two windows: the control.
    Again,
    Floor,
    Socket,
    NoPeek,
    Unwatched,
}

impl Variant {
    const ALL: [Self; 5] = [
        Self::Again,
        Self::Floor,
        Self::Socket,
        Self::NoPeek,
        Self::Unwatched,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Again => "a/a",
            Self::Floor => "floor",
            Self::Socket => "socket",
            Self::NoPeek => "no-peek",
            Self::Unwatched => "unwatched",
        }
    }

    fn legend(self) -> &'static str {
        match self {
            Self::Again => {
                "no flyprobe in either window: the A/A control, whose interval is this \
                 section's resolution"
            }
            Self::Floor => {
                "`flyprobe --hooks socket --empty-hooks --bench-toggle --pid-tree SERVER`: empty \
                 programs on the three socket events"
            }
            Self::Socket => "`flyprobe --hooks socket --bench-toggle --pid-tree SERVER`",
            Self::NoPeek => {
                "`flyprobe --hooks socket --no-peek --bench-toggle --pid-tree SERVER`: no \
                 payload byte read (`socket` minus this is what the peeks cost)"
            }
            Self::Unwatched => {
                "`flyprobe --hooks socket --bench-toggle --pid-tree IDLE`: flyprobe watching an \
                 idle `sleep`, the loaded server's events leave at the target check"
            }
        }
    }

    fn flyprobe_args(self, server: u32, idle: u32) -> Option<Vec<String>> {
        let args: &[&str] = match self {
            Self::Again => return None,
            Self::Floor => &["--hooks", "socket", "--empty-hooks"],
            Self::Socket | Self::Unwatched => &["--hooks", "socket"],
            Self::NoPeek => &["--hooks", "socket", "--no-peek"],
        };
        let pid = if self == Self::Unwatched {
            idle
        } else {
            server
        };
        Some(
            args.iter()
                .map(|a| a.to_string())
                .chain([
                    "--bench-toggle".into(),
                    "--pid-tree".into(),
                    pid.to_string(),
                ])
                .collect(),
        )
    }

    /// The target on the added CPU per request, %.
    fn target(self, kind: &Kind) -> Option<f64> {
        match self {
            Self::Socket => Some(kind.socket_max),
            Self::Unwatched => kind.unwatched_max,
            _ => None,
        }
    }
}

/// The servers of section 1 that are measured here (TLS is not: `--tls`'s uprobes are not
/// on the socket events).
pub fn kinds() -> impl Iterator<Item = &'static Kind> {
    KINDS.iter().filter(|k| !k.tls)
}

/// Whether `bin` has `--bench-toggle` (a saved baseline binary may not): its arguments
/// with `--help` after them, as section 1 checks its variants.
pub fn supported(bin: &Path) -> bool {
    Command::new(bin)
        .args(["--bench-toggle", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn intro(r: &mut Report) {
    r.md(format!(
        "\n## 1w. Server CPU per request, pinned, paired within one load ({PAIRS} pairs of {} ms \
         windows per variant)\n",
        WINDOW.as_millis()
    ));
    r.md(format!(
        "As section 1 (server alone on CPU 0; `wrk -t1 -c{WRK_CONNECTIONS}` and flyprobe on CPU \
         {PROBE_CPU}), but flyprobe is started once per variant and its programs on the socket \
         events are detached and attached again during one wrk load (`--bench-toggle`: SIGUSR1 \
         detaches, SIGUSR2 attaches). A pair is two {} ms windows, programs attached in one and \
         detached in the other (random order, {} ms after each switch before the window opens); \
         its ratio is the server's CPU per request (its processes' CPU clocks; requests from \
         the bytes its sockets received, `ss`, over the size of wrk's request) attached over \
         detached. A variant's added cost is the median of its pairs' ratios with a bootstrap \
         95% interval; the verdicts are judged as in section 1. The two windows of a pair are \
         a second apart, where section 1's are up to a minute apart: the A/A interval below \
         is this section's resolution.\n",
        WINDOW.as_millis(),
        SETTLE.as_millis()
    ));
    for v in Variant::ALL {
        r.md(format!("- `{}`: {}", v.name(), v.legend()));
    }
}

pub fn section(r: &mut Report, kind: &Kind, seed: u64) -> Result<()> {
    r.md(format!("\n### 1w.{} {}\n", kind.key, kind.title));
    let server = (kind.start)()?;
    let idle = Guard::spawn("sleep", Command::new("sleep").arg("infinity"));
    let pids = server.tree();
    let request_bytes = request_bytes(&server);
    let mut rng = Rng::new(seed ^ 0x7061_6972);
    let mut rows = vec![
        [
            "variant",
            "CPU µs/req detached",
            "attached",
            "added % (median, 95% CI)",
            "target",
            "verdict",
            "req/s detached",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut added = Vec::new();
    for v in Variant::ALL {
        let pairs = run_variant(v, &server, &pids, idle.pid(), request_bytes, &mut rng)?;
        let ratios: Vec<f64> = pairs
            .iter()
            .map(|p| p.on.per_req() / p.off.per_req())
            .collect();
        let iv = stats::bootstrap_median(&ratios).map(|x| (x - 1.0) * 100.0);
        let sd = spread_pct(&ratios);
        r.code(format!(
            "{:<9} pairs {}: ratio median {:+.2}% [{:+.2}, {:+.2}], sd of a pair {sd:.2}%",
            v.name(),
            pairs.len(),
            iv.median,
            iv.lo,
            iv.hi
        ));
        let target = v.target(kind);
        let verdict = target.map_or(String::new(), |t| {
            let verdict = Verdict::at_most(iv, t);
            r.record(
                &format!(
                    "{} (1w, paired windows): {} added CPU per request",
                    kind.key,
                    v.name()
                ),
                verdict,
            );
            verdict.label().to_string()
        });
        let median =
            |f: &dyn Fn(&Pair) -> f64| stats::median(&pairs.iter().map(f).collect::<Vec<_>>());
        rows.push(vec![
            v.name().into(),
            format!("{:.3}", median(&|p| p.off.per_req() * 1e6)),
            format!("{:.3}", median(&|p| p.on.per_req() * 1e6)),
            interval(iv),
            target.map_or("—".into(), |t| format!("≤ {t}%")),
            verdict,
            format!("{:.0}", median(&|p| p.off.requests / p.off.wall_s)),
        ]);
        added.push((v, ratios));
    }
    r.md("");
    super::cpu::table(r, &rows);
    r.md("");
    // socket against the floor, each from its own pairs: socket's added % minus factor x
    // floor's, its interval from resampling both.
    let ratios_of = |v: Variant| added.iter().find(|(x, _)| *x == v).map(|(_, r)| r.clone());
    if let (Some(factor), Some(socket), Some(floor)) = (
        kind.floor_factor,
        ratios_of(Variant::Socket),
        ratios_of(Variant::Floor),
    ) {
        let iv = stats::bootstrap_difference(&socket, &floor, factor);
        let what = format!(
            "{} (1w, paired windows): socket added <= {factor} x floor added",
            kind.key
        );
        let verdict = Verdict::at_most(iv, 0.0);
        r.record(&what, verdict);
        r.code(format!(
            "{}  {what}: socket added − {factor} × floor added {:+.2} points [{:+.2}, {:+.2}] \
             (target ≤ 0)",
            verdict.label(),
            iv.median,
            iv.lo,
            iv.hi
        ));
    }
    ensure!(
        server.tree() == pids,
        "the server's processes changed during the windows: {pids:?} -> {:?}",
        server.tree()
    );
    Ok(())
}

/// One window: the server's CPU and requests over it.
#[derive(Clone, Copy, Debug)]
struct Window {
    cpu_s: f64,
    requests: f64,
    wall_s: f64,
}

impl Window {
    fn per_req(&self) -> f64 {
        self.cpu_s / self.requests.max(1.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Pair {
    on: Window,
    off: Window,
}

fn run_variant(
    v: Variant,
    server: &Server,
    pids: &[u32],
    idle: u32,
    request_bytes: f64,
    rng: &mut Rng,
) -> Result<Vec<Pair>> {
    let fp = v.flyprobe_args(server.pid(), idle).map(|args| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cpu = PROBE_CPU.to_string();
        Flyprobe::start_via(&["taskset", "-c", &cpu], &args)
    });
    let fp_pid = fp.as_ref().map(Flyprobe::pid);
    let toggle = |attached: bool| {
        if let Some(pid) = fp_pid {
            let sig = if attached {
                libc::SIGUSR2
            } else {
                libc::SIGUSR1
            };
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, sig) };
        }
    };
    let seconds = (PAIRS as f64 * 2.0 * (SETTLE + WINDOW).as_secs_f64()) as u64 + 10;
    let mut wrk = Wrk::start(&server.url(), seconds)?;
    // Warm-up: the connections opened, the server's caches filled.
    std::thread::sleep(Duration::from_secs(1));
    let mut pairs = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        let first_on = rng.below(2) == 0;
        let mut on = None;
        let mut off = None;
        for attached in [first_on, !first_on] {
            toggle(attached);
            std::thread::sleep(SETTLE);
            let w = window(server, pids, request_bytes)?;
            if attached {
                on = Some(w);
            } else {
                off = Some(w);
            }
        }
        if let (Some(on), Some(off)) = (on, off) {
            pairs.push(Pair { on, off });
        }
        if wrk.exited() {
            bail!("wrk exited before the windows were done");
        }
    }
    wrk.stop();
    if let Some(fp) = fp {
        toggle(true);
        fp.stop();
    }
    Ok(pairs)
}

/// The server's CPU and the requests it received over one window.
fn window(server: &Server, pids: &[u32], request_bytes: f64) -> Result<Window> {
    let cpu0 = tree_cpu_ns(pids)?;
    let bytes0 = received_bytes(server.port)?;
    let t0 = Instant::now();
    std::thread::sleep(WINDOW);
    let cpu1 = tree_cpu_ns(pids)?;
    let bytes1 = received_bytes(server.port)?;
    Ok(Window {
        cpu_s: cpu1.saturating_sub(cpu0) as f64 / 1e9,
        requests: bytes1.saturating_sub(bytes0) as f64 / request_bytes,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

fn tree_cpu_ns(pids: &[u32]) -> Result<u64> {
    pids.iter().try_fold(0, |sum, &pid| {
        server::cpu_ns(pid)
            .map(|ns| sum + ns)
            .with_context(|| format!("server process {pid} is gone"))
    })
}

/// Bytes received by the established TCP sockets on local port `port` (the server's side
/// of wrk's connections), from the kernel's tcp_info.
fn received_bytes(port: u16) -> Result<u64> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .context("running ss (iproute2; `cargo xtask setup` installs it)")?;
    ensure!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(sum_received(&String::from_utf8_lossy(&out.stdout)))
}

/// The sum of `bytes_received:N` in `ss -ti` output.
fn sum_received(ss: &str) -> u64 {
    ss.split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_received:"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// The size of the request wrk sends to `server` (its default: the path and a Host header).
fn request_bytes(server: &Server) -> f64 {
    format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        server.path, server.port
    )
    .len() as f64
}

/// A background wrk load on CPU `PROBE_CPU`, for `seconds` at most.
struct Wrk(Child);

impl Wrk {
    fn start(url: &str, seconds: u64) -> Result<Self> {
        let child = Command::new("taskset")
            .args(["-c", &PROBE_CPU.to_string(), "wrk", "-t1"])
            .arg(format!("-c{WRK_CONNECTIONS}"))
            .arg(format!("-d{seconds}s"))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wrk (`cargo xtask setup` installs it)")?;
        Ok(Self(child))
    }

    fn exited(&mut self) -> bool {
        self.0.try_wait().is_ok_and(|s| s.is_some())
    }

    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Standard deviation of `ratios`, in % of 1.
fn spread_pct(ratios: &[f64]) -> f64 {
    let n = ratios.len().max(1) as f64;
    let mean = ratios.iter().sum::<f64>() / n;
    (ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt() * 100.0
}

fn interval(iv: Interval) -> String {
    format!("{:+.2}% [{:+.2}%, {:+.2}%]", iv.median, iv.lo, iv.hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_bytes_received_of_every_socket() {
        let ss = "0 0 127.0.0.1:80 127.0.0.1:5000\n\t cubic wscale:7,7 bytes_sent:900 \
                  bytes_acked:900 bytes_received:470 segs_out:10\n0 0 127.0.0.1:80 \
                  127.0.0.1:5001\n\t cubic bytes_received:47 bytes_sent:1\n";
        assert_eq!(sum_received(ss), 517);
        assert_eq!(sum_received(""), 0);
    }

    #[test]
    fn only_socket_and_unwatched_have_targets() {
        let nginx = &KINDS[0];
        assert_eq!(Variant::Socket.target(nginx), Some(nginx.socket_max));
        assert_eq!(Variant::Floor.target(nginx), None);
        assert_eq!(Variant::Again.flyprobe_args(1, 2), None);
        let unwatched = Variant::Unwatched.flyprobe_args(1, 2).unwrap();
        assert_eq!(unwatched.last().map(String::as_str), Some("2"));
        assert!(unwatched.iter().any(|a| a == "--bench-toggle"));
    }
}
