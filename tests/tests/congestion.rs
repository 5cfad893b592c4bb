//! QoS under congestion, on the namespace lab: qodd owns a 100 Mbit/s bottleneck (HTB on the
//! edge's device-facing egress) while 8 bulk TCP flows fill it. Margins are generous on purpose:
//! the measured numbers go to the benchmark document, not into assertions. Needs root.

use std::{net::SocketAddr, time::Duration};

use qod_proto::v1 as pb;
use qod_testkit::{
    EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, DEVICE_IF, addr,
    traffic::{Delivered, Probe, tcp_flows, udp_probe},
};

const PHASE: Duration = Duration::from_secs(6);
const WARMUP: Duration = Duration::from_secs(2);

fn config() -> String {
    r#"
[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
max_downstream_rate = { value = 500, unit = "kbps" }
max_upstream_rate = { value = 500, unit = "kbps" }

[[profiles]]
name = "QOS_G"
status = "ACTIVE"
service_class = "high_throughput_data"
target_min_downstream_rate = { value = 20, unit = "Mbps" }
max_downstream_rate = { value = 40, unit = "Mbps" }
target_min_upstream_rate = { value = 1, unit = "Mbps" }

[[profiles]]
name = "QOS_C"
status = "ACTIVE"
band = "best_effort"
max_downstream_rate = { value = 10, unit = "Mbps" }
"#
    .into()
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}

fn session(device: &str, profile: &str, device_ports: Option<u32>, server_ports: Option<u32>) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device: Some(pb::Device {
            ipv4_address: Some(pb::DeviceIpv4Addr {
                public_address: Some(device.into()),
                private_address: Some(device.into()),
                public_port: None,
            }),
            ..Default::default()
        }),
        application_server: Some(pb::ApplicationServer { ipv4_address: Some(addr::SERVER_V4.into()), ..Default::default() }),
        device_ports: device_ports.map(|p| pb::PortsSpec { ports: vec![p], ranges: vec![] }),
        application_server_ports: server_ports.map(|p| pb::PortsSpec { ports: vec![p], ranges: vec![] }),
        qos_profile: profile.into(),
        duration: 600,
        ..Default::default()
    }
}

/// 8 bulk flows server → 10.0.1.3 and a 10 ms probe 10.0.1.2 ⇄ server:7007, for one phase.
fn congested_probe(lab: &Lab) -> (Probe, Delivered) {
    let bulk = tcp_flows(&lab.server, ip(addr::SERVER_V4), &lab.device, SocketAddr::new(ip(addr::OTHER_DEVICE_V4), 9000), 8, PHASE)
        .expect("bulk flows");
    std::thread::sleep(Duration::from_millis(500));
    let probe = udp_probe(
        &lab.device,
        SocketAddr::new(ip(addr::DEVICE_V4), 7000),
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), 7007),
        Duration::from_millis(10),
        PHASE - Duration::from_secs(1),
    )
    .expect("probe")
    .join()
    .expect("probe thread")
    .expect("probe");
    (probe, bulk.join().expect("bulk thread").expect("bulk"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_hold_their_promise_under_congestion() {
    assert!(nix::unistd::Uid::effective().is_root(), "run as root (cargo xtask test)");
    let lab = Lab::new().expect("lab");
    for extra in ["10.0.1.4/24", "10.0.1.5/24"] {
        lab.device.ip(&["addr", "add", extra, "dev", DEVICE_IF]).expect("address");
    }
    let interfaces = [
        format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100 }}"),
        format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 100 }}"),
    ];
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let qodd = Qodd::start(&lab.edge, &interfaces, &config()).await.expect("qodd");
    let mut api = qodd.sessions().await.expect("client");

    // 1. No session: the probe queues behind the bulk flows.
    let (without, bulk) = congested_probe(&lab);
    let bulk_mbps = bulk.goodput_bps(WARMUP) / 1e6;
    eprintln!(
        "no session: probe p50 {:?} p99 {:?} loss {:.1}%, bulk {bulk_mbps:.1} Mbit/s",
        without.quantile(0.5),
        without.quantile(0.99),
        without.loss() * 100.0
    );
    assert!(bulk_mbps > 60.0 && bulk_mbps < 105.0, "the bottleneck is the 100 Mbit/s scheduler: {bulk_mbps}");

    // 2. Low-latency session for the probe's flow.
    api.create_session(session(addr::DEVICE_V4, "QOS_E", None, Some(7007))).await.expect("QOS_E");
    let (with, _) = congested_probe(&lab);
    eprintln!(
        "QOS_E: probe p50 {:?} p99 {:?} loss {:.1}%",
        with.quantile(0.5),
        with.quantile(0.99),
        with.loss() * 100.0
    );
    assert!(
        with.quantile(0.99) * 5 <= without.quantile(0.99),
        "p99 with the session {:?} is not 5x below p99 without {:?}",
        with.quantile(0.99),
        without.quantile(0.99)
    );

    // 3. Guaranteed 20 Mbit/s for one flow against the 8 bulk flows.
    api.create_session(session("10.0.1.4", "QOS_G", Some(9100), None)).await.expect("QOS_G");
    let bulk = tcp_flows(&lab.server, ip(addr::SERVER_V4), &lab.device, SocketAddr::new(ip(addr::OTHER_DEVICE_V4), 9200), 8, PHASE)
        .expect("bulk");
    let target = tcp_flows(&lab.server, ip(addr::SERVER_V4), &lab.device, SocketAddr::new(ip("10.0.1.4"), 9100), 1, PHASE)
        .expect("target flow");
    let got = target.join().expect("thread").expect("target").goodput_bps(WARMUP) / 1e6;
    let _ = bulk.join();
    eprintln!("QOS_G (20 Mbit/s guaranteed): {got:.2} Mbit/s");
    assert!(got >= 18.0, "guaranteed 20 Mbit/s, got {got:.2}");

    // 4. A 10 Mbit/s cap holds for a flow alone on the link.
    api.create_session(session("10.0.1.5", "QOS_C", Some(9300), None)).await.expect("QOS_C");
    let capped = tcp_flows(&lab.server, ip(addr::SERVER_V4), &lab.device, SocketAddr::new(ip("10.0.1.5"), 9300), 1, PHASE)
        .expect("capped flow");
    let got = capped.join().expect("thread").expect("capped").goodput_bps(WARMUP) / 1e6;
    eprintln!("QOS_C (10 Mbit/s maximum): {got:.2} Mbit/s");
    assert!(got <= 11.0, "maximum 10 Mbit/s, got {got:.2}");
    assert!(got >= 2.0, "the capped flow should still get through: {got:.2}");
}
