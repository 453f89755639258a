//! Bad input: one clear line on stderr, the documented exit code, never a panic.

use std::{
    net::TcpListener,
    os::unix::process::CommandExt as _,
    process::{Command, Output},
};

use flyprobe_tests::{flyprobe, free_port, require_root};

const USAGE: i32 = 2;
const RUNTIME: i32 = 1;

fn run(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(flyprobe::bin());
    cmd.args(args);
    configure(&mut cmd);
    cmd.output().expect("running flyprobe")
}

/// Exactly one error line, naming the problem, and the expected exit code.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit code; stderr:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line; stderr:\n{stderr}");
    assert!(errors[0].starts_with("flyprobe: error: "), "{stderr}");
    assert!(
        errors[0].contains(needle),
        "expected {needle:?} in:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
}

fn own_pid() -> String {
    std::process::id().to_string()
}

#[test]
fn pid_that_does_not_exist() {
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap();
    let out = run(&["--pid-tree", &pid], |_| {});
    assert_fails(&out, USAGE, &format!("no process with PID {pid}"));
}

#[test]
fn pid_zero() {
    assert_fails(
        &run(&["--pid-tree", "0"], |_| {}),
        USAGE,
        "PID 0 is not a process",
    );
}

#[test]
fn pid_not_a_number() {
    assert_fails(
        &run(&["--pid-tree", "abc"], |_| {}),
        USAGE,
        "'abc' is not a PID",
    );
}

#[test]
fn no_pid_tree() {
    assert_fails(&run(&[], |_| {}), USAGE, "--pid-tree");
}

#[test]
fn malformed_listen_address() {
    let out = run(&["--pid-tree", &own_pid(), "--listen", "nowhere"], |_| {});
    assert_fails(&out, USAGE, "--listen");
}

#[test]
fn without_privileges() {
    // As `nobody`, with no capabilities.
    let out = run(&["--pid-tree", &own_pid()], |cmd| {
        cmd.uid(65534).gid(65534);
    });
    assert_fails(
        &out,
        RUNTIME,
        "needs root, or the capabilities CAP_BPF and CAP_PERFMON",
    );
}

#[test]
fn listen_address_in_use() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["--pid-tree", &own_pid(), "--listen", &addr], |_| {});
    assert_fails(
        &out,
        RUNTIME,
        &format!("cannot listen on {addr}: the address is already in use"),
    );
}

/// The benchmark's switch detaches the socket set's programs; the other sets have none.
#[test]
fn bench_toggle_with_another_hook_set() {
    for set in ["syscall", "fentry"] {
        let out = run(
            &["--pid-tree", &own_pid(), "--hooks", set, "--bench-toggle"],
            |_| {},
        );
        assert_fails(
            &out,
            RUNTIME,
            "--bench-toggle applies to the socket set only: add --hooks socket",
        );
    }
}

#[test]
fn pid_of_a_thread() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap().to_string();
    let out = run(&["--pid-tree", &tid], |_| {});
    done_tx.send(()).unwrap();
    thread.join().unwrap();
    let want = format!("PID {tid} is a thread of process {}", own_pid());
    assert_fails(&out, USAGE, &want);
}

#[test]
fn pid_of_a_kernel_thread() {
    // PID 2 is kthreadd on Linux.
    assert_fails(
        &run(&["--pid-tree", "2"], |_| {}),
        USAGE,
        "PID 2 is a kernel thread (kthreadd)",
    );
}

/// As root, watching this test process, on a free port, with `extra` arguments.
fn run_as_root(extra: &[&str]) -> Output {
    require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let pid = own_pid();
    let mut args = vec!["--pid-tree", &pid, "--listen", &listen];
    args.extend_from_slice(extra);
    run(&args, |_| {})
}

#[test]
fn kernel_without_a_needed_tracepoint() {
    let out = run_as_root(&["--require-tracepoint", "bogus:nothing"]);
    assert_fails(&out, RUNTIME, "this kernel has no tracepoint bogus:nothing");
}

#[test]
fn access_log_that_cannot_be_opened() {
    let out = run_as_root(&["--access-log", "/nonexistent/dir/access.log"]);
    assert_fails(
        &out,
        RUNTIME,
        "cannot open the access log /nonexistent/dir/access.log",
    );
}

#[test]
fn tracefs_that_cannot_be_mounted() {
    // A regular file is no mount point: mount(2) fails with ENOTDIR.
    let not_a_dir = flyprobe::log_path("not-a-dir");
    std::fs::write(&not_a_dir, "").unwrap();
    let out = run_as_root(&["--tracefs", not_a_dir.to_str().unwrap()]);
    assert_fails(&out, RUNTIME, "mounting it failed");
    let _ = std::fs::remove_file(not_a_dir);
}

#[test]
fn web_config_that_cannot_be_read() {
    let dir = std::env::temp_dir(); // a directory is no YAML file
    let out = run_as_root(&["--web.config.file", dir.to_str().unwrap()]);
    assert_fails(
        &out,
        USAGE,
        &format!("cannot read the web config {}", dir.display()),
    );
}

#[test]
fn web_config_that_is_not_valid() {
    let path = flyprobe::log_path("web.yml");
    std::fs::write(&path, "basic_auth_users:\n  alice: not-a-bcrypt-hash\n").unwrap();
    let out = run_as_root(&["--web.config.file", path.to_str().unwrap()]);
    assert_fails(&out, USAGE, "basic_auth_users.alice must be a bcrypt hash");
    std::fs::write(&path, "tls_server_config: [\n").unwrap();
    let out = run_as_root(&["--web.config.file", path.to_str().unwrap()]);
    assert_fails(&out, USAGE, "is not valid");
    let _ = std::fs::remove_file(path);
}

#[test]
fn pid_that_exits_during_start_up() {
    require_root();
    // The target exits as soon as flyprobe holds its first loaded eBPF program: after the
    // PID was checked, before start-up is over.
    let mut target = Command::new("sh")
        .args([
            "-c",
            "read fp; until ls -l /proc/$fp/fd 2>/dev/null | grep -q bpf-prog; do sleep 0.002; done",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let fp = Command::new(flyprobe::bin())
        .args(["--pid-tree", &pid, "--listen", &listen])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    writeln!(target.stdin.take().unwrap(), "{}", fp.id()).unwrap();
    // If flyprobe finished starting before the target exited, it would serve on: fail after
    // a deadline instead of hanging.
    let mut fp = fp;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = fp.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = fp.kill();
            panic!(
                "flyprobe was still serving after 30 s: the target did not exit during start-up"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    target.wait().unwrap();
    let mut stderr = Vec::new();
    use std::io::Read as _;
    fp.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr,
    };
    assert_fails(
        &out,
        USAGE,
        &format!("PID {pid} exited while flyprobe was starting"),
    );
}

/// From a child PID namespace the kernel's PIDs cannot be named: one line, exit 2, never a
/// daemon that serves zeros.
#[test]
fn run_in_a_child_pid_namespace() {
    require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(flyprobe::bin())
        .args(["--pid-tree", "1", "--listen", &listen])
        .output()
        .expect("unshare (util-linux, installed by `cargo xtask setup`)");
    assert_fails(&out, 2, "child PID namespace");
}
