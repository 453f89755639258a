//! Release builds of what the demo and the tests run.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::cmd::{output, run, workspace_root};

pub fn release(packages: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--release", "--bins"]);
    for p in packages {
        cmd.args(["--package", p]);
    }
    run(&mut cmd)
}

pub fn artifact(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

/// flyprobe loads eBPF programs: say so before building anything.
pub fn require_root(task: &str) -> Result<()> {
    if output(Command::new("id").arg("-u")).as_deref() != Some("0") {
        bail!(
            "`cargo xtask {task}` loads eBPF programs and needs root: run `sudo -E cargo xtask {task}`"
        );
    }
    Ok(())
}
