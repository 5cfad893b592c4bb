//! Bursts and delivery (#13 items 1 and 4), each qodd scenario beside a hand-built reference in
//! the same run.
//!
//! Method: the same three-namespace lab, 100 Mbit/s on the device side, 8 bulk TCP flows server →
//! 10.0.1.3, offloads off. The bursty flow sends 4 × 1,200 B back to back every 100 ms (400
//! kbit/s, inside QOS_E's 500) server → device; the over-allowance flow 40 × 1,200 B every second;
//! each datagram is echoed with its first 64 bytes, and both the round trip (the way back is not
//! congested) and the one-way delay to the echo's kernel receive timestamp are reported: the
//! second leaves out the wake-ups of the echo and of the probe's receiver, which compete with 16
//! bulk endpoints for two cores. The first burst is left out (neighbour resolution). The references
//! are a hand-built HTB tree of the same shape on a lab of their own (no qodd): a 500 kbit/s
//! prio-0 class steered by a u32 filter, with tc's default burst, then with a ten-frame burst,
//! both with the 50-packet FIFO qod used to give low-latency classes. Delivery: a QOS_E session
//! flooded at 20 Mbit/s and a QOS_C session (10 Mbit/s cap) flooded at 30 Mbit/s; what GetSession
//! reports against what the receivers counted.

use std::{net::SocketAddr, time::Duration};

use qod_testkit::{
    DEVICE_IF, EDGE_DEV_IF, Lab, Qodd, addr,
    api::{CONGESTION_PROFILES, ip, scheduled_interfaces, session},
    traffic::{Bursts, Delivered, Probe, tcp_flows, udp_bursts, udp_flood, udp_probe},
};

/// A burst shape and how often it is sent.
#[derive(Clone, Copy)]
struct Pattern {
    shape: Bursts,
    every: Duration,
}

/// 4 × 1,200 B every 100 ms (400 kbit/s, inside QOS_E's 500).
const SMALL: Pattern = Pattern {
    shape: Bursts {
        count: 4,
        size: 1200,
    },
    every: Duration::from_millis(100),
};
/// 40 × 1,200 B every second (384 kbit/s on average, 48 KB at once).
const LARGE: Pattern = Pattern {
    shape: Bursts {
        count: 40,
        size: 1200,
    },
    every: Duration::from_secs(1),
};

fn join<T>(h: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
}

/// Bursts of `pattern` server:`port` → `device`:7000 for `seconds`, with or without 8 bulk
/// flows beside them; the first burst left out.
fn run_bursts(
    lab: &Lab,
    (device, port): (&str, u16),
    Pattern { shape, every }: Pattern,
    seconds: Duration,
    congested: bool,
) -> anyhow::Result<Probe> {
    let bulk = congested
        .then(|| {
            tcp_flows(
                &lab.server,
                ip(addr::SERVER_V4),
                &lab.device,
                SocketAddr::new(ip(addr::OTHER_DEVICE_V4), 9000),
                8,
                seconds + Duration::from_secs(1),
            )
        })
        .transpose()?;
    std::thread::sleep(Duration::from_millis(500));
    let probe = join(udp_bursts(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), port),
        &lab.device,
        SocketAddr::new(ip(device), 7000),
        shape,
        every,
        seconds,
    )?)?;
    if let Some(b) = bulk {
        let _: Delivered = join(b)?;
    }
    Ok(probe.skip(shape.count))
}

fn row(name: &str, p: &Probe) {
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    let answered = p.sorted();
    let late = answered
        .iter()
        .filter(|d| **d > Duration::from_millis(1))
        .count() as f64
        / answered.len().max(1) as f64;
    println!(
        "{name:<58} {:>8} {:>8} {:>8} {:>8} {:>7.1}% {:>7.2}%",
        ms(p.quantile(0.5)),
        ms(p.quantile(0.95)),
        ms(p.quantile(0.99)),
        ms(p.quantile(1.0)),
        p.loss() * 100.0,
        late * 100.0
    );
}

fn lab_with_devices() -> anyhow::Result<Lab> {
    let lab = Lab::new()?;
    for extra in ["10.0.1.4/24", "10.0.1.5/24", "10.0.1.6/24"] {
        lab.device.ip(&["addr", "add", extra, "dev", DEVICE_IF])?;
    }
    Ok(lab)
}

