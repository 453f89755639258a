//! The guest suite of `cargo xtask vm-test`: runs inside a QEMU guest booted on another
//! kernel (its initramfs carries flyprobe, this binary, the workspace's Rust server and
//! Debian's nginx). For each hook set it is told to try it starts flyprobe watching a
//! 2-worker Rust server and a 2-worker nginx, sends known traffic, and checks the counts
//! against what it sent, the lifecycle of a SIGKILLed worker, and a clean stop. Hook sets the
//! kernel must refuse are checked for a one-line error and a non-zero exit.
//!
//! Output, one line each on stdout (the serial console): `VMSUITE check SET NAME PASS|FAIL
//! DETAIL`, `VMSUITE hooks SET CHOSEN PROGRAMS`, and last `VMSUITE done PASS|FAIL`.
//!
//! usage: flyprobe-vm-suite --auto EXPECTED [--set SET]... [--refuse SET]...

use std::{
    collections::{BTreeMap, BTreeSet},
    panic::{AssertUnwindSafe, catch_unwind},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flyprobe_tests::{
    client::{self, Conn},
    flyprobe::{self, Flyprobe, Metrics},
    servers::{self, Server},
};

/// Everything is emulated (TCG): generous, but a hang still ends.
const SETTLE: Duration = Duration::from_secs(90);

struct Args {
    auto: String,
    sets: Vec<String>,
    refuse: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: flyprobe-vm-suite --auto EXPECTED [--set SET]... [--refuse SET]...";
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut args = Args {
        auto: String::new(),
        sets: Vec::new(),
        refuse: Vec::new(),
    };
    for pair in argv.chunks(2) {
        match pair {
            [flag, v] if flag == "--auto" => args.auto = v.clone(),
            [flag, v] if flag == "--set" => args.sets.push(v.clone()),
            [flag, v] if flag == "--refuse" => args.refuse.push(v.clone()),
            _ => return Err(usage.into()),
        }
    }
    if args.auto.is_empty() {
        return Err(usage.into());
    }
    Ok(args)
}

struct Suite {
    failed: usize,
}

impl Suite {
    /// Run one check; a panic in it (the harness's helpers panic with what they saw) is a
    /// failure with that message.
    fn check(&mut self, set: &str, name: &str, f: impl FnOnce() -> Result<String, String>) {
        let outcome = catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|panic| Err(panic_message(panic.as_ref())));
        let (verdict, detail) = match outcome {
            Ok(detail) => ("PASS", detail),
            Err(detail) => {
                self.failed += 1;
                ("FAIL", detail)
            }
        };
        // One line per check: the host parses these.
        let detail = detail.replace('\n', " | ");
        println!("VMSUITE check {set} {name} {verdict} {detail}");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

fn main() {
    // The accept check's server: accept one connection and hold it, never reading.
    let argv: Vec<String> = std::env::args().collect();
    if let [_, flag, port] = argv.as_slice()
        && flag == "--accept-and-hold"
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(0)))
            .expect("binding the accept check's port");
        println!("listening");
        // Accept only when told: after flyprobe attached (the syscall hooks miss an accept
        // already blocked when they attach).
        let mut go = String::new();
        let _ = std::io::stdin().read_line(&mut go);
        let held = listener.accept().expect("accepting");
        println!("accepted");
        std::thread::sleep(Duration::from_secs(3600));
        drop(held);
        return;
    }
    if let [_, flag, backlog] = argv.as_slice()
        && (flag == "--pod-listener" || flag == "--own-listener")
    {
        hold_listener(backlog.parse().unwrap_or(2), flag == "--pod-listener");
        return;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let mut suite = Suite { failed: 0 };
    let mut first = true;
    for set in &args.sets {
        let expected = if set == "auto" { &args.auto } else { set };
        run_set(&mut suite, set, expected, first);
        first = false;
    }
    for set in &args.refuse {
        suite.check(set, "refused", || refused(set));
    }
    // The end-to-end tests that need nothing but Rust servers and nginx, as `cargo xtask test`
    // runs them, on every hook set.
    for set in &args.sets {
        let hooks = if set == "auto" { &args.auto } else { set };
        if set == "auto" && args.sets.iter().any(|s| s == &args.auto) {
            continue;
        }
        for (binary, tests) in E2E.iter().filter(|(b, _)| runs_on(b, hooks)) {
            suite.check(set, &format!("e2e-{binary}"), || e2e(binary, tests, hooks));
        }
    }
    // What each set costs here, next to empty programs on the same events.
    let mut measured = BTreeSet::new();
    for set in &args.sets {
        let hooks = if set == "auto" { &args.auto } else { set };
        if measured.insert(hooks.clone()) {
            suite.check(hooks, "cost", || cost(hooks));
        }
    }
    let verdict = if suite.failed == 0 { "PASS" } else { "FAIL" };
    println!("VMSUITE done {verdict}");
}

fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
}

fn run_set(suite: &mut Suite, set: &str, expected: &str, first: bool) {
    let before = tracefs_mounted();
    let rust = servers::rust_server_with(&["--workers", "2"], 2);
    let nginx = servers::nginx(rust.port);
    let fp = match catch_unwind(|| {
        Flyprobe::start(&[
            "--hooks",
            set,
            "--pid-tree",
            &rust.pid().to_string(),
            "--pid-tree",
            &nginx.pid().to_string(),
        ])
    }) {
        Ok(fp) => fp,
        Err(panic) => {
            let why = panic_message(panic.as_ref());
            suite.check(set, "starts", || {
                Err(format!("flyprobe did not start: {why}"))
            });
            return;
        }
    };
    if first {
        suite.check(set, "mounts-tracefs", || {
            if !before && tracefs_mounted() {
                Ok("tracefs was not mounted; flyprobe mounted it".into())
            } else {
                Err(format!(
                    "tracefs mounted before flyprobe: {before}, after: {}",
                    tracefs_mounted()
                ))
            }
        });
    }
    suite.check(set, "hook-set", || {
        let log = fp.log();
        let line = log
            .lines()
            .find(|l| l.contains("attached") && l.contains("programs"))
            .ok_or_else(|| format!("no 'attached' line in the log:\n{log}"))?;
        // "attached N programs (SET hooks) to M tracepoints; ..."
        let programs = line
            .split("attached ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?");
        println!("VMSUITE hooks {set} {expected} {programs}");
        let want = format!("({expected} hooks)");
        let m = fp.scrape();
        let info = m.get("flyprobe_build_info", &[("hooks", expected)]);
        if line.contains(&want) && info == Some(1.0) {
            Ok(format!("{expected}, {programs} programs"))
        } else {
            Err(format!("wanted {want}: {line}; build_info {info:?}"))
        }
    });
    suite.check(set, "accept", || accept(expected));
    if first {
        suite.check(set, "least-privilege", || least_privilege(expected, &rust));
        suite.check(set, "pod-listener", || listener(expected, true));
        suite.check(set, "own-listener", || listener(expected, false));
    }
    for (server, s) in [("flyprobe-test-server", &rust), ("nginx", &nginx)] {
        suite.check(set, &format!("{server}-workers"), || {
            let m = settle(&fp, "2 workers", |m| {
                (gauge(m, "server_workers", server) == 2).then_some(())
            });
            Ok(format!("{} worker series", worker_pids(&m, server).len()))
        });
        suite.check(set, &format!("{server}-exact"), || {
            exact(&fp, server, s.port)
        });
        suite.check(set, &format!("{server}-sigkill"), || {
            sigkill(&fp, server, s)
        });
    }
    suite.check(set, "stops", || {
        let log = fp.stop();
        Ok(log.lines().last().unwrap_or("").to_string())
    });
    suite.check(set, "nginx-h2c", || h2c_streams(set));
    suite.check(set, "nginx-tls", || tls_requests(set));
}

