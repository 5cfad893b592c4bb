//! The demo: a throwaway device / edge / server lab, `qodd` on the edge with the default
//! configuration, a session created with `qodctl`, packets shown marked and counted on the wire,
//! then deleted and shown unmarked. The lab is removed at the end, also on error or Ctrl-C.
//!
//! Run by `cargo xtask demo` after its set-up, with the release `qodd` and `qodctl` built.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{Context as _, ensure};
use qod_testkit::{Capture, EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, SERVER_IF, Seen, addr, udp_send};

/// Runs `qodctl` against `qodd` over TLS (its dev CA) with the token in `token_file`.
fn qodctl(qodd: &Qodd, token_file: &Path, args: &[&str]) -> anyhow::Result<String> {
    println!("\n$ qodctl {}", args.join(" "));
    let out = Command::new(qod_testkit::release_bin("qodctl"))
        .env("QODCTL_ADDR", qodd.addr())
        .env("QODCTL_CA", qodd.pki.path("ca.crt"))
        .env("QODCTL_TOKEN_FILE", token_file)
        .args(args)
        .output()
        .context("run qodctl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "qodctl {} failed", args.join(" "));
    Ok(text)
}

fn dscp_name(d: u8) -> &'static str {
    match d {
        0 => "DF",
        8 => "CS1",
        10 => "AF11",
        18 => "AF21",
        24 => "CS3",
        26 => "AF31",
        32 => "CS4",
        40 => "CS5",
        46 => "EF",
        56 => "CS7",
        _ => "",
    }
}

fn summarize(seen: &[Seen]) {
    let mut flows: Vec<(String, u8, usize, usize)> = Vec::new();
    for p in seen.iter().filter(|p| p.protocol == 17) {
        let key = format!("udp {}:{} -> {}:{}", p.src, p.sport, p.dst, p.dport);
        match flows.iter_mut().find(|f| f.0 == key && f.1 == p.dscp) {
            Some(f) => {
                f.2 += 1;
                f.3 += p.frame_len;
            }
            None => flows.push((key, p.dscp, 1, p.frame_len)),
        }
    }
    for (flow, dscp, n, bytes) in flows {
        println!(
            "  {flow:<42} {n:>3} packets {bytes:>6} bytes  DSCP {dscp:>2} {}",
            dscp_name(dscp)
        );
    }
}

fn traffic(lab: &Lab) -> anyhow::Result<()> {
    let sa = |ip: &str, port: u16| -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::new(ip.parse()?, port))
    };
    let capture = Capture::start(&lab.server, SERVER_IF)?;
    udp_send(
        &lab.device,
        sa(addr::DEVICE_V4, 40000)?,
        sa(addr::SERVER_V4, 5000)?,
        10,
        200,
    )?;
    udp_send(
        &lab.device,
        sa(addr::DEVICE_V4, 40001)?,
        sa(addr::SERVER_V4, 6000)?,
        10,
        200,
    )?;
    println!("\nreceived by the server ({SERVER_IF}):");
    summarize(&capture.finish()?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    // On Ctrl-C the demo future is dropped, and with it the lab and qodd (their Drop cleans up).
    runtime.block_on(async {
        tokio::select! {
            result = demo() => result,
            _ = tokio::signal::ctrl_c() => {
                println!("\ninterrupted; removing the lab");
                Ok(())
            }
        }
    })
}

async fn demo() -> anyhow::Result<()> {
    {
        println!(
            "building the lab: device ({}) <-> edge running qodd <-> server ({})",
            addr::DEVICE_V4,
            addr::SERVER_V4
        );
        let lab = Lab::new()?;
        println!(
            "namespaces: {} {} {}",
            lab.device.name, lab.edge.name, lab.server.name
        );
        let qodd = Qodd::start_bin(
            &qod_testkit::release_bin("qodd"),
            &lab.edge,
            &[EDGE_DEV_IF, EDGE_SRV_IF],
            "",
        )
        .await?;
        let api = qodd.addr();
        println!(
            "qodd is up on {api} (TLS, access tokens required), managing {EDGE_DEV_IF} and {EDGE_SRV_IF}"
        );
        // The dev helper mints a token from the lab's DEV-ONLY key (qodd warns it trusts it).
        let dir = qodd.pki.dir.display().to_string();
        let token = qodctl(
            &qodd,
            Path::new("/dev/null"),
            &["dev", "token", "--dir", &dir, "--client", "demo-app"],
        )?;
        let token_file = qodd.dir.path().join("demo-app.token");
        std::fs::write(&token_file, token.trim())?;

        qodctl(&qodd, &token_file, &["profiles"])?;
        println!("\nbefore any session, nothing is marked:");
        traffic(&lab)?;

        let created = qodctl(
            &qodd,
            &token_file,
            &[
                "--json",
                "create",
                "--device-ipv4",
                addr::DEVICE_V4,
                "--server-ipv4",
                addr::SERVER_V4,
                "--server-ports",
                "5000",
                "--profile",
                "QOS_E",
                "--duration",
                "120",
            ],
        )?;
        let created: serde_json::Value =
            serde_json::from_str(&created).context("qodctl --json output")?;
        let id = created["sessionId"]
            .as_str()
            .context("no sessionId in qodctl output")?
            .to_owned();

        println!(
            "\nwith the QOS_E session, its flow (to port 5000) carries DSCP 32 (CS4); port 6000 does not:"
        );
        traffic(&lab)?;
        qodctl(&qodd, &token_file, &["get", &id])?;

        qodctl(&qodd, &token_file, &["delete", &id])?;
        println!("\nafter delete, nothing is marked again:");
        traffic(&lab)?;

        let mut qodd = qodd;
        let status = qodd.stop();
        println!(
            "\nqodd stopped ({}); removing the lab",
            status.map_or("unknown".into(), |s| s.to_string())
        );
        Ok(())
    }
}
