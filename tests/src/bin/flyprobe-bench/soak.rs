//! The soak (`--only soak`, not part of the default run): flyprobe watching gunicorn with
//! UvicornWorkers that recycle (`--max-requests`) under keep-alive load plus a stream of new
//! connections, for `--soak-minutes`. The daemon's RSS, CPU and kernel map entries are
//! sampled every 10 s into a table and an SVG plot next to the report; at the end the
//! counts must equal what the clients did, and the daemon's memory must be flat.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use flyprobe_tests::{client::Conn, flyprobe::Flyprobe, servers};

use super::{Report, server, status_kb};

const SERVER: &str = "soak";
const WORKERS: u32 = 4;
/// Requests a worker serves before gunicorn replaces it (with up to 10% jitter).
const MAX_REQUESTS: u32 = 2_000;
/// Keep-alive clients, each sending a request every `KEEPALIVE_EVERY`.
const KEEPALIVE_CLIENTS: u32 = 8;
const KEEPALIVE_EVERY: Duration = Duration::from_millis(40);
/// New connections per second (one request each), from `NEW_CLIENTS` threads.
const NEW_PER_SECOND: u32 = 500;
const NEW_CLIENTS: u32 = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Exited workers keep their own series this long (so the pid series plateau in the run).
const RETENTION: &str = "1m";

/// What the clients did.
#[derive(Default)]
struct Counts {
    /// Connections established.
    connections: AtomicU64,
    /// Requests answered 200.
    answered: AtomicU64,
    /// Requests that got no answer (a recycled worker closed the keep-alive connection
    /// before reading them): not counted by the server either.
    failed: AtomicU64,
    /// New connections whose one request got no answer (a worker that exited may have
    /// accepted them and never read them: no worker counts those).
    fresh_failed: AtomicU64,
}

struct Sample {
    secs: f64,
    answered: u64,
    rss_kib: u64,
    /// Daemon CPU over the last interval, % of one core.
    cpu_pct: f64,
    connections: u64,
    processes: u64,
    series: u64,
    /// Distinct `pid` labels on server_requests_total.
    pid_series: usize,
    map_kib: u64,
}

