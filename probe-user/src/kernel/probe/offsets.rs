//! Where the programs read what they read: kernel struct fields from the kernel's BTF,
//! tracepoint record fields from tracefs. Rust emits no CO-RE relocations, so the daemon
//! finds each offset here at load time and writes it into the object's read-only globals.

use std::path::Path;

use probe_common::syscall_layout;

use super::{error::ProbeError, hooks::SOCKET_EVENTS};
use crate::kernel::{
    btf::Btf,
    tracefs::{Format, TracefsError},
};

/// The `skb_drop_reason`s of the packets `tcp_v{4,6}_rcv` discards on a listener after
/// adding them to its drop counter (`kfree_skb` with `rx_sk` a listener, 6.11+): a handshake
/// dropped at a full accept queue is TCP_LISTEN_OVERFLOW from Linux 6.15, NOT_SPECIFIED
/// before; the other discards there (a bare ACK under TCP_DEFER_ACCEPT, measured on 6.18) are
/// NOT_SPECIFIED on every kernel. Both are counted: the drop counter holds an overflow twice
/// and the rest once, none of which is an overflow more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenOverflow {
    /// TCP_LISTEN_OVERFLOW (u32::MAX, which matches no reason, before 6.15).
    pub(super) overflow: u32,
    pub(super) not_specified: u32,
    /// TCP_LISTEN_OVERFLOW is named.
    pub named: bool,
}

impl ListenOverflow {
    fn read(btf: &Btf) -> Self {
        let value = |name| {
            btf.enum_value("skb_drop_reason", name)
                .map_or(u32::MAX, |v| v as u32)
        };
        let overflow = value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW");
        Self {
            overflow,
            not_specified: value("SKB_DROP_REASON_NOT_SPECIFIED"),
            named: overflow != u32::MAX,
        }
    }

    /// Whether a reason is known at all.
    pub fn known(&self) -> bool {
        self.not_specified != u32::MAX
    }
}

/// Offsets of kernel struct fields the socket-keyed sets read, from the kernel's BTF.
#[derive(Clone, Copy, Debug)]
pub struct SocketOffsets {
    pub(super) sk_family: u32,
    pub(super) sk_state: u32,
    pub(super) sk_num: u32,
    pub(super) sk_net: u32,
    pub(super) net_inum: u32,
    pub(super) sk_protocol: u32,
    pub(super) inet_sport: u32,
    /// The drop reason of a handshake dropped on a full accept queue.
    pub(super) listen_overflow: ListenOverflow,
    pub(super) task: TaskOffsets,
    /// `pt_regs.si`, followed by `di` and `orig_ax` (the syscall number).
    pub(super) regs_arg1: u32,
    /// Unix-domain sockets; all 0 where BTF lacks `unix_sock` (af_unix built as a module).
    pub(super) unix: UnixOffsets,
    /// The syscall's buffer is found through the saved user registers (the socket set on
    /// x86_64).
    pub(super) peek_regs: bool,
    /// The fentry set's iterator reads.
    pub(super) iter: Option<IterOffsets>,
}

/// What the raw lifecycle programs read of a task, from BTF.
#[derive(Clone, Copy, Debug)]
pub(super) struct TaskOffsets {
    pub(super) exit_code: u32,
    pub(super) pid: u32,
    pub(super) tgid: u32,
    pub(super) flags: u32,
}

impl TaskOffsets {
    fn read(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |path: &str| btf.offset_of("task_struct", &[path]);
        Ok(Self {
            exit_code: field("exit_code")?,
            pid: field("pid")?,
            tgid: field("tgid")?,
            flags: field("flags")?,
        })
    }

    /// The offsets where the kernel has BTF for them, else `None` (the syscall set then
    /// attaches the classic lifecycle programs), and which it is, logged.
    pub(super) fn probe() -> Option<Self> {
        match Btf::from_sys_fs()
            .map_err(ProbeError::from)
            .and_then(|btf| Self::read(&btf))
        {
            Ok(offsets) => Some(offsets),
            Err(err) => {
                log::info!(
                    "lifecycle: classic sched tracepoints ({err}): every thread a watched \
                     process starts is announced to the daemon, which discards it"
                );
                None
            }
        }
    }
}

/// What the socket-keyed sets read of unix-domain sockets.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct UnixOffsets {
    pub(super) sk_type: u32,
    pub(super) sk_socket: u32,
    pub(super) addr: u32,
    /// `socket_alloc.vfs_inode` + `inode.i_ino`: a `struct socket`'s inode number.
    pub(super) socket_ino: u32,
    pub(super) socket_sk: u32,
}

