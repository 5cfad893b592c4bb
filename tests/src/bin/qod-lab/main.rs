//! `cargo xtask lab` (run by it after its set-up, with the release `qodd` built): QoS under congestion on a namespace lab, with and without sessions.
//!
//! Method: device / edge / server namespaces; `qodd` on the edge owns a 100 Mbit/s scheduler on
//! both edge interfaces (HTB from the default profile shares), offloads off so HTB sees real
//! frames. Each scenario runs for `--seconds`: 8 bulk TCP flows server → device (10.0.1.3), a
//! 64-byte UDP probe every 10 ms device 10.0.1.2 ⇄ server:7007 (RTT), and one rate-target TCP
//! flow server → device 10.0.1.4:9100. Scenarios: idle (probe alone), congested without sessions,
//! congested with a QOS_E session on the probe and a 20 Mbit/s guaranteed session on the target
//! flow, a 10 Mbit/s capped flow alone, and a 20 Mbit/s guarantee without a maximum (QOS_GU, no
//! CAMARA priority: it shares spare capacity equally with best effort) beside the bulk flows. Throughput is goodput measured by the receivers in
//! 100 ms samples, the first 2 s (slow start) left out. Plots go to target/qod-lab/.
//!
//! Then policing, on a second lab where `qodd` only marks (no `capacity_mbit`, so a maximum is
//! held by the classifier's policer): one TCP flow through a 20 Mbit/s maximum (QOS_G), against
//! the same flow through a hand-built 20 Mbit/s HTB class on the same interface (the reference,
//! run right after in the same lab), with the retransmits each caused; and a 30 Mbit/s UDP flow
//! through the same maximum (what is delivered must be the maximum).
//!
//! Then bursts and delivery ([`bursts`]): a bursty QOS_E flow within and beyond its allowance
//! against hand-built references, and flooded sessions' GetSession counters against their
//! receivers. `QOD_LAB_ONLY_POLICING=1` / `QOD_LAB_ONLY_BURSTS=1` run just those parts.

use std::{net::SocketAddr, path::Path, time::Duration};

use qod_testkit::{
    DEVICE_IF, EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, addr,
    api::{CONGESTION_PROFILES, ip, scheduled_interfaces, session},
    traffic::{Delivered, Probe, SAMPLE, tcp_flows, tcp_retransmits, udp_flood, udp_probe},
};

mod bursts;
mod svg;

use svg::{Series, chart};

const WARMUP: Duration = Duration::from_secs(2);

struct Outcome {
    name: &'static str,
    probe: Option<Probe>,
    target: Option<Delivered>,
    bulk: Option<Delivered>,
}

fn run_scenario(
    lab: &Lab,
    seconds: Duration,
    bulk: bool,
    probe: bool,
    target_port: Option<(&str, u16)>,
) -> anyhow::Result<(Option<Probe>, Option<Delivered>, Option<Delivered>)> {
    let bulk = bulk
        .then(|| {
            tcp_flows(
                &lab.server,
                ip(addr::SERVER_V4),
                &lab.device,
                SocketAddr::new(ip(addr::OTHER_DEVICE_V4), 9000),
                8,
                seconds,
            )
        })
        .transpose()?;
    let target = target_port
        .map(|(dev, port)| {
            tcp_flows(
                &lab.server,
                ip(addr::SERVER_V4),
                &lab.device,
                SocketAddr::new(ip(dev), port),
                1,
                seconds,
            )
        })
        .transpose()?;
    std::thread::sleep(Duration::from_millis(500));
    let probe = probe
        .then(|| {
            udp_probe(
                &lab.device,
                SocketAddr::new(ip(addr::DEVICE_V4), 7000),
                &lab.server,
                SocketAddr::new(ip(addr::SERVER_V4), 7007),
                Duration::from_millis(10),
                seconds.saturating_sub(Duration::from_secs(1)),
            )
        })
        .transpose()?;
    let join = |h: std::thread::JoinHandle<anyhow::Result<Delivered>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("flow thread panicked"))?
    };
    let probe = probe
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("probe panicked"))?)
        .transpose()?;
    Ok((
        probe,
        target.map(join).transpose()?,
        bulk.map(join).transpose()?,
    ))
}

/// One TCP flow server → 10.0.1.4:9100 for `seconds`: goodput (Mbit/s) and retransmits.
fn one_tcp_flow(lab: &Lab, seconds: Duration) -> anyhow::Result<(f64, u64)> {
    let before = tcp_retransmits(&lab.server)?;
    let got = tcp_flows(
        &lab.server,
        ip(addr::SERVER_V4),
        &lab.device,
        SocketAddr::new(ip("10.0.1.4"), 9100),
        1,
        seconds,
    )?
    .join()
    .map_err(|_| anyhow::anyhow!("flow thread panicked"))??;
    Ok((
        got.goodput_bps(WARMUP) / 1e6,
        tcp_retransmits(&lab.server)? - before,
    ))
}

