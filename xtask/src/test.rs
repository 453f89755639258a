//! Every test: unit tests, then the end-to-end tests against the real kernel and servers.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build::{self, artifact},
    cmd::run,
    setup,
};

#[derive(Args)]
pub struct TestArgs {
    /// Only run end-to-end tests whose name contains this.
    filter: Option<String>,
}

pub fn run_all(args: &TestArgs) -> Result<()> {
    build::require_root("test")?;
    build::release(&["probe-user", "flyprobe-tests"])?;
    run(Command::new("cargo")
        .args(["test", "--release", "--workspace"])
        .args(["--exclude", "probe-ebpf", "--exclude", "flyprobe-tests"])
        // The shared HTTP parsers run in the kernel: a million random inputs each.
        .env("FLYPROBE_FUZZ_CASES", "1000000"))?;
    let mut e2e = end_to_end(&[]);
    if let Some(filter) = &args.filter {
        e2e.arg(filter);
    }
    let all = run(&mut e2e);
    if args.filter.is_some() {
        return all;
    }
    // The exact-count core again on the syscall hook set, which kernels without the socket
    // tracepoints use: both sets must count the same.
    let syscall = run(end_to_end(&[
        "--test",
        "watch_servers",
        "--test",
        "http_matrix",
        "--test",
        "http2",
        // TLS through OpenSSL runs the same programs on every hook set.
        "--test",
        "tls",
        "--test",
        "lifecycle",
        "--test",
        "unix_sockets",
        "--test",
        "threads",
        "--test",
        "stall",
    ])
    .env("FLYPROBE_HOOKS", "syscall"));
    // The lifecycle programs of a kernel without BTF for task_struct (classic sched
    // tracepoints, exit status gathered from exit_group and signals), forced here.
    let classic = run(end_to_end(&["--test", "lifecycle", "--test", "stall"])
        .env("FLYPROBE_HOOKS", "syscall")
        .env("FLYPROBE_CLASSIC_LIFECYCLE", "1"));
    // A pod's overflows from its namespace's count: the path of kernels before 6.15, which
    // the syscall set takes here.
    let pod = run(end_to_end(&["--test", "waiting"])
        .arg("a_pods_")
        .env("FLYPROBE_HOOKS", "syscall"));
    all.and(syscall).and(classic).and(pod)
}

/// `cargo test` of the end-to-end tests (`targets`: which test files, all when empty), with
/// the artifacts they drive.
fn end_to_end(targets: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--package",
        "flyprobe-tests",
    ])
    .args(targets)
    .arg("--")
    // One at a time: the tests assert exact in-flight and active gauges under timing.
    .arg("--test-threads=1")
    .env("FLYPROBE_BIN", artifact("flyprobe"))
    .env("FLYPROBE_TEST_SERVER", artifact("flyprobe-test-server"))
    .env("FLYPROBE_ECHO_SERVER", artifact("flyprobe-echo-server"))
    .env("FLYPROBE_URING_SERVER", artifact("flyprobe-uring-server"))
    .env("FLYPROBE_PYTHON", setup::venv_python());
    cmd
}
