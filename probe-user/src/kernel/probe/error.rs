//! Why the kernel object did not load or attach, and how such errors are told in one line.

use aya::{EbpfError, maps::MapError, programs::ProgramError};
use thiserror::Error;

use crate::kernel::{btf::BtfError, maps::TakeError, tracefs::TracefsError};

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "tracepoint {category}:{name} keeps `{field}` at offset {found}, where the shared \
         program expects {expected}"
    )]
    LayoutMismatch {
        category: String,
        name: String,
        field: String,
        found: u32,
        expected: u32,
    },
    #[error("loading the eBPF object into the kernel")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no program `{name}`")]
    MissingProgram { name: &'static str },
    #[error("loading program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {category}:{tracepoint}")]
    Attach {
        program: &'static str,
        category: &'static str,
        tracepoint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(transparent)]
    TakeMap(#[from] TakeError),
    #[error("the kernel's BTF has no function {function}: the fentry hooks need it")]
    NoFunction { function: &'static str },
    #[error("{function}({params}) is not what the fentry hooks read")]
    Signature {
        function: &'static str,
        params: String,
    },
    #[error("opening map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

pub(super) fn program_error(name: &'static str, e: ProgramError) -> ProbeError {
    ProbeError::Program {
        name,
        source: Box::new(e),
    }
}

/// `e` and every error under it, on one line.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// The first line of `e` and its causes (a verifier's log is long), and the verifier's
/// verdict from its end.
pub(super) fn first_line(e: &dyn std::error::Error) -> String {
    let text = causes(e);
    let line = text.lines().next().unwrap_or_default();
    // The verifier's verdict is the line before its closing statistics ("R2 unbounded
    // memory access, …" on 6.1); matching words missed that one.
    let lines: Vec<&str> = text.lines().collect();
    let verdict = lines
        .iter()
        .position(|l| l.trim_start().starts_with("verification time"))
        .and_then(|at| lines[..at].iter().rev().find(|l| !l.trim().is_empty()))
        .copied()
        .unwrap_or_default();
    format!("{line} … {verdict}")
}
