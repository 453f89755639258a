//! Orchestration for flyprobe: setup, demo, test. The plain build is `cargo build`.

mod bench;
mod build;
mod cmd;
mod demo;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "flyprobe development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need: rust-src, bpf-linker, nginx and wrk, the Python
    /// test servers.
    Setup,
    /// Set up, build, then watch a 2-worker uvicorn app with flyprobe, send traffic and print a scrape.
    Demo(demo::DemoArgs),
    /// Set up, build, then run every test: unit tests and end-to-end tests against the real kernel.
    Test(test::TestArgs),
    /// Set up, build, then measure flyprobe's overhead side by side (see README, Benchmarks).
    Bench(bench::BenchArgs),
    /// Boot Debian's 6.1 and 6.12 kernels under QEMU and run the guest suite on each (see
    /// README, Kernels).
    VmTest(vm::VmArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup_all(),
        Task::Demo(args) => setup_all().and_then(|()| demo::run_demo(&args)),
        Task::Test(args) => setup_all().and_then(|()| test::run_all(&args)),
        Task::Bench(args) => setup_all().and_then(|()| bench::run_bench(&args)),
        Task::VmTest(args) => setup_all().and_then(|()| vm::run_all(&args)),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn setup_all() -> Result<()> {
    setup::rust_toolchain()?;
    setup::debian_packages()?;
    setup::python_servers()
}
