//! Where a process runs, as labels: its container and pod (from the cgroup v2 path, as
//! containerd, CRI-O, docker and the kubelet name cgroups) with their Kubernetes names (from
//! the kubelet's log directories), its systemd unit, and its network namespace when that is
//! not the host's.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use procfs::process::{MountInfo, Process};

use crate::processes::kubelet;

/// Label names, in the order `Labels::values` returns them. `namespace`, `pod` and
/// `container` are the names cAdvisor and kube-state-metrics use, so joins just work.
pub const NAMES: [&str; 7] = [
    "container_id",
    "pod_uid",
    "unit",
    "netns",
    "namespace",
    "pod",
    "container",
];

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub unit: Option<String>,
    /// The network namespace's inode, when it differs from flyprobe's own (the host's, for
    /// a DaemonSet with hostNetwork).
    pub netns: Option<String>,
    /// The pod's namespace and name, and the container's name, as the kubelet's log
    /// directories give them (kept once read: a deleted pod's server keeps them).
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

impl Labels {
    /// What /proc says about `pid`. Unreadable parts stay unknown.
    pub fn of(pid: u32) -> Self {
        let mut labels = cgroup_of(pid)
            .map(|path| Self::from_cgroup_path(&path))
            .unwrap_or_default();
        labels.name_pod();
        let own = netns_id(pid);
        if own.is_some() && own != netns_id("self") {
            labels.netns = own.map(|id| id.to_string());
        }
        labels
    }

    /// A pod's names still missing (the kubelet links a container's log just after it
    /// starts, so a server found at once may be ahead of it).
    pub fn unnamed_pod(&self) -> bool {
        self.pod_uid.is_some()
            && (self.namespace.is_none()
                || (self.container_id.is_some() && self.container.is_none()))
    }

    /// Fill in the namespace, pod and container names from the kubelet's log directories;
    /// true when something was added.
    pub fn name_pod(&mut self) -> bool {
        let Some(uid) = &self.pod_uid else {
            return false;
        };
        let Some(names) = kubelet::names(uid, self.container_id.as_deref()) else {
            return false;
        };
        let before = (self.namespace.is_some(), self.container.is_some());
        self.namespace = Some(names.namespace);
        self.pod = Some(names.pod);
        self.container = names.container.or(self.container.take());
        before != (true, self.container.is_some())
    }

