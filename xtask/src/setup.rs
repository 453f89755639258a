//! Installs everything the build and the tests need on a fresh machine, idempotently:
//! rust-src (for `-Z build-std=core`), bpf-linker (built against the toolchain's own LLVM),
//! and a Python venv with the servers the tests drive.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run, workspace_root};

/// bpf-linker release known to work with aya 0.14 and LLVM 21–23.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn rust_toolchain() -> Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["--print", "sysroot"]))
            .context("`rustc --print sysroot` failed: is a Rust toolchain installed?")?,
    );
    for (tool, component) in [("clippy", "clippy"), ("fmt", "rustfmt")] {
        if output(Command::new("cargo").args([tool, "--version"])).is_none() {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("ok: rust-src present in {}", sysroot.display());
    } else {
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    bpf_linker(&sysroot)
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version")) {
        eprintln!("ok: {version}");
        return Ok(());
    }
    // bpf-linker links against LLVM; the toolchain ships its own libLLVM, so build against that
    // one instead of requiring a system LLVM of the right major version.
    let lib_dir = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM major version from {libllvm}"))?
        .to_string();

    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        symlink(lib_dir.join(&libllvm), &path)
            .with_context(|| format!("symlinking {}", path.display()))?;
    }
    eprintln!(
        "bpf-linker missing: building {BPF_LINKER_VERSION} against the toolchain's LLVM {major}"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // The toolchain's libLLVM is not on the loader path; record where it lives.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        ))?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Programs from Debian packages the tests and benchmarks run: (binary, package).
const DEBIAN: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("wrk", "wrk"),
    // The benchmark's profile of where the added CPU goes (section 1p).
    ("perf", "linux-perf"),
    ("bpftool", "bpftool"),
    // A real Prometheus scrapes flyprobe in the tests; promtool checks the exposition.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // The dashboard's browser test.
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
    // Security, node-wide and deploy tests: a TLS client and certificate, network
    // namespaces, capability-bounded runs, systemd unit checks.
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("ip", "iproute2"),
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
];

pub fn debian_packages() -> Result<()> {
    install_debian(DEBIAN)
}

/// Install the packages of `wanted` whose binary is missing.
pub fn install_debian(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| which::which(bin).is_err() && !Path::new("/usr/sbin").join(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if missing.is_empty() {
        eprintln!(
            "ok: {} installed",
            wanted
                .iter()
                .map(|(b, _)| *b)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        // Only the binaries are wanted: do not start the distribution's nginx service.
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("RUNLEVEL", "1"))?;
    Ok(())
}

/// The venv the tests and the demo run servers from.
pub fn venv_python() -> PathBuf {
    workspace_root().join("target/venv/bin/python")
}

pub fn python_servers() -> Result<()> {
    let root = workspace_root();
    let requirements = root.join("tests/python/requirements.txt");
    let wanted = fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = root.join("target/venv");
    let stamp = venv.join(".flyprobe-requirements");
    if fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) && venv_python().exists() {
        eprintln!("ok: python venv {} up to date", venv.display());
        return Ok(());
    }
    if !venv_python().exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv_python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))?;
    fs::write(&stamp, wanted)?;
    Ok(())
}
