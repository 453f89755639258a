//! Startup errors a user can act on, and the exit codes the README documents.

use std::{io, net::SocketAddr};

use thiserror::Error;

/// Bad arguments: the command line, a PID that names no process, an unusable web config.
pub const EXIT_USAGE: u8 = 2;
/// Everything else that stops flyprobe: privileges, the port, tracefs, the kernel.
pub const EXIT_RUNTIME: u8 = 1;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("no process with PID {pid}: pass the PID of a running server to --pid-tree")]
    NoSuchProcess { pid: u32 },
    #[error(
        "PID {pid} is a kernel thread ({comm}), not a server: pass the server's PID to --pid-tree"
    )]
    KernelThread { pid: u32, comm: String },
    #[error("PID {pid} is a thread of process {tgid}: pass --pid-tree {tgid}")]
    Thread { pid: u32, tgid: u32 },
    #[error(
        "PID {pid} exited while flyprobe was starting: nothing to watch; start flyprobe on a running server"
    )]
    ExitedDuringStartup { pid: u32 },
    #[error(
        "flyprobe runs in a child PID namespace ({ns}): its kernel programs see the host's PIDs, \
         which this namespace cannot name, so every count would be 0; run it in the host's PID \
         namespace (Kubernetes: hostPID: true; docker: --pid=host)"
    )]
    PidNamespace { ns: String },
    #[error(
        "flyprobe needs root, or the capabilities CAP_BPF and CAP_PERFMON, to load eBPF \
         programs (it has neither: {detail}); run it with sudo"
    )]
    NotPrivileged { detail: String },
    #[error(
        "cannot listen on {addr}: the address is already in use; stop what holds it or pass --listen with another port"
    )]
    ListenInUse { addr: SocketAddr },
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoSuchProcess { .. }
            | Self::KernelThread { .. }
            | Self::Thread { .. }
            | Self::ExitedDuringStartup { .. }
            | Self::PidNamespace { .. } => EXIT_USAGE,
            Self::NotPrivileged { .. }
            | Self::ListenInUse { .. }
            | Self::Listen { .. }
            | Self::AccessLog { .. } => EXIT_RUNTIME,
        }
    }
}
