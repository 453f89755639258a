//! Command line. Usage errors print one line and exit 2.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{ArgGroup, Parser, error::ErrorKind};
use probe_common::{DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_REQUEST_SERIES};

use crate::error::EXIT_USAGE;

#[derive(Debug, Parser)]
#[command(
    name = "flyprobe",
    version,
    about = "Kernel-level server probe: per-worker connections and requests from eBPF \
             tracepoints, served as Prometheus metrics. Needs root (or CAP_BPF + CAP_PERFMON).",
    group(ArgGroup::new("selector").required(true).multiple(true)
        .args(["pid_tree", "port", "comm", "cgroup", "all_listeners"]))
)]
pub struct Cli {
    /// Watch this process and all its descendants, present and future (repeatable).
    #[arg(long = "pid-tree", value_name = "PID", value_parser = parse_pid)]
    pub pid_tree: Vec<u32>,

    /// Watch every process listening on this TCP port, and its tree (repeatable; found
    /// within a second of its listen()).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Watch every process with this name (comm or argv[0]), and its tree (repeatable).
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,

    /// Watch every process in this cgroup v2 subtree, e.g. /sys/fs/cgroup/kubepods.slice
    /// (repeatable).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<PathBuf>,

    /// Watch every process that listens on a TCP port (node-wide mode).
    #[arg(long)]
    pub all_listeners: bool,

    /// The kubelet's log directory: its pods/ and containers/ entries give the namespace,
    /// pod and container names of servers running in pods. Absent: no such labels.
    #[arg(long, value_name = "DIR", default_value = crate::processes::kubelet::DEFAULT_LOG_DIR)]
    pub kubelet_log_dir: PathBuf,

    /// Address to serve /metrics on. Loopback by default: expose it on purpose.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,

    /// Connections tracked at once; more are counted in flyprobe_dropped_events_total.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Processes with counters at once (live workers plus ones not yet retired).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PROCESSES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_processes: u32,

    /// Write one JSON line per request to FILE ("-": stdout). Off by default; when off the
    /// kernel does not build the records at all.
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<PathBuf>,

    /// Label combinations (process x method x status x protocol) counted at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REQUEST_SERIES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_request_series: u32,

    /// How long an exited worker keeps its own series (long enough for Prometheus to scrape
    /// its final values); then its counters are folded into the server's `pid="retired"`
    /// series, so sums and rates stay continuous while /metrics does not grow with every
    /// recycled worker.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub worker_retention: std::time::Duration,

    /// The `server` label, instead of the kind detected from the root's command line.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Exit (status 0) once every --pid-tree root has exited, instead of serving final metrics.
    #[arg(long, requires = "pid_tree")]
    pub exit_with_target: bool,

    /// TLS and authentication for the HTTP endpoint, from a YAML file in the format of
    /// Prometheus exporters' web config (tls_server_config, basic_auth_users), plus
    /// bearer_token_file.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config: Option<PathBuf>,

    /// Which kernel hooks carry connections and requests: `fentry` (fexit on tcp_recvmsg and
    /// tcp_sendmsg, where the kernel allows BPF trampolines), `socket` (raw socket
    /// tracepoints, Linux >= 6.3), both with nothing on the syscall path; `syscall` (syscall
    /// tracepoints: every syscall on the node pays while attached); or `auto` (the first of
    /// fentry, socket, syscall that works here).
    #[arg(long, value_enum, value_name = "SET", default_value_t = Hooks::Auto)]
    pub hooks: Hooks,

    /// See HTTPS requests: uprobes on OpenSSL's SSL_read/SSL_write (in each libssl the
    /// watched processes map) give a TLS connection's plaintext, counted as HTTP/1.x
    /// (`protocol="https"`) or HTTP/2 (`h2`). Off by default: each OpenSSL call of every
    /// process on the node that maps such a libssl then pays a uprobe trap (see the README).
    /// Keeps CAP_PERFMON and CAP_SYS_ADMIN, to attach to the libssl of servers found later.
    #[arg(long)]
    pub tls: bool,

    /// Attach only empty programs on the fentry or socket hooks' events (the benchmark's cost
    /// floor).
    #[arg(long, hide = true)]
    pub empty_hooks: bool,

