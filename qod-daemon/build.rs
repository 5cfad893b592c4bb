//! Builds the eBPF classifier (qod-ebpf) for the BPF target with aya-build, as aya-template does.
//!
//! First it checks that the machine has the eBPF toolchain (nightly `rust-src`, `bpf-linker`, the
//! same LLVM in both) with the set-up's own check, and stops with one line saying to run the
//! set-up when it does not, instead of aya-build's backtrace.
use anyhow::{Context as _, anyhow};

#[path = "../xtask/src/toolchain.rs"]
mod toolchain;

fn main() -> anyhow::Result<()> {
    if let Err(missing) = toolchain::check() {
        println!("cargo::error=qod: {missing}");
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("qod-daemon has no parent directory"))?
        .join("qod-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "qod-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
