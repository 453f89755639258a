//! `flyprobe`: watches a server's process tree from the kernel and serves Prometheus metrics.

mod access_log;
mod api;
mod btf;
mod cli;
mod containers;
mod daemon;
mod error;
mod events;
mod http;
mod kernel_maps;
mod kubelet;
mod lifecycle;
mod memory;
mod metrics;
mod openmetrics;
mod openssl;
mod persist;
mod privileges;
mod probe;
mod selectors;
mod selftest;
mod server_kind;
mod snapshot;
mod sock_diag;
mod sockets;
mod state;
mod tracefs;
mod watched;
mod web_config;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return cli::report_usage_error(&err),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match daemon::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain, no backtrace.
            eprintln!("flyprobe: error: {err:#}");
            ExitCode::from(error::exit_code(&err))
        }
    }
}
