//! The `flyprobe` binary under test, and its scrapes.

use std::{
    collections::BTreeMap,
    fs::File,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use prometheus_parse::{Sample, Scrape, Value};

use crate::{artifact, client::Conn, eventually, free_port, procs::Guard, workspace};

pub fn bin() -> PathBuf {
    artifact("FLYPROBE_BIN", workspace().join("target/release/flyprobe"))
}

/// A file for a child's stderr, unique per test process and call.
pub fn log_path(tag: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "flyprobe-test-{}-{n}-{tag}.log",
        std::process::id()
    ))
}

/// The hook set every flyprobe under test is told to use (`--hooks`), from `FLYPROBE_HOOKS`;
/// `None` when the variable is unset or empty.
pub fn hooks() -> Option<String> {
    std::env::var("FLYPROBE_HOOKS")
        .ok()
        .filter(|h| !h.is_empty())
}

/// Whether flyprobe tells a listener's own overflows apart with hook set `set` on this
/// kernel: the fentry set sees the handshakes a listener dropped (`kfree_skb`'s `rx_sk`,
/// or before Linux 6.11 fexit on `tcp_check_req`); the socket set from Linux 6.11
/// (`rx_sk`); the syscall set never.
pub fn overflows_per_listener(set: &str) -> bool {
    set == "fentry" || (set == "socket" && crate::kernel_at_least(6, 11))
}

/// A wrapper for [`Flyprobe::start_via`]: `setpriv` (the program at that path) running
/// flyprobe as nobody holding only the documented minimal set of capabilities to start
/// (tracefs already mounted).
pub fn as_nobody(setpriv: &str) -> Vec<String> {
    let caps = "-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search";
    vec![
        setpriv.into(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
    ]
}

pub struct Flyprobe {
    guard: Guard,
    pub port: u16,
    log: PathBuf,
}

impl Flyprobe {
    /// Start flyprobe watching `pid`'s tree and wait until it serves metrics.
    pub fn watch(pid: u32) -> Self {
        Self::start(&["--pid-tree", &pid.to_string()])
    }

    pub fn start(args: &[&str]) -> Self {
        Self::start_on(free_port(), args)
    }

    /// Start on a given loopback port (the demo uses the documented default, 9464).
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        Self::spawn(port, &[], args).ready()
    }

    /// Start through `wrapper` (e.g. `setpriv ...`, which then execs flyprobe) and wait
    /// until it serves metrics.
    pub fn start_via(wrapper: &[&str], args: &[&str]) -> Self {
        Self::spawn(free_port(), wrapper, args).ready()
    }

    /// Start without waiting for plain-HTTP metrics (a TLS endpoint answers no plain HTTP).
    pub fn spawn(port: u16, wrapper: &[&str], args: &[&str]) -> Self {
        let log = log_path("flyprobe");
        let stderr = File::create(&log).expect("creating flyprobe log");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        cmd.args(args);
        // FLYPROBE_HOOKS=syscall (or socket, auto) runs every test against that hook set;
        // unset, flyprobe picks its own default (and a binary without the flag still works).
        if let Some(hooks) = hooks() {
            cmd.args(["--hooks", &hooks]);
        }
        // FLYPROBE_CLASSIC_LIFECYCLE=1 (with the syscall hooks): the lifecycle programs a
        // kernel without BTF for task_struct gets.
        if std::env::var_os("FLYPROBE_CLASSIC_LIFECYCLE").is_some_and(|v| v == "1") {
            cmd.arg("--classic-lifecycle");
        }
        let guard = Guard::spawn(
            "flyprobe",
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(stderr),
        );
        Self { guard, port, log }
    }

    /// Wait until it serves /metrics (30 s, or `FLYPROBE_START_SECS`: the QEMU guests under
    /// TCG need longer); fail with its log if it exits first.
    pub fn ready(mut self) -> Self {
        let secs = std::env::var("FLYPROBE_START_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        eventually(
            "flyprobe to serve /metrics",
            Duration::from_secs(secs),
            || {
                if let Ok(Some(status)) = self.guard.child.try_wait() {
                    panic!("flyprobe exited early ({status}):\n{}", self.log());
                }
                self.try_scrape()
            },
        );
        self
    }

    /// Exited already? (Its status, if so.)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.guard.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Wait for flyprobe to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.guard.wait_timeout(timeout)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The hook set it attached, from its "attached N programs (SET hooks)" line.
    pub fn hook_set(&self) -> Option<String> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains(" hooks) to "))?;
        let set = line.split(" (").nth(1)?.split(' ').next()?;
        Some(set.to_string())
    }

    fn try_scrape(&self) -> Result<Metrics, String> {
        let mut conn = Conn::connect(self.port).map_err(|e| e.to_string())?;
        let resp = conn.get("/metrics").map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("status {}", resp.status));
        }
        let text = String::from_utf8(resp.body).map_err(|e| e.to_string())?;
        Metrics::parse(&text)
    }

    pub fn scrape(&self) -> Metrics {
        self.try_scrape()
            .unwrap_or_else(|e| panic!("scraping flyprobe: {e}\n{}", self.log()))
    }

    /// SIGTERM, then require a clean exit (status 0) within 10 s; returns flyprobe's log.
    pub fn stop(mut self) -> String {
        self.guard.signal(libc::SIGTERM);
        let status = self.guard.wait_timeout(Duration::from_secs(10));
        let log = self.log();
        assert!(
            status.is_some_and(|s| s.success()),
            "flyprobe did not exit 0 on SIGTERM ({status:?}):\n{log}"
        );
        log
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self, String> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .map_err(|e| format!("unparsable exposition: {e}"))?;
        Ok(Self {
            text: text.to_string(),
            samples: scrape.samples,
        })
    }

    fn value(sample: &Sample) -> f64 {
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        }
    }

    /// Every series of `name` whose labels include all of `labels`.
    pub fn series(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| {
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (labels, Self::value(s))
            })
            .collect()
    }

    /// `name` summed by its `pid` label (over any other labels), for one server.
    pub fn by_pid(&self, name: &str, server: &str) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.series(name, &[("server", server)]) {
            if let Some(pid) = labels.get("pid").and_then(|p| p.parse().ok()) {
                *out.entry(pid).or_default() += v as u64;
            }
        }
        out
    }

    /// The cumulative count of histogram `name`'s bucket `le`, summed over the series
    /// matching `labels`.
    pub fn bucket(&self, name: &str, labels: &[(&str, &str)], le: f64) -> u64 {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match &s.value {
                Value::Histogram(buckets) => buckets.iter().find(|b| b.less_than == le),
                _ => None,
            })
            .map(|b| b.count as u64)
            .sum()
    }

    /// The sum of every series of `name` matching `labels`.
    pub fn total(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.series(name, labels)
            .iter()
            .map(|(_, v)| *v as u64)
            .sum()
    }

    /// One server's 2xx responses, connections accepted and connections closed.
    pub fn served(&self, server: &str) -> (u64, u64, u64) {
        let of = [("server", server)];
        (
            self.total(
                "server_requests_total",
                &[("server", server), ("status", "2xx")],
            ),
            self.total("server_connections_accepted_total", &of),
            self.total("server_connections_closed_total", &of),
        )
    }

    pub fn sum(&self, name: &str, server: &str) -> u64 {
        self.by_pid(name, server).values().sum()
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.series(name, labels).as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }
}