/// nginx over TLS with `--tls`: 8 HTTP/1.1 requests on one connection and 4 HTTP/2 streams
/// on another (curl, ALPN), seen through the OpenSSL uprobes on every hook set: 8 `https`
/// and 4 `h2` requests, nothing in flight, no `tls` exchange. The HTTP/2 walks of the
/// plaintext load on every kernel tested (6.1 refused them until their read lengths were
/// masked): a refusal, which flyprobe would survive by counting `h2` exchanges, fails.
fn tls_requests(set: &str) -> Result<String, String> {
    let (nginx, _) = servers::nginx_tls();
    let fp = Flyprobe::start(&[
        "--hooks",
        set,
        "--tls",
        "--pid-tree",
        &nginx.pid().to_string(),
    ]);
    settle(&fp, "the OpenSSL uprobes attached", |m| {
        m.get("flyprobe_tls_libraries", &[])
            .is_some_and(|n| n >= 1.0)
            .then_some(())
    });
    let url = format!("https://127.0.0.1:{}/", nginx.port);
    for (version, n) in [("--http1.1", 8), ("--http2", 4)] {
        // One `-o` per URL: curl writes the bodies after the first to stdout otherwise.
        let out = std::process::Command::new("curl")
            .args(["-sk", version, "-w", "%{http_code}\n"])
            .args((0..n).flat_map(|_| ["-o", "/dev/null", url.as_str()]))
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let codes = String::from_utf8_lossy(&out.stdout).to_string();
        if codes.lines().filter(|c| *c == "200").count() != n {
            return Err(format!("curl {version}: {codes:?}"));
        }
    }
    let count = |m: &Metrics, protocol: &str| {
        m.total(
            "server_requests_total",
            &[("server", "nginx"), ("protocol", protocol)],
        )
    };
    if let Some(line) = fp
        .log()
        .lines()
        .find(|l| l.contains("HTTP/2 walks did not load"))
    {
        return Err(line.chars().take(600).collect());
    }
    let m = settle(&fp, "8 https and 4 h2 requests", |m| {
        let in_flight = m.total("server_in_flight_requests", &[("server", "nginx")]);
        (count(m, "https") == 8 && count(m, "h2") == 4 && in_flight == 0).then_some(())
    });
    fp.stop();
    let tls = m.total(
        "server_exchanges_total",
        &[("server", "nginx"), ("protocol", "tls")],
    );
    if tls != 0 {
        return Err(format!("{tls} tls exchanges"));
    }
    Ok(format!(
        "{} https, {} h2 requests",
        count(&m, "https"),
        count(&m, "h2")
    ))
}

/// nginx speaking HTTP/2 without TLS: 8 GET / streams opened at once on one connection,
/// then 8 of a static file nginx sends with sendfile (tcp_sendpage before 6.5) on another:
/// with every hook set, 16 h2 requests (GET, 2xx), nothing in flight, no h2 exchange. A
/// frame walk the kernel refused (flyprobe would survive it by counting exchanges) fails.
fn h2c_streams(set: &str) -> Result<String, String> {
    let (nginx, _) = servers::nginx_h2c();
    let fp = Flyprobe::start(&["--hooks", set, "--pid-tree", &nginx.pid().to_string()]);
    if let Some(line) = fp
        .log()
        .lines()
        .find(|l| l.contains("frame walks did not load"))
    {
        return Err(line.chars().take(600).collect());
    }
    for path in ["/", "/static/page.bin"] {
        let statuses =
            client::h2c_gets(nginx.port, path, 8).map_err(|e| format!("h2c {path}: {e}"))?;
        if statuses != vec![200; 8] {
            return Err(format!("nginx answered {path} with {statuses:?}"));
        }
    }
    let of = |extra: &[(&'static str, &'static str)]| {
        let mut labels = vec![("server", "nginx"), ("protocol", "h2")];
        labels.extend_from_slice(extra);
        labels
    };
    let m = settle(&fp, "16 h2c streams", |m| {
        let requests = m.total(
            "server_requests_total",
            &of(&[("method", "GET"), ("status", "2xx")]),
        );
        let all = m.total("server_requests_total", &of(&[]));
        let in_flight = m.total("server_in_flight_requests", &[("server", "nginx")]);
        (requests == 16 && all == 16 && in_flight == 0).then_some(())
    });
    fp.stop();
    let exchanges = m.total("server_exchanges_total", &of(&[]));
    if exchanges != 0 {
        return Err(format!("{exchanges} h2 exchanges"));
    }
    let requests = m.total("server_requests_total", &of(&[]));
    Ok(format!("{requests} h2 requests, no h2 exchange"))
}

