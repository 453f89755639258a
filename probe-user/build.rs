//! Builds the kernel object from `probe-ebpf` (bpfel, `-Z build-std=core`) and leaves it in
//! OUT_DIR, where `include_bytes_aligned!` embeds it into the flyprobe binary.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "probe-ebpf")
        .ok_or_else(|| anyhow!("probe-ebpf not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("probe-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();

    // aya-build watches the kernel crate; the shared types live next door.
    println!("cargo:rerun-if-changed={root_dir}/../probe-common/src");

    // Build with the toolchain that builds us, on stable too: RUSTC_BOOTSTRAP lets it take
    // `-Z build-std=core` (rust-src and bpf-linker come from `cargo xtask setup`).
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    // SAFETY: build scripts are single-threaded; aya-build reads the variable below.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "probe-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF object (run `cargo xtask setup` if rust-src or bpf-linker is missing)",
    )
}
