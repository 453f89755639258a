//! `cargo xtask vm-test`: flyprobe on the kernels users run. Each kernel of the matrix is a
//! Debian package (pinned below), booted under QEMU with an initramfs that carries
//! everything: busybox, flyprobe, the guest suite (tests/src/bin/flyprobe-vm-suite.rs), the
//! workspace's Rust server and Debian's nginx with their shared libraries. The guest suite
//! prints one line per check on the serial console; this reads them, prints the table and
//! fails on any failure.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    build::{self, artifact},
    cmd::{run, workspace_root},
    setup,
};

/// One kernel of the matrix and what flyprobe must do on it.
struct Kernel {
    name: &'static str,
    /// Debian's package (bookworm-security). When the archive drops it, pin the newest one
    /// `apt-cache search linux-image | grep cloud-amd64-unsigned` lists.
    package: &'static str,
    /// The hook set `--hooks auto` must choose.
    auto: &'static str,
    /// Hook sets forced with `--hooks` and checked like the default.
    forced: &'static [&'static str],
    /// Hook sets the kernel cannot run: flyprobe must refuse them in one line.
    refused: &'static [&'static str],
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        package: "linux-image-6.1.0-57-cloud-amd64-unsigned",
        auto: "fentry",
        forced: &["fentry", "syscall"],
        // No sock:sock_{recv,send}_length before 6.3.
        refused: &["socket"],
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        auto: "fentry",
        forced: &["fentry", "socket", "syscall"],
        refused: &[],
    },
];

/// What the guest needs from the host's Debian: QEMU, and a static busybox for /init.
const HOST_PACKAGES: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86")];

#[derive(Args)]
pub struct VmArgs {
    /// Which kernel of the matrix (6.1, 6.12) or `all`.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// `tcg` (emulation: works everywhere, slow) or `kvm` (where nested virtualization works).
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    accel: String,
    /// Give up on a guest after this many seconds (6.12 runs four hook sets: 15 minutes and
    /// more under TCG on a busy 2-core host).
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

pub fn run_all(args: &VmArgs) -> Result<()> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| args.kernel == "all" || k.name == args.kernel)
        .collect();
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!(
            "--kernel {}: not in the matrix ({} or all)",
            args.kernel,
            names.join(", ")
        );
    }
    setup::install_debian(HOST_PACKAGES)?;
    build::release(&["probe-user", "flyprobe-tests"])?;
    let dir = workspace_root().join("target/vm");
    let cache = dir.join("cache");
    fs::create_dir_all(&cache)?;
    let busybox = busybox(&cache)?;
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&initramfs, &busybox)?;
    let mut reports = Vec::new();
    for kernel in kernels {
        let vmlinuz = vmlinuz(&cache, kernel)?;
        reports.push(boot(kernel, &vmlinuz, &initramfs, args, &dir)?);
    }
    print_table(&reports);
    let costs = dir.join("costs.md");
    fs::write(&costs, cost_tables(&reports))?;
    eprintln!("==> the cost tables are in {}", costs.display());
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel)
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test failed on {} (guest logs in {})",
            failed.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// `apt-get download` into the cache (once), and the .deb's path.
fn download(cache: &Path, package: &str) -> Result<PathBuf> {
    let find = || -> Option<PathBuf> {
        fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    let fetched = run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(cache));
    if fetched.is_err() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(cache))
        .with_context(|| {
            format!(
                "{package} is not in Debian's archive any more: pin a newer one in xtask/src/vm.rs \
                 (`apt-cache search linux-image | grep cloud-amd64-unsigned`)"
            )
        })?;
    }
    find().with_context(|| format!("apt-get download {package} left no .deb"))
}

/// One file out of a .deb (`dpkg-deb --fsys-tarfile | tar -x`), into `dest`.
fn extract(deb: &Path, pattern: &str, dest: &Path) -> Result<PathBuf> {
    let scratch = dest.with_extension("extract");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards '{pattern}'",
        deb.display(),
        scratch.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    let found = walk(&scratch)
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("{pattern} not in {}", deb.display()))?;
    fs::rename(&found, dest)?;
    fs::remove_dir_all(&scratch)?;
    Ok(dest.to_path_buf())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn vmlinuz(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let dest = cache.join(format!("vmlinuz-{}", kernel.package));
    if dest.exists() {
        return Ok(dest);
    }
    let deb = download(cache, kernel.package)?;
    extract(&deb, "./boot/vmlinuz-*", &dest)
}