/// Three keep-alive connections with a known mix of methods and statuses: every count equal
/// to what was sent.
fn exact(fp: &Flyprobe, server: &str, port: u16) -> Result<String, String> {
    let base = fp.scrape();
    let mut sent: BTreeMap<(String, String), u64> = BTreeMap::new();
    let plan = [
        ("POST", "/echo", 1),
        ("GET", "/", 4),
        ("GET", "/missing", 2),
        ("GET", "/error", 1),
    ];
    let mut total = 0;
    for _ in 0..3 {
        let mut conn = Conn::connect(port).map_err(|e| e.to_string())?;
        for (method, path, n) in plan {
            for _ in 0..n {
                let resp = if method == "GET" {
                    conn.get(path)
                } else {
                    conn.send(method, path, b"hello")
                }
                .map_err(|e| format!("{method} {path}: {e}"))?;
                let class = format!("{}xx", resp.status / 100);
                *sent.entry((method.into(), class)).or_default() += 1;
                total += 1;
            }
        }
        conn.close();
    }
    let counted = |m: &Metrics| {
        let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (labels, v) in m.series("server_requests_total", &[("server", server)]) {
            *by.entry((labels["method"].clone(), labels["status"].clone()))
                .or_default() += v as u64;
        }
        by
    };
    let was = counted(&base);
    let accepted0 = base.total("server_connections_accepted_total", &[("server", server)]);
    settle(fp, "the traffic", |m| {
        let mut now = counted(m);
        for (k, v) in &was {
            *now.entry(k.clone()).or_default() -= v;
        }
        now.retain(|_, n| *n > 0);
        let accepted = m.total("server_connections_accepted_total", &[("server", server)]);
        (now == sent
            && accepted - accepted0 == 3
            && m.total("server_active_connections", &[("server", server)]) == 0
            && m.total("server_in_flight_requests", &[("server", server)]) == 0)
            .then_some(())
    });
    Ok(format!("{total} requests on 3 connections: {sent:?}"))
}

/// flyprobe as `nobody` with only the capabilities the README documents (tracefs is mounted
/// by now), on a kernel built as Debian builds it (perf_event_paranoid=3, where a perf event
/// wants CAP_SYS_ADMIN): the set `auto` chooses loads, attaches and counts.
fn least_privilege(expected: &str, server: &Server) -> Result<String, String> {
    // util-linux's setpriv, not busybox's (which /init puts first on PATH and lacks --reuid).
    let wrapper = flyprobe::as_nobody("/usr/bin/setpriv");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let fp = Flyprobe::start_via(&wrapper, &["--pid-tree", &server.pid().to_string()]);
    let log = fp.log();
    let want = format!("({expected} hooks)");
    if !log.contains(&want) {
        return Err(format!("wanted {want}: {log}"));
    }
    let label = [("server", "flyprobe-test-server")];
    let before = fp.scrape().total("server_requests_total", &label);
    let mut conn = Conn::connect(server.port).map_err(|e| e.to_string())?;
    for _ in 0..5 {
        conn.get("/").map_err(|e| e.to_string())?;
    }
    conn.close();
    settle(&fp, "5 requests as nobody", |m| {
        (m.total("server_requests_total", &label) == before + 5).then_some(())
    });
    Ok(format!(
        "{expected} hooks as uid 65534 with the documented capabilities: 5 requests counted"
    ))
}

/// The listener checks' server: a listener with `backlog`, in a network namespace of its own
/// (loopback up) where `pod`. It says "listening PORT"; told "connect N", it opens N
/// connections to it at once (those the full queue drops retry their SYN, dropped again),
/// accepts one every 100 ms, gives up on the rest after 3 s and says "closed".
fn hold_listener(backlog: i32, pod: bool) {
    use std::{io::BufRead as _, os::fd::FromRawFd as _};
    // SAFETY: plain syscalls on this process and a socket it owns from here on.
    let listener = unsafe {
        if pod {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNET),
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        assert!(
            bound == 0 && libc::listen(fd, backlog) == 0,
            "bind/listen: {}",
            std::io::Error::last_os_error()
        );
        std::net::TcpListener::from_raw_fd(fd)
    };
    let port = listener.local_addr().expect("local address").port();
    println!("listening {port}");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let n: usize = line
        .trim()
        .strip_prefix("connect ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let clients: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()
            })
        })
        .collect();
    // A slow worker: one connection taken every 100 ms frees a place in the queue for a SYN
    // whose handshake then finds it full again (a handshake drop, which the listener's drop
    // counter holds twice), besides the SYNs dropped at a full queue.
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let mut taken = Vec::new();
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok((conn, _)) = listener.accept() {
            taken.push(conn);
        }
    }
    let held: Vec<_> = clients.into_iter().map(|c| c.join().ok()).collect();
    drop((held, taken));
    // The listener's drop counter (sk_drops): above the kernel's overflow count by the
    // handshakes it holds twice.
    let mut meminfo = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: getsockopt into an array of u32 of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let drops = if rc == 0 {
        meminfo[libc::SK_MEMINFO_DROPS as usize] as i64
    } else {
        -1
    };
    println!("closed {drops}");
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(listener);
}

