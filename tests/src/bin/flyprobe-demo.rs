//! `flyprobe-demo`, run by `cargo xtask demo` (which builds flyprobe first): the main job on
//! a laptop, a 2-worker uvicorn app watched by flyprobe, some traffic, and the scrape a
//! Prometheus server would get.

use std::{thread, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use flyprobe_tests::{client::Conn, flyprobe::Flyprobe, servers, workspace};

/// Watch a 2-worker uvicorn app with flyprobe, send traffic and print a scrape.
#[derive(Parser)]
#[command(name = "flyprobe-demo")]
pub struct DemoArgs {
    /// Port flyprobe serves /metrics on (loopback).
    #[arg(long, default_value_t = 9464)]
    port: u16,
    /// Keep everything running after the traffic, until Ctrl-C, to scrape it yourself.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = DemoArgs::parse();
    if let Err(err) = run(&args) {
        eprintln!("flyprobe-demo: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: &DemoArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("flyprobe loads eBPF programs and needs root: run `sudo -E cargo xtask demo`");
    }
    // SAFETY (of the env): single-threaded here; the harness reads these paths, which
    // `cargo xtask demo` sets, else the workspace's.
    unsafe {
        for (var, path) in [
            ("FLYPROBE_BIN", "target/release/flyprobe"),
            ("FLYPROBE_PYTHON", "target/venv/bin/python"),
        ] {
            if std::env::var_os(var).is_none() {
                std::env::set_var(var, workspace().join(path));
            }
        }
    }

    eprintln!("==> starting uvicorn tests/apps/app.py with 2 workers");
    let server = servers::uvicorn(2);
    eprintln!("==> starting flyprobe --pid-tree {}", server.pid());
    let fp = Flyprobe::start_on(args.port, &["--pid-tree", &server.pid().to_string()]);

    let (mut connections, mut requests) = (0, 0);
    for _ in 0..40 {
        let mut conn = Conn::connect(server.port).context("connecting to uvicorn")?;
        conn.get("/")?;
        conn.close();
        connections += 1;
        requests += 1;
    }
    for _ in 0..4 {
        let mut conn = Conn::connect(server.port)?;
        for _ in 0..40 {
            conn.get("/")?;
        }
        conn.close();
        connections += 1;
        requests += 40;
    }
    let _held = Conn::connect(server.port)?;
    connections += 1;
    thread::sleep(Duration::from_millis(500));

    println!("client: {connections} connections (1 still open), {requests} requests\n");
    println!(
        "$ curl -s http://127.0.0.1:{}/metrics | grep -v '^#'",
        fp.port
    );
    for line in fp.scrape().text.lines().filter(|l| !l.starts_with('#')) {
        println!("{line}");
    }
    if args.keep {
        println!(
            "\nflyprobe is serving http://127.0.0.1:{0}/metrics and the live dashboard at \
             http://127.0.0.1:{0}/; uvicorn listens on 127.0.0.1:{1}; Ctrl-C to stop",
            fp.port, server.port
        );
        loop {
            thread::park();
        }
    }
    fp.stop();
    Ok(())
}
