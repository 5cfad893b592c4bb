//! QoS under congestion, on the namespace lab: qodd owns a 100 Mbit/s bottleneck (HTB on the
//! edge's device-facing egress) while 8 bulk TCP flows fill it. Margins are generous on purpose:
//! the measured numbers go to the benchmark document, not into assertions. Needs root.

use std::{net::SocketAddr, time::Duration};

use qod_proto::v1 as pb;
use qod_testkit::{
    DEVICE_IF, EDGE_DEV_IF, Lab, Qodd, addr,
    api::{ip, reason, session},
    traffic::{Delivered, Probe, tcp_flows, udp_probe},
};

const PHASE: Duration = Duration::from_secs(6);
const WARMUP: Duration = Duration::from_secs(2);

type Flows = std::thread::JoinHandle<anyhow::Result<Delivered>>;

/// `n` TCP flows server → `device`:`port`, for one phase.
fn downlink(lab: &Lab, device: &str, port: u16, n: u16) -> Flows {
    tcp_flows(
        &lab.server,
        ip(addr::SERVER_V4),
        &lab.device,
        SocketAddr::new(ip(device), port),
        n,
        PHASE,
    )
    .expect("TCP flows")
}

/// The goodput of finished flows after the warm-up, in Mbit/s.
fn goodput_mbit(flows: Flows) -> f64 {
    flows
        .join()
        .expect("flows thread")
        .expect("flows")
        .goodput_bps(WARMUP)
        / 1e6
}

/// 8 bulk flows server → 10.0.1.3 and a 10 ms probe 10.0.1.2 ⇄ server:7007, for one phase.
fn congested_probe(lab: &Lab) -> (Probe, Delivered) {
    let bulk = downlink(lab, addr::OTHER_DEVICE_V4, 9000, 8);
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
    qod_testkit::api::require_root();
    let lab = Lab::new().expect("lab");
    for extra in ["10.0.1.4/24", "10.0.1.5/24", "10.0.1.6/24"] {
        lab.device
            .ip(&["addr", "add", extra, "dev", DEVICE_IF])
            .expect("address");
    }
    let interfaces = qod_testkit::api::scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let qodd = Qodd::start(
        &lab.edge,
        &interfaces,
        qod_testkit::api::CONGESTION_PROFILES,
    )
    .await
    .expect("qodd");
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
    assert!(
        bulk_mbps > 60.0 && bulk_mbps < 105.0,
        "the bottleneck is the 100 Mbit/s scheduler: {bulk_mbps}"
    );

    // 2. Low-latency session for the probe's flow.
    api.create_session(session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_E",
        &[],
        &[7007],
        600,
    ))
    .await
    .expect("QOS_E");
    let (with, _) = congested_probe(&lab);
    eprintln!(
        "QOS_E: probe p50 {:?} p99 {:?} loss {:.1}%",
        with.quantile(0.5),
        with.quantile(0.99),
        with.loss() * 100.0
    );
    // Generous, and on p50 / p90: on two busy cores a few probes of the debug-built harness are
    // late whatever the queue does (p99 4-11 ms against 23-47 ms without, moving with the VM's
    // state); the lab has the tight numbers.
    assert!(
        with.quantile(0.5) * 10 <= without.quantile(0.5)
            && with.quantile(0.9) * 4 <= without.quantile(0.9),
        "with the session p50 {:?} p90 {:?}, without p50 {:?} p90 {:?}",
        with.quantile(0.5),
        with.quantile(0.9),
        without.quantile(0.5),
        without.quantile(0.9)
    );

    // 3. Guaranteed 20 Mbit/s for one flow against the 8 bulk flows.
    api.create_session(session(
        "10.0.1.4",
        addr::SERVER_V4,
        "QOS_G",
        &[9100],
        &[],
        600,
    ))
    .await
    .expect("QOS_G");
    let bulk = downlink(&lab, addr::OTHER_DEVICE_V4, 9200, 8);
    let got = goodput_mbit(downlink(&lab, "10.0.1.4", 9100, 1));
    let _ = bulk.join();
    eprintln!("QOS_G (20 Mbit/s guaranteed): {got:.2} Mbit/s");
    assert!(got >= 18.0, "guaranteed 20 Mbit/s, got {got:.2}");

    // 4. A 10 Mbit/s cap holds for a flow alone on the link.
    api.create_session(session(
        "10.0.1.5",
        addr::SERVER_V4,
        "QOS_C",
        &[9300],
        &[],
        600,
    ))
    .await
    .expect("QOS_C");
    let got = goodput_mbit(downlink(&lab, "10.0.1.5", 9300, 1));
    eprintln!("QOS_C (10 Mbit/s maximum): {got:.2} Mbit/s");
    assert!(got <= 11.0, "maximum 10 Mbit/s, got {got:.2}");
    assert!(
        got >= 2.0,
        "the capped flow should still get through: {got:.2}"
    );

    // 5. A guarantee without a maximum and without a CAMARA priority beside 8 bulk flows: it
    //    keeps its 20 Mbit/s and shares the spare capacity equally with best effort (one HTB
    //    priority, round robin), so best effort is not starved (it used to get 14-16 Mbit/s).
    api.create_session(session(
        "10.0.1.6",
        addr::SERVER_V4,
        "QOS_GU",
        &[9400],
        &[],
        600,
    ))
    .await
    .expect("QOS_GU");
    let bulk = downlink(&lab, addr::OTHER_DEVICE_V4, 9500, 8);
    let got = goodput_mbit(downlink(&lab, "10.0.1.6", 9400, 1));
    let bulk = goodput_mbit(bulk);
    eprintln!("QOS_GU (20 Mbit/s guaranteed, no maximum): {got:.2} Mbit/s, bulk {bulk:.2} Mbit/s");
    assert!(got >= 18.0, "guaranteed 20 Mbit/s, got {got:.2}");
    assert!(
        bulk >= 25.0,
        "best effort shares the spare capacity: {bulk:.2} Mbit/s"
    );
}