pub fn section(r: &mut Report, minutes: u64, out: &Path) -> Result<()> {
    r.md(format!(
        "\n## Soak: {minutes} min of keep-alive load plus {NEW_PER_SECOND} new connections/s, \
         workers recycling\n"
    ));
    r.md(format!(
        "gunicorn with {WORKERS} UvicornWorkers, `--max-requests {MAX_REQUESTS} \
         --max-requests-jitter {}`; {KEEPALIVE_CLIENTS} keep-alive clients at one request \
         per {} ms each, and {NEW_PER_SECOND} new connections a second with one request each; \
         flyprobe `--worker-retention {RETENTION}`. Sampled every {} s: the daemon's RSS, its \
         CPU (utime + stime over the interval, % of one core), the kernel maps' entries and \
         memory, and the distinct `pid` series.\n",
        MAX_REQUESTS / 10,
        KEEPALIVE_EVERY.as_millis(),
        SAMPLE_EVERY.as_secs()
    ));
    let server = servers::gunicorn_with(
        WORKERS,
        &[
            "--max-requests",
            &MAX_REQUESTS.to_string(),
            "--max-requests-jitter",
            &(MAX_REQUESTS / 10).to_string(),
        ],
    );
    let fp = Flyprobe::start(&[
        "--pid-tree",
        &server.pid().to_string(),
        "--server-name",
        SERVER,
        "--worker-retention",
        RETENTION,
    ]);
    let port = server.port;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..KEEPALIVE_CLIENTS {
        let (counts, stop) = (counts.clone(), stop.clone());
        clients.push(std::thread::spawn(move || keepalive(port, &counts, &stop)));
    }
    for _ in 0..NEW_CLIENTS {
        let (counts, stop) = (counts.clone(), stop.clone());
        let every = Duration::from_secs(1) / (NEW_PER_SECOND / NEW_CLIENTS);
        clients.push(std::thread::spawn(move || {
            fresh(port, every, &counts, &stop)
        }));
    }

    let started = Instant::now();
    let ticks = server::ticks_per_second();
    let mut samples = Vec::new();
    let mut last_cpu = server::cpu_ticks(fp.pid()).unwrap_or(0);
    let mut last_at = Instant::now();
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        std::thread::sleep(SAMPLE_EVERY.saturating_sub(last_at.elapsed()));
        let cpu = server::cpu_ticks(fp.pid()).unwrap_or(last_cpu);
        let interval = last_at.elapsed().as_secs_f64();
        last_at = Instant::now();
        let m = fp.scrape();
        let entries = |map| m.total("flyprobe_map_entries", &[("map", map)]);
        let pid_series: BTreeSet<String> = m
            .series("server_requests_total", &[("server", SERVER)])
            .into_iter()
            .map(|(labels, _)| labels["pid"].clone())
            .collect();
        let sample = Sample {
            secs: started.elapsed().as_secs_f64(),
            answered: counts.answered.load(Ordering::SeqCst),
            rss_kib: status_kb(fp.pid(), "VmRSS:"),
            cpu_pct: (cpu - last_cpu) as f64 / ticks / interval * 100.0,
            connections: entries("connections"),
            processes: entries("processes"),
            series: entries("request_series"),
            pid_series: pid_series.len(),
            map_kib: m.total("flyprobe_map_memory_bytes", &[]) / 1024,
        };
        last_cpu = cpu;
        eprintln!(
            "soak {:>4.0} s: {} answered, RSS {} KiB, CPU {:.1}%, maps {}/{}/{} entries, {} pid \
             series",
            sample.secs,
            sample.answered,
            sample.rss_kib,
            sample.cpu_pct,
            sample.connections,
            sample.processes,
            sample.series,
            sample.pid_series
        );
        samples.push(sample);
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a soak client panicked"))?;
    }
    let answered = counts.answered.load(Ordering::SeqCst);
    let connections = counts.connections.load(Ordering::SeqCst);
    let failed = counts.failed.load(Ordering::SeqCst);

    table(r, &samples);
    let svg = out.with_extension("svg");
    fs::write(&svg, plot(&samples)).with_context(|| format!("writing {}", svg.display()))?;
    r.md(format!(
        "\n![daemon RSS and CPU over the soak]({})\n",
        svg.file_name().unwrap_or_default().to_string_lossy()
    ));

    // Exact at the end: every answered request, and every connection (all closed), but for
    // new connections that got no answer: a worker that exited may have accepted them and
    // never read them, which no worker counts (fentry and socket hooks).
    let fresh_failed = counts.fresh_failed.load(Ordering::SeqCst);
    let exact = |got: (u64, u64, u64)| {
        let (requests, accepted, closed) = got;
        requests == answered
            && (connections.saturating_sub(fresh_failed)..=connections).contains(&accepted)
            && closed == accepted
    };
    let settle = Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let got = fp.scrape().served(SERVER);
        if exact(got) || Instant::now() >= settle {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let stopped = fp
        .scrape()
        .total("server_stopped_total", &[("server", SERVER)]);
    r.code(format!(
        "clients: {answered} requests answered, {failed} unanswered ({fresh_failed} of them on \
         new connections), {connections} connections; flyprobe: {} 2xx requests, {} accepted, \
         {} closed; {stopped} workers recycled",
        counted.0, counted.1, counted.2
    ));
    let ok = exact(counted);
    r.target(
        "counts exact at the end (1 = yes)",
        f64::from(u8::from(ok)),
        ok,
        "requests equal, connections within the unanswered new ones",
    );
    // Flat: from the first sample past the retention's plateau to the last.
    let settled = samples
        .iter()
        .find(|s| s.secs >= 120.0)
        .or(samples.first())
        .map_or(0, |s| s.rss_kib);
    let last = samples.last().map_or(0, |s| s.rss_kib);
    let growth = last as f64 / settled.max(1) as f64;
    r.target(
        &format!("daemon RSS at the end / at 2 min ({settled} -> {last} KiB)"),
        growth,
        (0.9..=1.1).contains(&growth),
        "within ±10%",
    );
    let cpu = samples.iter().map(|s| s.cpu_pct).sum::<f64>() / samples.len().max(1) as f64;
    r.code(format!("daemon CPU: {cpu:.1}% of one core on average"));
    drop(fp);
    drop(server);
    Ok(())
}

