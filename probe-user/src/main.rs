//! `flyprobe`: the binary. Parses the command line, runs the daemon (the library), and turns
//! an error into one line and its exit code.

use std::process::ExitCode;

use clap::Parser as _;
use flyprobe::{
    cli, daemon,
    error::{EXIT_RUNTIME, EXIT_USAGE, StartError},
    expose::web_config::WebConfigError,
};

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
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The exit code the README documents for an error.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<WebConfigError>().is_some() {
        return EXIT_USAGE; // the operator's file: bad input, like a bad flag
    }
    err.downcast_ref::<StartError>()
        .map_or(EXIT_RUNTIME, StartError::exit_code)
}
