//! Bursts and delivery under congestion (#13 items 1 and 4), on the namespace lab with both
//! interfaces scheduled (100 Mbit/s) and 8 bulk TCP flows filling the device side: a bursty
//! low-latency flow within its allowance is not queued, one beyond it is dropped rather than
//! queued (and its neighbour does not notice), a profile's burst rate widens the allowance, and
//! GetSession reports what each session's class delivered and dropped as the receiver counted it.
//! Bounds are generous; the lab (`cargo xtask lab`) carries the tight numbers. Needs root.

use std::{net::SocketAddr, time::Duration};

use qod_proto::v1 as pb;
use qod_testkit::{
    DEVICE_IF, EDGE_DEV_IF, Lab, Qodd, addr,
    api::{CONGESTION_PROFILES, ip, session},
    traffic::{Bursts, Delivered, Probe, tcp_flows, udp_bursts, udp_flood, udp_probe},
};

const PHASE: Duration = Duration::from_secs(6);
const METRICS_PORT: u16 = 9466;

/// A low-latency profile whose burst rate (10 Mbit/s over a 50 ms budget) allows 59,375 bytes.
const BURSTY_PROFILE: &str = r#"
[[profiles]]
name = "QOS_EB"
status = "ACTIVE"
band = "low_latency"
max_downstream_rate = { value = 500, unit = "kbps" }
max_downstream_burst_rate = { value = 10, unit = "Mbps" }
max_upstream_rate = { value = 500, unit = "kbps" }
packet_delay_budget = { value = 50, unit = "Milliseconds" }
"#;

/// 8 bulk flows server → 10.0.1.3 for `seconds`.
fn bulk(
    lab: &Lab,
    port: u16,
    seconds: Duration,
) -> std::thread::JoinHandle<anyhow::Result<Delivered>> {
    tcp_flows(
        &lab.server,
        ip(addr::SERVER_V4),
        &lab.device,
        SocketAddr::new(ip(addr::OTHER_DEVICE_V4), port),
        8,
        seconds,
    )
    .expect("bulk flows")
}

/// Bursts server:`port` → device `device`:7000 (downlink, the congested way) every `interval`,
/// leaving out the first (it also waits for neighbour resolution).
fn bursts(
    lab: &Lab,
    device: &str,
    port: u16,
    shape: Bursts,
    interval: Duration,
) -> std::thread::JoinHandle<anyhow::Result<Probe>> {
    udp_bursts(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), port),
        &lab.device,
        SocketAddr::new(ip(device), 7000),
        shape,
        interval,
        PHASE - Duration::from_secs(1),
    )
    .map(|h| {
        std::thread::spawn(move || {
            h.join()
                .expect("bursts thread")
                .map(|p| p.skip(shape.count))
        })
    })
    .expect("bursts")
}

fn done<T>(h: std::thread::JoinHandle<anyhow::Result<T>>) -> T {
    h.join().expect("traffic thread").expect("traffic")
}

fn summary(p: &Probe) -> String {
    format!(
        "p50 {:?} p90 {:?} p99 {:?} max {:?} loss {:.1}% of {}",
        p.quantile(0.5),
        p.quantile(0.9),
        p.quantile(0.99),
        p.quantile(1.0),
        p.loss() * 100.0,
        p.rtts.len()
    )
}

type Client =
    qod_proto::v1::quality_on_demand_client::QualityOnDemandClient<qod_proto::client::QodChannel>;

async fn get(api: &mut Client, id: &str) -> pb::SessionCounters {
    qod_testkit::session_info(api, id)
        .await
        .counters
        .expect("counters")
}

