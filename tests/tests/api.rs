//! The JSON API beside `/metrics`: `/api/v1/snapshot` must say what `/metrics` says for the
//! same traffic, and every `/api/v1/stream` client must get rates from its own previous
//! event (docs/api.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flyprobe_tests::{
    client::{Conn, Response},
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, children},
};
use serde::Deserialize;

const SETTLE: Duration = Duration::from_secs(15);
const REQUESTS: &str = "server_requests_total";
const DURATION: &str = "server_request_duration_seconds";
const CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "aborted", "other"];

// ---------- the documented shapes ----------

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    version: String,
    time: f64,
    servers: Vec<ServerSnap>,
    lifecycle: Vec<LifecycleEvent>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct ServerSnap {
    server: String,
    labels: BTreeMap<String, String>,
    up: bool,
    uptime_seconds: f64,
    workers: u64,
    active_connections: u64,
    queued_connections: u64,
    in_flight_requests: u64,
    requests_total: u64,
    status_classes: BTreeMap<String, u64>,
    exchanges_total: u64,
    latency: Latency,
    queue_latency: Latency,
    listen_queue_length: u64,
    listen_queue_limit: u64,
    listen_overflows: u64,
    resets_sent: u64,
    resets_received: u64,
    started_total: u64,
    stopped_total: BTreeMap<String, u64>,
    worker_list: Vec<WorkerSnap>,
    /// Only in stream events.
    rates: Option<Rates>,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Latency {
    bounds: Vec<f64>,
    cumulative: Vec<u64>,
    count: u64,
    sum: f64,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct WorkerSnap {
    pid: u32,
    ppid: u32,
    comm: String,
    uptime_seconds: f64,
    active_connections: u64,
    in_flight_requests: u64,
    requests_total: u64,
    status_classes: BTreeMap<String, u64>,
    /// Only in stream events.
    requests_per_second: Option<f64>,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Rates {
    interval_seconds: f64,
    requests_per_second: f64,
    error_rate: f64,
    p50_seconds: Option<f64>,
    p99_seconds: Option<f64>,
    queue_p50_seconds: Option<f64>,
    queue_p99_seconds: Option<f64>,
}

/// A stream's first event has no previous one to rate against.
const FIRST_EVENT_RATES: Rates = Rates {
    interval_seconds: 0.0,
    requests_per_second: 0.0,
    error_rate: 0.0,
    p50_seconds: None,
    p99_seconds: None,
    queue_p50_seconds: None,
    queue_p99_seconds: None,
};

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct LifecycleEvent {
    time: f64,
    server: String,
    labels: BTreeMap<String, String>,
    pid: u32,
    event: String,
    reason: Option<String>,
}

impl Snapshot {
    fn server(&self, name: &str) -> &ServerSnap {
        self.servers
            .iter()
            .find(|s| s.server == name)
            .unwrap_or_else(|| panic!("no server {name} in {self:#?}"))
    }
}

impl ServerSnap {
    fn worker(&self, pid: u32) -> Option<&WorkerSnap> {
        self.worker_list.iter().find(|w| w.pid == pid)
    }

    fn rates(&self) -> &Rates {
        self.rates
            .as_ref()
            .unwrap_or_else(|| panic!("a stream event without rates: {self:#?}"))
    }
}

// ---------- plain HTTP ----------

/// One `Connection: close` GET: status, lower-cased headers, body.
fn raw_get(port: u16, path: &str) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to flyprobe");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        Chunked::new(reader).read_to_end(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    (status, headers, body)
}

fn read_head(reader: &mut impl BufRead) -> (u16, BTreeMap<String, String>) {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("reading the status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("reading a header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("a header line");
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    (status, headers)
}

/// A `Transfer-Encoding: chunked` body, decoded as it arrives.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(0);
            }
            if line.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                line.clear();
                if self.inner.read_line(&mut line)? == 0 {
                    return Ok(0);
                }
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        if n == 0 {
            return Ok(0);
        }
        self.left -= n;
        Ok(n)
    }
}

