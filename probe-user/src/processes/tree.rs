//! The process tree as /proc shows it now.

use std::collections::BTreeMap;

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
