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
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use flyprobe_tests::{flyprobe::Flyprobe, procs::Guard};

use super::{
    Report,
    cpu::{KINDS, Kind, PROBE_CPU, interval_pct},
    server::{self, Server},
    stats::{self, Rng, Verdict},
};

/// After a toggle, before the window: the daemon has handled the signal and the kernel
/// has patched the tracepoint (a few ms), and the CPUs have settled.
const SETTLE: Duration = Duration::from_millis(100);
const WINDOW: Duration = Duration::from_millis(500);
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
                "`socket`'s flyprobe and signals, its programs detached in both windows: the A/A \
                 control (the switching itself included), whose interval is this section's \
                 resolution"
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

    fn flyprobe_args(self, server: u32, idle: u32) -> Vec<String> {
        let extra: &[&str] = match self {
            Self::Floor => &["--empty-hooks"],
            Self::Again | Self::Socket | Self::Unwatched => &[],
            Self::NoPeek => &["--no-peek"],
        };
        let pid = if self == Self::Unwatched {
            idle
        } else {
            server
        };
        toggle_args(extra, pid)
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
    super::cpu::accepts(bin, &["--bench-toggle"])
}

pub fn intro(r: &mut Report, pairs: usize) {
    r.md(format!(
        "\n## 1w. Server CPU per request, pinned, paired within one load ({pairs} pairs of {} ms \
         windows per variant, `--pairs`)\n",
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

pub fn section(r: &mut Report, kind: &Kind, seed: u64, pairs: usize) -> Result<()> {
    r.md(format!("\n### 1w.{} {}\n", kind.key, kind.title));
    // This harness and its `ss` runs stay off the server's CPU.
    let _pinned = Pinned::to(PROBE_CPU)?;
    let server = (kind.start)()?;
    let idle = Guard::spawn("sleep", Command::new("sleep").arg("infinity"));
    let pids = server.tree();
    let request_bytes = request_bytes(server.path, server.port);
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
        let (pairs, check) = run_variant(
            v,
            &server,
            &pids,
            idle.pid(),
            request_bytes,
            &mut rng,
            pairs,
        )?;
        // The windows' request counts rest on wrk's request size: checked over the load.
        // wrk goes on for a moment after the last read of the bytes (until its SIGINT is
        // handled): those requests, at the load's rate, are counted on the bytes' side.
        let off_by = (check.from_bytes + check.tail) / check.from_wrk.max(1) as f64 - 1.0;
        ensure!(
            off_by.abs() < 0.01,
            "requests from the bytes received ({:.0}, and {:.0} after the last read) and from \
             wrk ({}) differ by {:.2}%: the request size ({request_bytes} bytes) is wrong",
            check.from_bytes,
            check.tail,
            check.from_wrk,
            off_by * 100.0
        );
        let ratios: Vec<f64> = pairs
            .iter()
            .map(|p| p.on.per_req() / p.off.per_req())
            .collect();
        let iv = stats::bootstrap_median(&ratios).map(|x| (x - 1.0) * 100.0);
        let sd = spread_pct(&ratios);
        r.code(format!(
            "{:<9} pairs {}: ratio median {:+.2}% [{:+.2}, {:+.2}], sd of a pair {sd:.2}%; \
             requests over the load {:.0} from bytes (+{:.0} after the last read), {} from \
             wrk",
            v.name(),
            pairs.len(),
            iv.median,
            iv.lo,
            iv.hi,
            check.from_bytes,
            check.tail,
            check.from_wrk
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
            interval_pct(iv),
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

/// A `--bench-toggle` flyprobe's arguments: the socket hook set, `extra`, watching `pid`'s
/// tree.
pub(super) fn toggle_args(extra: &[&str], pid: u32) -> Vec<String> {
    ["--hooks", "socket"]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .chain([
            "--bench-toggle".into(),
            "--pid-tree".into(),
            pid.to_string(),
        ])
        .collect()
}

/// This thread (and what it spawns) on one CPU until dropped, then on all again.
pub(super) struct Pinned(libc::cpu_set_t);

impl Pinned {
    pub(super) fn to(cpu: u32) -> Result<Self> {
        // SAFETY: cpu_set_t is plain data; the calls only read and write the sets given.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            ensure!(
                libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut before) == 0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            ensure!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) == 0,
                "pinning the benchmark to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
            Ok(Self(before))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the set saved by `to`.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// One window: the server's CPU and requests over it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    cpu_s: f64,
    pub(super) requests: f64,
    wall_s: f64,
}

impl Window {
    pub(super) fn per_req(&self) -> f64 {
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
    n: usize,
) -> Result<(Vec<Pair>, CrossCheck)> {
    let args = v.flyprobe_args(server.pid(), idle);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cpu = PROBE_CPU.to_string();
    let fp = Flyprobe::start_via(&["taskset", "-c", &cpu], &args);
    let mut switch = Switch::new(&fp);
    // Room for the reads between windows; stopped at the end.
    let seconds = 3 * (n as f64 * 2.0 * (SETTLE + WINDOW).as_secs_f64()) as u64 + 30;
    let started = Instant::now();
    let mut wrk = Wrk::start(&server.url(), seconds)?;
    // Warm-up: the connections opened, the server's caches filled.
    std::thread::sleep(Duration::from_secs(1));
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let first_on = rng.below(2) == 0;
        switch.set(first_on && v != Variant::Again)?;
        let first = window(server, pids, request_bytes)?;
        switch.set(!first_on && v != Variant::Again)?;
        let second = window(server, pids, request_bytes)?;
        let (on, off) = if first_on {
            (first, second)
        } else {
            (second, first)
        };
        pairs.push(Pair { on, off });
        ensure!(!wrk.exited(), "wrk exited before the windows were done");
    }
    let from_bytes = received_bytes(server.port)?.values().sum::<u64>() as f64 / request_bytes;
    let read = Instant::now();
    let from_wrk = wrk.stop()?;
    let rate = from_bytes / read.duration_since(started).as_secs_f64();
    let tail = rate * read.elapsed().as_secs_f64();
    fp.stop();
    Ok((
        pairs,
        CrossCheck {
            from_bytes,
            tail,
            from_wrk,
        },
    ))
}

/// The requests of a whole load as this section counts them (the bytes the server's
/// sockets received over the size of wrk's request) and as wrk does.
struct CrossCheck {
    from_bytes: f64,
    /// The requests wrk completed after the bytes' last read, until it stopped (estimated
    /// at the load's rate).
    tail: f64,
    from_wrk: u64,
}

/// The daemon's line for each switch (`--bench-toggle`).
const TOGGLED: &str = "programs on the socket events";

/// Switches a `--bench-toggle` flyprobe's programs on the socket events.
pub(super) struct Switch<'a> {
    fp: &'a Flyprobe,
    toggles: usize,
}

impl<'a> Switch<'a> {
    pub(super) fn new(fp: &'a Flyprobe) -> Self {
        Self { fp, toggles: 0 }
    }

    /// Attach (SIGUSR2) or detach (SIGUSR1), then wait for the daemon's log line and the
    /// settle time: a window must never measure a switch still pending.
    pub(super) fn set(&mut self, attached: bool) -> Result<()> {
        let sig = if attached {
            libc::SIGUSR2
        } else {
            libc::SIGUSR1
        };
        // SAFETY: kill(2) on our own child.
        ensure!(
            unsafe { libc::kill(self.fp.pid() as i32, sig) } == 0,
            "flyprobe (pid {}) is gone",
            self.fp.pid()
        );
        self.toggles += 1;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.fp.log().matches(TOGGLED).count() < self.toggles {
            ensure!(
                Instant::now() < deadline,
                "flyprobe did not confirm switch {} within 5 s:\n{}",
                self.toggles,
                self.fp.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(SETTLE);
        Ok(())
    }
}

/// The server's CPU and the requests it received over one window.
fn window(server: &Server, pids: &[u32], request_bytes: f64) -> Result<Window> {
    measured(server, pids, request_bytes, || {
        std::thread::sleep(WINDOW);
        Ok(())
    })
}

/// The server's CPU (processes `pids`) and the requests it received while `during` ran.
pub(super) fn measured(
    server: &Server,
    pids: &[u32],
    request_bytes: f64,
    during: impl FnOnce() -> Result<()>,
) -> Result<Window> {
    let cpu0 = tree_cpu_ns(pids)?;
    let bytes0 = received_bytes(server.port)?;
    let t0 = Instant::now();
    during()?;
    let cpu1 = tree_cpu_ns(pids)?;
    let bytes1 = received_bytes(server.port)?;
    // wrk keeps its connections: a window where one closed or opened would count wrong.
    ensure!(
        bytes0.keys().eq(bytes1.keys()),
        "wrk's connections changed during a window ({} -> {} connections)",
        bytes0.len(),
        bytes1.len()
    );
    let received: u64 = bytes1
        .iter()
        .map(|(peer, b)| b.saturating_sub(bytes0[peer]))
        .sum();
    ensure!(received > 0, "the server received nothing in a window");
    Ok(Window {
        cpu_s: cpu1.saturating_sub(cpu0) as f64 / 1e9,
        requests: received as f64 / request_bytes,
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

/// Bytes received by each established TCP socket on local port `port` (the server's side of
/// wrk's connections), by peer address, from the kernel's tcp_info.
fn received_bytes(port: u16) -> Result<BTreeMap<String, u64>> {
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
    Ok(received_by_peer(&String::from_utf8_lossy(&out.stdout)))
}

/// `bytes_received:N` of each socket in `ss -tinH state established` output, by its peer
/// address (each socket is a line of queues and addresses, then a line of tcp_info).
fn received_by_peer(ss: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut peer = None;
    for word in ss.split_whitespace() {
        if let Some(n) = word.strip_prefix("bytes_received:") {
            if let (Some(p), Ok(n)) = (peer.take(), n.parse::<u64>()) {
                out.insert(p, n);
            }
        } else if is_address(word) {
            // Local address first, then the peer: the second of the line wins.
            peer = Some(word.to_string());
        }
    }
    out
}

/// `1.2.3.4:80` or `[::1]:80` (not a tcp_info field such as `rto:201`).
fn is_address(word: &str) -> bool {
    word.rsplit_once(':').is_some_and(|(host, port)| {
        (host.contains('.') || host.ends_with(']'))
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The size of the request wrk sends to `path` on loopback port `port` (its default: the
/// path and a Host header).
pub(super) fn request_bytes(path: &str, port: u16) -> f64 {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").len() as f64
}

/// A background wrk load on CPU `PROBE_CPU`, for `seconds` at most; killed if dropped.
pub(super) struct Wrk(Option<Child>);

impl Wrk {
    pub(super) fn start(url: &str, seconds: u64) -> Result<Self> {
        let child = Command::new("taskset")
            .args(["-c", &PROBE_CPU.to_string(), "wrk", "-t1"])
            .arg(format!("-c{WRK_CONNECTIONS}"))
            .arg(format!("-d{seconds}s"))
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wrk (`cargo xtask setup` installs it)")?;
        Ok(Self(Some(child)))
    }

    /// wrk's process (taskset exec'd it).
    pub(super) fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub(super) fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| c.try_wait().is_ok_and(|s| s.is_some()))
    }

    /// Stop it (SIGINT: wrk then prints its summary) and return the requests it completed.
    pub(super) fn stop(mut self) -> Result<u64> {
        let child = self.0.take().context("wrk was stopped already")?;
        // SAFETY: kill(2) on our own child (taskset exec'd wrk: the same process).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        completed(&text).with_context(|| format!("no request count in wrk's output:\n{text}"))
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `N requests in` of wrk's summary.
fn completed(summary: &str) -> Option<u64> {
    summary
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
}

/// Standard deviation of `ratios`, in % of 1.
fn spread_pct(ratios: &[f64]) -> f64 {
    let n = ratios.len().max(1) as f64;
    let mean = ratios.iter().sum::<f64>() / n;
    (ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt() * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_received_by_peer() {
        let ss = "0 0 127.0.0.1:80 127.0.0.1:5000\n\t cubic wscale:7,7 rto:201 bytes_sent:900 \
                  bytes_acked:900 bytes_received:470 segs_out:10\n0 0 [::1]:80 \
                  [::1]:5001\n\t cubic bytes_received:47 bytes_sent:1\n";
        let peers = received_by_peer(ss);
        assert_eq!(
            peers.into_iter().collect::<Vec<_>>(),
            [("127.0.0.1:5000".into(), 470), ("[::1]:5001".into(), 47)]
        );
        assert!(received_by_peer("").is_empty());
    }

    #[test]
    fn wrk_summary_count() {
        let out = "Running 1m test @ http://127.0.0.1:8080/\n  1 threads and 32 connections\n  \
                   8261630 requests in 59.95s, 1.13GB read\nRequests/sec: 137809.55\n";
        assert_eq!(completed(out), Some(8_261_630));
        assert_eq!(completed("nothing"), None);
    }

    #[test]
    fn wrk_request_size() {
        // Measured on 6.18: nginx's stub_status counted 46.96 bytes_received per request
        // under `wrk -t1 -c32 http://127.0.0.1:18080/ok.txt`.
        assert_eq!(request_bytes("/ok.txt", 18080), 47.0);
        assert_eq!(request_bytes("/", 8), 37.0);
    }

    #[test]
    fn only_socket_and_unwatched_have_targets() {
        let nginx = &KINDS[0];
        assert_eq!(Variant::Socket.target(nginx), Some(nginx.socket_max));
        assert_eq!(Variant::Floor.target(nginx), None);
        assert!(
            Variant::Again
                .flyprobe_args(1, 2)
                .ends_with(&["1".to_string()])
        );
        let unwatched = Variant::Unwatched.flyprobe_args(1, 2);
        assert_eq!(unwatched.last().map(String::as_str), Some("2"));
        assert!(unwatched.iter().any(|a| a == "--bench-toggle"));
    }
}
