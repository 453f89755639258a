//! Worker lifecycle: how many started and stopped in a tree, why a process ended (as a
//! `reason` label: `exit_0`, `exit_nonzero`, `signal_<NAME>`), and the last starts and stops
//! for the dashboard's feed.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{SystemTime, UNIX_EPOCH},
};

use nix::sys::signal::Signal;
use probe_common::{ExitInfo, exit_flags};

/// Worker starts and stops of one root's tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    pub started: u64,
    pub stopped: BTreeMap<String, u64>,
}

/// Reasons every server reports from the start, so `rate()` sees them at 0 first.
pub const COMMON_REASONS: [&str; 3] = ["exit_0", "exit_nonzero", "signal_SIGKILL"];

/// Worker starts and stops kept for the dashboard's feed.
pub const EVENT_LOG_LEN: usize = 100;

/// One worker start or stop.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// Unix seconds.
    pub time: f64,
    pub root: u32,
    pub pid: u32,
    /// `None` for a start, the stop reason for a stop.
    pub stopped: Option<String>,
}

/// The last `EVENT_LOG_LEN` worker starts and stops, oldest first.
#[derive(Debug, Default)]
pub struct EventLog(VecDeque<LifecycleEvent>);

impl EventLog {
    /// A start (`stopped` None) or stop of worker `pid` of root `root`, now.
    pub fn push(&mut self, root: u32, pid: u32, stopped: Option<String>) {
        if self.0.len() == EVENT_LOG_LEN {
            self.0.pop_front();
        }
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.0.push_back(LifecycleEvent {
            time,
            root,
            pid,
            stopped,
        });
    }

    pub fn iter(&self) -> impl Iterator<Item = &LifecycleEvent> {
        self.0.iter()
    }

    /// Forget the events of the roots `gone`.
    pub fn forget(&mut self, gone: &BTreeSet<u32>) {
        self.0.retain(|e| !gone.contains(&e.root));
    }
}

pub fn reason(exit: &ExitInfo) -> String {
    if exit.flags & exit_flags::EXITED != 0 {
        // exit_group(status): the parent sees status & 0xff.
        if exit.code & 0xff == 0 {
            "exit_0".into()
        } else {
            "exit_nonzero".into()
        }
    } else if exit.flags & exit_flags::SIGNALED != 0 {
        match Signal::try_from(exit.signal as i32) {
            Ok(sig) => format!("signal_{}", sig.as_str()),
            Err(_) => format!("signal_{}", exit.signal),
        }
    } else {
        // Neither seen: it ended before flyprobe watched, or only its leader thread exited.
        "unknown".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(flags: u32, code: u32, signal: u32) -> ExitInfo {
        ExitInfo {
            flags,
            code,
            signal,
        }
    }

    #[test]
    fn exit_code_wins_over_an_earlier_handled_signal() {
        let both = exit_flags::EXITED | exit_flags::SIGNALED;
        assert_eq!(reason(&info(both, 0, 15)), "exit_0");
        assert_eq!(reason(&info(exit_flags::EXITED, 3, 0)), "exit_nonzero");
        assert_eq!(reason(&info(exit_flags::EXITED, 256, 0)), "exit_0");
    }

    #[test]
    fn the_event_log_keeps_the_latest_and_forgets_a_gone_server() {
        let mut log = EventLog::default();
        for pid in 0..EVENT_LOG_LEN as u32 + 5 {
            log.push(pid % 2, pid, None);
        }
        let pids: Vec<u32> = log.iter().map(|e| e.pid).collect();
        assert_eq!(pids.len(), EVENT_LOG_LEN);
        assert_eq!(pids[0], 5, "the oldest went first");
        log.forget(&BTreeSet::from([1]));
        assert!(log.iter().all(|e| e.root == 0));
        assert_eq!(log.iter().count(), EVENT_LOG_LEN / 2);
    }

    #[test]
    fn signals_are_named() {
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 9)), "signal_SIGKILL");
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 11)), "signal_SIGSEGV");
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 64)), "signal_64");
        assert_eq!(reason(&info(0, 0, 0)), "unknown");
    }
}
