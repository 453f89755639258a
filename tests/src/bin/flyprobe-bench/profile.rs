//! Section 1p: where the added CPU goes. Section 1w says how much CPU per request flyprobe
//! adds to a pinned server; this section says what that CPU is spent on. As in 1w, one
//! flyprobe runs through one wrk load and its programs on the socket events are attached
//! and detached (`--bench-toggle`) for alternating windows; during each window `perf record`
//! samples the server's CPU (`-C 0`, cpu-clock, no call graphs), and each kernel or user
//! symbol's share of the server's samples, times the window's CPU per request (the server's
//! CPU clocks over the requests its sockets received), is that symbol's time per request.
//! Symbols are grouped by what they do for flyprobe (its programs, the map code, the helpers
//! they call, the tracepoint's dispatch); what grew anywhere else (the server's own code,
//! the network stack) is shown as the rest, with its largest symbols. wrk's wake-ups per
//! request are counted too: on loopback the server's send wakes wrk, on the server's CPU,
//! whenever wrk was waiting, and a slower server finds it waiting more often.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use flyprobe_tests::{flyprobe::Flyprobe, procs::Guard};

use super::{
    Report,
    cpu::{Kind, PROBE_CPU, SERVER_CPU},
    paired::{Pinned, Switch, Wrk, measured, request_bytes, toggle_args},
    stats::Rng,
};

/// Pairs of windows per variant: a window holds ~16,000 samples of the server, so a symbol
/// at 1% of its CPU is known to ~2.5% of itself from one window, ~1% from the eight here.
const PAIRS: usize = 4;
const WINDOW: Duration = Duration::from_secs(4);
const FREQUENCY_HZ: u32 = 4000;

/// What each group of symbols is, in the order the report lists them. A symbol belongs to
/// the first group one of whose patterns it starts with.
const GROUPS: [(&str, &[&str]); 7] = [
    (
        "dispatch: the tracepoint calling the programs",
        &[
            "bpf_trace_run",
            "__bpf_trace_",
            "call_trace_",
            "__traceiter_",
        ],
    ),
    (
        "flyprobe's programs (their own instructions)",
        &["bpf_prog_"],
    ),
    (
        "maps: hash lookups and updates",
        &[
            "htab_",
            "__htab_",
            "lookup_nulls_elem_raw",
            "lookup_elem_raw",
            "alloc_htab_elem",
            "pcpu_freelist_",
            "__pcpu_freelist_",
            "bpf_mem_",
            "memcmp",
        ],
    ),
    (
        "payload peeks: user memory reads",
        &[
            "bpf_probe_read_user",
            "copy_from_user_nofault",
            "nmi_uaccess_okay",
        ],
    ),
    (
        "kernel memory reads (socket fields)",
        &["bpf_probe_read_kernel", "copy_from_kernel_nofault"],
    ),
    (
        "clock (bpf_ktime_get_ns)",
        &["bpf_ktime_get_ns", "ktime_get_mono_fast_ns", "read_tsc"],
    ),
    (
        "other helpers",
        &[
            "bpf_get_current_",
            "bpf_task_pt_regs",
            "bpf_tail_call",
            "bpf_ringbuf_",
            "bpf_loop",
        ],
    ),
];

/// The group of `symbol` (perf's name, without its `[k] ` mark), or None: the rest.
fn group_of(symbol: &str) -> Option<usize> {
    GROUPS
        .iter()
        .position(|(_, patterns)| patterns.iter().any(|p| symbol.starts_with(p)))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// `socket`'s flyprobe, its programs detached in both windows: what the method reads
    /// where nothing changes.
    Again,
    Floor,
    Unwatched,
    Socket,
}

impl Variant {
    const ALL: [Self; 4] = [Self::Again, Self::Floor, Self::Unwatched, Self::Socket];

    fn name(self) -> &'static str {
        match self {
            Self::Again => "a/a",
            Self::Floor => "floor",
            Self::Unwatched => "unwatched",
            Self::Socket => "socket",
        }
    }

    fn flyprobe_args(self, server: u32, idle: u32) -> Vec<String> {
        match self {
            Self::Floor => toggle_args(&["--empty-hooks"], server),
            Self::Unwatched => toggle_args(&[], idle),
            Self::Again | Self::Socket => toggle_args(&[], server),
        }
    }
}

