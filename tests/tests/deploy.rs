//! The deployment artefacts in deploy/ (issue 7), checked with the real tools:
//!
//! - Kubernetes manifests and the Helm chart: tests/python/validate_deploy.py renders the chart
//!   with Helm's own engine (the Helm Go SDK, shipped by helm-python-sdk), validates every
//!   object against the Kubernetes JSON schemas (kubernetes-validate, strict, every version it
//!   carries) and the ServiceMonitor against models generated from the prometheus-operator
//!   CRD, and checks the DaemonSet's security shape; see that file for what each check does.
//! - The command lines they run go through flyprobe's own argument parser.
//! - The documented capability set is enough: flyprobe bounded to exactly it watches a server
//!   of another user.
//! - systemd-analyze verifies the unit and rates its exposure; promtool checks the Prometheus
//!   config and the dashboard's PromQL; hadolint and BuildKit's parser read the Dockerfile,
//!   which is not built (no container engine here).
//!
//! Nothing skips: a missing tool fails with the fix (`cargo xtask setup` installs them).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use flyprobe_tests::{
    artifact, client::Conn, eventually, flyprobe, free_port, procs::Guard, require_root, servers,
    workspace,
};

/// The capabilities flyprobe is documented to need, and the only ones the DaemonSet, the Helm
/// chart and the systemd unit may grant.
const CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];

/// The metrics flyprobe exports, with their own labels.
const METRICS: &[(&str, &[&str])] = &[
    ("server_active_connections", &["server", "pid"]),
    ("server_in_flight_requests", &["server", "pid"]),
    (
        "server_requests_total",
        &["server", "pid", "method", "status", "protocol", "transport"],
    ),
    (
        "server_request_duration_seconds",
        &["server", "method", "status"],
    ),
    ("server_connections_accepted_total", &["server", "pid"]),
    ("server_connections_closed_total", &["server", "pid"]),
    (
        "server_exchanges_total",
        &["server", "pid", "protocol", "transport"],
    ),
    ("server_received_bytes_total", &["server", "pid"]),
    ("server_sent_bytes_total", &["server", "pid"]),
    ("server_workers", &["server"]),
    ("server_uptime_seconds", &["server"]),
    ("server_up", &["server"]),
    ("server_worker_info", &["server", "pid", "ppid", "comm"]),
    ("server_worker_uptime_seconds", &["server", "pid"]),
    ("server_started_total", &["server"]),
    ("server_stopped_total", &["server", "reason"]),
    ("server_connection_queue_seconds", &["server"]),
    ("server_listen_queue_length", &["server", "port"]),
    ("server_listen_queue_limit", &["server", "port"]),
    ("server_listen_overflows_total", &["server", "port"]),
    ("server_connection_resets_total", &["server", "direction"]),
    ("flyprobe_build_info", &["version"]),
    ("flyprobe_dropped_events_total", &["reason"]),
    ("flyprobe_map_entries", &["map"]),
];
const HISTOGRAMS: &[&str] = &[
    "server_request_duration_seconds",
    "server_connection_queue_seconds",
];
/// Labels every server_* series carries in node-wide mode, when known.
const NODE_WIDE_LABELS: &[&str] = &[
    "container_id",
    "pod_uid",
    "unit",
    "netns",
    "namespace",
    "pod",
    "container",
];
/// Labels Prometheus adds from the target (the ServiceMonitor and the Kubernetes example add
/// node, service, endpoint, and the probe pod's namespace and pod as probe_namespace and
/// probe_pod: namespace, pod and container are the servers').
const TARGET_LABELS: &[&str] = &[
    "instance",
    "job",
    "node",
    "service",
    "endpoint",
    "probe_namespace",
    "probe_pod",
];
/// What the dashboard must show (issue 7): the stat panels, request rate by status, latency
/// quantiles, in-flight, the per-worker table and the lifecycle.
const DASHBOARD_REQUIRES: &[&str] = &[
    "server_workers",
    "server_uptime_seconds",
    "server_active_connections",
    "server_in_flight_requests",
    "server_requests_total",
    "server_request_duration_seconds",
    "server_worker_info",
    "server_started_total",
    "server_stopped_total",
];

fn deploy() -> PathBuf {
    workspace().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A program on PATH (or in /usr/sbin, /sbin); missing is a failure that says how to get it.
fn tool(name: &str, fix: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found: {fix}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of `key = "value"` in a Rust or TOML source.
fn quoted_value(source: &str, key: &str) -> String {
    source
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(key)?;
            rest.split('"').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no {key} = \"...\""))
}

