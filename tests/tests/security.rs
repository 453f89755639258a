//! Least privilege and the protected endpoint: flyprobe runs as a non-root user holding only
//! the documented capabilities, drops what it no longer needs once attached, and serves over
//! TLS with basic or bearer authentication, checked with a real client (curl).

use std::{fs, path::PathBuf, process::Command, time::Duration};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{self, Flyprobe},
    free_port,
    netns::Netns,
    require_root,
    servers::{self, Server},
};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19) and CAP_BPF (39): what the daemon keeps
/// after attaching.
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 39);

/// The capability sets of `pid` from /proc: (effective, permitted, bounding, ambient).
fn caps_of(pid: u32) -> (u64, u64, u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    (
        field("CapEff:"),
        field("CapPrm:"),
        field("CapBnd:"),
        field("CapAmb:"),
    )
}

fn uid_of(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `n` keep-alive requests on one connection, then the totals must match.
fn exact_requests(fp: &Flyprobe, server: &Server, n: u64) {
    let mut c = Conn::connect(server.port).unwrap();
    for _ in 0..n {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    c.close();
    let pid = server.pid().to_string();
    eventually("exact counts", std::time::Duration::from_secs(10), || {
        let m = fp.scrape();
        let got = m.total("server_requests_total", &[("pid", &pid)]);
        if got == n { Ok(()) } else { Err(got) }
    });
}

#[test]
fn runs_as_nobody_with_only_the_documented_capabilities() {
    require_root();
    let server = servers::rust_server();
    let wrapper = flyprobe::as_nobody("setpriv");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let pid = server.pid().to_string();
    let fp = Flyprobe::start_via(&wrapper, &["--pid-tree", &pid]);
    assert_eq!(uid_of(fp.pid()), 65534);
    let (eff, prm, _, amb) = caps_of(fp.pid());
    println!("as nobody after attach: CapEff {eff:#x} CapPrm {prm:#x} CapAmb {amb:#x}");
    assert_eq!((eff, prm, amb), (KEPT, KEPT, 0), "{}", fp.log());
    exact_requests(&fp, &server, 25);
    let log = fp.stop();
    assert!(
        log.contains("capabilities dropped to [CAP_BPF, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE]"),
        "{log}"
    );
}

/// The documented set reaches a root server in a network namespace of its own (a pod):
/// CAP_SYS_PTRACE lets flyprobe, as nobody, borrow its listener for the accept queue's
/// limit, which nothing in /proc shows.
#[test]
fn as_nobody_it_reads_a_pods_listener() {
    require_root();
    let name = "flyprobe-e2e-nobody";
    let ns = Netns::create(&[name]);
    let server = servers::gunicorn_sync_in_netns(name, 1, 16);
    let port = server.port;
    let wrapper = flyprobe::as_nobody("setpriv");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let pid = server.pid().to_string();
    let fp = Flyprobe::start_via(&wrapper, &["--pid-tree", &pid]);
    let limit = eventually("the pod's queue limit", Duration::from_secs(20), || {
        let m = fp.scrape();
        m.get("server_listen_queue_limit", &[("port", &port.to_string())])
            .ok_or(m.text)
    });
    assert_eq!(limit, 16.0, "gunicorn --backlog 16");
    let log = fp.stop();
    assert!(!log.contains("reading the listener"), "{log}");
    drop((server, ns));
}

#[test]
fn root_gives_up_every_capability_it_no_longer_needs() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let (eff, prm, bnd, amb) = caps_of(fp.pid());
    println!("as root after attach: CapEff {eff:#x} CapPrm {prm:#x} CapBnd {bnd:#x}");
    assert_eq!((eff, prm, bnd, amb), (KEPT, KEPT, KEPT, 0));
    exact_requests(&fp, &server, 10);
    fp.stop();
}

/// A scratch directory with a self-signed certificate for 127.0.0.1, made by openssl.
fn tls_files() -> PathBuf {
    let dir = flyprobe::log_path("tls");
    fs::create_dir_all(&dir).unwrap();
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=flyprobe-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl (Debian package openssl) is needed to make the test certificate");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    dir
}

/// curl's HTTP status for `url` (000 when no HTTP answer came), and its exit code.
fn curl(url: &str, extra: &[&str], ca: &PathBuf) -> (String, i32) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is needed for the TLS test");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn tls_with_basic_and_bearer_auth_refuses_wrong_credentials_and_plain_http() {
    require_root();
    let dir = tls_files();
    let hash = bcrypt::hash("correct horse", 8).unwrap();
    fs::write(dir.join("token"), "t0k3n-for-scrapers\n").unwrap();
    let config = dir.join("web.yml");
    fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
             basic_auth_users:\n  prometheus: '{hash}'\nbearer_token_file: token\n"
        ),
    )
    .unwrap();
    let server = servers::rust_server();
    let port = free_port();
    let mut fp = Flyprobe::spawn(
        port,
        &[],
        &[
            "--pid-tree",
            &server.pid().to_string(),
            "--web.config.file",
            config.to_str().unwrap(),
        ],
    );
    let ca = dir.join("cert.pem");
    let https = format!("https://127.0.0.1:{port}");
    let metrics = format!("{https}/metrics");
    eventually(
        "flyprobe to serve TLS",
        std::time::Duration::from_secs(30),
        || {
            assert!(fp.exited().is_none(), "flyprobe exited:\n{}", fp.log());
            let got = curl(&metrics, &["-u", "prometheus:correct horse"], &ca);
            if got.0 == "200" { Ok(()) } else { Err(got) }
        },
    );
    let cases: [(&str, &[&str], &str); 7] = [
        ("right password", &["-u", "prometheus:correct horse"], "200"),
        ("wrong password", &["-u", "prometheus:wrong"], "401"),
        ("unknown user", &["-u", "root:correct horse"], "401"),
        ("no credentials", &[], "401"),
        (
            "bearer token",
            &["-H", "Authorization: Bearer t0k3n-for-scrapers"],
            "200",
        ),
        ("wrong token", &["-H", "Authorization: Bearer nope"], "401"),
        (
            "token as password",
            &["-u", "prometheus:t0k3n-for-scrapers"],
            "401",
        ),
    ];
    for (what, args, want) in cases {
        for path in ["/metrics", "/api/v1/snapshot", "/"] {
            let got = curl(&format!("{https}{path}"), args, &ca);
            assert_eq!(got.0, want, "{what} on {path}: {got:?}");
        }
    }
    // The body really is the exposition, over TLS.
    let body = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["-u", "prometheus:correct horse", &metrics])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&body.stdout).contains("server_workers{server="));
    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let (code, exit) = curl(&format!("http://127.0.0.1:{port}/metrics"), &[], &ca);
    assert_eq!(code, "000", "plain HTTP got an HTTP status");
    assert_ne!(exit, 0, "plain HTTP to the TLS port must fail");
    // An untrusted certificate is refused by the client: the server is really TLS.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", &metrics])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl should reject the self-signed cert"
    );
    drop(fp);
    let _ = fs::remove_dir_all(dir);
}
