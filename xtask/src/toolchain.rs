//! What the eBPF build needs and whether this machine has it: the nightly toolchain's `rust-src`
//! (aya-build runs `cargo +nightly build -Z build-std=core`), `bpf-linker`, and the same LLVM
//! major in both. Plain `std`, no dependencies: `xtask`'s set-up uses it to decide what to
//! install, and `qod-daemon/build.rs` includes this very file (`#[path]`) to stop a build on a
//! machine without the set-up with one clear line instead of aya-build's backtrace.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// The toolchain aya-build builds the classifier with.
pub const NIGHTLY: &str = "nightly";

/// What to tell someone whose machine lacks part of the eBPF toolchain.
pub const RUN_SETUP: &str =
    "run `cargo xtask setup` as root (every `cargo xtask` command runs it first), then build again";

/// Stdout of a successful run of `program args`, else `None`.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether rustup knows a nightly toolchain.
pub fn has_nightly() -> bool {
    output("rustup", &["toolchain", "list"])
        .is_some_and(|l| l.lines().any(|l| l.starts_with(NIGHTLY)))
}

/// The nightly toolchain's sysroot.
fn nightly_sysroot() -> Option<PathBuf> {
    output("rustup", &["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .map(|s| PathBuf::from(s.trim()))
}

/// Whether the nightly toolchain has `rust-src` (the sources `-Z build-std=core` compiles).
pub fn has_rust_src() -> bool {
    nightly_sysroot().is_some_and(|s| {
        s.join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
    })
}

/// `bpf-linker --version`, if it runs.
pub fn bpf_linker_version() -> Option<String> {
    output("bpf-linker", &["--version"]).map(|v| v.trim().to_owned())
}

/// The LLVM major version the nightly compiler emits.
pub fn nightly_llvm_major() -> Option<String> {
    let rustc = output("rustup", &["run", NIGHTLY, "rustc", "-vV"])?;
    rustc
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
}

/// The LLVM major version `bpf-linker` is linked against.
pub fn bpf_linker_llvm_major() -> Option<String> {
    let linker = output("sh", &["-c", "ldd \"$(command -v bpf-linker)\""])?;
    linker
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("libLLVM.so.")
                .or_else(|| w.strip_prefix("libLLVM-"))
        })
        .and_then(|v| v.split(['.', '-']).next())
        .map(str::to_owned)
}

/// One of Google's well-known protobuf types, where protoc looks for them by default.
const PROTOBUF_WELL_KNOWN: &str = "/usr/include/google/protobuf/descriptor.proto";

/// `Err(one line)` naming the first thing the build lacks, `Ok` when it has everything.
pub fn check() -> Result<(), String> {
    if !has_nightly() {
        return Err("no nightly Rust toolchain: the eBPF classifier is built with nightly (build-std). This machine kind ships one; qod's set-up does not fetch toolchains on purpose (a newer nightly's LLVM would not match bpf-linker's)".to_owned());
    }
    if !has_rust_src() {
        return Err(format!(
            "the nightly toolchain lacks rust-src, which the eBPF classifier's build needs: {RUN_SETUP}"
        ));
    }
    if bpf_linker_version().is_none() {
        return Err(format!(
            "bpf-linker is not installed (or cannot run), and the eBPF classifier's build needs it: {RUN_SETUP}"
        ));
    }
    let nightly = nightly_llvm_major()
        .ok_or("`rustc +nightly -vV` does not report its LLVM version".to_owned())?;
    let linker = bpf_linker_llvm_major().ok_or(
        "cannot tell which LLVM bpf-linker is linked against (ldd shows no libLLVM)".to_owned(),
    )?;
    if nightly != linker {
        return Err(format!(
            "LLVM mismatch: rustc +nightly emits LLVM {nightly} bitcode but bpf-linker uses LLVM {linker}. Use a nightly whose LLVM is {linker} (this machine kind's nightly 1.97 has LLVM 22), or rebuild bpf-linker against LLVM {nightly}"
        ));
    }
    if std::env::var_os("PROTOC").is_none() && output("protoc", &["--version"]).is_none() {
        return Err(format!(
            "protoc is not installed, and the etcd client's generated code needs it: {RUN_SETUP}"
        ));
    }
    // protoc alone is not enough: etcd's protos import Google's well-known types, which Debian
    // ships in libprotobuf-dev (a recommendation of protobuf-compiler, not a dependency).
    if std::env::var_os("PROTOC_INCLUDE").is_none()
        && !std::path::Path::new(PROTOBUF_WELL_KNOWN).exists()
    {
        return Err(format!(
            "{PROTOBUF_WELL_KNOWN} is missing (Debian's libprotobuf-dev), and the etcd client's protos import it: {RUN_SETUP}"
        ));
    }
    Ok(())
}