/// What the artefacts must agree with, for validate_deploy.py.
fn expectations() -> String {
    let metrics: BTreeMap<&str, &[&str]> = METRICS.iter().copied().collect();
    let cargo = read(&workspace().join("Cargo.toml"));
    let setup = read(&workspace().join("xtask/src/setup.rs"));
    serde_json::json!({
        "capabilities": CAPABILITIES,
        "metrics": metrics,
        "histograms": HISTOGRAMS,
        "node_wide_labels": NODE_WIDE_LABELS,
        "target_labels": TARGET_LABELS,
        "dashboard_requires": DASHBOARD_REQUIRES,
        "promtool": tool("promtool", "`cargo xtask setup` installs Debian's prometheus package"),
        "version": env!("CARGO_PKG_VERSION"),
        "rust_version": quoted_value(&cargo, "rust-version ="),
        "bpf_linker_version": quoted_value(&setup, "const BPF_LINKER_VERSION: &str ="),
    })
    .to_string()
}

/// Runs one check of tests/python/validate_deploy.py (in the test venv); returns the command
/// lines it found, by where they come from.
fn validate(check: &str) -> BTreeMap<String, Vec<String>> {
    let script = workspace().join("tests/python/validate_deploy.py");
    let out = run(Command::new(servers::python())
        .arg(&script)
        .arg(check)
        .arg(expectations()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "validate_deploy.py {check} failed ({}):\n{stderr}\n(a missing module: run `cargo xtask \
         setup`, which installs tests/python/requirements.txt into target/venv)",
        out.status
    );
    let result = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("validate_deploy.py {check} printed no RESULT line"));
    let result: serde_json::Value = serde_json::from_str(result).expect("RESULT is JSON");
    serde_json::from_value(result["command_lines"].clone()).expect("command_lines")
}

/// flyprobe's own parser accepts `args`: clap stops at the first bad argument or value before
/// it reaches --help, so `flyprobe ARGS --help` exits 0 only when all of ARGS parse.
fn assert_flyprobe_parses(source: &str, args: &[String]) {
    let out = run(Command::new(flyprobe::bin()).args(args).arg("--help"));
    assert!(
        out.status.success(),
        "{source}: flyprobe refuses `{}`:\n{}",
        args.join(" "),
        text(&out)
    );
    eprintln!("ok: {source}: flyprobe parses `{}`", args.join(" "));
}

fn assert_all_parse(lines: &BTreeMap<String, Vec<String>>, expected: usize) {
    assert_eq!(lines.len(), expected, "command lines found: {lines:?}");
    for (source, args) in lines {
        assert_flyprobe_parses(source, args);
    }
}

#[test]
fn kubernetes_manifests_match_the_schemas() {
    let lines = validate("kubernetes");
    assert_all_parse(&lines, 1);
}

#[test]
fn helm_chart_renders_and_matches_the_schemas() {
    let lines = validate("helm");
    assert_all_parse(&lines, 3);
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    validate("grafana");
}

#[test]
fn prometheus_config_passes_promtool() {
    let promtool = tool(
        "promtool",
        "`cargo xtask setup` installs Debian's prometheus package",
    );
    let config = deploy().join("prometheus/prometheus.yml");
    let out = run(Command::new(promtool)
        .args(["check", "config"])
        .arg(&config));
    assert!(
        out.status.success(),
        "promtool check config {}:\n{}",
        config.display(),
        text(&out)
    );
    eprint!("{}", text(&out));
    validate("prometheus");
}

#[test]
fn dockerfile_lints_and_runs_flyprobe() {
    let lines = validate("dockerfile");
    assert_all_parse(&lines, 1);
}

/// `[Service]` settings of a unit file: key -> every value it is given.
fn service_section(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = "";
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
            out.entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_verifies_and_bounds_capabilities() {
    let unit_path = deploy().join("systemd/flyprobe.service");
    let unit = read(&unit_path);
    let service = service_section(&unit);
    let one = |key: &str| -> &str {
        match service.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}= must be set exactly once in [Service], got {other:?}"),
        }
    };
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let set: BTreeSet<String> = one(key).split_whitespace().map(str::to_string).collect();
        assert_eq!(set, expected, "{key}= must be exactly the documented set");
    }
    for (key, value) in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict")] {
        assert_eq!(one(key), value, "{key}=");
    }
    let exec: Vec<String> = one("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/flyprobe", "ExecStart=");
    assert!(
        exec.contains(&"--all-listeners".to_string()),
        "ExecStart= runs --all-listeners"
    );
    assert_flyprobe_parses("deploy/systemd ExecStart", &exec[1..]);

    // systemd's own checks, in a scratch root: the unit where it installs, the distribution's
    // units it refers to, and flyprobe where ExecStart= runs it.
    let analyze = tool(
        "systemd-analyze",
        "install Debian's systemd package (apt-get install systemd)",
    );
    let root = std::env::temp_dir().join(format!("flyprobe-deploy-systemd-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    for dir in ["etc/systemd/system", "usr/lib/systemd", "usr/local/bin"] {
        fs::create_dir_all(root.join(dir)).expect("creating the scratch root");
    }
    fs::copy(&unit_path, root.join("etc/systemd/system/flyprobe.service")).expect("copying");
    fs::copy(flyprobe::bin(), root.join("usr/local/bin/flyprobe")).expect("copying flyprobe");
    let copied = run(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd")));
    assert!(copied.status.success(), "copying units: {}", text(&copied));

    let verify = run(Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("flyprobe.service"));
    // Unknown keys and values are only warnings to systemd: any output is a failure here.
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify ({}):\n{}",
        verify.status,
        text(&verify)
    );
    eprintln!("ok: systemd-analyze verify: no findings");

    // Exposure (0 = locked down, 10 = unprotected) must stay at most 3.0: the threshold is on
    // systemd's 0..100 scale.
    let security = run(Command::new(&analyze)
        .args(["security", "--offline=true", "--threshold=30"])
        .arg(format!("--root={}", root.display()))
        .arg("flyprobe.service"));
    let report = text(&security);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    let _ = fs::remove_dir_all(&root);
    assert!(
        security.status.success(),
        "systemd-analyze security: exposure above 3.0:\n{report}"
    );
    eprintln!("ok: systemd-analyze security: {}", overall.trim());
}

