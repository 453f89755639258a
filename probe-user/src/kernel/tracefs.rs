//! tracefs: mounted when missing (it is not at boot on some hosts), and the source of
//! tracepoint record layouts, which are not a stable ABI outside the syscall events.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::mount::{MsFlags, mount};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {path} and mounting it failed ({source}); mount it with \
         `mount -t tracefs tracefs {path}` or run flyprobe as root"
    )]
    Mount { path: PathBuf, source: nix::Error },
    #[error("{path} has no events/ directory after mounting tracefs: is CONFIG_FTRACE enabled?")]
    NoEvents { path: PathBuf },
    #[error(
        "this kernel has no tracepoint {category}:{name} ({path}){}",
        missing_hint(category)
    )]
    MissingTracepoint {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracepoint {category}:{name} has no field `{field}`")]
    MissingField {
        category: String,
        name: String,
        field: String,
    },
}

/// Make sure tracefs is mounted at `path`; mount it if not.
pub fn ensure_mounted(path: &Path) -> Result<(), TracefsError> {
    if path.join("events").is_dir() {
        return Ok(());
    }
    log::info!("tracefs is not mounted at {}: mounting it", path.display());
    mount(
        Some("tracefs"),
        path,
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| TracefsError::Mount {
        path: path.to_path_buf(),
        source,
    })?;
    if path.join("events").is_dir() {
        Ok(())
    } else {
        Err(TracefsError::NoEvents {
            path: path.to_path_buf(),
        })
    }
}

/// Field offsets of one tracepoint's record.
#[derive(Debug)]
pub struct Format {
    category: String,
    name: String,
    fields: Vec<(String, u32)>,
}

impl Format {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                TracefsError::MissingTracepoint {
                    category: category.into(),
                    name: name.into(),
                    path: path.clone(),
                }
            } else {
                TracefsError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Ok(Self::parse(category, name, &text))
    }

    /// Lines look like `\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;`.
    fn parse(category: &str, name: &str, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split(';').map(str::trim);
                let decl = parts.next()?.strip_prefix("field:")?;
                let field = decl.split_whitespace().last()?;
                let field = field.split('[').next()?.to_string();
                let offset = parts
                    .find_map(|p| p.strip_prefix("offset:"))?
                    .parse()
                    .ok()?;
                Some((field, offset))
            })
            .collect();
        Self {
            category: category.into(),
            name: name.into(),
            fields,
        }
    }

    pub fn offset(&self, field: &str) -> Result<u32, TracefsError> {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|&(_, off)| off)
            .ok_or_else(|| TracefsError::MissingField {
                category: self.category.clone(),
                name: self.name.clone(),
                field: field.into(),
            })
    }

    /// The fields after the common header: a syscall event's arguments, in order.
    pub fn args(&self) -> Vec<(&str, u32)> {
        self.fields
            .iter()
            .filter(|(f, _)| !f.starts_with("common_") && f != "__syscall_nr")
            .map(|(f, off)| (f.as_str(), *off))
            .collect()
    }
}

/// What a missing tracepoint's category means for the user.
fn missing_hint(category: &str) -> &'static str {
    match category {
        "sock" => {
            ": the socket hooks need Linux >= 6.3 (sock:sock_recv_length, sock_send_length); \
             use --hooks auto or --hooks syscall"
        }
        "syscalls" => ": the syscall hooks need a kernel built with CONFIG_FTRACE_SYSCALLS",
        _ => ": flyprobe needs the sched, signal and sock tracepoints",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from kernel 6.18, where comm became __data_loc and moved every later field.
    const FORK_6_18: &str = "name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    // The layout before 6.x: fixed char[16] comm arrays.
    const FORK_5_15: &str = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn reads_offsets_of_both_layouts() {
        let new = Format::parse("sched", "sched_process_fork", FORK_6_18);
        assert_eq!(new.offset("child_pid").unwrap(), 20);
        assert_eq!(new.offset("parent_comm").unwrap(), 8);
        let old = Format::parse("sched", "sched_process_fork", FORK_5_15);
        assert_eq!(old.offset("child_pid").unwrap(), 44);
        assert_eq!(old.offset("child_comm").unwrap(), 28);
    }

    #[test]
    fn first_field_skips_the_header() {
        let text = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:unsigned int fd;\toffset:16;\tsize:8;\tsigned:0;
";
        let f = Format::parse("syscalls", "sys_enter_close", text);
        assert_eq!(f.args(), vec![("fd", 16)]);
        assert!(matches!(
            f.offset("nope"),
            Err(TracefsError::MissingField { .. })
        ));
    }
}
