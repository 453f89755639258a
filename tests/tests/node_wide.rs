//! Node-wide mode: servers found by --port, --comm, --all-listeners and --cgroup, including
//! ones started after flyprobe (picked up from exec/listen events within a second), labelled
//! with the container, pod, unit and network namespace they run in. Counts stay exact.

use std::{
    ffi::CString,
    fs, io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use flyprobe_tests::{
    client::Conn,
    eventually,
    flyprobe::{Flyprobe, Metrics},
    free_port,
    netns::{Netns, enter, in_netns, listening},
    require_root,
    servers::{self, Server},
};

const SERVER: &str = "flyprobe-test-server";
const REQUESTS: &str = "server_requests_total";
const ACCEPTED: &str = "server_connections_accepted_total";

/// `n` requests on `conns` connections, all 200.
fn traffic(port: u16, conns: u64, per_conn: u64) {
    for _ in 0..conns {
        let mut c = Conn::connect(port).expect("connect");
        for _ in 0..per_conn {
            assert_eq!(c.get("/").expect("GET /").status, 200);
        }
        c.close();
    }
}

/// Wait until flyprobe reports a server whose series carry `labels`; how long that took.
fn discovered(fp: &Flyprobe, labels: &[(&str, &str)]) -> Duration {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let m = fp.scrape();
        if m.get("server_up", labels) == Some(1.0) {
            return t0.elapsed();
        }
        // The daemon's log says what it saw (exec and listen announcements, scans): the
        // one thing that tells a missed event from a slow one.
        assert!(
            Instant::now() < deadline,
            "flyprobe did not find the server {labels:?} in 10 s; server_up: {:?}\nflyprobe's log:\n{}",
            m.series("server_up", &[]),
            fp.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the counts settle at the client's.
fn exact(fp: &Flyprobe, labels: &[(&str, &str)], conns: u64, requests: u64) -> Metrics {
    eventually(
        &format!("{requests} requests on {conns} connections for {labels:?}"),
        Duration::from_secs(10),
        || {
            let m = fp.scrape();
            let got = (m.total(ACCEPTED, labels), m.total(REQUESTS, labels));
            if got == (conns, requests) {
                Ok(m)
            } else {
                Err(got)
            }
        },
    )
}

fn started_listening(server: &Server) -> Instant {
    eventually("the server to listen", Duration::from_secs(10), || {
        listening(server.port).then_some(()).ok_or(())
    });
    Instant::now()
}

#[test]
fn port_selector_finds_a_server_started_later_within_a_second() {
    require_root();
    let port = free_port();
    let fp = Flyprobe::start(&["--port", &port.to_string()]);
    let other = servers::rust_server(); // listens on another port: not watched
    let server = servers::rust_server_unprobed(port, |_| {});
    let listen_at = started_listening(&server);
    let labels = [("server", SERVER)];
    discovered(&fp, &labels);
    let lag = listen_at.elapsed();
    println!("--port: found {lag:?} after the server started listening");
    assert!(lag < Duration::from_secs(1), "took {lag:?}");
    traffic(server.port, 3, 4);
    let m = exact(&fp, &labels, 3, 12);
    assert_eq!(
        m.series("server_up", &[]).len(),
        1,
        "only the server on --port is watched:\n{}",
        m.text
    );
    traffic(other.port, 1, 1);
    let m = exact(&fp, &labels, 3, 12);
    assert_eq!(m.total(REQUESTS, &[]), 12, "{}", m.text);
    fp.stop();
}

#[test]
fn comm_and_all_listeners_find_running_and_new_servers() {
    require_root();
    // Already running when flyprobe starts: found by the start-up scan.
    let before = servers::rust_server();
    // --comm with the full name: the kernel cuts comm to 15 bytes, argv[0] is whole.
    let fp = Flyprobe::start(&["--comm", SERVER]);
    discovered(&fp, &[("server", SERVER)]);
    let later = servers::rust_server_unprobed(free_port(), |_| {});
    let listen_at = started_listening(&later);
    let pid = |s: &Server| s.pid().to_string();
    // Same name, same place: one server with two roots, each a worker.
    eventually("the second server's worker", Duration::from_secs(5), || {
        let m = fp.scrape();
        let info = m.get("server_worker_info", &[("pid", &pid(&later))]);
        info.is_some().then_some(()).ok_or(m.text)
    });
    println!("--comm: found {:?} after listen", listen_at.elapsed());
    let m = fp.scrape();
    let base = m.total(REQUESTS, &[("pid", &pid(&before))]); // its readiness probes
    traffic(later.port, 2, 5);
    traffic(before.port, 1, 3);
    eventually("exact counts", Duration::from_secs(10), || {
        let m = fp.scrape();
        let got = (
            m.total(REQUESTS, &[("pid", &pid(&later))]),
            m.total(REQUESTS, &[("pid", &pid(&before))]),
        );
        if got == (10, base + 3) {
            Ok(())
        } else {
            Err(got)
        }
    });
    fp.stop();

    // --all-listeners: every listening process, flyprobe itself excluded.
    let fp = Flyprobe::start(&["--all-listeners"]);
    let m = eventually("both running servers", Duration::from_secs(5), || {
        let m = fp.scrape();
        let found = [&before, &later]
            .iter()
            .filter(|s| m.get("server_worker_info", &[("pid", &pid(s))]) == Some(1.0))
            .count();
        if found == 2 { Ok(m) } else { Err(m.text) }
    });
    assert!(
        m.series("server_worker_info", &[("pid", &fp.pid().to_string())])
            .is_empty(),
        "flyprobe watches itself:\n{}",
        m.text
    );
    let third = servers::rust_server_unprobed(free_port(), |_| {});
    let listen_at = started_listening(&third);
    eventually("the new listener", Duration::from_secs(5), || {
        let m = fp.scrape();
        m.series("server_worker_info", &[("pid", &pid(&third))])
            .len()
            .eq(&1)
            .then_some(())
            .ok_or(())
    });
    println!(
        "--all-listeners: found {:?} after listen",
        listen_at.elapsed()
    );
    traffic(third.port, 2, 2);
    exact(&fp, &[("pid", &pid(&third))], 2, 4);
    fp.stop();
}

/// Where cgroup v2 is mounted here (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup v2 hierarchy is mounted (the tests need one)")
}

/// A cgroup the test creates (parents too) and removes, deepest first.
struct Cgroup {
    created: Vec<PathBuf>,
    pub path: PathBuf,
}

impl Cgroup {
    fn create(path: PathBuf) -> Self {
        let mut created = Vec::new();
        let mut missing: Vec<&Path> = path.ancestors().take_while(|p| !p.exists()).collect();
        missing.reverse();
        for dir in missing {
            fs::create_dir(dir)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
            created.push(dir.to_path_buf());
        }
        Self { created, path }
    }

    /// Make `cmd` join this cgroup between fork and exec.
    fn join(&self, cmd: &mut Command) {
        let procs = CString::new(self.path.join("cgroup.procs").to_str().unwrap()).unwrap();
        // SAFETY: only async-signal-safe calls (open, write, close) after fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // The server was killed by its guard; its cgroup empties a moment later.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn cgroup_selector_labels_kubernetes_containers_and_systemd_units() {
    require_root();
    let root = cgroup2_root();
    let (uid_a, id_a) = (
        "0b1c2d3e-4f50-4617-8a9b-c0d1e2f3a4b5",
        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9f",
    );
    let (uid_b, id_b) = (
        "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
        "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    );
    let unit = "flyprobe-e2e.service";
    // As the kubelet's systemd driver with containerd names them, as its cgroupfs driver
    // does, and a plain systemd service.
    let systemd_pod = Cgroup::create(root.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id_a}.scope",
        uid_a.replace('-', "_")
    )));
    let cgroupfs_pod = Cgroup::create(root.join(format!("kubepods/besteffort/pod{uid_b}/{id_b}")));
    let service = Cgroup::create(root.join("system.slice").join(unit));

    // The service runs before flyprobe starts; the pods start after.
    let svc = servers::rust_server_unprobed(free_port(), |c| service.join(c));
    started_listening(&svc);
    let fp = Flyprobe::start(&[
        "--cgroup",
        root.join("kubepods.slice").to_str().unwrap(),
        "--cgroup",
        "/kubepods",
        "--cgroup",
        service.path.to_str().unwrap(),
    ]);
    let a = servers::rust_server_unprobed(free_port(), |c| systemd_pod.join(c));
    let b = servers::rust_server_unprobed(free_port(), |c| cgroupfs_pod.join(c));
    let outside = servers::rust_server(); // in no selected cgroup
    for s in [&a, &b] {
        started_listening(s);
    }
    let labels_a = [("container_id", id_a), ("pod_uid", uid_a)];
    let labels_b = [("container_id", id_b), ("pod_uid", uid_b)];
    let labels_svc = [("unit", unit)];
    for labels in [&labels_a[..], &labels_b[..], &labels_svc[..]] {
        let mut with_server = vec![("server", SERVER)];
        with_server.extend_from_slice(labels);
        discovered(&fp, &with_server);
    }
    traffic(a.port, 2, 3);
    traffic(b.port, 1, 5);
    traffic(svc.port, 1, 2);
    traffic(outside.port, 1, 1);
    exact(&fp, &labels_a, 2, 6);
    exact(&fp, &labels_b, 1, 5);
    let m = exact(&fp, &labels_svc, 1, 2);
    println!(
        "{}",
        m.text
            .lines()
            .filter(|l| l.starts_with("server_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(m.series("server_up", &[]).len(), 3, "{}", m.text);
    assert_eq!(
        m.total(REQUESTS, &[]),
        13,
        "the outside server is not watched:\n{}",
        m.text
    );
    // Series of one pod carry its labels and no one else's.
    for (labels, _) in m.series(REQUESTS, &[("pod_uid", uid_a)]) {
        assert_eq!(labels.get("container_id").map(String::as_str), Some(id_a));
        assert!(!labels.contains_key("unit"), "{labels:?}");
    }
    fp.stop();
    drop((a, b, svc));
}

#[test]
fn same_port_in_two_network_namespaces_are_two_servers() {
    require_root();
    let ns = Netns::create(&["flyprobe-e2e-a", "flyprobe-e2e-b"]);
    let port = 18080;
    let fp = Flyprobe::start(&["--port", &port.to_string()]);
    let start = |name: &'static str| servers::rust_server_unprobed(port, |c| enter(c, name));
    let a = start("flyprobe-e2e-a");
    let b = start("flyprobe-e2e-b");
    for (s, name) in [(&a, "flyprobe-e2e-a"), (&b, "flyprobe-e2e-b")] {
        in_netns(name, || {
            eventually(
                "the server to listen in its netns",
                Duration::from_secs(10),
                || listening(s.port).then_some(()).ok_or(()),
            )
        });
    }
    eventually("two servers on one port", Duration::from_secs(5), || {
        let up = fp.scrape().series("server_up", &[]);
        if up.len() == 2 { Ok(()) } else { Err(up) }
    });
    in_netns("flyprobe-e2e-a", || traffic(port, 2, 2));
    in_netns("flyprobe-e2e-b", || traffic(port, 1, 7));
    let netns_of = |s: &Server| {
        fs::read_link(format!("/proc/{}/ns/net", s.pid()))
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("net:[")
            .trim_end_matches(']')
            .to_string()
    };
    let (na, nb) = (netns_of(&a), netns_of(&b));
    assert_ne!(na, nb);
    exact(&fp, &[("netns", &na)], 2, 4);
    let m = exact(&fp, &[("netns", &nb)], 1, 7);
    assert_eq!(
        m.total(REQUESTS, &[("pid", &a.pid().to_string()), ("netns", &na)]),
        4,
        "{}",
        m.text
    );
    fp.stop();
    drop((a, b, ns));
}

#[test]
fn cgroup_selector_works_from_inside_a_cgroup_namespace() {
    require_root();
    // As in a pod on cgroup v2: flyprobe in its own cgroup namespace sees other cgroups as
    // `/../kubepods…` and must still match and label them.
    let root = cgroup2_root();
    let (uid, id) = (
        "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d",
        "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00",
    );
    let agent = Cgroup::create(root.join("flyprobe-e2e-agent.slice/flyprobe.scope"));
    let pod = Cgroup::create(root.join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    )));
    let server = servers::rust_server_unprobed(free_port(), |c| pod.join(c));
    started_listening(&server);
    let procs = agent.path.join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec unshare --cgroup \"$0\" \"$@\"",
        procs.display()
    );
    let selector = root.join("kubepods.slice");
    let fp = Flyprobe::start_via(
        &["sh", "-c", &script],
        &["--cgroup", selector.to_str().unwrap()],
    );
    let seen = fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).unwrap();
    let own_ns = fs::read_link(format!("/proc/{}/ns/cgroup", fp.pid())).unwrap();
    assert_ne!(
        own_ns,
        fs::read_link("/proc/self/ns/cgroup").unwrap(),
        "not namespaced"
    );
    let seen = seen
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default();
    println!("server's cgroup as the test sees it: {seen}");
    let labels = [("container_id", id), ("pod_uid", uid)];
    let mut with_server = vec![("server", SERVER)];
    with_server.extend_from_slice(&labels);
    discovered(&fp, &with_server);
    traffic(server.port, 2, 3);
    exact(&fp, &labels, 2, 6);
    let log = fp.stop();
    assert!(
        log.contains("in a cgroup namespace rooted at /flyprobe-e2e-agent.slice/flyprobe.scope"),
        "{log}"
    );
    drop(server);
}