    /// Socket set: never read the syscall's buffer, so method, status and protocol stay
    /// unknown (each turn a request of protocol "unknown"; the benchmark's measure of what the
    /// payload peeks cost). The start-up self-test needs the peeks and is not run.
    #[arg(long, hide = true)]
    pub no_peek: bool,

    /// Benchmarks only: SIGUSR1 detaches the raw programs on the socket events
    /// (sock_recv_length, sock_send_length, inet_sock_set_state), SIGUSR2 attaches them
    /// again, so one load can be measured with and without them in alternating windows.
    #[arg(long, hide = true)]
    pub bench_toggle: bool,

    /// The syscall hooks' lifecycle programs as a kernel without BTF for task_struct has
    /// them: classic sched tracepoints (tests run that path on kernels that have BTF).
    #[arg(long, hide = true)]
    pub classic_lifecycle: bool,

    /// Also attach an empty program to sys_enter_read (the benchmark's cost floor).
    #[arg(long, hide = true)]
    pub calibration_probe: bool,

    /// Pin the kernel maps under DIR (on a BPF filesystem, e.g. /sys/fs/bpf/flyprobe) so
    /// counters and open connections survive a restart of flyprobe. Off by default.
    #[arg(long, value_name = "DIR")]
    pub pin_path: Option<PathBuf>,

    /// Fail unless this tracepoint exists (CATEGORY:NAME; tests simulate an old kernel).
    #[arg(long, value_name = "TRACEPOINT", hide = true)]
    pub require_tracepoint: Vec<String>,

    /// Where tracefs is (mounted there when missing).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/kernel/tracing",
        hide = true
    )]
    pub tracefs: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hooks {
    Auto,
    Fentry,
    Socket,
    Syscall,
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => {
            Err("PID 0 is not a process; pass the server's PID (e.g. `pgrep -o uvicorn`)".into())
        }
        Ok(pid) => Ok(pid),
        Err(_) => Err(format!("'{s}' is not a PID (a positive integer)")),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration such as 30s, 5m or 1h ({e})"))
}

/// Help and version go to stdout with exit 0; anything else is one line on stderr, exit 2.
pub fn report_usage_error(err: &clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    // clap's message may continue on indented lines ("required arguments were not
    // provided:\n  --pid-tree <PID>"); fold it into one line, without the usage block.
    let rendered = err.to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.trim_start_matches("error: ");
    eprintln!("flyprobe: error: {line} (see `flyprobe --help`)");
    ExitCode::from(EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_must_be_positive_integers() {
        assert_eq!(parse_pid("1234"), Ok(1234));
        assert!(parse_pid("0").unwrap_err().contains("PID 0"));
        assert!(parse_pid("abc").unwrap_err().contains("'abc' is not a PID"));
        assert!(parse_pid("-5").is_err());
    }

    #[test]
    fn defaults_are_loopback_and_bounded() {
        let cli = Cli::try_parse_from(["flyprobe", "--pid-tree", "7"]).unwrap();
        assert_eq!(cli.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(cli.pid_tree, vec![7]);
        assert_eq!(cli.worker_retention, std::time::Duration::from_secs(300));
        assert_eq!(cli.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(cli.hooks, Hooks::Auto);
        let cli = Cli::try_parse_from(["flyprobe", "--pid-tree", "7", "--hooks", "syscall"]);
        assert_eq!(cli.unwrap().hooks, Hooks::Syscall);
        assert!(Cli::try_parse_from(["flyprobe", "--pid-tree", "7", "--hooks", "kprobe"]).is_err());
    }

    #[test]
    fn some_selector_is_required_and_they_combine() {
        assert!(Cli::try_parse_from(["flyprobe"]).is_err());
        let cli = Cli::try_parse_from([
            "flyprobe",
            "--port",
            "8000",
            "--comm",
            "nginx",
            "--cgroup",
            "/sys/fs/cgroup/kubepods.slice",
            "--all-listeners",
        ])
        .unwrap();
        assert_eq!(
            (cli.port, cli.comm.len(), cli.all_listeners),
            (vec![8000], 1, true)
        );
        assert!(Cli::try_parse_from(["flyprobe", "--port", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["flyprobe", "--all-listeners", "--exit-with-target"]).is_err()
        );
    }
}