pub fn intro(r: &mut Report) {
    r.md(format!(
        "\n## 1p. Where the added CPU goes (perf, {PAIRS} pairs of {} s windows per variant)\n",
        WINDOW.as_secs()
    ));
    r.md(format!(
        "As section 1w (one flyprobe through one `wrk -t1 -c32` load, its programs on the \
         socket events detached and attached again between windows), with `perf record -C \
         {SERVER_CPU} -F {FREQUENCY_HZ}` over each window. A symbol's time per request is its \
         share of the server's samples times the window's CPU per request (CPU clocks over \
         requests, as in 1w); each figure is the mean over the windows of one state. `added` \
         is attached minus detached. The groups are flyprobe's own work; `the rest` is what \
         grew in the server's and the kernel's code, its largest symbols listed, with wrk's \
         wake-ups per request (on loopback, the server's send wakes wrk from the server's \
         CPU whenever wrk was waiting). One symbol of the rest moves by up to a few hundred ns \
         between windows where nothing changed (see `a/a`): its rows are leads; the groups \
         and the totals are the figures.\n\n\
         - `a/a`: `socket`'s flyprobe with its programs detached in both windows\n\
         - `floor`: `flyprobe --hooks socket --empty-hooks --bench-toggle --pid-tree SERVER` \
         (empty programs)\n\
         - `unwatched`: `flyprobe --hooks socket --bench-toggle --pid-tree IDLE`, watching an \
         idle `sleep`\n\
         - `socket`: `flyprobe --hooks socket --bench-toggle --pid-tree SERVER`\n"
    ));
}

pub fn section(r: &mut Report, kind: &Kind, seed: u64) -> Result<()> {
    r.md(format!("\n### 1p.{} {}\n", kind.key, kind.title));
    let _pinned = Pinned::to(PROBE_CPU)?;
    let server = (kind.start)()?;
    let idle = Guard::spawn("sleep", Command::new("sleep").arg("infinity"));
    let pids = server.tree();
    let request_bytes = request_bytes(server.path, server.port);
    let dir = std::env::temp_dir().join(format!("flyprobe-bench-perf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rng = Rng::new(seed ^ 0x7065_7266);
    for v in Variant::ALL {
        let profiles = run_variant(
            &server,
            &pids,
            v,
            &v.flyprobe_args(server.pid(), idle.pid()),
            request_bytes,
            &mut rng,
            &dir,
        )?;
        report(r, v, &profiles);
    }
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        server.tree() == pids,
        "the server's processes changed during the windows: {pids:?} -> {:?}",
        server.tree()
    );
    Ok(())
}

/// One state's windows, summed.
#[derive(Default, Debug)]
struct Profile {
    /// ns per request by symbol, summed over the windows (divide by `windows`).
    ns: HashMap<String, f64>,
    /// The server's CPU per request from its clocks, summed over the windows.
    cpu_ns: f64,
    samples: u64,
    wakeups: f64,
    windows: usize,
}

impl Profile {
    fn mean(&self, ns: f64) -> f64 {
        ns / self.windows.max(1) as f64
    }

    fn group(&self, g: Option<usize>) -> f64 {
        self.mean(
            self.ns
                .iter()
                .filter(|(s, _)| group_of(s) == g)
                .map(|(_, ns)| ns)
                .sum(),
        )
    }

    fn symbol(&self, s: &str) -> f64 {
        self.mean(self.ns.get(s).copied().unwrap_or(0.0))
    }
}

/// Attached and detached profiles of one variant.
fn run_variant(
    server: &super::server::Server,
    pids: &[u32],
    v: Variant,
    args: &[String],
    request_bytes: f64,
    rng: &mut Rng,
    dir: &Path,
) -> Result<[Profile; 2]> {
    let cpu = PROBE_CPU.to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fp = Flyprobe::start_via(&["taskset", "-c", &cpu], &args);
    let mut switch = Switch::new(&fp);
    let seconds = (PAIRS as u64 * 2) * (WINDOW.as_secs() + 5) + 30;
    let mut wrk = Wrk::start(&server.url(), seconds)?;
    let wrk_pid = wrk.pid().context("wrk did not start")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut profiles = [Profile::default(), Profile::default()];
    for pair in 0..PAIRS {
        let first_on = rng.below(2) == 0;
        for attached in [first_on, !first_on] {
            switch.set(attached && v != Variant::Again)?;
            let file = dir.join(format!(
                "{}-{pair}.data",
                if attached { "on" } else { "off" }
            ));
            let w = window(server, pids, request_bytes, wrk_pid, &file)?;
            let symbols = symbols(&file, pids)?;
            let total: u64 = symbols.values().sum();
            ensure!(
                total > 1000,
                "perf recorded {total} samples of the server in a window"
            );
            let p = &mut profiles[usize::from(!attached)];
            for (s, n) in symbols {
                *p.ns.entry(s).or_default() += n as f64 / total as f64 * w.cpu_ns;
            }
            p.cpu_ns += w.cpu_ns;
            p.samples += total;
            p.wakeups += w.wakeups;
            p.windows += 1;
            ensure!(!wrk.exited(), "wrk exited before the windows were done");
        }
    }
    drop(wrk);
    fp.stop();
    Ok(profiles)
}

struct Window {
    cpu_ns: f64,
    wakeups: f64,
}

/// One window under `perf record`, recorded to `file`: the server's CPU per request and
/// wrk's (`wrk`) wake-ups per request over it.
fn window(
    server: &super::server::Server,
    pids: &[u32],
    request_bytes: f64,
    wrk: u32,
    file: &Path,
) -> Result<Window> {
    let mut woken = 0;
    let w = measured(server, pids, request_bytes, || {
        let before = wakeups(wrk)?;
        // No build-id cache: nothing written to root's ~/.debug.
        perf(&[
            "record",
            "-q",
            "--no-buildid-cache",
            "-C",
            &SERVER_CPU.to_string(),
            "-F",
            &FREQUENCY_HZ.to_string(),
            "-o",
            &file.to_string_lossy(),
            "--",
            "sleep",
            &WINDOW.as_secs_f64().to_string(),
        ])?;
        woken = wakeups(wrk)?.saturating_sub(before);
        Ok(())
    })?;
    Ok(Window {
        cpu_ns: w.per_req() * 1e9,
        wakeups: woken as f64 / w.requests,
    })
}

/// Voluntary context switches of `pid`'s threads: each is a wait that a wake-up ended.
fn wakeups(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).context("wrk is gone")? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        sum += voluntary_switches(&status).context("no voluntary_ctxt_switches in status")?;
    }
    Ok(sum)
}