/// The kubelet's log layout under `dir`: `pods/<namespace>_<pod>_<uid>/<container>/0.log`
/// and, with `link`, the `containers/<pod>_<namespace>_<container>-<id>.log` link to it.
fn kubelet_logs(dir: &Path, names: (&str, &str, &str), uid: &str, id: &str, link: bool) {
    let (namespace, pod, container) = names;
    let pod_dir = dir.join("pods").join(format!("{namespace}_{pod}_{uid}"));
    fs::create_dir_all(pod_dir.join(container)).unwrap();
    let log = pod_dir.join(container).join("0.log");
    fs::write(&log, "").unwrap();
    fs::create_dir_all(dir.join("containers")).unwrap();
    if link {
        std::os::unix::fs::symlink(
            &log,
            dir.join("containers")
                .join(format!("{pod}_{namespace}_{container}-{id}.log")),
        )
        .unwrap();
    }
}

#[test]
fn kubernetes_names_come_from_the_kubelet_log_directories() {
    require_root();
    let root = cgroup2_root();
    let logs = std::env::temp_dir().join(format!("flyprobe-e2e-kubelet-{}", std::process::id()));
    let _ = fs::remove_dir_all(&logs);
    // (cgroup path, namespace, pod, container, uid, id): the systemd and cgroupfs drivers,
    // containerd and CRI-O ids, names with dashes and dots.
    let pods = [
        (
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope",
            "team-a",
            "api.v2-7d9f8c6b5-x2x9k",
            "uvicorn-worker",
            "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
            "aa11bb22cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66",
        ),
        (
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{id}.scope",
            "team-b",
            "web-0",
            "nginx",
            "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
            "bb22cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66ee77",
        ),
        (
            "kubepods/burstable/pod{uid}/{id}",
            "default",
            "worker.batch-1",
            "app",
            "3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f",
            "cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66ee77ff88",
        ),
        (
            "kubepods/besteffort/pod{uid}/crio-{id}",
            "kube-system",
            "coredns-5d78c9869d-abcde",
            "coredns",
            "4d5e6f7a-8b9c-4d0e-9f1a-3b4c5d6e7f80",
            "dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66ee77ff88aa99",
        ),
    ];
    let fp = Flyprobe::start(&[
        "--cgroup",
        root.join("kubepods.slice").to_str().unwrap(),
        "--cgroup",
        "/kubepods",
        "--kubelet-log-dir",
        logs.to_str().unwrap(),
    ]);
    let mut running = Vec::new();
    for (n, (path, namespace, pod, container, uid, id)) in pods.into_iter().enumerate() {
        // The last one is found before the kubelet links its container's log (it does so
        // just after the container starts): the container name follows at a later sweep.
        let late = n == pods.len() - 1;
        kubelet_logs(&logs, (namespace, pod, container), uid, id, !late);
        let path = path
            .replace("{uid_}", &uid.replace('-', "_"))
            .replace("{uid}", uid)
            .replace("{id}", id);
        let cgroup = Cgroup::create(root.join(path));
        let server = servers::rust_server_unprobed(free_port(), |c| cgroup.join(c));
        started_listening(&server);
        let labels = [
            ("namespace", namespace),
            ("pod", pod),
            ("container", container),
            ("pod_uid", uid),
            ("container_id", id),
        ];
        if late {
            discovered(&fp, &labels[..2]);
            kubelet_logs(&logs, (namespace, pod, container), uid, id, true);
        }
        discovered(&fp, &labels);
        traffic(server.port, 1, 2);
        exact(&fp, &labels, 1, 2);
        running.push((server, cgroup, labels));
        if running.len() == 1 {
            // The first pod is deleted while its server runs: its log directories go, a
            // new pod's arrival rereads them, and the server keeps the names it had.
            fs::remove_dir_all(logs.join("pods")).unwrap();
            fs::remove_dir_all(logs.join("containers")).unwrap();
        }
    }
    let m = fp.scrape();
    assert_eq!(m.series("server_up", &[]).len(), pods.len(), "{}", m.text);
    for (_, _, labels) in &running {
        assert_eq!(
            m.get("server_up", labels),
            Some(1.0),
            "{labels:?}:\n{}",
            m.text
        );
    }
    // A pod whose logs the kubelet has not written (or a node without them): no names.
    let (uid, id) = (
        "5e6f7a8b-9c0d-4e1f-8a2b-4c5d6e7f8091",
        "ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66ee77ff88aa99bb00",
    );
    let bare = Cgroup::create(root.join(format!("kubepods/pod{uid}/{id}")));
    let server = servers::rust_server_unprobed(free_port(), |c| bare.join(c));
    started_listening(&server);
    discovered(&fp, &[("pod_uid", uid)]);
    for (labels, _) in fp.scrape().series("server_up", &[("pod_uid", uid)]) {
        for name in ["namespace", "pod", "container"] {
            assert!(!labels.contains_key(name), "{labels:?}");
        }
    }
    fp.stop();
    drop(server);
    drop(running);
    let _ = fs::remove_dir_all(&logs);
}