fn snapshot(port: u16) -> Snapshot {
    let (status, headers, body) = raw_get(port, "/api/v1/snapshot");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "snapshot content type: {headers:?}"
    );
    let snap: Snapshot = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "the snapshot does not have the documented shape: {e}\n{}",
            String::from_utf8_lossy(&body)
        )
    });
    for s in &snap.servers {
        assert!(s.rates.is_none(), "rates are for stream events only");
        assert!(
            s.worker_list
                .iter()
                .all(|w| w.requests_per_second.is_none())
        );
    }
    snap
}

// ---------- an SSE client ----------

/// One `/api/v1/stream` client: its events arrive on a channel from a reader thread.
struct Stream {
    events: mpsc::Receiver<Result<Snapshot, String>>,
    socket: TcpStream,
    /// Every event received so far, in order.
    seen: Vec<Snapshot>,
}

impl Stream {
    fn open(port: u16, interval_ms: u64) -> Self {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("connecting to flyprobe");
        write!(
            socket,
            "GET /api/v1/stream?interval_ms={interval_ms} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let (status, headers) = read_head(&mut reader);
        assert_eq!(status, 200, "GET /api/v1/stream: {headers:?}");
        assert!(
            headers
                .get("content-type")
                .is_some_and(|v| v.starts_with("text/event-stream")),
            "stream content type: {headers:?}"
        );
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            let body: Box<dyn Read + Send> = if chunked {
                Box::new(Chunked::new(reader))
            } else {
                Box::new(reader)
            };
            let lines = BufReader::new(body).lines();
            let (mut event, mut data) = (String::new(), String::new());
            for line in lines {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let parsed = if event == "snapshot" {
                            serde_json::from_str::<Snapshot>(&data)
                                .map_err(|e| format!("event does not parse: {e}\n{data}"))
                        } else {
                            Err(format!("unexpected event {event:?}: {data}"))
                        };
                        if tx.send(parsed).is_err() {
                            return;
                        }
                    }
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
                // Comments (`:` keep-alives), `id:` and `retry:` are ignored.
            }
        });
        Self {
            events,
            socket,
            seen: Vec::new(),
        }
    }

    fn next(&mut self) -> &Snapshot {
        let event = self
            .events
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no stream event within 10 s: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        self.seen.push(event);
        self.seen.last().unwrap()
    }

    /// Read events until one satisfies `check`.
    fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + timeout;
        loop {
            let event = self.next().clone();
            if check(&event) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a stream event with {what}; last: {event:#?}"
            );
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

// ---------- histogram_quantile, as PromQL computes it ----------

/// `cumulative` has one entry per bound plus the +Inf bucket (the total).
fn histogram_quantile(q: f64, bounds: &[f64], cumulative: &[f64]) -> Option<f64> {
    let total = *cumulative.last()?;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let b = cumulative[..bounds.len()]
        .iter()
        .position(|&c| c >= rank)
        .unwrap_or(bounds.len());
    if b == bounds.len() {
        return bounds.last().copied();
    }
    if b == 0 && bounds[0] <= 0.0 {
        return Some(bounds[0]);
    }
    let (start, below) = if b == 0 {
        (0.0, 0.0)
    } else {
        (bounds[b - 1], cumulative[b - 1])
    };
    Some(start + (bounds[b] - start) * (rank - below) / (cumulative[b] - below))
}

fn close_to(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-12
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------- tests ----------

#[test]
fn the_page_and_the_api_have_their_content_types_and_the_page_is_self_contained() {
    require_root();
    let server = servers::rust_server();
    let fp = Flyprobe::watch(server.pid());
    let (status, headers, body) = raw_get(fp.port, "/");
    assert_eq!(status, 200);
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{headers:?}"
    );
    let page = String::from_utf8(body).expect("the page is UTF-8");
    assert!(page.contains("api/v1/stream") && page.contains("api/v1/snapshot"));
    for external in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "src=\"/",
        "href=\"/",
    ] {
        assert!(
            !page.contains(external),
            "the page must embed everything and use relative URLs: found {external:?}"
        );
    }
    snapshot(fp.port);
    let mut stream = Stream::open(fp.port, 200);
    stream.next();
    fp.stop();
}

