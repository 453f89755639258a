//! The process tree as /proc shows it now.

use std::collections::{BTreeMap, BTreeSet};

use procfs::process::{Process, all_processes};

/// task_struct flag of kernel threads (include/linux/sched.h), in /proc/PID/stat's flags.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Every process's parent, as /proc shows them now.
pub fn parents() -> BTreeMap<u32, u32> {
    all_processes()
        .into_iter()
        .flatten()
        .filter_map(|p| p.ok()?.stat().ok())
        .map(|s| (s.pid as u32, s.ppid as u32))
        .collect()
}

/// Whether `pid` still runs. Only /proc saying so makes it gone: an error such as running out
/// of file descriptors must not declare live workers dead (and untrack them).
pub fn alive(pid: u32) -> bool {
    match Process::new(pid as i32).and_then(|p| p.stat()) {
        Ok(stat) => stat.state != 'Z' && stat.state != 'X',
        Err(procfs::ProcError::NotFound(_)) => false,
        Err(err) => {
            log::debug!("cannot tell whether {pid} runs ({err}): assuming it does");
            true
        }
    }
}

/// `pid`'s ancestors in `parents`, its parent first, up to PID 1. Bounded: a snapshot of
/// /proc taken mid-reparent may hold a loop.
pub fn ancestors(pid: u32, parents: &BTreeMap<u32, u32>) -> Vec<u32> {
    ancestors_by(pid, |p| parents.get(&p).copied())
}

/// `pid`'s ancestors as `parent_of` names them (a map, or /proc read a step at a time).
pub fn ancestors_by(pid: u32, parent_of: impl Fn(u32) -> Option<u32>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut cur = pid;
    while let Some(parent) = parent_of(cur) {
        if parent == 0 || out.contains(&parent) || out.len() > 256 {
            break;
        }
        out.push(parent);
        cur = parent;
    }
    out
}

/// The closest of `pid` and its ancestors that is in `roots`.
pub fn nearest_root(pid: u32, parents: &BTreeMap<u32, u32>, roots: &BTreeSet<u32>) -> Option<u32> {
    std::iter::once(pid)
        .chain(ancestors(pid, parents))
        .find(|p| roots.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_end_at_the_top_and_at_a_loop() {
        // 1 -> 10 -> 11 -> 12; 30 <-> 31 (a snapshot taken mid-reparent)
        let parents = BTreeMap::from([(1, 0), (10, 1), (11, 10), (12, 11), (30, 31), (31, 30)]);
        assert_eq!(ancestors(12, &parents), vec![11, 10, 1]);
        assert_eq!(ancestors(1, &parents), Vec::<u32>::new());
        assert_eq!(ancestors(99, &parents), Vec::<u32>::new());
        assert_eq!(ancestors(30, &parents), vec![31, 30]);
    }

    #[test]
    fn nearest_root_walks_up_to_the_closest_root() {
        // 1 -> 10 -> 11 -> 12, 1 -> 20
        let parents = BTreeMap::from([(1, 0), (10, 1), (11, 10), (12, 11), (20, 1)]);
        let roots = BTreeSet::from([10, 11]);
        assert_eq!(nearest_root(12, &parents, &roots), Some(11));
        assert_eq!(nearest_root(10, &parents, &roots), Some(10));
        assert_eq!(nearest_root(20, &parents, &roots), None);
    }
}
