//! `cargo xtask bench`: builds the release binaries, then runs the benchmark
//! (`flyprobe-bench`, tests/src/bin/flyprobe-bench) with the options given.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build::{self, artifact},
    cmd::run,
};

#[derive(Args)]
pub struct BenchArgs {
    /// Measure the binaries already in target/release instead of building them first.
    #[arg(long)]
    no_build: bool,
    /// The benchmark's options: --rounds, --seconds, --only SECTIONS, --out FILE, --flyprobe
    /// FILE, ... (`cargo xtask bench --no-build -- --help` lists them all).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "OPTIONS"
    )]
    options: Vec<String>,
}

pub fn run_bench(args: &BenchArgs) -> Result<()> {
    build::require_root("bench")?;
    // `--no-build` may come after the benchmark's own options.
    let no_build = args.no_build || args.options.iter().any(|o| o == "--no-build");
    if !no_build {
        build::release(&["probe-user", "flyprobe-tests"])?;
    }
    let options = args.options.iter().filter(|o| *o != "--no-build");
    run(Command::new(artifact("flyprobe-bench")).args(options))
}