/// Counter `name` of `TcpExt` in `pid`'s network namespace (/proc/PID/net/netstat).
fn tcp_ext(pid: u32, name: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/net/netstat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .find_map(|pair| match pair {
            [names, values] if names.starts_with("TcpExt:") => {
                let i = names.split_whitespace().position(|n| n == name)?;
                values.split_whitespace().nth(i)?.parse().ok()
            }
            _ => None,
        })
        .ok_or_else(|| format!("no TcpExt {name} in {path}"))
}

/// The accept queue of the listener on `port` in `pid`'s network namespace, as
/// /proc/PID/net/tcp shows it (rx_queue of a LISTEN line).
fn proc_queue(pid: u32, port: u16) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    let local = format!(":{port:04X}");
    text.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.get(1)?.ends_with(&local) && cols.get(3) == Some(&"0A"))
            .then(|| u64::from_str_radix(cols.get(4)?.split_once(':')?.1, 16).ok())
            .flatten()
    })
}

/// A listener with backlog 2 and a slow worker, watched by flyprobe as nobody with the
/// documented capabilities: in a network namespace of its own as in a pod (`pod`), else in
/// flyprobe's. Its limit and queue (sock_diag, or in the pod the listener borrowed with
/// pidfd_getfd), and after 8 clients its overflows: the kernel's own count of the namespace
/// where flyprobe can tell them per listener (its log says whether), absent where it cannot.
/// Against the backlog it listened with and the namespace's /proc.
fn listener(hooks: &str, pod: bool) -> Result<String, String> {
    const BACKLOG: u64 = 2;
    let mode = if pod {
        "--pod-listener"
    } else {
        "--own-listener"
    };
    let mut server = this_suite(mode, &BACKLOG.to_string())?;
    let pid = server.pid();
    let mut said = std::io::BufReader::new(server.child.stdout.take().ok_or("no stdout")?);
    let mut hear = || -> Result<String, String> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut said, &mut line).map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    };
    let heard = hear()?;
    let port: u16 = heard
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("the listener said {heard:?}"))?;
    let before = tcp_ext(pid, "ListenOverflows")?;
    // util-linux's setpriv, not busybox's (which /init puts first on PATH and lacks --reuid).
    let wrapper = flyprobe::as_nobody("/usr/bin/setpriv");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let fp = Flyprobe::start_via(
        &wrapper,
        &["--hooks", hooks, "--pid-tree", &pid.to_string()],
    );
    // Per listener (the handshakes it dropped told apart: on 6.1 the fentry set's fexit on
    // tcp_check_req, on 6.12 kfree_skb's rx_sk), or in a pod its namespace's
    // count; in flyprobe's own namespace without either, none. The log must agree.
    let per_listener = flyprobe::overflows_per_listener(hooks);
    if per_listener == fp.log().contains("per listener needs") {
        return Err(format!(
            "{hooks} hooks on this kernel should count overflows per listener: \
             {per_listener}; the log says otherwise:\n{}",
            fp.log()
        ));
    }
    let counted = pod || per_listener;
    let want = |n: u64| counted.then_some(n as f64);
    let port_label = port.to_string();
    let labels = [("port", port_label.as_str())];
    settle(&fp, "the queue's limit, and no overflows", |m| {
        (m.get("server_listen_queue_limit", &labels) == Some(BACKLOG as f64)
            && m.get("server_listen_overflows_total", &labels) == want(0))
        .then_some(())
    });
    let mut stdin = server.child.stdin.take().ok_or("no stdin")?;
    std::io::Write::write_all(&mut stdin, b"connect 8\n").map_err(|e| e.to_string())?;
    let heard = hear()?;
    let sk_drops = heard
        .strip_prefix("closed ")
        .ok_or(format!("the listener said {heard:?}, not closed"))?
        .to_string();
    // Both read again at each look: handshakes the full queue dropped are retried (SYN-ACK
    // retransmits, the clients' FINs) and overflow again for a few seconds.
    let kernel = || tcp_ext(pid, "ListenOverflows").map_or(0, |n| n - before);
    if kernel() == 0 {
        return Err("8 clients on a backlog of 2 did not overflow it".into());
    }
    let queue = || proc_queue(pid, port);
    let m = settle(&fp, "overflows and the queue as the kernel counts", |m| {
        (m.get("server_listen_overflows_total", &labels) == want(kernel())
            && m.get("server_listen_queue_length", &labels) == queue().map(|q| q as f64))
        .then_some(())
    });
    let overflows = m.get("server_listen_overflows_total", &labels);
    let queue = m.get("server_listen_queue_length", &labels).unwrap_or(-1.0);
    let kernel = kernel();
    let log = fp.stop();
    if log.contains("reading the listener") {
        return Err(format!("a borrow failed: {log}"));
    }
    drop(stdin);
    let how = match (pod, per_listener) {
        (true, true) => "in a pod, per listener",
        (true, false) => "in a pod, the namespace's count",
        (false, true) => "per listener",
        (false, false) => "none exported: this kernel cannot tell them per listener",
    };
    Ok(format!(
        "as nobody: limit {BACKLOG}, queue {queue}, overflows {overflows:?} with the \
         kernel's {kernel} ({how}; the listener's drop counter read {sk_drops} as the clients \
         ended, each handshake drop in it twice)"
    ))
}

