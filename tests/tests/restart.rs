//! --pin-path: counters and connection state survive a restart of flyprobe (SIGTERM or
//! SIGKILL). A connection opened before the restart and closed after it is accounted once;
//! a worker that exits while no flyprobe runs is still retired into its server's totals.
//! Without the flag nothing is pinned.

use std::{fs, path::Path, time::Duration};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    require_root,
    servers::{self, Server},
};

const SERVER: &str = "uvicorn";

/// (accepted, closed, active, requests) summed over the server.
fn totals(m: &Metrics) -> (u64, u64, u64, u64) {
    (
        m.sum("server_connections_accepted_total", SERVER),
        m.sum("server_connections_closed_total", SERVER),
        m.sum("server_active_connections", SERVER),
        m.sum("server_requests_total", SERVER),
    )
}

fn settles(fp: &Flyprobe, want: (u64, u64, u64, u64)) -> Metrics {
    eventually(
        &format!("(accepted, closed, active, requests) == {want:?}"),
        Duration::from_secs(10),
        || {
            let m = fp.scrape();
            if totals(&m) == want {
                Ok(m)
            } else {
                Err(totals(&m))
            }
        },
    )
}

fn pinned(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn get(conn: &mut Conn, n: u64) {
    for _ in 0..n {
        assert_eq!(conn.get("/").unwrap().status, 200);
    }
}

fn worker_pids(server: &Server) -> Vec<u32> {
    servers::children(server.pid())
        .into_iter()
        .filter(|c| {
            fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("spawn_main"))
        })
        .collect()
}

#[test]
fn pinned_counters_and_connections_survive_restarts() {
    require_root();
    let dir = Path::new("/sys/fs/bpf").join(format!("flyprobe-test-{}", std::process::id()));
    // The held connection idles through three daemon starts: uvicorn's 5 s keep-alive
    // timeout would close it on a loaded machine.
    let server = servers::uvicorn_with(2, &["--timeout-keep-alive", "120"]);
    let root = server.pid().to_string();
    let args = [
        "--pid-tree",
        root.as_str(),
        "--pin-path",
        dir.to_str().unwrap(),
    ];

    let fp = Flyprobe::start(&args);
    let mut held = Conn::connect(server.port).unwrap(); // open across both restarts
    get(&mut held, 3);
    let mut short = Conn::connect(server.port).unwrap();
    get(&mut short, 5);
    short.close();
    settles(&fp, (2, 1, 1, 8));
    assert_eq!(
        pinned(&dir),
        ["CONNS", "DROPS", "EXITS", "LINEAGE", "REQS", "STATS"],
        "pinned maps"
    );
    let log = fp.stop(); // SIGTERM
    assert!(log.contains("pinning maps under"), "{log}");

    // Restart: the counters continue, the held connection is still active.
    let fp = Flyprobe::start(&args);
    settles(&fp, (2, 1, 1, 8));
    assert!(
        fp.log().contains("1 watched roots carried over"),
        "{}",
        fp.log()
    );
    get(&mut held, 4);
    settles(&fp, (2, 1, 1, 12));

    // SIGKILL this time; a worker dies while no flyprobe runs.
    drop(fp); // the guard SIGKILLs the process group
    let workers = worker_pids(&server);
    assert_eq!(workers.len(), 2);
    let before = {
        // What the dying worker had served (its requests are in the pinned maps).
        let fp = Flyprobe::start(&args);
        let m = settles(&fp, (2, 1, 1, 12));
        let served = m.by_pid("server_requests_total", SERVER);
        drop(fp);
        served
    };
    let victim = *workers
        .iter()
        .find(|w| !before.contains_key(w) || before.len() == 2)
        .unwrap();
    // SAFETY: kill(2) on a worker of our own server.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    eventually("the worker to be gone", Duration::from_secs(10), || {
        (!Path::new(&format!("/proc/{victim}")).exists() || {
            fs::read_to_string(format!("/proc/{victim}/stat")).is_ok_and(|s| s.contains(") Z "))
        })
        .then_some(())
        .ok_or(())
    });
    let fp = Flyprobe::start(&args);
    // The held connection was the victim's or not: either way nothing is lost or doubled.
    let victim_had_held = before.get(&victim).copied().unwrap_or(0) >= 7;
    let m = if victim_had_held {
        // The kernel closed it with the worker: accounted as closed once.
        settles(&fp, (2, 2, 0, 12))
    } else {
        get(&mut held, 1);
        settles(&fp, (2, 1, 1, 13))
    };
    assert_eq!(
        m.get(
            "server_stopped_total",
            &[("server", SERVER), ("reason", "unknown")]
        ),
        Some(1.0),
        "the worker that died while no flyprobe ran:\n{}",
        m.text
    );
    if !victim_had_held {
        held.close();
        settles(&fp, (2, 2, 0, 13));
    }
    fp.stop();
    // Pins outlive the daemon until removed. A different map size is refused, not ignored.
    assert_eq!(pinned(&dir).len(), 6);
    let mut resized = args.to_vec();
    resized.extend(["--max-connections", "1000"]);
    let out = std::process::Command::new(flyprobe_tests::flyprobe::bin())
        .args(&resized)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", flyprobe_tests::free_port()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("but --max-connections asks for 1000"),
        "{stderr}"
    );
    // Removing the directory starts afresh: the ledger of the old maps is not carried over.
    for name in pinned(&dir) {
        fs::remove_file(dir.join(name)).unwrap();
    }
    let fp = Flyprobe::start(&args);
    settles(&fp, (0, 0, 0, 0));
    let log = fp.stop();
    assert!(!log.contains("carried over"), "{log}");
    for name in pinned(&dir) {
        fs::remove_file(dir.join(name)).unwrap();
    }
    fs::remove_dir(&dir).unwrap();
}

#[test]
fn nothing_is_pinned_without_the_flag() {
    require_root();
    let server = servers::rust_server();
    let bpffs = Path::new("/sys/fs/bpf");
    let before = pinned(bpffs);
    let fp = Flyprobe::watch(server.pid());
    let mut c = Conn::connect(server.port).unwrap();
    get(&mut c, 2);
    c.close();
    fp.stop();
    assert_eq!(pinned(bpffs), before, "flyprobe left pins in /sys/fs/bpf");
}
