//! A real Prometheus (Debian's package) scrapes flyprobe: PromQL sees exactly the requests the
//! client sent. The exposition passes `promtool check metrics`, and the OpenMetrics one (what
//! Prometheus asks for) parses with the strict OpenMetrics parser of prometheus-client.

use std::{
    fs,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{self, Flyprobe},
    free_port,
    procs::Guard,
    require_root,
    servers::{self, python},
};

fn binary(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path.to_string_lossy().into_owned();
        }
    }
    panic!("{name} not found: it comes with Debian's `prometheus` package (`cargo xtask setup`)");
}

/// GET `path` from a local HTTP server: the body of a 200.
fn try_get(port: u16, path: &str, accept: Option<&str>) -> Result<String, String> {
    let mut conn = Conn::connect(port).map_err(|e| e.to_string())?;
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{}\r\n",
        accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"))
    );
    conn.write(head.as_bytes()).map_err(|e| e.to_string())?;
    let resp = conn.read_response(false).map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    if resp.status == 200 {
        Ok(body)
    } else {
        Err(format!("{}: {body}", resp.status))
    }
}

fn get(port: u16, path: &str, accept: Option<&str>) -> String {
    try_get(port, path, accept).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One instant PromQL query; the value of its single result, if there is one.
fn promql(port: u16, query: &str) -> Result<f64, String> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = try_get(port, &format!("/api/v1/query?query={encoded}"), None)?;
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let result = &json["data"]["result"];
    match result.as_array().map(Vec::as_slice) {
        Some([one]) => one["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| body.clone()),
        _ => Err(body),
    }
}

#[test]
fn prometheus_counts_exactly_what_the_client_sent() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let dir = flyprobe::log_path("prometheus");
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: flyprobe\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            fp.port
        ),
    )
    .unwrap();
    let check = Command::new(binary("promtool"))
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let prom_port = free_port();
    let _prometheus = Guard::spawn(
        "prometheus",
        Command::new(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("prometheus.log")).unwrap()),
    );
    eventually(
        "Prometheus to scrape flyprobe (up == 1)",
        Duration::from_secs(60),
        || match promql(prom_port, "up{job=\"flyprobe\"}") {
            Ok(1.0) => Ok(()),
            other => Err(other),
        },
    );

    // 3 connections, 41 requests, a few of them 404 and 500.
    let mut sent = 0;
    for paths in [&["/", "/", "/error"][..], &["/nope"; 8][..], &["/"; 30][..]] {
        let mut c = Conn::connect(server.port).unwrap();
        for path in paths {
            c.get(path).unwrap();
            sent += 1;
        }
        c.close();
    }
    let total = eventually(
        "sum(server_requests_total) to reach what was sent",
        Duration::from_secs(30),
        || match promql(prom_port, "sum(server_requests_total)") {
            Ok(v) if v as u64 == sent => Ok(v),
            other => Err(other),
        },
    );
    println!("PromQL sum(server_requests_total) = {total}, client sent {sent}");
    let per_status = |s: &str| {
        promql(
            prom_port,
            &format!("sum(server_requests_total{{status=\"{s}\"}})"),
        )
    };
    eventually("per-status sums", Duration::from_secs(10), || {
        let got = (per_status("2xx"), per_status("4xx"), per_status("5xx"));
        if got == (Ok(32.0), Ok(8.0), Ok(1.0)) {
            Ok(())
        } else {
            Err(got)
        }
    });
    // Stable after more scrapes: nothing counted twice.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        promql(prom_port, "sum(server_requests_total)"),
        Ok(sent as f64)
    );
    assert_eq!(
        promql(prom_port, "sum(server_request_duration_seconds_count)"),
        Ok(sent as f64)
    );

    // promtool lints the text format...
    let text = get(fp.port, "/metrics", None);
    let mut promtool = Command::new(binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and the OpenMetrics exposition Prometheus negotiates parses strictly.
    let om = get(
        fp.port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    let mut parser = Command::new(python())
        .args([
            "-c",
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             fams = list(p(sys.stdin.read()))\n\
             total = sum(s.value for f in fams if f.name == 'server_requests' for s in f.samples if s.name == 'server_requests_total')\n\
             print(len(fams), int(total))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(om.as_bytes())
        .unwrap();
    let out = parser.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "OpenMetrics parser rejected the exposition: {}\n{om}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total: u64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(total, sent, "OpenMetrics requests total");
    fp.stop();
    let _ = fs::remove_dir_all(dir);
}