fn busybox(cache: &Path) -> Result<PathBuf> {
    let dest = cache.join("busybox");
    if dest.exists() {
        return Ok(dest);
    }
    let deb = download(cache, "busybox-static")?;
    extract(&deb, "./bin/busybox", &dest)
}

/// The guest's /init: mount what flyprobe needs (not tracefs: flyprobe mounts it, and the
/// suite checks that), bring up loopback, run the suite with the arguments given after
/// `--` on the kernel command line, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up
echo "VMSUITE kernel $(uname -r) cpus $(nproc)"
export FLYPROBE_BIN=/bin/flyprobe FLYPROBE_TEST_SERVER=/bin/flyprobe-test-server
export FLYPROBE_ECHO_SERVER=/bin/flyprobe-echo-server FLYPROBE_URING_SERVER=/bin/flyprobe-uring-server
export CI=true
# Under TCG a daemon that verifies every program (the socket set with --tls) takes tens of
# seconds to start, more when the host is busy.
export FLYPROBE_START_SECS=180
/bin/flyprobe-vm-suite "$@" 2>/tmp/suite.err
status=$?
[ $status -eq 0 ] || { echo "VMSUITE exit $status"; tail -n 40 /tmp/suite.err; }
echo "VMSUITE halt"
poweroff -f
"#;

/// The initramfs: /init, busybox, flyprobe and the suite's binaries at the paths the suite
/// expects, every shared library they load (from `ldd`), and what nginx opens at start.
fn write_initramfs(path: &Path, busybox: &Path) -> Result<()> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("nginx is not installed: run `cargo xtask setup`")?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "tmp",
        "usr",
        "usr/sbin",
        "var",
        "var/log",
        "var/log/nginx",
        "var/lib",
        "var/lib/nginx",
        "run",
    ] {
        cpio.dir(dir);
    }
    cpio.file("init", INIT.as_bytes(), 0o755);
    cpio.file("bin/busybox", &fs::read(busybox)?, 0o755);
    cpio.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    );
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
    // `openssl req` reads its configuration.
    cpio.dir("usr/lib");
    cpio.dir("usr/lib/ssl");
    cpio.file(
        "usr/lib/ssl/openssl.cnf",
        &fs::read("/usr/lib/ssl/openssl.cnf")
            .context("openssl is not installed: run `cargo xtask setup`")?,
        0o644,
    );
    let mut elves = vec![
        (artifact("flyprobe"), "bin/flyprobe".to_string()),
        (
            artifact("flyprobe-test-server"),
            "bin/flyprobe-test-server".into(),
        ),
        (
            artifact("flyprobe-vm-suite"),
            "bin/flyprobe-vm-suite".into(),
        ),
        (
            artifact("flyprobe-echo-server"),
            "bin/flyprobe-echo-server".into(),
        ),
        (
            artifact("flyprobe-uring-server"),
            "bin/flyprobe-uring-server".into(),
        ),
        (
            PathBuf::from("/usr/sbin/bpftool"),
            "usr/sbin/bpftool".into(),
        ),
        (PathBuf::from("/usr/bin/setpriv"), "usr/bin/setpriv".into()),
        // The TLS check's certificate and client (Debian's OpenSSL, as nginx's).
        (PathBuf::from("/usr/bin/openssl"), "usr/bin/openssl".into()),
        (PathBuf::from("/usr/bin/curl"), "usr/bin/curl".into()),
        (
            nginx.clone(),
            nginx.to_string_lossy().trim_start_matches('/').into(),
        ),
    ];
    for (name, binary) in e2e_binaries()? {
        elves.push((binary, format!("bin/e2e-{name}")));
    }
    let mut libs = BTreeSet::new();
    for (elf, _) in &elves {
        libs.extend(shared_libraries(elf)?);
    }
    for lib in libs {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_string();
        elves.push((lib, inside));
    }
    for (from, to) in &elves {
        // Parents of library paths (lib/x86_64-linux-gnu, lib64) are made as needed.
        let mut parent = Path::new(to).parent();
        let mut parents = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            parents.push(p.to_path_buf());
            parent = p.parent();
        }
        for p in parents.into_iter().rev() {
            cpio.dir(&p.to_string_lossy());
        }
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        let mode = fs::metadata(from)?.permissions().mode() & 0o777;
        cpio.file(to, &data, mode | 0o400);
    }
    let bytes = cpio.finish();
    let mut out = fs::File::create(path)?;
    out.write_all(&bytes)?;
    eprintln!(
        "==> initramfs {} ({:.1} MiB)",
        path.display(),
        bytes.len() as f64 / f64::from(1 << 20)
    );
    Ok(())
}