impl UnixOffsets {
    fn read(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        Ok(Self {
            sk_type: field("sock", &["sk_type"])?,
            sk_socket: field("sock", &["sk_socket"])?,
            addr: field("unix_sock", &["addr"])?,
            socket_ino: field("socket_alloc", &["vfs_inode"])? + field("inode", &["i_ino"])?,
            socket_sk: field("socket", &["sk"])?,
        })
    }
}

/// The syscall set's way from an accepted fd to its socket's family (TCP or unix), from BTF.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FdOffsets {
    pub(super) task_files: u32,
    pub(super) files_fdt: u32,
    pub(super) fdt_fd: u32,
    pub(super) file_private_data: u32,
    pub(super) socket_sk: u32,
    pub(super) sk_family: u32,
}

impl FdOffsets {
    /// The offsets, or zeros (and a warning) where the kernel has no BTF for them.
    pub(super) fn probe() -> Self {
        let read = || -> Result<Self, ProbeError> {
            let btf = Btf::from_sys_fs()?;
            let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
            Ok(Self {
                task_files: field("task_struct", &["files"])?,
                files_fdt: field("files_struct", &["fdt"])?,
                fdt_fd: field("fdtable", &["fd"])?,
                file_private_data: field("file", &["private_data"])?,
                socket_sk: field("socket", &["sk"])?,
                sk_family: field("sock_common", &["skc_family"])?,
            })
        };
        read().unwrap_or_else(|err| {
            log::warn!(
                "unix-domain connections accepted without a peer address are counted as tcp: {err}"
            );
            Self::default()
        })
    }
}

/// Where the fentry set finds the data of a `tcp_recvmsg` / `tcp_sendmsg` call.
#[derive(Clone, Copy, Debug)]
pub(super) struct IterOffsets {
    pub(super) msg_iter: u32,
    pub(super) iter_type: u32,
    pub(super) iov_offset: u32,
    /// The union of `ubuf` and the iovec pointer (`iov` before 6.4, `__iov` since).
    pub(super) iter_ptr: u32,
    pub(super) ubuf: u32,
    pub(super) iovec: u32,
}

impl SocketOffsets {
    /// What the socket set needs, or why this kernel cannot have it: the socket tracepoints
    /// (Linux >= 6.3) and the BTF to read sockets with.
    pub fn probe(tracefs: &Path) -> Result<Self, ProbeError> {
        for event in SOCKET_EVENTS {
            Format::read(tracefs, "sock", event)?;
        }
        let btf = Btf::from_sys_fs()?;
        let mut offsets = Self::fields(&btf)?;
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        // The programs read `si` and `orig_ax` 16 bytes after it: peek only where `si`,
        // `di` and `orig_ax` are adjacent, as the x86_64 ABI lays them out.
        if cfg!(target_arch = "x86_64") {
            let (si, orig_ax) = (field("pt_regs", &["si"])?, field("pt_regs", &["orig_ax"])?);
            let adjacent = field("pt_regs", &["di"])? == si + 8 && orig_ax == si + 16;
            if !adjacent {
                log::warn!(
                    "pt_regs keeps si at {si} and orig_ax at {orig_ax}: method and status \
                     labels are off"
                );
            }
            offsets.regs_arg1 = si;
            offsets.peek_regs = adjacent;
        }
        Ok(offsets)
    }

