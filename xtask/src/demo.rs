//! `cargo xtask demo`: builds flyprobe and the demo (`flyprobe-demo`,
//! tests/src/bin/flyprobe-demo.rs), then runs it.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build::{self, artifact},
    cmd::run,
    setup,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Port flyprobe serves /metrics on (loopback).
    #[arg(long, default_value_t = 9464)]
    port: u16,
    /// Keep everything running after the traffic, until Ctrl-C, to scrape it yourself.
    #[arg(long)]
    keep: bool,
}

pub fn run_demo(args: &DemoArgs) -> Result<()> {
    build::require_root("demo")?;
    build::release(&["probe-user", "flyprobe-tests"])?;
    let mut demo = Command::new(artifact("flyprobe-demo"));
    demo.args(["--port", &args.port.to_string()])
        .env("FLYPROBE_BIN", artifact("flyprobe"))
        .env("FLYPROBE_PYTHON", setup::venv_python());
    if args.keep {
        demo.arg("--keep");
    }
    run(&mut demo)
}
