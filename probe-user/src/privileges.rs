//! Is this process allowed to load and attach tracepoint programs?

use procfs::process::Process;

use crate::error::StartError;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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

fn has(set: u64, cap: u32) -> bool {
    set & (1 << cap) != 0
}

fn can_load(effective: u64) -> bool {
    has(effective, CAP_SYS_ADMIN) || (has(effective, CAP_BPF) && has(effective, CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_sys_admin_or_bpf_and_perfmon() {
        assert!(can_load(1 << CAP_SYS_ADMIN));
        assert!(can_load((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!can_load(1 << CAP_BPF));
        assert!(!can_load(0));
    }
}
