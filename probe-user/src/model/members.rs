//! One process of a watched tree as the daemon knows it: a `Member` and its `Role`, a tree's
//! `Root` and how it came to be watched (`Origin`), and the `ProcessKey` that names a
//! process within its tree.

use std::time::Instant;

use crate::processes::containers::Labels;

#[derive(Debug, Clone)]
pub struct Root {
    pub pid: u32,
    pub server: String,
    /// Seconds after boot the root process started.
    pub started: f64,
    /// Seconds after boot it exited, once it has.
    pub exited: Option<f64>,
    /// Container, pod, unit and network namespace, where known.
    pub labels: Labels,
    pub origin: Origin,
}

/// How a root came to be watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Named by `--pid-tree`: watched for flyprobe's whole life.
    PidTree,
    /// Found by a node-wide selector: forgotten some time after it exits.
    Selector,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub ppid: u32,
    pub root: u32,
    pub comm: String,
    /// Seconds after boot the process started.
    pub started: f64,
    /// Forked after flyprobe attached: becoming a worker counts as a start.
    pub forked_here: bool,
    pub role: Role,
    pub exited: Option<Instant>,
}

impl Member {
    pub(super) fn new(ppid: u32, root: u32, comm: String, started: f64, forked_here: bool) -> Self {
        Self {
            ppid,
            root,
            comm,
            started,
            forked_here,
            role: Role::Unclassified,
            exited: None,
        }
    }
}

/// What a member is to its server, as `classify` (or its exit) last found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Not looked at while alive yet: at its exit, a sibling that serves makes it a worker.
    #[default]
    Unclassified,
    /// Has not served (a helper, a child before it serves).
    Other,
    /// Serves right now (holds a listening socket it did not hand down, or accepted).
    Serving,
    /// Has served, not now: its exit is a worker stop.
    Served,
    /// Has handed its listening socket to a descendant: never a worker.
    Supervisor,
}

impl Role {
    pub fn serving(self) -> bool {
        self == Self::Serving
    }

    /// Serves or has served: a worker, whose exit is a stop.
    pub fn has_served(self) -> bool {
        matches!(self, Self::Serving | Self::Served)
    }

    /// The role once the member is known to have served (a previous run's ledger says so):
    /// a supervisor stays one, for `classify` to decide.
    pub(super) fn served(self) -> Self {
        match self {
            Self::Serving | Self::Supervisor => self,
            Self::Unclassified | Self::Other | Self::Served => Self::Served,
        }
    }

    /// The role after `classify` found the member serving (`serves`) or not.
    pub(super) fn classified(self, serves: bool) -> Self {
        match (serves, self) {
            (true, _) => Self::Serving,
            (false, Self::Serving | Self::Served) => Self::Served,
            (false, Self::Supervisor) => Self::Supervisor,
            (false, Self::Unclassified | Self::Other) => Self::Other,
        }
    }
}

/// A process of a watched tree: its root and its PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcessKey {
    pub root: u32,
    pub pid: u32,
}

impl ProcessKey {
    pub fn new(root: u32, pid: u32) -> Self {
        Self { root, pid }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The role's state machine: serving makes a worker for good (its exit is a stop), a
    /// supervisor is never made a worker by not serving, and the ledger's word that a member
    /// served leaves a supervisor to `classify`.
    #[test]
    fn a_role_once_served_stays_a_worker_and_a_supervisor_stays_one() {
        use Role::*;
        assert_eq!(Unclassified.classified(false), Other);
        assert_eq!(Other.classified(true), Serving);
        assert_eq!(Serving.classified(false), Served);
        assert_eq!(Served.classified(true), Serving);
        assert_eq!(Supervisor.classified(false), Supervisor);
        assert!(Served.has_served() && Serving.has_served());
        assert!(!Other.has_served() && !Supervisor.has_served() && !Unclassified.has_served());
        assert_eq!(Unclassified.served(), Served);
        assert_eq!(Supervisor.served(), Supervisor);
        assert_eq!(Serving.served(), Serving);
    }
}