/// The policing scenarios (see the module comment).
async fn policing(seconds: Duration) -> anyhow::Result<()> {
    let lab = Lab::new()?;
    lab.device
        .ip(&["addr", "add", "10.0.1.4/24", "dev", DEVICE_IF])?;
    let extra = std::env::var("QOD_LAB_POLICER_BURST_MS")
        .map(|ms| format!("policer_burst_ms = {ms}\n"))
        .unwrap_or_default();
    let qodd = Qodd::start_bin(
        &qod_testkit::release_bin("qodd"),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        &format!("{extra}{CONGESTION_PROFILES}"),
    )
    .await?;
    let mut api = qodd.sessions().await?;
    println!("policing lab up (no capacity: maximums are policed)");
    let s = api
        .create_session(session(
            "10.0.1.4",
            addr::SERVER_V4,
            "QOS_G",
            &[9100],
            &[],
            3600,
        ))
        .await?
        .into_inner();
    println!("scenario 5/7: one TCP flow through a policed 20 Mbit/s maximum");
    let (policed, policed_rtx) = one_tcp_flow(&lab, seconds)?;
    println!("scenario 6/7: 30 Mbit/s of UDP through the same maximum");
    let udp = udp_flood(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), 5555),
        &lab.device,
        SocketAddr::new(ip("10.0.1.4"), 9100),
        30_000_000,
        seconds,
    )?
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))??
    .goodput_bps(WARMUP)
        / 1e6;
    api.delete_session(qod_proto::v1::DeleteSessionRequest {
        session_id: s.session_id,
    })
    .await?;
    println!("scenario 7/7: the same TCP flow through a hand-built 20 Mbit/s HTB class");
    let tc = |args: &str| lab.edge.exec("tc", &args.split(' ').collect::<Vec<_>>());
    tc(&format!(
        "qdisc replace dev {EDGE_DEV_IF} root handle 1: htb default 1"
    ))?;
    tc(&format!(
        "class replace dev {EDGE_DEV_IF} parent 1: classid 1:1 htb rate 20mbit ceil 20mbit burst 15140 cburst 15140"
    ))?;
    let (htb, htb_rtx) = one_tcp_flow(&lab, seconds)?;
    tc(&format!("qdisc del dev {EDGE_DEV_IF} root"))?;
    let burst = std::env::var("QOD_LAB_POLICER_BURST_MS").unwrap_or_else(|_| "default".into());
    println!();
    println!("policer burst: {burst}");
    println!(
        "TCP through the policed 20 Mbit/s maximum: {policed:.2} Mbit/s, {policed_rtx} retransmits = {:.1}% of the HTB reference's {htb:.2} Mbit/s ({htb_rtx} retransmits)",
        policed / htb * 100.0
    );
    // The policer counts whole frames (skb->len): 1200 bytes of payload are a 1242-byte frame.
    let frames = udp * 1242.0 / 1200.0;
    println!(
        "UDP 30 Mbit/s offered through the 20 Mbit/s maximum: {udp:.2} Mbit/s of payload delivered, {frames:.2} Mbit/s of frames ({:+.1}% of the maximum)",
        (frames / 20.0 - 1.0) * 100.0
    );
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `qod-lab [SECONDS]`: seconds per scenario (default 10, at least 4).
fn main() -> anyhow::Result<()> {
    let seconds = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("seconds per scenario {s:?}: {e}"))?,
        None => 10,
    };
    run(seconds)
}