    /// Labels from a cgroup v2 path such as
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c…slice/cri-containerd-<id>.scope`,
    /// `/kubepods/besteffort/pod<uid>/<id>`, `/docker/<id>`, `/system.slice/nginx.service`.
    /// Paths seen from inside a cgroup namespace (`/../../kubepods…`) work too.
    pub fn from_cgroup_path(path: &str) -> Self {
        let parts: Vec<&str> = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != "..")
            .collect();
        let mut labels = Self::default();
        for part in &parts {
            if let Some(uid) = pod_uid(part) {
                labels.pod_uid = Some(uid);
            }
            if let Some(id) = container_id(part) {
                labels.container_id = Some(id);
            }
        }
        if labels.container_id.is_none() {
            labels.unit = parts
                .iter()
                .rev()
                .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
                .map(|p| p.to_string());
        }
        labels
    }

    /// Values in `NAMES` order; "" where unknown (Prometheus treats that as no label).
    pub fn values(&self) -> [&str; 7] {
        [
            &self.container_id,
            &self.pod_uid,
            &self.unit,
            &self.netns,
            &self.namespace,
            &self.pod,
            &self.container,
        ]
        .map(|v| v.as_deref().unwrap_or(""))
    }

    /// The known labels as (name, value).
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        NAMES
            .into_iter()
            .zip(self.values())
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }
}

/// The cgroup v2 path of `pid` from the hierarchy's root (the `0::` line of
/// /proc/<pid>/cgroup, made absolute when flyprobe runs in a cgroup namespace).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let seen = cgroup2_path(Process::new(pid as i32).ok()?)?;
    Some(namespace_root().map_or_else(|| seen.clone(), |root| join(root, &seen)))
}

/// The `0::` (cgroup v2) line's path of /proc/<pid>/cgroup.
fn cgroup2_path(process: Process) -> Option<String> {
    process
        .cgroups()
        .ok()?
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
        .map(|c| c.pathname)
}

/// Where flyprobe's cgroup namespace is rooted in the hierarchy, if it runs in one (a
/// container on cgroup v2: /proc then shows other cgroups as `/../../kubepods…`, relative
/// to that root). Found once: the cgroup whose cgroup.procs lists flyprobe, under the
/// cgroup2 mount (the DaemonSet mounts the host's), minus flyprobe's own namespaced path.
fn namespace_root() -> Option<&'static str> {
    static ROOT: OnceLock<Option<String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        // A cgroup2 mount made outside our namespace shows its root as "/../.." in
        // mountinfo; PID 1 (the host's, with hostPID) has another namespace, when readable.
        let (root, mount_root) = cgroup2_mounts().into_iter().next()?;
        let own_ns = fs::read_link("/proc/self/ns/cgroup").ok()?;
        let other_ns = fs::read_link("/proc/1/ns/cgroup").is_ok_and(|ns| ns != own_ns);
        if !mount_root.starts_with("/..") && !other_ns {
            return None; // the host's namespace: paths are absolute already
        }
        let seen = cgroup2_path(Process::myself().ok()?)?;
        let me = std::process::id().to_string();
        let own = find_procs(&root, &root, &me, 0)?;
        let base = own.strip_suffix(seen.trim_end_matches('/')).unwrap_or(&own);
        log::info!(
            "in a cgroup namespace rooted at {}",
            if base.is_empty() { "/" } else { base }
        );
        Some(base.to_string())
    })
    .as_deref()
}

/// The cgroup (path from `root`) whose cgroup.procs lists `pid`.
fn find_procs(root: &Path, dir: &Path, pid: &str, depth: u32) -> Option<String> {
    if fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.lines().any(|l| l == pid)) {
        let rel = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", rel.to_string_lossy()));
    }
    if depth > 32 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_procs(root, &e.path(), pid, depth + 1))
}

/// Where cgroup2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts),
/// with each mount's root as mountinfo shows it ("/", or "/../.." from inside a namespace).
pub fn cgroup2_mounts() -> Vec<(PathBuf, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| cgroup2_mounts_in(&text))
        .unwrap_or_default()
}

/// The cgroup2 mounts of a mountinfo text, each line parsed by procfs on its own: a line it
/// cannot parse costs that line, not every mount.
fn cgroup2_mounts_in(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| MountInfo::from_line(line).ok())
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| (m.mount_point, m.root))
        .collect()
}

/// `root` + a namespace-relative `path` (which may climb out with `..`), normalized.
fn join(root: &str, path: &str) -> String {
    let mut parts: Vec<&str> = root.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            parts.pop();
        } else {
            parts.push(part);
        }
    }
    format!("/{}", parts.join("/"))
}

/// The inode of the network namespace of `/proc/<of>` (a PID, or "self").
pub fn netns_id(of: impl std::fmt::Display) -> Option<u64> {
    // The link's target is the namespace's nsfs inode ("net:[4026531840]" names it too).
    fs::metadata(format!("/proc/{of}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let rest = if let Some(rest) = part.strip_prefix("pod") {
        rest
    } else if part.starts_with("kubepods") {
        let at = part.find("-pod")?;
        part[at + 4..].strip_suffix(".slice")?
    } else {
        return None;
    };
    let uid = rest.replace('_', "-");
    let is_uid = uid.len() == 36
        && uid.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        });
    is_uid.then_some(uid)
}

/// A 64-hex container id, bare (containerd's cgroupfs driver), as `crio-<id>` (CRI-O's), or
/// as `<runtime>-<id>.scope` (systemd): `cri-containerd-`, `crio-`, `docker-`, `libpod-`.
/// CRI-O's `crio-conmon-` monitor is not a container.
fn container_id(part: &str) -> Option<String> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = name.rsplit('-').next()?;
    let is_id = id.len() == 64
        && id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    is_id.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7e4d5a6b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d";
    const UID: &str = "1b2c3d4e-5f60-4718-9a0b-c1d2e3f4a5b6";

    #[test]
    fn kubelet_systemd_driver_with_containerd_crio_and_docker() {
        let uid_ = UID.replace('-', "_");
        for runtime in ["cri-containerd", "crio", "docker"] {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/{runtime}-{ID}.scope"
            );
            let l = Labels::from_cgroup_path(&path);
            assert_eq!(l.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(l.pod_uid.as_deref(), Some(UID), "{path}");
            assert_eq!(l.unit, None);
        }
        // Guaranteed QoS pods sit right under kubepods.slice.
        let l = Labels::from_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(l.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kubelet_cgroupfs_driver_and_cgroup_namespaces() {
        let l = Labels::from_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(
            (l.container_id.as_deref(), l.pod_uid.as_deref()),
            (Some(ID), Some(UID))
        );
        let l = Labels::from_cgroup_path(&format!("/../../kubepods/pod{UID}/{ID}"));
        assert_eq!(
            (l.container_id.as_deref(), l.pod_uid.as_deref()),
            (Some(ID), Some(UID))
        );
        // CRI-O with the cgroupfs driver.
        let l = Labels::from_cgroup_path(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
        assert_eq!(
            (l.container_id.as_deref(), l.pod_uid.as_deref()),
            (Some(ID), Some(UID))
        );
        assert_eq!(
            Labels::from_cgroup_path(&format!("/kubepods/pod{UID}/crio-conmon-{ID}")).container_id,
            None
        );
    }

    #[test]
    fn plain_docker_and_systemd_units() {
        let l = Labels::from_cgroup_path(&format!("/docker/{ID}"));
        assert_eq!(l.container_id.as_deref(), Some(ID));
        assert_eq!(l.pod_uid, None);
        let l = Labels::from_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(l.container_id.as_deref(), Some(ID));
        let l = Labels::from_cgroup_path("/system.slice/nginx.service");
        assert_eq!(l.unit.as_deref(), Some("nginx.service"));
        assert_eq!(l.container_id, None);
        assert_eq!(Labels::from_cgroup_path("/"), Labels::default());
        assert_eq!(
            Labels::from_cgroup_path(&format!("/system.slice/crio-conmon-{ID}.scope")).container_id,
            None
        );
    }

    #[test]
    fn namespace_relative_paths_are_made_absolute() {
        let root = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-a.scope";
        assert_eq!(
            join(root, "/../../kubepods-pod2.slice/cri-containerd-b.scope"),
            "/kubepods.slice/kubepods-pod2.slice/cri-containerd-b.scope"
        );
        assert_eq!(join(root, "/"), root);
        assert_eq!(
            join("/", "/system.slice/x.service"),
            "/system.slice/x.service"
        );
        assert_eq!(join("/a", "/../../.."), "/");
    }

    #[test]
    fn lookalikes_are_not_ids() {
        assert_eq!(pod_uid("podcast"), None);
        assert_eq!(container_id(&ID.to_uppercase()), None);
        assert_eq!(container_id(&ID[..63]), None);
        let l = Labels::from_cgroup_path("/user.slice/user-0.slice/session-3.scope");
        assert_eq!(l.unit.as_deref(), Some("session-3.scope"));
        assert_eq!(l.pairs(), vec![("unit", "session-3.scope")]);
    }

    /// procfs and a stat read what /proc shows: the network namespace's inode as its link
    /// names it, and the cgroup v2 line of /proc/self/cgroup.
    #[test]
    fn own_netns_and_cgroup_as_proc_shows_them() {
        let link = fs::read_link("/proc/self/ns/net").expect("ns/net");
        assert_eq!(
            format!("net:[{}]", netns_id("self").expect("netns")),
            link.to_string_lossy()
        );
        let text = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let v2 = text.lines().find_map(|l| l.strip_prefix("0::"));
        assert_eq!(
            cgroup2_path(Process::myself().expect("myself")),
            v2.map(str::to_string)
        );
    }

    #[test]
    fn cgroup2_mounts_from_mountinfo_lines_skip_what_does_not_parse() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
this line is not mountinfo
35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
36 25 0:31 /../.. /host/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts_in(text),
            vec![
                (PathBuf::from("/sys/fs/cgroup"), "/".to_string()),
                (PathBuf::from("/host/cgroup"), "/../..".to_string()),
            ]
        );
    }
}