/// End-to-end test binaries the guest suite runs (the Rust-only tests of each; see E2E in
/// tests/src/bin/flyprobe-vm-suite.rs), built as `cargo xtask test` builds them.
const E2E_BINARIES: [&str; 5] = [
    "http_matrix",
    "watch_servers",
    "sockets",
    "unix_sockets",
    "waiting",
];

fn e2e_binaries() -> Result<Vec<(&'static str, PathBuf)>> {
    let out = Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "flyprobe-tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or("");
        if let (Some(name), Some(exe)) = (
            E2E_BINARIES.iter().find(|b| **b == name),
            msg["executable"].as_str(),
        ) {
            found.push((*name, PathBuf::from(exe)));
        }
    }
    if found.len() != E2E_BINARIES.len() {
        bail!("cargo test --no-run built {found:?}, not all of {E2E_BINARIES:?}");
    }
    Ok(found)
}

/// The absolute paths `ldd` resolves for `elf` (its loader included), symlinks resolved to
/// the real file (stored under the name the loader asks for).
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .with_context(|| format!("ldd {}", elf.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        bail!(
            "{}: a library is missing on this machine: {}",
            elf.display(),
            missing.trim()
        );
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A newc cpio archive (what the kernel unpacks as its initramfs), built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// What one guest reported.
struct Report {
    kernel: &'static str,
    release: String,
    /// (set, chosen, programs)
    hooks: Vec<(String, String, String)>,
    /// (set, check, verdict, detail)
    checks: Vec<(String, String, String, String)>,
    done: Option<String>,
    seconds: f64,
    /// (set, program, runs, ns per run), the empty programs' under "SET-empty".
    costs: Vec<(String, String, String, String)>,
    /// (set, ns of programs per request, the same for the empty programs)
    per_request: Vec<(String, String, String)>,
}

impl Report {
    fn passed(&self) -> bool {
        self.done.as_deref() == Some("PASS")
            && !self.checks.is_empty()
            && self.checks.iter().all(|c| c.2 == "PASS")
    }
}

fn boot(
    kernel: &'static Kernel,
    vmlinuz: &Path,
    initramfs: &Path,
    args: &VmArgs,
    dir: &Path,
) -> Result<Report> {
    let mut suite = vec!["--auto".to_string(), kernel.auto.to_string()];
    for set in std::iter::once(&"auto").chain(kernel.forced) {
        suite.extend(["--set".into(), set.to_string()]);
    }
    for set in kernel.refused {
        suite.extend(["--refuse".into(), set.to_string()]);
    }
    let append = format!(
        "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 -- {}",
        suite.join(" ")
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        &args.accel,
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
    ])
    .args(["-nographic", "-no-reboot", "-kernel"])
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", &append])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!(
        "==> kernel {} ({}): {}",
        kernel.name,
        kernel.package,
        crate::cmd::display(&cmd)
    );
    let log_path = dir.join(format!("guest-{}.log", kernel.name));
    let mut log = fs::File::create(&log_path)?;
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let mut report = Report {
        kernel: kernel.name,
        release: String::new(),
        hooks: Vec::new(),
        checks: Vec::new(),
        done: None,
        seconds: 0.0,
        costs: Vec::new(),
        per_request: Vec::new(),
    };
    let deadline = start + Duration::from_secs(args.timeout);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(log, "{line}")?;
                if let Some(at) = line.find("VMSUITE") {
                    eprintln!("    {}", &line[at..]);
                }
                parse_line(&mut report, &line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                report.checks.push((
                    "-".into(),
                    "guest".into(),
                    "FAIL".into(),
                    format!("no end after {} s", args.timeout),
                ));
                break;
            }
        }
    }
    let _ = child.wait();
    report.seconds = start.elapsed().as_secs_f64();
    if report.release.is_empty() {
        report.checks.push((
            "-".into(),
            "boot".into(),
            "FAIL".into(),
            format!("the guest never ran /init: see {}", log_path.display()),
        ));
    }
    Ok(report)
}

