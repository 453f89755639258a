//! Node-wide discovery: which processes are servers to watch, besides the `--pid-tree` roots.
//! A process matches when it listens on a `--port`, is named by `--comm`, sits in a
//! `--cgroup` subtree, or (`--all-listeners`) holds any listening TCP socket. The topmost
//! matching process of a tree becomes a root; its descendants follow it as members.
//!
//! New processes are found from kernel events (exec for --comm/--cgroup, a successful listen
//! for --port/--all-listeners); a full /proc scan runs at start and then only rarely, to
//! catch what no event announces (a process moved between cgroups without exec).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use procfs::process::Process;

use crate::{
    processes::containers,
    processes::sockets::{self, ListenerCache},
    processes::tree::{self, PF_KTHREAD},
};

#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// flyprobe's own ancestors (PID 1 among them): never roots, or flyprobe and everything
    /// else under them would become one server (systemd holds sockets for socket activation).
    ancestors: BTreeSet<u32>,
    pub ports: Vec<u16>,
    pub comms: Vec<String>,
    /// cgroup v2 paths relative to the hierarchy's root ("/kubepods.slice").
    pub cgroups: Vec<String>,
    pub all_listeners: bool,
}

impl Selectors {
    pub fn new(ports: &[u16], comms: &[String], cgroups: &[PathBuf], all_listeners: bool) -> Self {
        let mounts: Vec<PathBuf> = containers::cgroup2_mounts()
            .into_iter()
            .map(|(mount, _)| mount)
            .collect();
        let mut ancestors = BTreeSet::from([1]);
        // /proc read a step at a time: all of it (`tree::parents`) is not needed here.
        ancestors.extend(tree::ancestors_by(std::process::id(), |pid| {
            let stat = Process::new(pid as i32).and_then(|p| p.stat()).ok()?;
            Some(stat.ppid as u32)
        }));
        Self {
            ancestors,
            ports: ports.to_vec(),
            comms: comms.to_vec(),
            cgroups: cgroups.iter().map(|c| relative(c, &mounts)).collect(),
            all_listeners,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.comms.is_empty()
            && self.cgroups.is_empty()
            && !self.all_listeners
    }

    /// --comm and --cgroup are decided at exec.
    pub fn wants_exec_events(&self) -> bool {
        !self.comms.is_empty() || !self.cgroups.is_empty()
    }

    /// --port and --all-listeners are decided at listen.
    pub fn wants_listen_events(&self) -> bool {
        !self.ports.is_empty() || self.all_listeners
    }

    /// Does this one process match (regardless of its ancestors)?
    pub fn matches(&self, pid: u32) -> bool {
        self.matches_with(pid, &mut ListenerCache::default())
    }

    fn matches_with(&self, pid: u32, listeners: &mut ListenerCache) -> bool {
        if pid == std::process::id() || self.ancestors.contains(&pid) || self.is_empty() {
            return false;
        }
        let Ok(process) = Process::new(pid as i32) else {
            return false;
        };
        let Ok(stat) = process.stat() else {
            return false;
        };
        if stat.flags & PF_KTHREAD != 0 {
            return false;
        }
        if !self.comms.is_empty() {
            let argv0 = process
                .cmdline()
                .ok()
                .and_then(|c| c.into_iter().next())
                .map(|a| a.rsplit('/').next().unwrap_or_default().to_string());
            if self
                .comms
                .iter()
                .any(|c| comm_matches(c, &stat.comm) || argv0.as_deref() == Some(c.as_str()))
            {
                return true;
            }
        }
        if !self.cgroups.is_empty()
            && let Some(path) = containers::cgroup_of(pid)
            && self.cgroups.iter().any(|c| under(&path, c))
        {
            return true;
        }
        if self.wants_listen_events() {
            let ports = sockets::listening_ports(pid, listeners);
            if (self.all_listeners && !ports.is_empty())
                || self.ports.iter().any(|p| ports.contains(p))
            {
                return true;
            }
        }
        false
    }

    /// Every matching process that is the topmost match of its tree and not `watched`,
    /// parents before children.
    pub fn scan(&self, watched: impl Fn(u32) -> bool) -> Vec<u32> {
        if self.is_empty() {
            return Vec::new();
        }
        let parents = tree::parents();
        let mut listeners = ListenerCache::default();
        let candidates: BTreeSet<u32> = parents
            .keys()
            .copied()
            .filter(|&pid| !watched(pid) && self.matches_with(pid, &mut listeners))
            .collect();
        topmost(&candidates, &parents, watched)
    }
}

/// The candidates with no candidate or watched process among their ancestors, shallowest first.
fn topmost(
    candidates: &BTreeSet<u32>,
    parents: &BTreeMap<u32, u32>,
    watched: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let mut out: Vec<(usize, u32)> = Vec::new();
    for &pid in candidates {
        let above = tree::ancestors(pid, parents);
        if !above.iter().any(|&p| candidates.contains(&p) || watched(p)) {
            out.push((above.len(), pid));
        }
    }
    out.sort_unstable();
    out.into_iter().map(|(_, pid)| pid).collect()
}

/// comm is cut to 15 bytes by the kernel: a longer name matches its first 15.
fn comm_matches(wanted: &str, comm: &str) -> bool {
    let cut = wanted.get(..15.min(wanted.len())).unwrap_or(wanted);
    comm == wanted || (wanted.len() > 15 && comm == cut)
}

/// Is cgroup `path` the cgroup `root` or inside it?
fn under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    root.is_empty()
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A --cgroup argument as a path inside the hierarchy: "/sys/fs/cgroup/x" and "/x" alike.
fn relative(arg: &Path, mounts: &[PathBuf]) -> String {
    let rel = mounts
        .iter()
        .filter_map(|m| arg.strip_prefix(m).ok())
        .min_by_key(|r| r.as_os_str().len())
        .unwrap_or(arg);
    let rel = rel.to_string_lossy();
    format!("/{}", rel.trim_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_arguments_are_made_relative_to_the_mount() {
        let mounts = [
            PathBuf::from("/sys/fs/cgroup"),
            PathBuf::from("/sys/fs/cgroup/unified"),
        ];
        assert_eq!(
            relative(Path::new("/sys/fs/cgroup/unified/kubepods.slice/"), &mounts),
            "/kubepods.slice"
        );
        assert_eq!(
            relative(Path::new("/sys/fs/cgroup/system.slice"), &mounts),
            "/system.slice"
        );
        assert_eq!(relative(Path::new("kubepods"), &mounts), "/kubepods");
        assert!(under("/kubepods.slice/a.slice/c.scope", "/kubepods.slice"));
        assert!(under("/kubepods.slice", "/kubepods.slice"));
        assert!(!under("/kubepods.slice2/x", "/kubepods.slice"));
        assert!(under("/anything", "/"));
    }

    #[test]
    fn topmost_match_of_a_tree_wins() {
        // 1 -> 10 (gunicorn master) -> 11, 12 (workers); 1 -> 20 -> 21 (a match under a non-match)
        let parents = BTreeMap::from([
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 10),
            (20, 1),
            (21, 20),
            (30, 1),
            (31, 30),
        ]);
        let candidates = BTreeSet::from([10, 11, 12, 21, 31]);
        assert_eq!(topmost(&candidates, &parents, |_| false), vec![10, 21, 31]);
        // 30 is watched already: its child 31 is a member, not a new root.
        assert_eq!(topmost(&candidates, &parents, |p| p == 30), vec![10, 21]);
    }

    #[test]
    fn long_names_match_the_kernels_cut_comm() {
        assert!(comm_matches("gunicorn", "gunicorn"));
        assert!(comm_matches("a-very-long-server-name", "a-very-long-ser"));
        assert!(!comm_matches("gunicorn", "gunicorn2"));
        assert!(!comm_matches("short", "shor"));
    }
}