#[test]
fn snapshot_matches_metrics_for_the_same_traffic() {
    require_root();
    let server = servers::uvicorn(2);
    let (root, port) = (server.pid(), server.port);
    let fp = Flyprobe::watch(root);
    let t0 = unix_now();
    let initial: BTreeSet<u32> = children(root)
        .into_iter()
        .filter(|c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("spawn_main"))
        })
        .collect();
    eventually("flyprobe to see 2 workers", SETTLE, || {
        let s = snapshot(fp.port);
        let seen = s.server("uvicorn").worker_list.len();
        if seen == 2 { Ok(()) } else { Err(seen) }
    });

    // A worker exits non-zero mid-request (uvicorn replaces it): a stop, a start, and one
    // request without a response.
    let mut conn = Conn::connect(port).unwrap();
    assert!(conn.get("/exit?code=7").is_err());
    eventually("the replacement worker", SETTLE, || {
        let s = snapshot(fp.port);
        let u = s.server("uvicorn");
        let seen = (
            u.started_total,
            u.stopped_total.clone(),
            u.worker_list.len(),
        );
        if seen == (1, BTreeMap::from([("exit_nonzero".to_string(), 1)]), 2) {
            Ok(())
        } else {
            Err(seen)
        }
    });

    // Traffic of every class, on several connections; then some held open.
    let mut ledger: BTreeMap<(u32, u16), u64> = BTreeMap::new();
    let mut record = |r: Response| {
        *ledger
            .entry((r.worker_pid.expect("x-worker-pid"), r.status))
            .or_default() += 1;
    };
    for _ in 0..6 {
        let mut c = Conn::connect(port).unwrap();
        for path in [
            "/",
            "/",
            "/",
            "/redirect",
            "/nope",
            "/error",
            "/",
            "/big?kb=100",
        ] {
            record(c.get(path).unwrap());
        }
        c.close();
    }
    let idle: Vec<Conn> = (0..2)
        .map(|_| {
            let mut c = Conn::connect(port).unwrap();
            record(c.get("/").unwrap());
            c
        })
        .collect();
    let slow = thread::spawn(move || Conn::connect(port).and_then(|mut c| c.get("/slow?ms=8000")));
    let answered: u64 = ledger.values().sum();

    // Quiet: two snapshots around one scrape agree on everything that counts.
    let (s, m) = eventually("a quiet, consistent view", SETTLE, || {
        let s1 = snapshot(fp.port);
        let m = fp.scrape();
        let s2 = snapshot(fp.port);
        let key = |s: &Snapshot| {
            let u = s.server("uvicorn");
            (
                u.requests_total,
                u.active_connections,
                u.in_flight_requests,
                u.latency.count,
                (u.queue_latency.count, u.listen_queue_length),
                u.worker_list
                    .iter()
                    .map(|w| (w.pid, w.requests_total, w.active_connections))
                    .collect::<Vec<_>>(),
            )
        };
        let u = s1.server("uvicorn");
        // The aborted /exit request is counted beside the answered ones.
        let want = (answered + 1, 3, 1);
        let seen = (u.requests_total, u.active_connections, u.in_flight_requests);
        if seen == want && key(&s1) == key(&s2) {
            Ok((s1, m))
        } else {
            Err(seen)
        }
    });
    let t1 = unix_now();
    let u = s.server("uvicorn");
    let label = [("server", "uvicorn")];
    let gauge = |name: &str| {
        m.get(name, &label)
            .unwrap_or_else(|| panic!("no {name} in\n{}", m.text))
    };

    // The snapshot as a whole.
    let build: Vec<String> = m
        .series("flyprobe_build_info", &[])
        .into_iter()
        .filter_map(|(l, _)| l.get("version").cloned())
        .collect();
    assert_eq!(build, vec![s.version.clone()]);
    assert!(
        t0 <= s.time && s.time <= t1,
        "time {} not in [{t0}, {t1}]",
        s.time
    );
    assert_eq!(s.servers.len(), 1);

    // Server level.
    assert!(
        u.labels
            .keys()
            .all(|k| ["container_id", "pod_uid", "unit", "netns"].contains(&k.as_str())),
        "only the documented labels: {:?}",
        u.labels
    );
    assert!(u.up);
    assert_eq!(gauge("server_up"), 1.0);
    assert_eq!(u.workers, gauge("server_workers") as u64);
    assert_eq!(u.workers, 2);
    assert!(
        (u.uptime_seconds - gauge("server_uptime_seconds")).abs() < 1.0,
        "uptime {} vs {}",
        u.uptime_seconds,
        gauge("server_uptime_seconds")
    );
    assert_eq!(
        u.active_connections,
        m.sum("server_active_connections", "uvicorn")
    );
    assert_eq!(
        u.queued_connections,
        m.total("server_queued_connections", &[("server", "uvicorn")])
    );
    assert_eq!(
        u.in_flight_requests,
        m.sum("server_in_flight_requests", "uvicorn")
    );
    assert_eq!(u.requests_total, m.sum(REQUESTS, "uvicorn"));
    assert_eq!(
        u.status_classes
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(CLASSES)
    );
    let by_class = |m: &Metrics, pid: Option<&str>| -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = CLASSES.iter().map(|c| (c.to_string(), 0)).collect();
        let mut labels = vec![("server", "uvicorn")];
        if let Some(pid) = pid {
            labels.push(("pid", pid));
        }
        for (l, v) in m.series(REQUESTS, &labels) {
            let status = l.get("status").map(String::as_str).unwrap_or("");
            let class = if CLASSES[..6].contains(&status) {
                status
            } else {
                "other"
            };
            *out.get_mut(class).unwrap() += v as u64;
        }
        out
    };
    assert_eq!(
        u.status_classes,
        by_class(&m, None),
        "status classes vs /metrics"
    );
    assert_eq!(u.status_classes.values().sum::<u64>(), u.requests_total);
    assert_eq!(
        (u.status_classes["aborted"], u.exchanges_total),
        (1, 0),
        "the /exit request is aborted; HTTP is never an exchange"
    );
    let client: BTreeMap<&str, u64> =
        ledger
            .iter()
            .fold(BTreeMap::new(), |mut acc, ((_, st), n)| {
                *acc.entry(match st / 100 {
                    2 => "2xx",
                    3 => "3xx",
                    4 => "4xx",
                    5 => "5xx",
                    _ => "other",
                })
                .or_default() += n;
                acc
            });
    for class in ["2xx", "3xx", "4xx", "5xx"] {
        assert_eq!(
            u.status_classes[class],
            client.get(class).copied().unwrap_or(0),
            "{class}: snapshot vs what the client got"
        );
    }

    // Latency histogram.
    let les: Vec<f64> = m
        .text
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{DURATION}_bucket{{")) && l.contains("server=\"uvicorn\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            le.parse::<f64>().ok()
        })
        .filter(|le| le.is_finite())
        .collect::<Vec<_>>();
    let mut bounds = les.clone();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    assert_eq!(
        u.latency.bounds, bounds,
        "histogram bounds vs /metrics (without +Inf)"
    );
    assert_eq!(u.latency.cumulative.len(), u.latency.bounds.len());
    for (bound, cum) in u.latency.bounds.iter().zip(&u.latency.cumulative) {
        assert_eq!(
            *cum,
            m.bucket(DURATION, &label, *bound),
            "bucket le={bound}"
        );
    }
    assert_eq!(u.latency.count, m.bucket(DURATION, &label, f64::INFINITY));
    assert_eq!(
        u.latency.count,
        m.total(&format!("{DURATION}_count"), &label)
    );
    assert_eq!(u.latency.count, answered, "every answered request is timed");
    let sum: f64 = m
        .series(&format!("{DURATION}_sum"), &label)
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(
        close_to(u.latency.sum, sum, 1e-6),
        "sum {} vs {sum}",
        u.latency.sum
    );
    assert!(u.latency.cumulative.windows(2).all(|w| w[0] <= w[1]));

    // Waiting for a worker, the accept queues, drops and resets: /metrics' numbers.
    let queue = "server_connection_queue_seconds";
    assert_eq!(u.queue_latency.bounds, u.latency.bounds);
    assert_eq!(
        u.queue_latency.count,
        m.total(&format!("{queue}_count"), &label)
    );
    assert_eq!(
        u.queue_latency.count,
        m.bucket(queue, &label, f64::INFINITY)
    );
    for (field, metric) in [
        (u.listen_queue_length, "server_listen_queue_length"),
        (u.listen_queue_limit, "server_listen_queue_limit"),
        (u.listen_overflows, "server_listen_overflows_total"),
        (
            u.resets_sent + u.resets_received,
            "server_connection_resets_total",
        ),
    ] {
        assert_eq!(field, m.total(metric, &label), "{metric}");
    }
    assert!(u.listen_queue_limit > 0, "uvicorn's listen() backlog");

    // Lifecycle.
    assert_eq!(u.started_total, gauge("server_started_total") as u64);
    let stopped: BTreeMap<String, u64> = m
        .series("server_stopped_total", &label)
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(l, v)| (l["reason"].clone(), v as u64))
        .collect();
    assert_eq!(u.stopped_total, stopped);
    assert_eq!(
        u.stopped_total,
        BTreeMap::from([("exit_nonzero".to_string(), 1)])
    );
    let now: BTreeSet<u32> = u.worker_list.iter().map(|w| w.pid).collect();
    let gone: Vec<u32> = initial.difference(&now).copied().collect();
    let fresh: Vec<u32> = now.difference(&initial).copied().collect();
    assert_eq!((gone.len(), fresh.len()), (1, 1), "{initial:?} -> {now:?}");
    let events: Vec<(u32, &str, Option<&str>)> = s
        .lifecycle
        .iter()
        .map(|e| (e.pid, e.event.as_str(), e.reason.as_deref()))
        .collect();
    assert_eq!(
        events,
        vec![
            (gone[0], "stopped", Some("exit_nonzero")),
            (fresh[0], "started", None)
        ],
        "lifecycle, oldest first"
    );
    for e in &s.lifecycle {
        assert_eq!(e.server, "uvicorn");
        assert!(t0 - 1.0 <= e.time && e.time <= s.time, "{e:?}");
    }
    assert!(s.lifecycle[0].time <= s.lifecycle[1].time);

    // Workers.
    let info: BTreeMap<u32, (u32, String)> = m
        .series("server_worker_info", &label)
        .into_iter()
        .map(|(l, _)| {
            (
                l["pid"].parse().unwrap(),
                (l["ppid"].parse().unwrap(), l["comm"].clone()),
            )
        })
        .collect();
    assert_eq!(info.keys().copied().collect::<BTreeSet<_>>(), now);
    let requests = m.by_pid(REQUESTS, "uvicorn");
    let active = m.by_pid("server_active_connections", "uvicorn");
    let in_flight = m.by_pid("server_in_flight_requests", "uvicorn");
    for w in &u.worker_list {
        let p = w.pid.to_string();
        assert_eq!((w.ppid, w.comm.clone()), info[&w.pid], "worker {}", w.pid);
        assert_eq!(w.ppid, root);
        assert_eq!(w.requests_total, requests.get(&w.pid).copied().unwrap_or(0));
        assert_eq!(w.active_connections, active[&w.pid]);
        assert_eq!(w.in_flight_requests, in_flight[&w.pid]);
        assert_eq!(w.status_classes, by_class(&m, Some(&p)), "worker {}", w.pid);
        let uptime = m
            .get(
                "server_worker_uptime_seconds",
                &[("server", "uvicorn"), ("pid", &p)],
            )
            .unwrap();
        assert!(
            (w.uptime_seconds - uptime).abs() < 1.0,
            "{} vs {uptime}",
            w.uptime_seconds
        );
        let served: u64 = ledger
            .iter()
            .filter(|((pid, _), _)| *pid == w.pid)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            w.requests_total, served,
            "worker {}: vs x-worker-pid",
            w.pid
        );
    }
    // The exited worker's requests stay in the server's totals.
    let live: u64 = u.worker_list.iter().map(|w| w.requests_total).sum();
    assert_eq!(
        u.requests_total - live,
        requests.get(&gone[0]).copied().unwrap_or(0)
    );
    assert_eq!(
        u.requests_total - live,
        1,
        "the /exit request, without a response"
    );

    drop(idle);
    let _ = slow.join();
    fp.stop();
}