/// A server run as nobody (a dumpable process of another user: its /proc/<pid>/fd is 0500
/// and its own, so finding its listening socket takes CAP_DAC_READ_SEARCH to list the fds and
/// CAP_SYS_PTRACE to read their links), answering GET /.
fn nobody_server(setpriv: &Path, port: u16) -> Guard {
    let bin = artifact(
        "FLYPROBE_TEST_SERVER",
        workspace().join("target/release/flyprobe-test-server"),
    );
    let guard = Guard::spawn(
        "flyprobe-test-server (nobody)",
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin)
            .args(["--port", &port.to_string()]),
    );
    eventually("the server to answer", Duration::from_secs(30), || {
        Conn::connect(port)
            .and_then(|mut c| c.get("/"))
            .map(|r| r.status)
    });
    let uid = fs::read_to_string(format!("/proc/{}/status", guard.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .next()
                .map(str::to_string)
        });
    assert_eq!(uid.as_deref(), Some("65534"), "the server runs as nobody");
    guard
}

/// The documented capability set is enough, at start and afterwards. flyprobe runs as root
/// bounded to exactly these capabilities, with no_new_privs, as the DaemonSet and the systemd
/// unit run it (tracefs is then read without CAP_DAC_OVERRIDE). It must find a server of
/// another user that was running when it started, and one that starts after it attached
/// (what happens all day on a node), and count their requests.
#[test]
fn documented_capabilities_suffice() {
    require_root();
    let setpriv = tool("setpriv", "install Debian's util-linux package");
    let caps = format!(
        "-all,{}",
        CAPABILITIES
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let before_port = free_port();
    let before = nobody_server(&setpriv, before_port);
    let after_port = free_port();

    let metrics_port = free_port();
    let log = flyprobe::log_path("capabilities");
    let _flyprobe = Guard::spawn(
        "flyprobe (documented capabilities)",
        Command::new(&setpriv)
            .arg(format!("--bounding-set={caps}"))
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .args(["--no-new-privs", "--"])
            .arg(flyprobe::bin())
            .args(["--port", &before_port.to_string()])
            .args(["--port", &after_port.to_string()])
            .args(["--listen", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("creating the log")),
    );
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let scrape = || -> Result<flyprobe::Metrics, String> {
        let resp = Conn::connect(metrics_port)
            .and_then(|mut c| c.get("/metrics"))
            .map_err(|e| e.to_string())?;
        flyprobe::Metrics::parse(&String::from_utf8_lossy(&resp.body))
    };
    let found = |pid: u32, what: &str| {
        let pid = pid.to_string();
        eventually(what, Duration::from_secs(15), || {
            let m = scrape()?;
            match m.series("server_worker_info", &[("pid", &pid)]).len() {
                1 => Ok(()),
                n => Err(format!(
                    "{n} server_worker_info series; flyprobe's log:\n{}",
                    log_text()
                )),
            }
        });
    };
    found(
        before.pid(),
        "flyprobe bounded to the documented capabilities to find the server running before it",
    );

    // By now flyprobe has attached (it serves) and given up what it no longer needs.
    let after = nobody_server(&setpriv, after_port);
    found(
        after.pid(),
        "flyprobe bounded to the documented capabilities to find a server of another user \
         started after it attached (listing that server's /proc/<pid>/fd takes \
         CAP_DAC_READ_SEARCH, reading the links CAP_SYS_PTRACE: does flyprobe keep both?)",
    );

    for (server, port) in [(&before, before_port), (&after, after_port)] {
        for _ in 0..3 {
            let resp = Conn::connect(port)
                .and_then(|mut c| c.get("/"))
                .expect("GET /");
            assert_eq!(resp.status, 200);
        }
        let pid = server.pid().to_string();
        eventually(
            "flyprobe bounded to the documented capabilities to count the requests",
            Duration::from_secs(10),
            || {
                let n = scrape()?.total("server_requests_total", &[("pid", &pid)]);
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(format!("{n} requests; flyprobe's log:\n{}", log_text()))
                }
            },
        );
    }
    eprintln!(
        "ok: flyprobe bounded to {CAPABILITIES:?} finds and counts servers of another user, \
         started before and after it"
    );
}
