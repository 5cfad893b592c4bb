//! `cargo xtask`: set-up, demo, tests and lints for qod.
//!
//! Every command first makes sure the machine has what qod needs (see [`setup`]); that check is
//! idempotent and takes well under a second when everything is present.
//!
//! This binary must build on a machine with none of the eBPF toolchain, since installing it is
//! its first job: it links nothing of qod's (no daemon, no test kit). The demo and the lab are
//! binaries of the test kit (`tests/src/bin/`), which it builds and runs after the set-up.

mod setup;
mod toolchain;

use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker) and check versions.
    Setup,
    /// Build qodd and run it on a throwaway namespace lab: create a session, show packets marked.
    Demo,
    /// QoS under congestion on a namespace lab, with and without sessions: a table and SVG plots
    /// under target/qod-lab/.
    Lab {
        /// Seconds per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Build the Debian package (qodd, qodctl, the systemd unit, /etc/qodd/qodd.toml as a
    /// conffile) under target/debian/.
    Package,
    /// Run the whole test suite (unit, classifier and namespace end-to-end tests, and the
    /// package's contents). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: classifier ns/packet at 1..1M sessions; eBPF vs nftables vs iptables marking
    /// in the forwarding path; durable creates/s over gRPC; restart recovery with 100k and 1M
    /// sessions; an expiry storm seen by watchers; open-loop creates at 1k/2k/5k per second;
    /// creates beside 0/100/1,000 watchers; a reload, a link flap and memory at scale. Needs
    /// root. `-- classifier`, `-- forwarding`, `-- classes`, `-- creates`, `-- recovery`,
    /// `-- storm`, `-- openloop`, `-- watchers`, `-- reload`, `-- linkflap` or `-- scale` runs
    /// one part.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy (user space, then the eBPF crate alone).
    Lint,
}

/// The release `qodd` and `qodctl` the demo, the lab and the benchmarks run.
fn build_release() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--package", "qod-daemon", "--bins"])
}

/// The release build packaged with cargo-deb; returns the .deb's path.
fn package() -> anyhow::Result<std::path::PathBuf> {
    setup::cargo_deb()?;
    build_release()?;
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["deb", "--package", "qod-daemon", "--no-build", "--no-strip"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo deb")?;
    ensure!(out.status.success(), "cargo deb failed");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| std::path::PathBuf::from(l.trim()))
        .context("cargo deb printed no package path")?;
    Ok(path)
}

/// Builds and runs a binary of the test kit (release), after the set-up and the release build.
fn run_testkit_bin(bin: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec![
        "run",
        "--quiet",
        "--release",
        "--package",
        "qod-testkit",
        "--bin",
        bin,
    ];
    if !args.is_empty() {
        all.push("--");
        all.extend(args);
    }
    cargo(&all)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Demo => {
            setup::run()?;
            build_release()?;
            run_testkit_bin("qod-demo", &[])
        }
        Cmd::Lab { seconds } => {
            setup::run()?;
            build_release()?;
            run_testkit_bin("qod-lab", &[&seconds.to_string()])
        }
        Cmd::Package => {
            setup::run()?;
            let deb = package()?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Test { args } => {
            setup::run()?;
            // The package's contents are part of the suite (tests/tests/service.rs).
            let deb = package()?;
            // The REST API is run against CAMARA's OpenAPI (tests/tests/schemathesis.rs).
            let st = setup::schemathesis()?;
            // The cluster tests run a real etcd cluster (tests/tests/cluster.rs).
            setup::apt(&["etcd-server", "etcd-client"])?;
            cargo(&["build", "--package", "qod-daemon", "--bins"])?;
            let mut all = vec!["test", "--workspace", "--exclude", "qod-ebpf"];
            all.extend(args.iter().map(String::as_str));
            cargo_test(
                &all,
                &[
                    ("QOD_DEB", deb.as_os_str()),
                    ("QOD_SCHEMATHESIS", st.as_os_str()),
                ],
            )
        }
        Cmd::Bench { args } => {
            setup::run()?;
            setup::apt(&["nftables", "iptables"])?;
            // The durability benchmark runs the release qodd.
            build_release()?;
            let mut all = vec![
                "bench",
                "--package",
                "qod-testkit",
                "--bench",
                "dataplane",
                "--bench",
                "durability",
                "--",
            ];
            all.extend(args.iter().map(String::as_str));
            cargo(&all)
        }
        Cmd::Lint => {
            setup::run()?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "qod-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            let ebpf = workspace_root().join("qod-ebpf");
            let status = Command::new("cargo")
                .current_dir(&ebpf)
                .args([
                    "+nightly",
                    "clippy",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ])
                .status()
                .context("run cargo clippy for qod-ebpf")?;
            ensure!(status.success(), "clippy on qod-ebpf failed");
            Ok(())
        }
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `cargo test`, passing its output through, and closes with one line totalling every test
/// binary's result (cargo prints one `test result:` line per binary).
fn cargo_test(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(what)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    println!("qod: {passed} passed, {failed} failed, {ignored} skipped");
    ensure!(status.success(), "cargo test failed");
    Ok(())
}

/// Runs cargo in the workspace root with inherited output.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(args)
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}
