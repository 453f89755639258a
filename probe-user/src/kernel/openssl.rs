//! `--tls`: the OpenSSL libraries (libssl) that watched processes map, each attached once.
//! A uprobe belongs to a file, not a process: attached to one libssl, it fires in every
//! process that maps that file, now or later (the kernel programs keep to watched ones).
//! A container's libssl is a file of its own (another device and inode), reached through
//! `/proc/PID/root`.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sys::stat::{major, minor};

use procfs::process::{MMPermissions, MMapPath, Process};

use crate::kernel::probe::{Probe, causes};

/// Every this many sweeps, processes already scanned are scanned again: a process may load
/// libssl after it was first seen (Python imports `ssl` when it needs it).
const RESCAN_EVERY_SWEEPS: u32 = 10;

/// A file by device and inode.
type FileId = (i32, i32, u64);

pub struct OpenSsl {
    /// Every libssl attached (a failure is retried when a process maps it next, and
    /// warned of once).
    attached: BTreeSet<FileId>,
    warned: BTreeSet<FileId>,
    /// Processes whose maps were read since the last rescan.
    scanned: BTreeSet<u32>,
    sweeps: u32,
}

impl OpenSsl {
    pub fn new() -> Self {
        Self {
            attached: BTreeSet::new(),
            warned: BTreeSet::new(),
            scanned: BTreeSet::new(),
            sweeps: 0,
        }
    }

    /// Libraries attached so far.
    pub fn attached(&self) -> usize {
        self.attached.len()
    }

    /// Reads the maps of the live `members` not scanned yet (all of them every
    /// `RESCAN_EVERY_SWEEPS`) and attaches the uprobes to each libssl met for the first time.
    /// Each process scanned, and whether it maps an attached libssl (one that exec'd another
    /// program since it was marked no longer does).
    pub fn sweep(&mut self, probe: &mut Probe, members: &BTreeSet<u32>) -> Vec<(u32, bool)> {
        let mut seen = Vec::new();
        self.sweeps += 1;
        if self.sweeps >= RESCAN_EVERY_SWEEPS {
            self.sweeps = 0;
            self.scanned.clear();
        }
        self.scanned.retain(|pid| members.contains(pid));
        for &pid in members {
            if !self.scanned.insert(pid) {
                continue;
            }
            // Gone since (its maps unreadable): its exit ends its mark.
            let Some(libraries) = libssl_of(pid) else {
                continue;
            };
            let mut attached = false;
            for (id, path) in libraries {
                attached |= self.attached.contains(&id) || self.attach(probe, pid, id, &path);
            }
            seen.push((pid, attached));
        }
        seen
    }

    fn attach(&mut self, probe: &mut Probe, pid: u32, id: FileId, path: &Path) -> bool {
        // The file the path names now must be the one mapped (not one an upgrade put there).
        let same = std::fs::metadata(path).is_ok_and(|m| {
            m.ino() == id.2 && (major(m.dev()), minor(m.dev())) == (id.0 as u64, id.1 as u64)
        });
        let result = if same {
            probe.attach_openssl(path).map_err(|e| causes(&e))
        } else {
            Err("the file at that path is not the one mapped (replaced since)".to_string())
        };
        match result {
            Ok(n) => {
                log::info!(
                    "TLS: OpenSSL uprobes attached to {} ({n} probes; mapped by pid {pid}): its \
                     HTTPS plaintext is counted",
                    path.display()
                );
                self.attached.insert(id);
                true
            }
            Err(e) => {
                if self.warned.insert(id) {
                    log::warn!(
                        "TLS: no uprobes on {} (mapped by pid {pid}): {e}; its connections count \
                         as protocol=\"tls\" exchanges (retried with the next process mapping \
                         it; where kernel.perf_event_paranoid > 2, attaching after start-up \
                         needs CAP_SYS_ADMIN)",
                        path.display()
                    );
                }
                false
            }
        }
    }
}

impl Default for OpenSsl {
    fn default() -> Self {
        Self::new()
    }
}

/// The libssl files `pid` maps executable, as paths through its root (its mount namespace);
/// `None` when its maps cannot be read or show nothing (it is gone, or a zombie).
fn libssl_of(pid: u32) -> Option<Vec<(FileId, PathBuf)>> {
    let maps = Process::new(pid as i32).and_then(|p| p.maps()).ok()?;
    if maps.0.is_empty() {
        return None;
    }
    let mut found = Vec::new();
    for map in maps {
        let MMapPath::Path(path) = &map.pathname else {
            continue;
        };
        if !map.perms.contains(MMPermissions::EXECUTE) || !is_libssl(path) {
            continue;
        }
        let id = (map.dev.0, map.dev.1, map.inode);
        if found.iter().any(|(f, _)| *f == id) {
            continue;
        }
        let inside = path.strip_prefix("/").unwrap_or(path);
        found.push((id, PathBuf::from(format!("/proc/{pid}/root")).join(inside)));
    }
    Some(found)
}

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`: OpenSSL's TLS library (not NSS's
/// `libssl3.so`, which has no `SSL_read`). A mapping of a file deleted since (an upgrade)
/// matches too; `OpenSsl::attach` then finds that the path names another file.
fn is_libssl(path: &std::path::Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libssl.so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_openssl_libssl_is_taken() {
        for yes in [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/libssl.so.1.1",
            "/opt/x/libssl.so",
        ] {
            assert!(is_libssl(std::path::Path::new(yes)), "{yes}");
        }
        for no in [
            "/usr/lib/x86_64-linux-gnu/libssl3.so",
            "/usr/lib/libcrypto.so.3",
            "/opt/libssl.so.3.d/libother.so",
        ] {
            assert!(!is_libssl(std::path::Path::new(no)), "{no}");
        }
    }

    /// This test process maps no libssl; a process that does is found by the e2e tests
    /// (tests/tests/tls.rs), which attach to it.
    #[test]
    fn a_process_without_libssl_has_none() {
        assert_eq!(libssl_of(std::process::id()), Some(Vec::new()));
    }

    /// A process that is gone is not one without libssl: its mark is left to its exit.
    #[test]
    fn a_process_that_is_gone_has_no_answer() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert_eq!(libssl_of(pid), None);
    }
}
