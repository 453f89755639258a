//! `--pin-path DIR`: state that survives a daemon restart. The kernel maps that hold counters
//! and open connections are pinned under DIR (a BPF filesystem), so a new daemon's programs
//! continue them: no counter reset, and a connection opened before the restart and closed
//! after it is accounted once. What userspace alone knows (final counters of exited workers,
//! worker starts and stops, who belongs to which tree) goes to a ledger file under
//! /run/flyprobe (bpffs holds no regular files), written at every sweep that changed it and at
//! shutdown. Both live until reboot, like the pins. Without the flag nothing is pinned or
//! written.
//!
//! Not pinned: the target set (rebuilt from /proc, so a PID reused while no daemon ran is not
//! tracked by mistake), pending-syscall slots and the rings (transient).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};
use probe_common::{ConnKey, ConnState, ExitInfo, ProcStats, ReqKey, ReqStats, names};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{kernel::probe::Limits, model::lifecycle::Lifecycle};

/// statfs f_type of a BPF filesystem (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: nix::libc::c_long = 0xcafe_4a11;

/// The maps pinned, with the (key, value) sizes this build expects of them.
const PINNED: [(&str, usize, usize); 6] = [
    (names::CONNS, size_of::<ConnKey>(), size_of::<ConnState>()),
    (names::STATS, size_of::<u32>(), size_of::<ProcStats>()),
    (names::REQS, size_of::<ReqKey>(), size_of::<ReqStats>()),
    (names::EXITS, size_of::<u32>(), size_of::<ExitInfo>()),
    (names::LINEAGE, size_of::<u32>(), size_of::<u32>()),
    (names::DROPS, size_of::<u32>(), size_of::<u64>()),
];

#[derive(Debug, Error)]
pub enum PinError {
    #[error("--pin-path {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--pin-path {path} is not on a BPF filesystem: mount one there (mount -t bpf bpf {path}) or use a directory under /sys/fs/bpf"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting the BPF filesystem at /sys/fs/bpf failed: {source}")]
    Mount {
        #[source]
        source: nix::Error,
    },
    #[error(
        "the map pinned at {path} has {found} bytes of {part} where this flyprobe expects {expected} (pinned by another version?): remove it to start afresh"
    )]
    Layout {
        path: PathBuf,
        part: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(
        "the map pinned at {path} holds {found} entries, but {flag} asks for {wanted}: pass {flag} {found}, or remove {dir} to start afresh with the new size"
    )]
    Size {
        path: PathBuf,
        dir: PathBuf,
        flag: &'static str,
        found: u32,
        wanted: u32,
    },
}

/// Where ledgers are kept, one per pin directory.
const LEDGER_DIR: &str = "/run/flyprobe";

pub struct PinDir {
    dir: PathBuf,
    ledger: PathBuf,
    /// The last ledger written, to skip identical writes.
    last: Option<String>,
    /// The last write failed (and was logged).
    pub failing: bool,
    /// Maps were pinned there before this run: only then does the ledger continue.
    existed: bool,
}

/// What userspace knew at the last sweep.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub roots: Vec<RootLedger>,
    pub members: Vec<MemberLedger>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RootLedger {
    pub pid: u32,
    /// Seconds after boot it started: with the PID, tells it from a later process.
    pub started: f64,
    pub started_workers: u64,
    pub stopped: BTreeMap<String, u64>,
    pub retired: Vec<(u32, ProcStats)>,
    pub retired_requests: Vec<(ReqKey, ReqStats)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MemberLedger {
    pub pid: u32,
    pub root: u32,
    pub started: f64,
    pub ever_worker: bool,
    /// Exited already (its stop, if a worker, was counted).
    pub exited: bool,
}

impl RootLedger {
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            started: self.started_workers,
            stopped: self.stopped.clone(),
        }
    }
}

impl PinDir {
    /// Make DIR ready (mounting bpffs at /sys/fs/bpf if DIR is under it and nothing is
    /// mounted there) and check that maps already pinned fit this build.
    pub fn prepare(dir: &Path, limits: &Limits) -> Result<Self, PinError> {
        let bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
        let sys_bpf = Path::new("/sys/fs/bpf");
        if dir.starts_with(sys_bpf) && sys_bpf.is_dir() && !bpffs(sys_bpf) {
            log::info!("no BPF filesystem at /sys/fs/bpf: mounting one");
            mount(
                Some("bpf"),
                sys_bpf,
                Some("bpf"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|source| PinError::Mount { source })?;
        }
        fs::create_dir_all(dir).map_err(|source| PinError::Dir {
            path: dir.into(),
            source,
        })?;
        if !bpffs(dir) {
            return Err(PinError::NotBpffs { path: dir.into() });
        }
        // "/sys/fs/bpf/flyprobe" -> /run/flyprobe/sys-fs-bpf-flyprobe.json
        let flat: String = dir
            .to_string_lossy()
            .trim_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let ledger = Path::new(LEDGER_DIR).join(format!("{flat}.json"));
        let mut pins = Self {
            dir: dir.into(),
            ledger,
            last: None,
            failing: false,
            existed: false,
        };
        for (name, key, value) in PINNED {
            let path = pins.map_path(name);
            let Ok(map) = MapData::from_pin(&path) else {
                continue; // not pinned yet
            };
            pins.existed = true;
            let Ok(info) = map.info() else { continue };
            let size = match name {
                names::CONNS => Some(("--max-connections", limits.max_connections)),
                names::STATS | names::EXITS | names::LINEAGE => {
                    Some(("--max-processes", limits.max_processes))
                }
                names::REQS => Some(("--max-request-series", limits.max_request_series)),
                _ => None,
            };
            if let Some((flag, wanted)) = size
                && info.max_entries() != wanted
            {
                return Err(PinError::Size {
                    path,
                    dir: dir.into(),
                    flag,
                    found: info.max_entries(),
                    wanted,
                });
            }
            for (part, found, expected) in [
                ("key", info.key_size() as usize, key),
                ("value", info.value_size() as usize, value),
            ] {
                if found != expected {
                    return Err(PinError::Layout {
                        path,
                        part,
                        found,
                        expected,
                    });
                }
            }
        }
        Ok(pins)
    }

    /// (map name, pin path) of every map to pin.
    pub fn maps(&self) -> Vec<(&'static str, PathBuf)> {
        PINNED
            .iter()
            .map(|(name, _, _)| (*name, self.map_path(name)))
            .collect()
    }

    fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ledger_path(&self) -> &Path {
        &self.ledger
    }

    /// The ledger of the previous run, if its maps are still pinned (an unreadable one is
    /// logged and ignored: the kernel counters are still there). A ledger whose maps were
    /// removed is stale: it is deleted, and everything starts afresh.
    pub fn load(&self) -> Option<Ledger> {
        if !self.existed {
            let _ = fs::remove_file(self.ledger_path());
            return None;
        }
        let text = fs::read_to_string(self.ledger_path()).ok()?;
        match serde_json::from_str(&text) {
            Ok(ledger) => Some(ledger),
            Err(err) => {
                log::warn!("ignoring {}: {err}", self.ledger_path().display());
                None
            }
        }
    }

    /// Write atomically (a new file renamed over the old one), unless nothing changed.
    pub fn save(&mut self, ledger: &Ledger) -> io::Result<()> {
        let text = serde_json::to_string(ledger).map_err(io::Error::other)?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        fs::create_dir_all(LEDGER_DIR)?;
        let tmp = self.ledger.with_extension("json.tmp");
        fs::write(&tmp, &text)?;
        fs::rename(tmp, &self.ledger)?;
        self.last = Some(text);
        Ok(())
    }
}