/// One keep-alive connection, a request every `KEEPALIVE_EVERY`; a new one when the server
/// closes it (a recycled worker).
fn keepalive(port: u16, counts: &Counts, stop: &AtomicBool) {
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(port) {
                Ok(c) => {
                    counts.connections.fetch_add(1, Ordering::SeqCst);
                    conn.insert(c)
                }
                Err(_) => {
                    std::thread::sleep(KEEPALIVE_EVERY);
                    continue;
                }
            },
        };
        match c.get("/") {
            Ok(resp) if resp.status == 200 && !resp.close => {
                counts.answered.fetch_add(1, Ordering::SeqCst);
            }
            Ok(resp) => {
                if resp.status == 200 {
                    counts.answered.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(c) = conn.take() {
                    c.close();
                }
            }
            Err(_) => {
                counts.failed.fetch_add(1, Ordering::SeqCst);
                if let Some(c) = conn.take() {
                    c.close();
                }
            }
        }
        std::thread::sleep(KEEPALIVE_EVERY);
    }
    if let Some(c) = conn {
        c.close();
    }
}

/// A new connection every `every`, one request on it, closed.
fn fresh(port: u16, every: Duration, counts: &Counts, stop: &AtomicBool) {
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if let Ok(mut conn) = Conn::connect(port) {
            counts.connections.fetch_add(1, Ordering::SeqCst);
            match conn.get("/") {
                Ok(resp) if resp.status == 200 => {
                    counts.answered.fetch_add(1, Ordering::SeqCst);
                }
                _ => {
                    counts.failed.fetch_add(1, Ordering::SeqCst);
                    counts.fresh_failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            conn.close();
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // fell behind: do not burst to catch up
        }
    }
}

fn table(r: &mut Report, samples: &[Sample]) {
    r.md("| time | answered | daemon RSS | daemon CPU | connections | processes | request series | map memory | pid series |");
    r.md("|---|---|---|---|---|---|---|---|---|");
    for s in samples {
        r.md(format!(
            "| {:.0} s | {} | {:.1} MiB | {:.1}% | {} | {} | {} | {} KiB | {} |",
            s.secs,
            s.answered,
            s.rss_kib as f64 / 1024.0,
            s.cpu_pct,
            s.connections,
            s.processes,
            s.series,
            s.map_kib,
            s.pid_series
        ));
    }
}

/// RSS (MiB, left axis) and CPU (% of a core, right axis) over time, as a plain SVG.
fn plot(samples: &[Sample]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 320.0, 60.0, 60.0, 30.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let t_max = samples.last().map_or(1.0, |s| s.secs).max(1.0);
    let rss = |s: &Sample| s.rss_kib as f64 / 1024.0;
    let rss_max = (samples.iter().map(rss).fold(0.0, f64::max) * 1.2).max(1.0);
    let cpu_max = (samples.iter().map(|s| s.cpu_pct).fold(0.0, f64::max) * 1.2).max(1.0);
    let x = |t: f64| left + t / t_max * pw;
    let y = |v: f64, max: f64| top + ph - v / max * ph;
    let line = |f: &dyn Fn(&Sample) -> (f64, f64)| {
        samples
            .iter()
            .map(|s| {
                let (px, py) = f(s);
                format!("{px:.1},{py:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="18">flyprobe daemon during the soak: RSS (blue, MiB) and CPU (red, % of one core)</text>"#
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let gy = top + ph - f * ph;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#1f77b4">{:.1}</text>"##,
            left - 6.0,
            gy + 4.0,
            f * rss_max
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#d62728">{:.1}%</text>"##,
            left + pw + 6.0,
            gy + 4.0,
            f * cpu_max
        );
    }
    let minutes = (t_max / 60.0).ceil() as u32;
    for m in 0..=minutes {
        let t = f64::from(m) * 60.0;
        if t > t_max {
            break;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{m} min</text>"#,
            x(t),
            top + ph + 20.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        line(&|s| (x(s.secs), y(rss(s), rss_max)))
    );
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#d62728" stroke-width="2" points="{}"/>"##,
        line(&|s| (x(s.secs), y(s.cpu_pct, cpu_max)))
    );
    svg.push_str("</svg>\n");
    svg
}
