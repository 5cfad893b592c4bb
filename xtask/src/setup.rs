//! Installs what building and testing qod needs, idempotently:
//! Debian packages (LLVM 22 for bpf-linker, iproute2, ethtool, protoc), the nightly toolchain's
//! `rust-src`, and `bpf-linker` built against LLVM 22. It never installs or updates a toolchain:
//! a newer nightly would bring an LLVM that this bpf-linker cannot read.

use std::process::{Command, Stdio};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::toolchain;

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "ethtool",
    "procps",
    // protoc, for the etcd client's generated code, and the well-known types its protos import
    // (a recommendation of protobuf-compiler, so not there with --no-install-recommends).
    "protobuf-compiler",
    "libprotobuf-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "qod's set-up installs system packages, and its demo and tests create network namespaces and load eBPF: run as root (e.g. `sudo -E cargo xtask ...`)"
    );
    apt(APT_PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    toolchain::check().map_err(|e| anyhow!(e))
}

fn is_root() -> bool {
    toolchain::output("id", &["-u"]).is_some_and(|o| o.trim() == "0")
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
            toolchain::output("dpkg-query", &["-W", "-f=${Status}", p])
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
    if !toolchain::has_nightly() {
        // check() words it.
        bail!(toolchain::check().err().unwrap_or_default());
    }
    if toolchain::has_rust_src() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run_cmd(
        Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain::NIGHTLY,
        ]),
        "rustup component add rust-src",
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    if toolchain::bpf_linker_version().is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
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

/// cargo-deb, which `cargo xtask package` builds the Debian package with.
pub fn cargo_deb() -> anyhow::Result<()> {
    if toolchain::output("cargo", &["deb", "--version"])
        .is_some_and(|v| v.contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} (a minute or two, once)");
    run_cmd(
        Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]),
        "cargo install cargo-deb",
    )
}

const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Schemathesis (PyPI), which the REST conformance test runs against CAMARA's OpenAPI files, in
/// a virtual environment of its own; returns the path of its `st`.
pub fn schemathesis() -> anyhow::Result<std::path::PathBuf> {
    let venv = std::path::PathBuf::from(format!(
        "/var/cache/qod/schemathesis-{SCHEMATHESIS_VERSION}"
    ));
    let st = venv.join("bin/st");
    let st_text = st.to_string_lossy().into_owned();
    if toolchain::output(&st_text, &["--version"]).is_some_and(|v| v.contains(SCHEMATHESIS_VERSION))
    {
        return Ok(st);
    }
    eprintln!("setup: installing schemathesis {SCHEMATHESIS_VERSION} from PyPI (about 30 s, once)");
    let venv_text = venv.to_string_lossy().into_owned();
    run_cmd(
        Command::new("python3").args(["-m", "venv", "--clear", &venv_text]),
        "python3 -m venv",
    )?;
    run_cmd(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        ]),
        "pip install schemathesis",
    )?;
    ensure!(
        toolchain::output(&st_text, &["--version"])
            .is_some_and(|v| v.contains(SCHEMATHESIS_VERSION)),
        "schemathesis {SCHEMATHESIS_VERSION} was installed but {st_text} --version does not say so"
    );
    Ok(st)
}