/// This binary as one of the servers of its checks (`mode`), talked to over its stdin and
/// stdout.
fn this_suite(mode: &str, arg: &str) -> Result<flyprobe_tests::procs::Guard, String> {
    Ok(flyprobe_tests::procs::Guard::spawn(
        mode.trim_start_matches('-'),
        Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args([mode, arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    ))
}

/// A server that accepts a connection and never reads it: the syscall set sees the accept
/// (active); the socket-keyed sets take a connection at a worker's first read, write or close,
/// so it stays queued.
fn accept(hooks: &str) -> Result<String, String> {
    let port = flyprobe_tests::free_port();
    let mut server = this_suite("--accept-and-hold", &port.to_string())?;
    // It says when it listens (a probe connection would be the one it accepts).
    let mut said = std::io::BufReader::new(server.child.stdout.take().ok_or("no stdout")?);
    let mut expect = |word: &str| -> Result<(), String> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut said, &mut line).map_err(|e| e.to_string())?;
        if line.trim() == word {
            Ok(())
        } else {
            Err(format!(
                "the accept-and-hold server said {line:?}, not {word}"
            ))
        }
    };
    expect("listening")?;
    let fp = Flyprobe::start(&["--hooks", hooks, "--pid-tree", &server.pid().to_string()]);
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let mut stdin = server.child.stdin.take().ok_or("no stdin")?;
    std::io::Write::write_all(&mut stdin, b"accept\n").map_err(|e| e.to_string())?;
    // Checked only once the accept happened, so a wrongly counted accept cannot hide.
    expect("accepted")?;
    let (active, queued) = if hooks == "syscall" { (1, 0) } else { (0, 1) };
    settle(&fp, "the held connection", |m| {
        (m.total("server_active_connections", &[]) == active
            && m.total("server_queued_connections", &[]) == queued
            && m.total("server_connections_accepted_total", &[]) == active)
            .then_some(())
    });
    drop(client);
    Ok(format!(
        "an accepted, never-read connection: active {active}, queued {queued}"
    ))
}

/// SIGKILL one worker: reported stopped by SIGKILL, its replacement started.
fn sigkill(fp: &Flyprobe, server: &str, s: &Server) -> Result<String, String> {
    // (workers started, workers stopped by SIGKILL)
    let lifecycle = |m: &Metrics| {
        let count = |name: &str, labels: &[(&str, &str)]| m.get(name, labels).unwrap_or(0.0) as u64;
        (
            count("server_started_total", &[("server", server)]),
            count(
                "server_stopped_total",
                &[("server", server), ("reason", "signal_SIGKILL")],
            ),
        )
    };
    let m = fp.scrape();
    let (started, killed) = lifecycle(&m);
    let victim = *worker_pids(&m, server)
        .iter()
        .next()
        .ok_or("no worker to kill")?;
    if servers::children(s.pid()).iter().all(|c| *c != victim) {
        return Err(format!("{victim} is not a child of {}", s.pid()));
    }
    // SAFETY: kill(2) on a worker of a server this suite started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    settle(fp, "the kill and the respawn", |m| {
        let (now_started, now_killed) = lifecycle(m);
        let pids = worker_pids(m, server);
        (now_killed == killed + 1
            && now_started == started + 1
            && gauge(m, "server_workers", server) == 2
            && !pids.contains(&victim))
        .then_some(())
    });
    Ok(format!(
        "worker {victim}: stopped signal_SIGKILL, one started"
    ))
}

