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
    let mut e2e = Command::new("cargo");
    e2e.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--package",
        "flyprobe-tests",
        "--",
    ])
    // One at a time: the tests assert exact in-flight and active gauges under timing.
    .arg("--test-threads=1")
    .env("FLYPROBE_BIN", artifact("flyprobe"))
    .env("FLYPROBE_TEST_SERVER", artifact("flyprobe-test-server"))
    .env("FLYPROBE_ECHO_SERVER", artifact("flyprobe-echo-server"))
    .env("FLYPROBE_PYTHON", setup::venv_python());
    if let Some(filter) = &args.filter {
        e2e.arg(filter);
    }
    run(&mut e2e)
}