fn voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Samples by symbol of the processes `pids` in perf data `file`.
fn symbols(file: &Path, pids: &[u32]) -> Result<BTreeMap<String, u64>> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let text = perf(&[
        "report",
        "--stdio",
        "--no-children",
        "-g",
        "none",
        "--sort",
        "sym",
        "-F",
        "sample,sym",
        "--pid",
        &pids.join(","),
        "-i",
        &file.to_string_lossy(),
    ])?;
    Ok(parse_report(&text))
}

/// What `perf ARGS` printed; its error output if it failed.
fn perf(args: &[&str]) -> Result<String> {
    let out = Command::new("perf")
        .args(args)
        .output()
        .context("running perf (`cargo xtask setup` installs linux-perf)")?;
    ensure!(
        out.status.success(),
        "perf {} failed: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `perf report -F sample,sym` lines (`  1234  [k] tcp_sendmsg`) by symbol, without the
/// `[k] ` / `[.] ` mark; comments and blank lines skipped.
fn parse_report(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((n, sym)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let sym = sym.trim();
        let sym = sym
            .strip_prefix("[k] ")
            .or_else(|| sym.strip_prefix("[.] "))
            .unwrap_or(sym)
            .trim();
        *out.entry(sym.to_string()).or_default() += n;
    }
    out
}

fn report(r: &mut Report, v: Variant, [on, off]: &[Profile; 2]) {
    let cpu_on = on.mean(on.cpu_ns);
    let cpu_off = off.mean(off.cpu_ns);
    let added = cpu_on - cpu_off;
    r.md(format!(
        "\n`{}`: server CPU per request {:.0} ns attached, {:.0} ns detached: **{:+.0} ns \
         ({:+.1}%)**; {} and {} samples of the server; wrk woken {:.3} times per request \
         attached, {:.3} detached.\n",
        v.name(),
        cpu_on,
        cpu_off,
        added,
        added / cpu_off * 100.0,
        on.samples,
        off.samples,
        on.mean(on.wakeups),
        off.mean(off.wakeups),
    ));
    let mut rows = vec![
        [
            "where",
            "ns/req attached",
            "detached",
            "added ns/req",
            "% of detached CPU",
        ]
        .map(String::from)
        .to_vec(),
    ];
    // `+ 0.0`: an empty sum is -0.0, printed as such.
    let row = |name: String, a: f64, d: f64| {
        vec![
            name,
            format!("{:.1}", a + 0.0),
            format!("{:.1}", d + 0.0),
            format!("{:+.1}", a - d + 0.0),
            format!("{:+.2}", (a - d) / cpu_off * 100.0 + 0.0),
        ]
    };
    let mut ours = (0.0, 0.0);
    for (g, (name, _)) in GROUPS.iter().enumerate() {
        let (a, d) = (on.group(Some(g)), off.group(Some(g)));
        ours = (ours.0 + a, ours.1 + d);
        rows.push(row(name.to_string(), a, d));
    }
    rows.push(row(
        "**flyprobe's work (the groups above)**".into(),
        ours.0,
        ours.1,
    ));
    let (a, d) = (on.group(None), off.group(None));
    rows.push(row("the rest (the server, the network stack)".into(), a, d));
    // The rest's largest changes, either way.
    let names: BTreeSet<&String> = on.ns.keys().chain(off.ns.keys()).collect();
    let mut rest: Vec<(&String, f64)> = names
        .into_iter()
        .filter(|s| group_of(s).is_none())
        .map(|s| (s, on.symbol(s) - off.symbol(s)))
        .collect();
    rest.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(b.0)));
    for (s, _) in rest.iter().take(6) {
        rows.push(row(
            format!("  of which `{}`", shortened(s)),
            on.symbol(s),
            off.symbol(s),
        ));
    }
    super::cpu::table(r, &rows);
}