/// Guaranteed rates never add up past the configured share: the session that does not fit is
/// refused and nothing of it is installed.
#[tokio::test(flavor = "multi_thread")]
async fn admission_control_refuses_what_does_not_fit() {
    qod_testkit::api::require_root();
    let lab = Lab::new().expect("lab");
    let interfaces = qod_testkit::api::scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let profiles = r#"
[[profiles]]
name = "QOS_30"
status = "ACTIVE"
target_min_downstream_rate = { value = 30, unit = "Mbps" }
"#;
    let qodd = Qodd::start(&lab.edge, &interfaces, profiles)
        .await
        .expect("qodd");
    let mut api = qodd.sessions().await.expect("client");
    let classes = || {
        lab.edge
            .exec("tc", &["class", "show", "dev", EDGE_DEV_IF])
            .expect("tc")
            .lines()
            .count()
    };
    let before = classes();
    // 80 % of 100 Mbit/s: two sessions of 30 fit, the third does not.
    for dev in ["10.0.1.2", "10.0.1.3"] {
        api.create_session(session(dev, addr::SERVER_V4, "QOS_30", &[], &[], 600))
            .await
            .expect("fits");
    }
    assert_eq!(
        classes(),
        before + 2,
        "one class per session on the device side"
    );
    // What the kernel holds (installed over rtnetlink): best effort's HTB priority (the profile
    // gives no CAMARA priority, so it shares spare capacity with best effort), the rate, the
    // ceiling (the capacity), bursts of the default 10 ms window (37,500 B at the rate, 125,000 B
    // at the ceiling; tc prints them back a few bytes short, as it does its own), and a 300-packet
    // FIFO leaf (the profile gives no delay budget).
    let shown = lab
        .edge
        .exec("tc", &["class", "show", "dev", EDGE_DEV_IF])
        .expect("tc");
    let class = shown
        .lines()
        .find(|l| l.starts_with("class htb 1:10") && l.contains("parent 1:1 leaf 10"))
        .unwrap_or_else(|| panic!("a per-session class: {shown}"));
    assert!(class.contains("prio 7 rate 30Mbit ceil 100Mbit"), "{class}");
    let bytes_after = |word: &str| -> f64 {
        class
            .split_whitespace()
            .skip_while(|w| *w != word)
            .nth(1)
            .and_then(|b| b.trim_end_matches('b').parse().ok())
            .unwrap_or_else(|| panic!("{word} in {class}"))
    };
    for (word, want) in [("burst", 37_500.0), ("cburst", 125_000.0)] {
        let got = bytes_after(word);
        assert!(
            (got - want).abs() <= want * 0.005,
            "{word} {got}, not {want}: {class}"
        );
    }
    let leaves = lab
        .edge
        .exec("tc", &["qdisc", "show", "dev", EDGE_DEV_IF])
        .expect("tc");
    assert!(
        leaves.contains("qdisc pfifo 100: parent 1:100 limit 300p"),
        "{leaves}"
    );
    let err = api
        .create_session(session(
            "10.0.1.4",
            addr::SERVER_V4,
            "QOS_30",
            &[],
            &[],
            600,
        ))
        .await
        .expect_err("over the share");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (tonic::Code::ResourceExhausted, "QUOTA_EXCEEDED")
    );
    assert!(err.message().contains(EDGE_DEV_IF), "{}", err.message());
    assert_eq!(
        classes(),
        before + 2,
        "nothing installed for the refused session"
    );
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: session("10.0.1.4", addr::SERVER_V4, "QOS_30", &[], &[], 600).device,
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert!(listed.sessions.is_empty());
}