#[tokio::test(flavor = "multi_thread")]
async fn bursts_and_delivery_under_congestion() {
    qod_testkit::api::require_root();
    let lab = Lab::new().expect("lab");
    for extra in ["10.0.1.4/24", "10.0.1.5/24", "10.0.1.6/24", "10.0.1.7/24"] {
        lab.device
            .ip(&["addr", "add", extra, "dev", DEVICE_IF])
            .expect("address");
    }
    let interfaces = qod_testkit::api::scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let qodd = Qodd::start(
        &lab.edge,
        &interfaces,
        &format!(
            "metrics_listen = \"127.0.0.1:{METRICS_PORT}\"\n{CONGESTION_PROFILES}{BURSTY_PROFILE}"
        ),
    )
    .await
    .expect("qodd");
    let mut api = qodd.sessions().await.expect("client");
    let create = |device: &str, profile: &str, port: u16| {
        session(
            device,
            addr::SERVER_V4,
            profile,
            &[],
            &[u32::from(port)],
            600,
        )
    };
    api.create_session(create(addr::DEVICE_V4, "QOS_E", 7101))
        .await
        .expect("QOS_E");
    let beyond = api
        .create_session(create("10.0.1.4", "QOS_E", 7102))
        .await
        .expect("QOS_E")
        .into_inner();
    api.create_session(create("10.0.1.5", "QOS_E", 7103))
        .await
        .expect("QOS_E");
    api.create_session(create("10.0.1.6", "QOS_EB", 7104))
        .await
        .expect("QOS_EB");

    // 1. Within the allowance: 4 × 1,200 B every 100 ms (400 kbit/s, under QOS_E's 500) beside
    //    8 bulk flows. Ten frames of burst pass at once: with tc's default burst (one frame) the
    //    3rd datagram waited 14 ms and the 4th 34 ms; in a shared FIFO all wait 35-49 ms.
    let load = bulk(&lab, 9000, PHASE + Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    let within = done(bursts(
        &lab,
        addr::DEVICE_V4,
        7101,
        Bursts {
            count: 4,
            size: 1200,
        },
        Duration::from_millis(100),
    ));
    let _ = done(load);
    eprintln!("bursts within the allowance: {}", summary(&within));

    assert!(within.loss() <= 0.02, "{}", summary(&within));
    // p50 and p90, not p99: on two busy cores a few late round trips come and go with the VM's
    // state (the lab measures p99 against a hand-built reference); tc's default burst made half
    // of them wait 14-34 ms, so p50 alone tells the two apart.
    assert!(
        within.quantile(0.5) <= Duration::from_millis(2)
            && within.quantile(0.9) <= Duration::from_millis(10),
        "a burst within its allowance waits: {}",
        summary(&within)
    );
    // One way (sender to the echo's kernel receive timestamp, no user-space wake-ups in it):
    // the queue itself. tc's default burst gave a one-way p99 of 34 ms; ten frames give ~0.1 ms.
    let one_way = within.one_way();
    assert!(
        one_way.rtts.iter().flatten().count() >= within.sorted().len() * 9 / 10
            && one_way.quantile(0.99) <= Duration::from_millis(5),
        "a burst within its allowance is queued, one way: {}",
        summary(&one_way)
    );

    // 2. Beyond it: 40 × 1,200 B every second (384 kbit/s on average, but 48 KB at once against
    //    an allowance of 15,140 B). What exceeds the allowance is dropped by the classifier
    //    rather than queued behind it (a 50-packet queue used to hold the burst for up to
    //    770 ms), and a QOS_E probe beside it keeps its latency.
    let load = bulk(&lab, 9100, PHASE + Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    let over = bursts(
        &lab,
        "10.0.1.4",
        7102,
        Bursts {
            count: 40,
            size: 1200,
        },
        Duration::from_secs(1),
    );
    let probe = udp_probe(
        &lab.server,
        SocketAddr::new(ip(addr::SERVER_V4), 7103),
        &lab.device,
        SocketAddr::new(ip("10.0.1.5"), 7000),
        Duration::from_millis(10),
        PHASE - Duration::from_secs(1),
    )
    .expect("probe");
    let (over, probe) = (done(over), done(probe));
    let _ = done(load);
    eprintln!("bursts beyond the allowance: {}", summary(&over));
    eprintln!("neighbouring QOS_E probe: {}", summary(&probe));
    assert!(
        over.loss() >= 0.3 && over.loss() <= 0.9,
        "about 13 of each 40 fit the allowance: {}",
        summary(&over)
    );
    assert!(
        over.quantile(0.5) <= Duration::from_millis(5)
            && over.quantile(0.9) <= Duration::from_millis(25),
        "what passes is not queued: {}",
        summary(&over)
    );
    assert!(
        probe.quantile(0.9) <= Duration::from_millis(10) && probe.loss() <= 0.02,
        "the neighbour is unaffected: {}",
        summary(&probe)
    );
    let c = get(&mut api, &beyond.session_id).await;
    let down = c.downlink.expect("downlink report");
    assert!(
        down.policer_dropped_packets > 0,
        "dropped by the classifier: {down:?}"
    );
    assert_eq!(
        down.class
            .unwrap_or_else(|| panic!("a class: {down:?}\n{}", qodd.log()))
            .queue_dropped_packets,
        0,
        "nothing left to overflow the queue: {down:?}"
    );

    // 3. The same bursts under a profile whose burst rate allows them: all pass, promptly.
    let load = bulk(&lab, 9200, PHASE + Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    let allowed = done(bursts(
        &lab,
        "10.0.1.6",
        7104,
        Bursts {
            count: 40,
            size: 1200,
        },
        Duration::from_secs(1),
    ));
    let _ = done(load);
    eprintln!(
        "bursts within a burst rate's allowance: {}",
        summary(&allowed)
    );
    assert!(allowed.loss() <= 0.02, "{}", summary(&allowed));
    assert!(
        allowed.quantile(0.9) <= Duration::from_millis(25),
        "{}",
        summary(&allowed)
    );

    // 4. Delivery as the receiver counts it. A QOS_E session flooded at 20 Mbit/s is held to
    //    500 kbit/s by its policer; a QOS_C session (capped at 10 Mbit/s, shaped by its class,
    //    no policer) flooded at 30 Mbit/s drops at its queue. GetSession's delivered packets
    //    match the receiver's, and the achieved rate its maximum.
    let flooded = api
        .create_session(create("10.0.1.7", "QOS_E", 7105))
        .await
        .expect("QOS_E")
        .into_inner();
    let capped = api
        .create_session(session(
            "10.0.1.2",
            addr::SERVER_V4,
            "QOS_C",
            &[],
            &[7106],
            600,
        ))
        .await
        .expect("QOS_C")
        .into_inner();
    let flood = |port: u16, device: &str, rate: u64| {
        udp_flood(
            &lab.server,
            SocketAddr::new(ip(addr::SERVER_V4), port),
            &lab.device,
            SocketAddr::new(ip(device), 7300),
            rate,
            PHASE,
        )
        .expect("flood")
    };
    let (a, b) = (
        flood(7105, "10.0.1.7", 20_000_000),
        flood(7106, "10.0.1.2", 30_000_000),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = get(&mut api, &flooded.session_id).await;
    let _ = get(&mut api, &capped.session_id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mid = [
        get(&mut api, &flooded.session_id)
            .await
            .downlink
            .expect("report"),
        get(&mut api, &capped.session_id)
            .await
            .downlink
            .expect("report"),
    ];
    let received = [done(a), done(b)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = [
        get(&mut api, &flooded.session_id)
            .await
            .downlink
            .expect("report"),
        get(&mut api, &capped.session_id)
            .await
            .downlink
            .expect("report"),
    ];
    for (n, (name, max)) in [("QOS_E", 500_000u64), ("QOS_C", 10_000_000)]
        .into_iter()
        .enumerate()
    {
        let got_packets = received[n].bytes[0] / 1200;
        let class = end[n].class.expect("a class");
        eprintln!(
            "{name}: receiver {got_packets} packets; GetSession delivered {} packets, {} queue drops, {} policed, achieved {:?} bit/s over {:?} ms, granted ≤ {:?}",
            class.delivered_packets,
            class.queue_dropped_packets,
            end[n].policer_dropped_packets,
            mid[n].achieved_bps,
            mid[n].achieved_interval_ms,
            mid[n].granted_max_bps
        );
        let diff = class.delivered_packets.abs_diff(got_packets) as f64;
        assert!(
            diff <= (got_packets as f64 * 0.01).max(3.0),
            "{name}: delivered {} against {got_packets} received",
            class.delivered_packets
        );
        assert_eq!(mid[n].granted_max_bps, Some(max), "{name}");
        let achieved = mid[n].achieved_bps.expect("achieved") as f64;
        assert!(
            achieved >= max as f64 * 0.85 && achieved <= max as f64 * 1.1,
            "{name}: achieved {achieved} bit/s against a maximum of {max}"
        );
        assert!(
            end[n].matched_packets >= class.delivered_packets + class.queue_dropped_packets,
            "{name}: {:?}",
            end[n]
        );
    }
    assert!(end[0].policer_dropped_packets > 0, "{:?}", end[0]);
    assert!(
        end[1].class.expect("class").queue_dropped_packets > 0
            && end[1].policer_dropped_packets == 0,
        "the capped flood drops at its queue: {:?}",
        end[1]
    );

    // 5. The scheduler's metrics count the session classes' deliveries and drops.
    let (status, _, body) = qod_testkit::http_get(&lab.edge, METRICS_PORT, "/metrics");
    assert_eq!(status, 200);
    let m = qod_testkit::metric_samples(&body);
    let key = |name: &str| format!("{name}{{interface=\"{EDGE_DEV_IF}\",queue=\"sessions\"}}");
    let delivered = qod_testkit::metric_value(&m, &key("qod_scheduler_delivered_packets_total"));
    let dropped = qod_testkit::metric_value(&m, &key("qod_scheduler_dropped_packets_total"));
    let class = end[1].class.expect("class");
    assert!(
        delivered >= (received[0].bytes[0] / 1200 + received[1].bytes[0] / 1200) as f64,
        "sessions delivered {delivered}"
    );
    assert!(
        dropped >= class.queue_dropped_packets as f64,
        "sessions dropped {dropped}, the capped class alone {}",
        class.queue_dropped_packets
    );
}
