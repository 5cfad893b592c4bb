//! Installs what building and testing qod needs, idempotently:
//! Debian packages (LLVM 22 for bpf-linker, iproute2, ethtool), the nightly toolchain's
//! `rust-src`, and `bpf-linker` built against LLVM 22. It never installs or updates a toolchain:
//! a newer nightly would bring an LLVM that this bpf-linker cannot read.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};

const APT_PACKAGES: &[&str] = &["llvm-22-dev", "iproute2", "ethtool", "procps"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    ensure!(
        nix_is_root(),
        "qod's set-up installs system packages, and its demo and tests create network namespaces and load eBPF: run as root (e.g. `sudo -E cargo xtask ...`)"
    );
    apt(APT_PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    llvm_match()
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start: {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing.
pub fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is not installed")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly Rust toolchain: the eBPF classifier is built with nightly (build-std). This machine kind ships one; qod's set-up does not fetch toolchains on purpose (a newer nightly's LLVM would not match bpf-linker's)."
        );
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run_cmd(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src",
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    run_cmd(
        Command::new("cargo").env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]),
        "cargo install bpf-linker",
    )
}

/// The LLVM major version the nightly compiler emits must be one bpf-linker can read.
fn llvm_match() -> anyhow::Result<()> {
    let rustc = output("rustc", &["+nightly", "-vV"]).context("cannot run rustc +nightly")?;
    let nightly_major = rustc
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV does not report its LLVM version")?;
    let linker = output("sh", &["-c", "ldd \"$(command -v bpf-linker)\""]).unwrap_or_default();
    let linker_major = linker
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("libLLVM.so.")
                .or_else(|| w.strip_prefix("libLLVM-"))
        })
        .and_then(|v| v.split(['.', '-']).next())
        .map(str::to_owned)
        .context("cannot tell which LLVM bpf-linker is linked against (ldd shows no libLLVM)")?;
    ensure!(
        nightly_major == linker_major,
        "LLVM mismatch: rustc +nightly emits LLVM {nightly_major} bitcode but bpf-linker uses LLVM {linker_major}. Use a nightly whose LLVM is {linker_major} (this machine kind's nightly 1.97 has LLVM 22), or rebuild bpf-linker against LLVM {nightly_major}."
    );
    Ok(())
}