/// The hand-built tree on the device side: capacity, best effort (default, 1000-packet FIFO)
/// and a 500 kbit/s prio-0 class 1:100 (`burst`: tc's default when `None`) with a 50-packet
/// FIFO, steered by source port `port`.
fn reference_tree(lab: &Lab, burst: Option<u32>, port: u16) -> anyhow::Result<()> {
    let tc = |args: String| -> anyhow::Result<()> {
        lab.edge
            .exec("tc", &args.split(' ').collect::<Vec<_>>())
            .map(drop)
    };
    let _ = lab
        .edge
        .exec("tc", &["qdisc", "del", "dev", EDGE_DEV_IF, "root"]);
    tc(format!(
        "qdisc add dev {EDGE_DEV_IF} root handle 1: htb default 20"
    ))?;
    tc(format!(
        "class add dev {EDGE_DEV_IF} parent 1: classid 1:1 htb rate 100mbit ceil 100mbit burst 15140 cburst 15140"
    ))?;
    tc(format!(
        "class add dev {EDGE_DEV_IF} parent 1:1 classid 1:20 htb rate 89mbit ceil 100mbit burst 15140 cburst 15140 prio 7"
    ))?;
    tc(format!(
        "qdisc add dev {EDGE_DEV_IF} parent 1:20 handle 20: pfifo limit 1000"
    ))?;
    let burst = burst.map_or(String::new(), |b| format!(" burst {b} cburst {b}"));
    tc(format!(
        "class add dev {EDGE_DEV_IF} parent 1:1 classid 1:100 htb rate 500kbit ceil 500kbit{burst} prio 0"
    ))?;
    tc(format!(
        "qdisc add dev {EDGE_DEV_IF} parent 1:100 handle 100: pfifo limit 50"
    ))?;
    tc(format!(
        "filter add dev {EDGE_DEV_IF} parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:100"
    ))
}