/// End-to-end test binaries (tests/tests/*.rs, copied into the guest as /bin/e2e-NAME) and
/// the tests of each that run here: those whose servers are the workspace's or nginx.
const E2E: &[(&str, &[&str])] = &[
    (
        "http_matrix",
        &[
            "rust_axum",
            "nginx_two_workers_with_sendfile",
            "non_http_traffic_is_exchanges_by_protocol_never_requests",
        ],
    ),
    ("watch_servers", &["rust_axum_server"]),
    (
        "waiting",
        &["a_deferred_accept_listeners_discarded_acks_are_no_overflows"],
    ),
    (
        "sockets",
        &["sockets_driven_through_io_uring_count_exactly"],
    ),
    (
        "unix_sockets",
        &[
            "rust_axum_on_a_unix_socket_counts_every_connection_and_request_exactly",
            "rust_axum_behind_nginx_over_a_unix_socket_counts_both_hops_and_no_outbound_connection",
        ],
    ),
];

/// io_uring does its I/O without syscalls: only the socket-keyed sets see it.
fn runs_on(binary: &str, hooks: &str) -> bool {
    binary != "sockets" || hooks != "syscall"
}

fn e2e(binary: &str, tests: &[&str], hooks: &str) -> Result<String, String> {
    let out = Command::new(format!("/bin/e2e-{binary}"))
        .arg("--exact")
        .args(tests)
        .args(["--test-threads", "1"])
        .env("FLYPROBE_HOOKS", hooks)
        .output()
        .map_err(|e| format!("/bin/e2e-{binary}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("no test result")
        .to_string();
    let passed = format!("{} passed", tests.len());
    if out.status.success() && result.contains(&passed) {
        Ok(format!("{} ({result})", tests.join(", ")))
    } else {
        // Each failure's panic line and the message after it.
        let lines: Vec<&str> = stdout.lines().collect();
        let failures: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .map(|(i, l)| {
                // The message's first line, and an assertion's two sides.
                let sides = lines[i..]
                    .iter()
                    .take_while(|l| !l.starts_with("note:"))
                    .filter(|l| {
                        l.trim_start().starts_with("left:") || l.trim_start().starts_with("right:")
                    });
                let mut out = vec![l.to_string(), lines.get(i + 1).unwrap_or(&"").to_string()];
                out.extend(sides.map(|s| s.to_string()));
                out.join(" ")
            })
            .collect();
        // `--exact` runs nothing for a name that no longer exists: say so, not just "FAIL".
        let missing = if out.status.success() && failures.is_empty() {
            format!(
                "fewer than {} tests ran: is every name in E2E[{binary}] a test of tests/tests/{binary}.rs?",
                tests.len()
            )
        } else {
            failures.join("; ")
        };
        Err(format!(
            "{result}; {missing}; stderr tail: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" / ")
        ))
    }
}

/// Requests per cost measurement: enough that the per-request figure is steady in a guest.
const COST_REQUESTS: u64 = 2000;

/// The kernel programs' run time (bpf_stats) per request of a Rust server under `hooks`, and
/// the same for the set's empty programs on the same events (fentry, socket: `--empty-hooks`;
/// syscall: the empty `--calibration-probe` program beside the real ones). Prints
/// `VMSUITE cost SET PROGRAM RUNS NS_PER_RUN` lines and returns the per-request summary.
fn cost(hooks: &str) -> Result<String, String> {
    let stats = |enable: bool| {
        std::fs::write(
            "/proc/sys/kernel/bpf_stats_enabled",
            if enable { "1" } else { "0" },
        )
        .map_err(|e| format!("bpf_stats_enabled: {e}"))
    };
    let run = |extra: &[&str]| -> Result<Vec<(String, u64, u64)>, String> {
        let server = servers::rust_server();
        let mut args = vec!["--hooks", hooks];
        args.extend_from_slice(extra);
        let pid = server.pid().to_string();
        args.extend(["--pid-tree", pid.as_str()]);
        let fp = Flyprobe::start(&args);
        stats(true)?;
        // Off again however this run ends.
        struct StatsOff;
        impl Drop for StatsOff {
            fn drop(&mut self) {
                let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
            }
        }
        let _off = StatsOff;
        let mut conns: Vec<Conn> = (0..4)
            .map(|_| Conn::connect(server.port))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        for i in 0..COST_REQUESTS {
            conns[(i % 4) as usize]
                .get("/")
                .map_err(|e| e.to_string())?;
        }
        for conn in conns {
            conn.close();
        }
        let progs = programs(fp.pid())?;
        stats(false)?;
        fp.stop();
        Ok(progs)
    };
    let per_request = |progs: &[(String, u64, u64)]| {
        progs.iter().map(|p| p.1).sum::<u64>() as f64 / COST_REQUESTS as f64
    };
    let real = run(&[])?;
    let floor_args: &[&str] = if hooks == "syscall" {
        &["--calibration-probe"]
    } else {
        &["--empty-hooks"]
    };
    let floor = run(floor_args)?;
    for (label, progs) in [
        (hooks.to_string(), &real),
        (format!("{hooks}-empty"), &floor),
    ] {
        for (name, ns, runs) in progs.iter() {
            // The syscall set's floor run carries the real programs beside the empty one.
            let real_in_floor = hooks == "syscall" && label != hooks && name != "calibration";
            if *runs > 0 && !real_in_floor {
                println!(
                    "VMSUITE cost {label} {name} {runs} {:.0}",
                    *ns as f64 / *runs as f64
                );
            }
        }
    }
    let (r, f) = if hooks == "syscall" {
        // The empty calibration program (on sys_enter_read) costs this much a run: as many
        // empty runs as the real programs made per request are the floor.
        let calibration = floor
            .iter()
            .find(|x| x.0 == "calibration" && x.2 > 0)
            .map_or(0.0, |x| x.1 as f64 / x.2 as f64);
        let runs: u64 = real.iter().map(|x| x.2).sum();
        (
            per_request(&real),
            calibration * runs as f64 / COST_REQUESTS as f64,
        )
    } else {
        (per_request(&real), per_request(&floor))
    };
    println!("VMSUITE costreq {hooks} {r:.0} {f:.0}");
    Ok(format!(
        "{r:.0} ns of programs per request, empty programs {f:.0} ns ({:.1}x)",
        r / f.max(1.0)
    ))
}

/// flyprobe's programs (by the fds it holds) with their bpf_stats: (name, run ns, runs).
fn programs(pid: u32) -> Result<Vec<(String, u64, u64)>, String> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).map_err(|e| e.to_string())? {
        let text =
            std::fs::read_to_string(entry.map_err(|e| e.to_string())?.path()).unwrap_or_default();
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            ids.insert(id);
        }
    }
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    let progs: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool output: {e}"))?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                p["run_time_ns"].as_u64().unwrap_or(0),
                p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// A hook set this kernel lacks: one error line naming it, a non-zero exit.