/// The checks every stream event pair must pass: rates from this stream's previous event.
fn assert_rates_follow(events: &[Snapshot], server: &str) {
    let first = events[0].server(server);
    assert_eq!(first.rates(), &FIRST_EVENT_RATES, "a stream's first event");
    assert!(
        first
            .worker_list
            .iter()
            .all(|w| w.requests_per_second == Some(0.0)),
        "{first:#?}"
    );
    let mut integrated = 0.0;
    for pair in events.windows(2) {
        let (p, e) = (pair[0].server(server), pair[1].server(server));
        let r = e.rates();
        let dt = pair[1].time - pair[0].time;
        assert!(
            r.interval_seconds > 0.0 && (r.interval_seconds - dt).abs() < 0.05,
            "interval {} vs the events' times {dt}",
            r.interval_seconds
        );
        let delta = (e.requests_total - p.requests_total) as f64;
        assert!(
            close_to(r.requests_per_second * r.interval_seconds, delta, 1e-9),
            "requests/s {} × {} s vs {delta} requests",
            r.requests_per_second,
            r.interval_seconds
        );
        integrated += r.requests_per_second * r.interval_seconds;
        let errors = (e.status_classes["5xx"] - p.status_classes["5xx"]) as f64;
        let want = if delta > 0.0 { errors / delta } else { 0.0 };
        assert!(
            close_to(r.error_rate, want, 1e-9),
            "error rate {} vs {want}",
            r.error_rate
        );
        // Quantiles from this interval's histogram delta.
        let mut cum: Vec<f64> = e
            .latency
            .cumulative
            .iter()
            .zip(&p.latency.cumulative)
            .map(|(a, b)| (a - b) as f64)
            .collect();
        cum.push((e.latency.count - p.latency.count) as f64);
        for (q, got) in [(0.5, r.p50_seconds), (0.99, r.p99_seconds)] {
            let want = histogram_quantile(q, &e.latency.bounds, &cum);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(w)) if close_to(g, w, 1e-9) => {}
                _ => panic!(
                    "p{} {got:?}, histogram_quantile says {want:?}; buckets {cum:?}",
                    q * 100.0
                ),
            }
        }
        if delta == 0.0 {
            assert_eq!((r.p50_seconds, r.p99_seconds), (None, None));
        }
        for w in &e.worker_list {
            let before = p.worker(w.pid).map_or(0, |x| x.requests_total);
            let rps = w
                .requests_per_second
                .expect("workers have requests_per_second in stream events");
            assert!(
                close_to(
                    rps * r.interval_seconds,
                    (w.requests_total - before) as f64,
                    1e-9
                ),
                "worker {}: {rps}/s over {} s vs {} requests",
                w.pid,
                r.interval_seconds,
                w.requests_total - before
            );
        }
    }
    let last = events.last().unwrap().server(server);
    let delta = (last.requests_total - first.requests_total) as f64;
    assert!(
        (integrated - delta).abs() < 1e-6 * delta.max(1.0),
        "Σ requests/s × interval = {integrated}, requests went up by {delta}"
    );
}