fn run(seconds: u64) -> anyhow::Result<()> {
    let seconds = Duration::from_secs(seconds.max(4));
    if std::env::var_os("QOD_LAB_ONLY_POLICING").is_some() {
        return tokio::runtime::Runtime::new()?.block_on(policing(seconds));
    }
    if std::env::var_os("QOD_LAB_ONLY_BURSTS").is_some() {
        return tokio::runtime::Runtime::new()?.block_on(bursts::bursts(seconds));
    }
    let out_dir = qod_testkit::workspace_root().join("target/qod-lab");
    std::fs::create_dir_all(&out_dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    let outcomes = rt.block_on(async {
        let lab = Lab::new()?;
        for extra in ["10.0.1.4/24", "10.0.1.5/24", "10.0.1.6/24"] {
            lab.device.ip(&["addr", "add", extra, "dev", DEVICE_IF])?;
        }
        let interfaces = scheduled_interfaces();
        let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
        let bin = qod_testkit::release_bin("qodd");
        let qodd = Qodd::start_bin(&bin, &lab.edge, &interfaces, CONGESTION_PROFILES).await?;
        let mut api = qodd.sessions().await?;
        println!("lab up: 100 Mbit/s scheduled bottleneck, {}s per scenario", seconds.as_secs());

        let mut outcomes = Vec::new();
        println!("scenario 1/7: idle (probe alone)");
        let (probe, _, _) = run_scenario(&lab, seconds, false, true, None)?;
        outcomes.push(Outcome { name: "idle", probe, target: None, bulk: None });
        println!("scenario 2/7: 8 bulk flows, no session");
        let (probe, target, bulk) = run_scenario(&lab, seconds, true, true, Some(("10.0.1.4", 9100)))?;
        outcomes.push(Outcome { name: "congested, no session", probe, target, bulk });
        println!("scenario 3/7: 8 bulk flows, QOS_E on the probe, 20 Mbit/s guaranteed on the target flow");
        api.create_session(session(addr::DEVICE_V4, addr::SERVER_V4, "QOS_E", &[], &[7007], 3600)).await?;
        api.create_session(session("10.0.1.4", addr::SERVER_V4, "QOS_G", &[9100], &[], 3600)).await?;
        let (probe, target, bulk) = run_scenario(&lab, seconds, true, true, Some(("10.0.1.4", 9100)))?;
        outcomes.push(Outcome { name: "congested, with sessions", probe, target, bulk });
        println!("scenario 4/7: one flow capped at 10 Mbit/s (QOS_C), alone");
        api.create_session(session("10.0.1.5", addr::SERVER_V4, "QOS_C", &[9300], &[], 3600)).await?;
        let (_, target, _) = run_scenario(&lab, seconds, false, false, Some(("10.0.1.5", 9300)))?;
        outcomes.push(Outcome { name: "capped 10 Mbit/s, alone", probe: None, target, bulk: None });
        println!("scenario 4b/7: a 20 Mbit/s guarantee without a maximum (QOS_GU) beside 8 bulk flows");
        api.create_session(session("10.0.1.6", addr::SERVER_V4, "QOS_GU", &[9400], &[], 3600)).await?;
        let (_, target, bulk) = run_scenario(&lab, seconds, true, false, Some(("10.0.1.6", 9400)))?;
        outcomes.push(Outcome { name: "guaranteed, no maximum", probe: None, target, bulk });
        anyhow::Ok(outcomes)
    })?;

    println!();
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>7} {:>14} {:>12}",
        "scenario", "p50 ms", "p99 ms", "max ms", "loss", "target Mbit/s", "bulk Mbit/s"
    );
    for o in &outcomes {
        let (p50, p99, max, loss) =
            o.probe
                .as_ref()
                .map_or(("-".into(), "-".into(), "-".into(), "-".into()), |p| {
                    (
                        ms(p.quantile(0.5)),
                        ms(p.quantile(0.99)),
                        ms(p.quantile(1.0)),
                        format!("{:.1}%", p.loss() * 100.0),
                    )
                });
        let mbps = |d: &Option<Delivered>| {
            d.as_ref().map_or("-".into(), |d| {
                format!("{:.2}", d.goodput_bps(WARMUP) / 1e6)
            })
        };
        println!(
            "{:<26} {p50:>9} {p99:>9} {max:>9} {loss:>7} {:>14} {:>12}",
            o.name,
            mbps(&o.target),
            mbps(&o.bulk)
        );
    }

    // RTT CDF.
    let cdf: Vec<Series> = outcomes
        .iter()
        .filter_map(|o| {
            let v = o.probe.as_ref()?.sorted();
            let n = v.len().max(1) as f64;
            Some(Series {
                name: o.name.into(),
                points: v
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d.as_secs_f64() * 1000.0, (i + 1) as f64 / n))
                    .collect(),
            })
        })
        .collect();
    let cdf_path = out_dir.join("rtt-cdf.svg");
    std::fs::write(
        &cdf_path,
        chart(
            "Probe RTT CDF (100 Mbit/s bottleneck, 8 bulk TCP flows)",
            "RTT (ms, log scale)",
            "fraction of probes",
            &cdf,
            true,
        ),
    )?;
    // Throughput over time.
    let mut tput = Vec::new();
    for o in &outcomes {
        for (what, d) in [("target", &o.target), ("bulk", &o.bulk)] {
            if let Some(d) = d {
                tput.push(Series {
                    name: format!("{what}: {}", o.name),
                    points: d
                        .samples
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            (
                                (i + 1) as f64 * SAMPLE.as_secs_f64(),
                                *b as f64 * 8.0 / SAMPLE.as_secs_f64() / 1e6,
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    let tput_path = out_dir.join("throughput.svg");
    std::fs::write(
        &tput_path,
        chart(
            "Goodput over time (100 ms samples)",
            "time (s)",
            "Mbit/s",
            &tput,
            false,
        ),
    )?;
    println!(
        "\nplots: {}\n       {}",
        display(&cdf_path),
        display(&tput_path)
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(policing(seconds))?;
    rt.block_on(bursts::bursts(seconds))
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