    /// What the fentry set needs: `inet_sock_set_state`, the BTF of the functions its fexit
    /// programs read (with the parameters where they expect them) and of the iterator.
    /// Whether the kernel lets trampolines attach is only known by trying.
    pub fn probe_fentry(tracefs: &Path) -> Result<Self, ProbeError> {
        Format::read(tracefs, "sock", "inet_sock_set_state")?;
        let btf = Btf::from_sys_fs()?;
        let signature = |function: &'static str, want: &[&str]| match btf.function_params(function)
        {
            Some(params) if params.len() >= want.len() && params[..want.len()] == *want => Ok(()),
            Some(params) => Err(ProbeError::Signature {
                function,
                params: params.join(", "),
            }),
            None => Err(ProbeError::NoFunction { function }),
        };
        // tcp_recvmsg lost its trailing addr_len in 6.16: flags stays fourth, and one of
        // the two programs reads the return value after the 4 or 5 parameters.
        signature("tcp_recvmsg", &["sk", "msg", "len", "flags"])?;
        // Each function's return value is read after its parameters: one of the programs
        // on it must match their number here.
        for (function, counts) in [("tcp_recvmsg", &[4, 5][..]), ("tcp_sendmsg", &[3])] {
            let params = btf.function_params(function).map_or(0, |p| p.len());
            if !counts.contains(&params) {
                return Err(ProbeError::Signature {
                    function,
                    params: format!("{params} parameters"),
                });
            }
        }
        signature("tcp_sendmsg", &["sk", "msg", "size"])?;
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        let iter_ptr = field("iov_iter", &["ubuf"])?;
        let iov = field("iov_iter", &["__iov"]).or_else(|_| field("iov_iter", &["iov"]))?;
        if iov != iter_ptr {
            return Err(ProbeError::Signature {
                function: "iov_iter",
                params: format!("ubuf at {iter_ptr}, iovec pointer at {iov}"),
            });
        }
        let kind = |value: &str| -> Result<u32, ProbeError> {
            Ok(btf.enum_value("iter_type", value)? as u32)
        };
        let mut offsets = Self::fields(&btf)?;
        offsets.iter = Some(IterOffsets {
            msg_iter: field("msghdr", &["msg_iter"])?,
            iter_type: field("iov_iter", &["iter_type"])?,
            iov_offset: field("iov_iter", &["iov_offset"])?,
            iter_ptr,
            ubuf: kind("ITER_UBUF")?,
            iovec: kind("ITER_IOVEC")?,
        });
        Ok(offsets)
    }

    /// The socket and task fields both sets read.
    fn fields(btf: &Btf) -> Result<Self, ProbeError> {
        let field = |ty: &str, path: &[&str]| btf.offset_of(ty, path);
        Ok(Self {
            sk_family: field("sock_common", &["skc_family"])?,
            sk_state: field("sock_common", &["skc_state"])?,
            sk_num: field("sock_common", &["skc_num"])?,
            sk_net: field("sock_common", &["skc_net", "net"])?,
            net_inum: field("net", &["ns", "inum"])?,
            sk_protocol: field("sock", &["sk_protocol"])?,
            inet_sport: field("inet_sock", &["inet_sport"])?,
            listen_overflow: ListenOverflow::read(btf),
            task: TaskOffsets::read(btf)?,
            regs_arg1: 0,
            unix: UnixOffsets::read(btf).unwrap_or_else(|err| {
                log::warn!("unix-domain connections are not counted: {err}");
                UnixOffsets::default()
            }),
            peek_regs: false,
            iter: None,
        })
    }
}

/// Offsets in tracepoint records, from tracefs.
pub(super) struct Offsets {
    pub(super) fork_child_pid: u32,
    pub(super) signal_sig: u32,
    pub(super) signal_pid: u32,
    pub(super) signal_result: u32,
}

impl Offsets {
    pub(super) fn read(tracefs: &Path) -> Result<Self, ProbeError> {
        let fork = Format::read(tracefs, "sched", "sched_process_fork")?;
        let signal = Format::read(tracefs, "signal", "signal_generate")?;
        Ok(Self {
            fork_child_pid: fork.offset("child_pid")?,
            signal_sig: signal.offset("sig")?,
            signal_pid: signal.offset("pid")?,
            signal_result: signal.offset("result")?,
        })
    }

    /// The kernel programs read syscall records at the fixed offsets of `syscall_layout` (a
    /// stable ABI): check that this syscall keeps its arguments (or ret) there.
    pub(super) fn check(tracefs: &Path, category: &str, name: &str) -> Result<(), ProbeError> {
        if category != "syscalls" {
            return Ok(());
        }
        let format = Format::read(tracefs, category, name)?;
        let checks: Vec<(String, u32, usize)> = if name.starts_with("sys_exit_") {
            vec![(
                "ret".to_string(),
                format.offset("ret")?,
                syscall_layout::RET,
            )]
        } else {
            let args = format.args();
            // The first is the descriptor every program reads.
            args.first().ok_or_else(|| TracefsError::MissingField {
                category: category.into(),
                name: name.into(),
                field: "fd".into(),
            })?;
            // Every argument: the recv family's programs read their flags too.
            args.iter()
                .enumerate()
                .map(|(n, (field, offset))| (field.to_string(), *offset, syscall_layout::arg(n)))
                .collect()
        };
        for (field, found, expected) in checks {
            if found as usize != expected {
                return Err(ProbeError::LayoutMismatch {
                    category: category.into(),
                    name: name.into(),
                    field,
                    found,
                    expected: expected as u32,
                });
            }
        }
        Ok(())
    }
}