#[test]
fn each_stream_client_gets_its_own_rates() {
    require_root();
    let server = servers::rust_server();
    let port = server.port;
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        "api",
    ]);

    let mut a = Stream::open(fp.port, 300);
    let first = a.next().server("api").clone();
    assert_eq!(first.rates().interval_seconds, 0.0);

    // Steady traffic, every 5th request a 500.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let traffic = thread::spawn(move || {
        let mut conn = Conn::connect(port).unwrap();
        let mut n = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let path = if n % 5 == 4 { "/error" } else { "/" };
            let resp = conn.get(path).unwrap();
            assert_eq!(resp.status, if n % 5 == 4 { 500 } else { 200 });
            n += 1;
            thread::sleep(Duration::from_millis(2));
        }
        conn.close();
        n
    });
    let busy = a.until("requests flowing", SETTLE, |e| {
        e.server("api").rates().requests_per_second > 0.0
    });
    assert!(busy.server("api").rates().p50_seconds.is_some());

    // A second client joins while traffic runs: its own baseline, so its first event has
    // no rates even though the first client's say requests are flowing.
    let mut b = Stream::open(fp.port, 700);
    let b_first = b.next().server("api").clone();
    assert_eq!(
        b_first.rates(),
        &FIRST_EVENT_RATES,
        "the second client's first event"
    );
    let a_then = a.next().server("api").clone();
    assert!(
        a_then.rates().requests_per_second > 0.0 && a_then.rates().interval_seconds > 0.0,
        "the first client's rates at the same time: {:?}",
        a_then.rates()
    );
    b.next();
    b.next();

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    assert!(sent > 50, "only {sent} requests");
    // Each stream: until it has shown every request, then one quiet interval.
    for (name, stream) in [("first", &mut a), ("second", &mut b)] {
        stream.until("every request counted", SETTLE, |e| {
            e.server("api").requests_total == sent
        });
        let quiet = stream.next().server("api").clone();
        assert_eq!(quiet.requests_total, sent, "{name}");
        let r = quiet.rates();
        assert_eq!(
            (
                r.requests_per_second,
                r.error_rate,
                r.p50_seconds,
                r.p99_seconds
            ),
            (0.0, 0.0, None, None),
            "{name}: an interval without requests"
        );
    }
    assert_rates_follow(&a.seen, "api");
    assert_rates_follow(&b.seen, "api");
    // Each at its own pace.
    let pace = |s: &Stream| {
        let n = s.seen.len() as f64 - 1.0;
        (s.seen.last().unwrap().time - s.seen[0].time) / n
    };
    let (pa, pb) = (pace(&a), pace(&b));
    assert!(
        (0.25..0.45).contains(&pa),
        "first client: one event per {pa} s, asked 0.3"
    );
    assert!(
        (0.6..0.9).contains(&pb),
        "second client: one event per {pb} s, asked 0.7"
    );
    // All of the traffic went through the first client's rates.
    let total: f64 = a
        .seen
        .windows(2)
        .map(|w| {
            w[1].server("api").rates().requests_per_second
                * w[1].server("api").rates().interval_seconds
        })
        .sum();
    assert!(
        (total - (sent - first.requests_total) as f64).abs() < 1e-6 * sent as f64,
        "{total} vs {sent}"
    );
    drop((a, b));
    fp.stop();
}