/// The burst scenarios (see the module comment).
pub async fn bursts(seconds: Duration) -> anyhow::Result<()> {
    println!();
    println!("bursts: references on a hand-built tree (no qodd)");
    let reference = lab_with_devices()?;
    reference_tree(&reference, None, 7101)?;
    let ref_default = run_bursts(&reference, (addr::DEVICE_V4, 7101), SMALL, seconds, true)?;
    reference_tree(&reference, Some(15_140), 7101)?;
    let ref_frames = run_bursts(&reference, (addr::DEVICE_V4, 7101), SMALL, seconds, true)?;
    let ref_over = run_bursts(&reference, (addr::DEVICE_V4, 7101), LARGE, seconds, true)?;
    drop(reference);

    println!("bursts: qodd, both interfaces scheduled");
    let lab = lab_with_devices()?;
    let interfaces = scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let qodd = Qodd::start_bin(
        &qod_testkit::release_bin("qodd"),
        &lab.edge,
        &interfaces,
        CONGESTION_PROFILES,
    )
    .await?;
    let mut api = qodd.sessions().await?;
    let mut create = async |device: &str, profile: &str, port: u32| {
        anyhow::Ok(
            api.create_session(session(
                device,
                addr::SERVER_V4,
                profile,
                &[],
                &[port],
                3600,
            ))
            .await?
            .into_inner(),
        )
    };
    create(addr::DEVICE_V4, "QOS_E", 7101).await?;
    create("10.0.1.4", "QOS_E", 7102).await?;
    create("10.0.1.5", "QOS_E", 7103).await?;
    let flooded = create("10.0.1.6", "QOS_E", 7105).await?;
    let capped = create(addr::DEVICE_V4, "QOS_C", 7106).await?;
    let idle = run_bursts(&lab, (addr::DEVICE_V4, 7101), SMALL, seconds, false)?;
    let small = run_bursts(&lab, (addr::DEVICE_V4, 7101), SMALL, seconds, true)?;
    // Beyond the allowance, with a neighbouring QOS_E probe (64 B every 10 ms).
    let neighbour = udp_probe(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), 7103),
        &lab.device,
        SocketAddr::new(ip("10.0.1.5"), 7000),
        Duration::from_millis(10),
        seconds + Duration::from_millis(500),
    )?;
    let over = run_bursts(&lab, ("10.0.1.4", 7102), LARGE, seconds, true)?;
    let neighbour = join(neighbour)?;

    let rows = [
        ("4 x 1200 B / 100 ms, idle, qodd QOS_E", &idle),
        (
            "4 x 1200 B / 100 ms, 8 bulk, reference, tc default burst",
            &ref_default,
        ),
        (
            "4 x 1200 B / 100 ms, 8 bulk, reference, 10-frame burst",
            &ref_frames,
        ),
        ("4 x 1200 B / 100 ms, 8 bulk, qodd QOS_E", &small),
        (
            "40 x 1200 B / 1 s, 8 bulk, reference (10 frames, 50p FIFO)",
            &ref_over,
        ),
        ("40 x 1200 B / 1 s, 8 bulk, qodd QOS_E", &over),
        ("  its QOS_E neighbour, 64 B / 10 ms", &neighbour),
    ];
    for (title, one_way) in [
        ("bursty flow (RTT)", false),
        ("bursty flow (one way)", true),
    ] {
        println!();
        println!(
            "{title:<58} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "p50 ms", "p95 ms", "p99 ms", "max ms", "loss", "> 1 ms"
        );
        for (name, probe) in rows {
            row(
                name,
                &if one_way {
                    probe.one_way()
                } else {
                    probe.clone()
                },
            );
        }
    }
    let (idle_p99, small_p99) = (
        idle.one_way().quantile(0.99),
        small.one_way().quantile(0.99),
    );
    println!(
        "bursty flow under 8 bulk flows, one way: p99 {:.2} ms, {:+.2} ms from idle (goal: within 1 ms)",
        small_p99.as_secs_f64() * 1000.0,
        (small_p99.as_secs_f64() - idle_p99.as_secs_f64()) * 1000.0
    );

    // Delivery: GetSession against the receivers.
    let flood = |port: u16, device: &str, rate: u64| {
        udp_flood(
            &lab.server,
            SocketAddr::new(ip(addr::SERVER_V4), port),
            &lab.device,
            SocketAddr::new(ip(device), 7300),
            rate,
            seconds,
        )
    };
    let (a, b) = (
        flood(7105, "10.0.1.6", 20_000_000)?,
        flood(7106, addr::DEVICE_V4, 30_000_000)?,
    );
    let ids = [flooded.session_id, capped.session_id];
    let mut reports = Vec::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &ids {
        qod_testkit::session_info(&mut api, id).await;
    }
    tokio::time::sleep(seconds.saturating_sub(Duration::from_secs(2))).await;
    for id in &ids {
        reports.push(qod_testkit::session_info(&mut api, id).await);
    }
    let received = [join(a)?, join(b)?];
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!();
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>10} {:>10} {:>14} {:>12}",
        "flooded session",
        "received",
        "delivered",
        "diff",
        "queue drop",
        "policed",
        "achieved",
        "granted max"
    );
    for (n, (name, id)) in [
        ("QOS_E, 20 Mbit/s offered", &ids[0]),
        ("QOS_C, 30 Mbit/s offered", &ids[1]),
    ]
    .into_iter()
    .enumerate()
    {
        let end = qod_testkit::session_info(&mut api, id).await;
        let down = end.counters.and_then(|c| c.downlink).unwrap_or_default();
        let class = down.class.unwrap_or_default();
        let mid = reports[n]
            .counters
            .and_then(|c| c.downlink)
            .unwrap_or_default();
        let got = received[n].bytes[0] / 1200;
        println!(
            "{name:<30} {got:>10} {:>10} {:>7.2}% {:>10} {:>10} {:>9.3} Mbit/s {:>7.3} Mbit/s",
            class.delivered_packets,
            (class.delivered_packets as f64 - got as f64) / got.max(1) as f64 * 100.0,
            class.queue_dropped_packets,
            down.policer_dropped_packets,
            mid.achieved_bps.unwrap_or(0) as f64 / 1e6,
            mid.granted_max_bps.unwrap_or(0) as f64 / 1e6,
        );
    }
    Ok(())
}