fn parse_line(report: &mut Report, line: &str) {
    // The console may put escape sequences before a line (the BIOS clearing the screen).
    let Some(at) = line.find("VMSUITE") else {
        return;
    };
    let line = &line[at..];
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["VMSUITE", "kernel", release, ..] => report.release = release.to_string(),
        ["VMSUITE", "hooks", set, chosen, programs] => {
            report
                .hooks
                .push((set.to_string(), chosen.to_string(), programs.to_string()))
        }
        ["VMSUITE", "check", set, name, verdict, detail @ ..] => report.checks.push((
            set.to_string(),
            name.to_string(),
            verdict.to_string(),
            detail.join(" "),
        )),
        ["VMSUITE", "cost", set, program, runs, ns] => report.costs.push((
            set.to_string(),
            program.to_string(),
            runs.to_string(),
            ns.to_string(),
        )),
        ["VMSUITE", "costreq", set, real, empty] => {
            report
                .per_request
                .push((set.to_string(), real.to_string(), empty.to_string()))
        }
        ["VMSUITE", "done", verdict] => report.done = Some(verdict.to_string()),
        ["VMSUITE", "exit", status] => report.checks.push((
            "-".into(),
            "suite".into(),
            "FAIL".into(),
            format!("the guest suite exited {status}"),
        )),
        _ => {}
    }
}

fn print_table(reports: &[Report]) {
    println!("\nkernel matrix (cargo xtask vm-test)\n");
    println!(
        "| kernel | release | --hooks | chosen | programs | checks passed | time |\n|---|---|---|---|---|---|---|"
    );
    for r in reports {
        for (set, chosen, programs) in &r.hooks {
            let of_set: Vec<_> = r.checks.iter().filter(|c| &c.0 == set).collect();
            let passed = of_set.iter().filter(|c| c.2 == "PASS").count();
            println!(
                "| {} | {} | {set} | {chosen} | {programs} | {passed}/{} | {:.0} s |",
                r.kernel,
                r.release,
                of_set.len(),
                r.seconds
            );
        }
        for c in r
            .checks
            .iter()
            .filter(|c| !r.hooks.iter().any(|h| h.0 == c.0))
        {
            println!(
                "| {} | {} | {} | {} ({}) | | {} | |",
                r.kernel, r.release, c.0, c.1, c.3, c.2
            );
        }
    }
    print!("{}", cost_tables(reports));
    println!();
    for r in reports {
        for (set, name, verdict, detail) in r.checks.iter().filter(|c| c.2 != "PASS") {
            println!("{verdict} {} --hooks {set} {name}: {detail}", r.kernel);
        }
        if r.done.is_none() {
            println!("FAIL {}: the guest suite did not finish", r.kernel);
        }
    }
}

/// The guests' per-hook costs as markdown (printed, and kept in target/vm/costs.md).
fn cost_tables(reports: &[Report]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nper-hook cost in the guest (bpf_stats over 2000 requests to the Rust server, 4 \
         keep-alive connections; TCG inflates absolute times, so compare each set with its own \
         empty programs: fentry and socket with `--empty-hooks` on the same events, syscall \
         with as many runs of an empty tracepoint program)\n"
    );
    let _ = writeln!(
        out,
        "| kernel | hook set | programs, ns per request | empty programs, ns per request | ratio |\n|---|---|---|---|---|"
    );
    for r in reports {
        for (set, real, empty) in &r.per_request {
            let ratio =
                real.parse::<f64>().unwrap_or(0.0) / empty.parse::<f64>().unwrap_or(1.0).max(1.0);
            let _ = writeln!(
                out,
                "| {} | {set} | {real} | {empty} | {ratio:.1}x |",
                r.kernel
            );
        }
    }
    let _ = writeln!(
        out,
        "\n| kernel | programs of | program | runs | ns per run |\n|---|---|---|---|---|"
    );
    for r in reports {
        for (set, program, runs, ns) in &r.costs {
            let _ = writeln!(out, "| {} | {set} | {program} | {runs} | {ns} |", r.kernel);
        }
    }
    out
}