fn refused(set: &str) -> Result<String, String> {
    let out = Command::new(flyprobe::bin())
        .args(["--hooks", set, "--pid-tree", "1", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("flyprobe: error"))
        .collect();
    match (out.status.code(), errors.as_slice()) {
        (Some(code), [line]) if code != 0 && line.contains(set) => {
            Ok(format!("exit {code}: {line}"))
        }
        _ => Err(format!("exit {:?}, stderr: {stderr}", out.status.code())),
    }
}

fn gauge(m: &Metrics, name: &str, server: &str) -> u64 {
    m.get(name, &[("server", server)]).unwrap_or(-1.0) as u64
}

fn worker_pids(m: &Metrics, server: &str) -> std::collections::BTreeSet<u32> {
    m.series("server_worker_info", &[("server", server)])
        .into_iter()
        .filter_map(|(labels, _)| labels.get("pid")?.parse().ok())
        .collect()
}

/// Scrape until `ok` holds (or fail after SETTLE with the last scrape).
fn settle<T>(fp: &Flyprobe, what: &str, ok: impl Fn(&Metrics) -> Option<T>) -> Metrics {
    let deadline = Instant::now() + SETTLE;
    loop {
        let m = fp.scrape();
        if ok(&m).is_some() {
            return m;
        }
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}; last scrape:\n{}", m.text);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::E2E;

    /// A renamed test would make `--exact` run nothing in the guest: catch it on the host.
    #[test]
    fn every_guest_test_is_a_test_of_its_file() {
        for (binary, tests) in E2E {
            let path = format!("{}/tests/{binary}.rs", env!("CARGO_MANIFEST_DIR"));
            let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            for test in *tests {
                assert!(
                    source.contains(&format!("fn {test}()")),
                    "E2E names {test}, which {path} does not define"
                );
            }
        }
    }
}
