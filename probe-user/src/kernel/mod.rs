//! The kernel side, seen from userspace: tracefs and BTF (what this kernel has), the
//! embedded object loaded and attached (`probe`), its maps read and written (`maps`), their
//! memory, the listening sockets sock_diag reports (and those borrowed from another
//! network namespace), and the OpenSSL libraries `--tls` attaches to. Nothing here knows
//! about servers or workers.

pub mod borrowed;
pub mod btf;
pub mod maps;
pub mod memory;
pub mod openssl;
pub mod probe;
pub mod ring;
pub mod sock_diag;
pub mod tracefs;