/// A managed link that goes down ends its sessions (NETWORK_TERMINATED, with an event) and new
/// ones are refused until it is back; a link that is deleted and re-created is attached again.
#[tokio::test(flavor = "multi_thread")]
async fn link_loss_terminates_sessions() {
    let (lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let mut events = qod_testkit::watch_all(&mut api).await;
    let s = qod_testkit::marked_flow(&mut api).await;

    lab.edge
        .ip(&["link", "set", EDGE_DEV_IF, "down"])
        .expect("link down");
    let ended = qod_testkit::api::next_unavailable(&mut events, Duration::from_secs(10))
        .await
        .expect("termination event");
    assert_eq!(ended.session_id, s.session_id);
    assert_eq!(ended.status_info(), pb::StatusInfo::NetworkTerminated);
    let err = api
        .create_session(session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_E",
            &[],
            &[],
            600,
        ))
        .await
        .expect_err("link down");
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // Delete the link (its veth peer goes with it) and make it again.
    lab.edge
        .ip(&["link", "del", EDGE_DEV_IF])
        .expect("delete link");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.link_device_side().expect("re-create the link");
    lab.wait_ready().expect("link up");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match api
            .create_session(session(
                addr::DEVICE_V4,
                addr::SERVER_V4,
                "QOS_L",
                &[],
                &[5001],
                600,
            ))
            .await
        {
            Ok(s) => break s,
            Err(e) if e.code() == tonic::Code::AlreadyExists => {
                // The terminated session is retained; delete it and retry.
                api.delete_session(pb::DeleteSessionRequest {
                    session_id: s.session_id.clone(),
                })
                .await
                .expect("delete");
            }
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "link never came back: {e:?}\n{}",
                    qodd.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Marking works again through the re-created link (downlink leaves through it).
    let capture = qod_testkit::Capture::start(&lab.device, DEVICE_IF).expect("capture");
    qod_testkit::udp_send(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), 5001),
        SocketAddr::new(ip(addr::DEVICE_V4), 45000),
        5,
        64,
    )
    .expect("udp");
    let seen = capture.finish().expect("capture");
    let flow: Vec<_> = seen.iter().filter(|p| p.sport == 5001).collect();
    assert!(
        !flow.is_empty() && flow.iter().all(|p| p.dscp == 10),
        "re-attached: {flow:?}"
    );
    assert_eq!(again.into_inner().qos_status(), pb::QosStatus::Available);
}