/// A symbol cut to 48 characters (a Rust one can be a line long), `…` where it was cut.
fn shortened(symbol: &str) -> String {
    const MAX: usize = 48;
    match symbol.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &symbol[..at]),
        None => symbol.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_by_symbol() {
        let text = "# Samples: 39K of event 'cpu-clock:pppH'\n#\n           131  [.] \
                    __GI___fstatat64\n            25  [k] bpf_prog_64a50188f71ea00f_sock_recv\n\
                    \n             2  [k] __bpf_trace_sock_msg_length\n   7  [k] \
                    0xffffffffc0201234\n";
        let by = parse_report(text);
        assert_eq!(by["__GI___fstatat64"], 131);
        assert_eq!(by["bpf_prog_64a50188f71ea00f_sock_recv"], 25);
        assert_eq!(by["__bpf_trace_sock_msg_length"], 2);
        assert_eq!(by["0xffffffffc0201234"], 7);
        assert_eq!(by.len(), 4);
    }

    #[test]
    fn symbols_fall_in_their_groups() {
        let g = |s| group_of(s).map(|i| GROUPS[i].0);
        assert_eq!(g("bpf_trace_run3"), Some(GROUPS[0].0));
        assert_eq!(g("bpf_prog_6f771fecd704b35a_sock_send"), Some(GROUPS[1].0));
        assert_eq!(g("lookup_nulls_elem_raw"), Some(GROUPS[2].0));
        assert_eq!(g("__htab_map_lookup_elem"), Some(GROUPS[2].0));
        assert_eq!(g("copy_from_user_nofault"), Some(GROUPS[3].0));
        assert_eq!(g("read_tsc"), Some(GROUPS[5].0));
        assert_eq!(g("bpf_get_current_pid_tgid"), Some(GROUPS[6].0));
        assert_eq!(g("tcp_sendmsg_locked"), None);
        assert_eq!(g("ngx_http_parse_header_line"), None);
    }

    #[test]
    fn variants_watch_what_they_say() {
        let floor = Variant::Floor.flyprobe_args(1, 2);
        assert!(floor.iter().any(|a| a == "--empty-hooks"));
        assert_eq!(floor.last().map(String::as_str), Some("1"));
        let unwatched = Variant::Unwatched.flyprobe_args(1, 2);
        assert_eq!(unwatched.last().map(String::as_str), Some("2"));
        for v in Variant::ALL {
            let args = v.flyprobe_args(1, 2);
            assert!(args.iter().any(|a| a == "--bench-toggle"), "{v:?}");
            assert_eq!(args[..2], ["--hooks", "socket"], "{v:?}");
        }
    }

    #[test]
    fn long_symbols_are_cut() {
        assert_eq!(shortened("tcp_poll"), "tcp_poll");
        let long = "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode";
        assert_eq!(shortened(long), format!("{}…", &long[..48]));
        assert_eq!(shortened(&"é".repeat(60)).chars().count(), 49);
    }

    #[test]
    fn voluntary_switches_from_status() {
        let status = "Name:\twrk\nvoluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t5\n";
        assert_eq!(voluntary_switches(status), Some(1234));
        assert_eq!(voluntary_switches("Name:\twrk\n"), None);
    }
}
