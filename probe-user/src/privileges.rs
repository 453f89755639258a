//! Is this process allowed to load and attach tracepoint programs? And, once they are
//! attached, giving up every capability the daemon no longer needs.

use std::collections::HashSet;

use caps::{CapSet, Capability};
use procfs::process::Process;
use thiserror::Error;

use crate::error::StartError;

/// What the running daemon keeps: CAP_BPF for map reads and writes (kernels before 6.5 check
/// it on every bpf() call); CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH to find listening sockets
/// and namespaces of other users' processes (/proc/<pid>/fd is mode 0500 of the process's
/// user: listing it takes DAC_READ_SEARCH, reading its links takes the ptrace check).
/// Loading and attaching needed CAP_PERFMON (and CAP_SYS_ADMIN to mount tracefs): dropped,
/// but for `--tls` (`KEPT_FOR_TLS`).
pub const KEPT: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_SYS_PTRACE,
];

#[derive(Debug, Error)]
pub enum DropError {
    #[error("dropping capabilities ({set:?}): {source}")]
    Set {
        set: CapSet,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// With `--tls`, CAP_PERFMON and CAP_SYS_ADMIN too: attaching a uprobe to the libssl of a
/// server found after start-up opens a uprobe perf event, which this 6.18 kernel refuses
/// with CAP_PERFMON alone (EACCES; measured with a server started after flyprobe, as
/// `tls.rs` tests).
pub const KEPT_FOR_TLS: [Capability; 2] = [Capability::CAP_PERFMON, Capability::CAP_SYS_ADMIN];

/// Reduce the effective, permitted, inheritable and ambient sets to `KEPT` (with `tls`, and
/// `KEPT_FOR_TLS`; or less, if we never had them), and the bounding set too when allowed
/// (CAP_SETPCAP). Irreversible.
pub fn drop_unneeded(tls: bool) -> Result<HashSet<Capability>, DropError> {
    let have = caps::read(None, CapSet::Permitted).map_err(|source| DropError::Set {
        set: CapSet::Permitted,
        source,
    })?;
    let wanted = KEPT
        .into_iter()
        .chain(KEPT_FOR_TLS.into_iter().filter(|_| tls));
    let keep: HashSet<Capability> = wanted.filter(|c| have.contains(c)).collect();
    let effective = caps::read(None, CapSet::Effective).unwrap_or_default();
    if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all().difference(&keep) {
            // Capabilities this kernel does not know fail with EINVAL: nothing to drop.
            let _ = caps::drop(None, CapSet::Bounding, *cap);
        }
    }
    let set = |which: CapSet, to: &HashSet<Capability>| {
        caps::set(None, which, to).map_err(|source| DropError::Set { set: which, source })
    };
    set(CapSet::Ambient, &HashSet::new())?;
    set(CapSet::Inheritable, &HashSet::new())?;
    set(CapSet::Effective, &keep)?;
    set(CapSet::Permitted, &keep)?;
    Ok(keep)
}

/// CAP_BPF + CAP_PERFMON (kernel ≥ 5.8), or CAP_SYS_ADMIN, which implies both.
pub fn check() -> Result<(), StartError> {
    let effective = Process::myself()
        .and_then(|p| p.status())
        .map(|s| s.capeff)
        .map_err(|e| StartError::NotPrivileged {
            detail: format!("cannot read own capabilities: {e}"),
        })?;
    if can_load(effective) {
        Ok(())
    } else {
        Err(StartError::NotPrivileged {
            detail: format!("effective capabilities {effective:#x}"),
        })
    }
}

fn has(set: u64, cap: Capability) -> bool {
    set & cap.bitmask() != 0
}

fn can_load(effective: u64) -> bool {
    use Capability::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};
    has(effective, CAP_SYS_ADMIN) || (has(effective, CAP_BPF) && has(effective, CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_sys_admin_or_bpf_and_perfmon() {
        use Capability::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};
        // The kernel's numbers (include/uapi/linux/capability.h), as /proc/PID/status has them.
        assert!(can_load(1 << 21));
        assert_eq!(CAP_SYS_ADMIN.bitmask(), 1 << 21);
        assert!(can_load(CAP_BPF.bitmask() | CAP_PERFMON.bitmask()));
        assert!(can_load((1 << 39) | (1 << 38)));
        assert!(!can_load(CAP_BPF.bitmask()));
        assert!(!can_load(0));
    }
}
