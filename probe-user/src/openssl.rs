//! `--tls`: the OpenSSL libraries (libssl) that watched processes map, each attached once.
//! A uprobe belongs to a file, not a process: attached to one libssl, it fires in every
//! process that maps that file, now or later (the kernel programs keep to watched ones).
//! A container's libssl is a file of its own (another device and inode), reached through
//! `/proc/PID/root`.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use procfs::process::{MMPermissions, MMapPath, Process};

use crate::probe::Probe;

/// Every this many sweeps, processes already scanned are scanned again: a process may load
/// libssl after it was first seen (Python imports `ssl` when it needs it).
const RESCAN_EVERY_SWEEPS: u32 = 10;

/// A file by device and inode.
type FileId = (i32, i32, u64);

pub struct OpenSsl {
    /// Every libssl met: whether its uprobes are attached (a failure is not retried).
    libraries: HashMap<FileId, bool>,
    /// Processes whose maps were read since the last rescan.
    scanned: BTreeSet<u32>,
    sweeps: u32,
}

impl OpenSsl {
    pub fn new() -> Self {
        Self {
            libraries: HashMap::new(),
            scanned: BTreeSet::new(),
            sweeps: 0,
        }
    }

    /// Libraries attached so far.
    pub fn attached(&self) -> usize {
        self.libraries.values().filter(|ok| **ok).count()
    }

    /// Reads the maps of the live `members` not scanned yet (all of them every
    /// `RESCAN_EVERY_SWEEPS`) and attaches the uprobes to each libssl met for the first time.
    /// The processes scanned that map an attached libssl.
    pub fn sweep(&mut self, probe: &mut Probe, members: &BTreeSet<u32>) -> Vec<u32> {
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
            for (id, path) in libssl_of(pid) {
                if let Some(&ok) = self.libraries.get(&id) {
                    if ok {
                        seen.push(pid);
                    }
                    continue;
                }
                let ok = match probe.attach_openssl(&path) {
                    Ok(n) => {
                        log::info!(
                            "TLS: OpenSSL uprobes attached to {} ({n} functions; mapped by pid \
                             {pid}): its HTTPS plaintext is counted",
                            path.display()
                        );
                        true
                    }
                    Err(e) => {
                        log::warn!(
                            "TLS: no uprobes on {} (mapped by pid {pid}): {e}; its connections \
                             count as protocol=\"tls\" exchanges",
                            path.display()
                        );
                        false
                    }
                };
                self.libraries.insert(id, ok);
                if ok {
                    seen.push(pid);
                }
            }
        }
        seen
    }
}

impl Default for OpenSsl {
    fn default() -> Self {
        Self::new()
    }
}

/// The libssl files `pid` maps executable, as paths through its root (its mount namespace).
fn libssl_of(pid: u32) -> Vec<(FileId, PathBuf)> {
    let Ok(maps) = Process::new(pid as i32).and_then(|p| p.maps()) else {
        return Vec::new();
    };
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
    found
}

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`: OpenSSL's TLS library (not NSS's
/// `libssl3.so`, which has no `SSL_read`).
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
            "/usr/lib/x86_64-linux-gnu/libssl.so.3.deleted/x",
        ] {
            assert!(!is_libssl(std::path::Path::new(no)), "{no}");
        }
    }

    /// This test process maps no libssl; a process that does is found by the e2e tests
    /// (tests/tests/tls.rs), which attach to it.
    #[test]
    fn a_process_without_libssl_has_none() {
        assert!(libssl_of(std::process::id()).is_empty());
    }
}
