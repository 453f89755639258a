//! Worker lifecycle: how many started and stopped in a tree, and why a process ended, as a
//! `reason` label: `exit_0`, `exit_nonzero`, `signal_<NAME>`.

use std::collections::BTreeMap;

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
    fn signals_are_named() {
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 9)), "signal_SIGKILL");
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 11)), "signal_SIGSEGV");
        assert_eq!(reason(&info(exit_flags::SIGNALED, 0, 64)), "signal_64");
        assert_eq!(reason(&info(0, 0, 0)), "unknown");
    }
}
