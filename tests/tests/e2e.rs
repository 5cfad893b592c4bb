//! End to end: the real `qodd` in a namespace lab, driven over gRPC, judged by what arrives on
//! the wire. Needs root (namespaces, eBPF); run through `cargo xtask test`.

use std::{net::IpAddr, time::Duration};

use futures::StreamExt as _;
use qod_proto::v1 as pb;
use qod_testkit::{
    Capture, DEVICE_IF, EDGE_DEV_IF, Lab, Qodd, SERVER_IF, Seen, addr,
    api::{device, reason, require_root, sa, server},
    tcp_exchange, udp_send,
};

const QOS_E_DSCP: u8 = 32;
const QOS_L_DSCP: u8 = 10;

fn create_request(
    dev: &str,
    srv: &str,
    server_ports: &[u32],
    profile: &str,
    duration: i32,
) -> pb::CreateSessionRequest {
    qod_testkit::api::session(dev, srv, profile, &[], server_ports, duration)
}

fn flow<'a>(seen: &'a [Seen], src: &str, dst: &str, dport: u16) -> Vec<&'a Seen> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().expect("ip"), dst.parse().expect("ip"));
    seen.iter()
        .filter(|p| p.src == src && p.dst == dst && p.dport == dport)
        .collect()
}

fn from_port<'a>(seen: &'a [Seen], src: &str, sport: u16) -> Vec<&'a Seen> {
    let src: IpAddr = src.parse().expect("ip");
    seen.iter()
        .filter(|p| p.src == src && p.sport == sport)
        .collect()
}

fn assert_all_dscp(pkts: &[&Seen], dscp: u8, what: &str) {
    assert!(!pkts.is_empty(), "{what}: no packet captured");
    for p in pkts {
        assert_eq!(p.dscp, dscp, "{what}: wrong DSCP on {p:?}");
        assert_eq!(p.ecn, 0, "{what}: ECN bits changed on {p:?}");
        assert!(p.checksum_ok, "{what}: bad IPv4 header checksum on {p:?}");
    }
}

/// Both directions of UDP and TCP of the session are marked, nothing else is, the counters match
/// the wire, and marking stops after delete.
async fn marks_the_session_flow_only(
    dev: &'static str,
    other_dev: &'static str,
    srv: &'static str,
    other_srv: &'static str,
) {
    let (lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");

    let created = api
        .create_session(create_request(dev, srv, &[5000, 5001], "QOS_E", 600))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.qos_status(), pb::QosStatus::Available);
    let id = created.session_id.clone();

    let at_server = Capture::start(&lab.server, SERVER_IF).expect("capture");
    let at_device = Capture::start(&lab.device, DEVICE_IF).expect("capture");
    udp_send(&lab.device, sa(dev, 40000), sa(srv, 5000), 20, 200).expect("uplink udp");
    udp_send(&lab.server, sa(srv, 5000), sa(dev, 40000), 15, 300).expect("downlink udp");
    udp_send(&lab.device, sa(other_dev, 40000), sa(srv, 5000), 10, 200).expect("other device");
    udp_send(&lab.device, sa(dev, 40001), sa(srv, 6000), 10, 200).expect("other port");
    udp_send(&lab.device, sa(dev, 40002), sa(other_srv, 5000), 10, 200).expect("other server");
    tcp_exchange(
        &lab.device,
        sa(dev, 40100),
        &lab.server,
        sa(srv, 5001),
        100_000,
    )
    .expect("tcp");
    let up = at_server.finish().expect("capture");
    let down = at_device.finish().expect("capture");

    assert_eq!(
        flow(&up, dev, srv, 5000).len(),
        20,
        "every uplink UDP datagram arrived"
    );
    assert_all_dscp(&flow(&up, dev, srv, 5000), QOS_E_DSCP, "uplink UDP");
    assert_all_dscp(&from_port(&down, srv, 5000), QOS_E_DSCP, "downlink UDP");
    assert_all_dscp(&flow(&up, dev, srv, 5001), QOS_E_DSCP, "uplink TCP");
    assert_all_dscp(&from_port(&down, srv, 5001), QOS_E_DSCP, "downlink TCP");
    assert_all_dscp(&flow(&up, other_dev, srv, 5000), 0, "other device");
    assert_all_dscp(&flow(&up, dev, srv, 6000), 0, "other server port");
    assert_all_dscp(&flow(&up, dev, other_srv, 5000), 0, "other server");

    // Counters: exactly what crossed the edge for this session, per direction.
    let session_up: Vec<&Seen> = [flow(&up, dev, srv, 5000), flow(&up, dev, srv, 5001)].concat();
    let session_down: Vec<&Seen> =
        [from_port(&down, srv, 5000), from_port(&down, srv, 5001)].concat();
    let got = api
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let c = got.counters.expect("counters");
    assert_eq!(c.uplink_packets, session_up.len() as u64);
    assert_eq!(
        c.uplink_bytes,
        session_up.iter().map(|p| p.frame_len as u64).sum::<u64>()
    );
    assert_eq!(c.downlink_packets, session_down.len() as u64);
    assert_eq!(
        c.downlink_bytes,
        session_down.iter().map(|p| p.frame_len as u64).sum::<u64>()
    );

    // After delete: gone from the API, traffic untouched.
    api.delete_session(pb::DeleteSessionRequest {
        session_id: id.clone(),
    })
    .await
    .expect("delete");
    let err = api
        .get_session(pb::GetSessionRequest { session_id: id })
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let at_server = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(&lab.device, sa(dev, 40000), sa(srv, 5000), 10, 200).expect("uplink udp");
    let after = at_server.finish().expect("capture");
    assert_all_dscp(&flow(&after, dev, srv, 5000), 0, "after delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_session_marks_its_flow_only() {
    use addr::*;
    marks_the_session_flow_only(DEVICE_V4, OTHER_DEVICE_V4, SERVER_V4, OTHER_SERVER_V4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_session_marks_its_flow_only() {
    use addr::*;
    marks_the_session_flow_only(DEVICE_V6, OTHER_DEVICE_V6, SERVER_V6, OTHER_SERVER_V6).await;
}

/// A datagram larger than the path MTU leaves the device in fragments; only the first carries
/// the ports a session names, yet every fragment must get the session's treatment (one datagram
/// split across bands arrives late or not at all). The classifier's fragment counters move.
async fn fragmented_datagrams_are_treated_whole(dev: &'static str, srv: &'static str) {
    const PORT: u16 = 9468;
    let (lab, qodd) =
        qod_testkit::lab_with_qodd(&format!("metrics_listen = \"127.0.0.1:{PORT}\"")).await;
    let mut api = qodd.sessions().await.expect("client");
    api.create_session(create_request(dev, srv, &[5000], "QOS_E", 60))
        .await
        .expect("create");
    let capture = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(&lab.device, sa(dev, 43000), sa(srv, 5000), 5, 3000).expect("udp");
    let seen = capture.finish().expect("capture");
    let (src, dst): (IpAddr, IpAddr) = (dev.parse().expect("ip"), srv.parse().expect("ip"));
    let datagram: Vec<&Seen> = seen
        .iter()
        .filter(|p| p.src == src && p.dst == dst)
        .collect();
    assert!(
        datagram.len() >= 15,
        "5 datagrams of 3000 bytes are at least 15 fragments: {datagram:?}"
    );
    assert_all_dscp(&datagram, QOS_E_DSCP, "every fragment");
    let (_, _, metrics) = qod_testkit::http_get(&lab.edge, PORT, "/metrics");
    let followed = metrics
        .lines()
        .filter(|l| l.starts_with("qod_classifier_fragments_total") && l.contains("followed"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(followed >= 10.0, "later fragments followed: {metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fragmented_ipv4_datagrams_are_treated_whole() {
    fragmented_datagrams_are_treated_whole(addr::DEVICE_V4, addr::SERVER_V4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fragmented_ipv6_datagrams_are_treated_whole() {
    fragmented_datagrams_are_treated_whole(addr::DEVICE_V6, addr::SERVER_V6).await;
}

/// Duration expiry: the watch stream reports DURATION_EXPIRED, the session reads UNAVAILABLE,
/// and the flow is no longer marked.
#[tokio::test(flavor = "multi_thread")]
async fn expiry_ends_marking_and_is_reported() {
    use addr::*;
    let (lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let mut events = qod_testkit::watch_all(&mut api).await;

    let created = api
        .create_session(create_request(DEVICE_V4, SERVER_V4, &[], "QOS_L", 3))
        .await
        .expect("create")
        .into_inner();
    let id = created.session_id.clone();
    let capture = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(
        &lab.device,
        sa(DEVICE_V4, 41000),
        sa(SERVER_V4, 7000),
        5,
        100,
    )
    .expect("udp");
    let during = capture.finish().expect("capture");
    assert_all_dscp(
        &flow(&during, DEVICE_V4, SERVER_V4, 7000),
        QOS_L_DSCP,
        "during the session",
    );

    let mut statuses = Vec::new();
    let mut sequences = Vec::new();
    let expired = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = events.next().await {
            let ev = ev.expect("event");
            let Some(pb::session_event::Kind::QosStatusChanged(c)) = ev.kind else {
                continue;
            };
            assert_eq!(c.session_id, id);
            statuses.push((c.qos_status(), c.status_info()));
            sequences.push(ev.revision);
            if c.qos_status() == pb::QosStatus::Unavailable {
                return c;
            }
        }
        panic!("watch stream ended");
    })
    .await
    .expect("expiry event within 20 s");
    assert_eq!(
        statuses[0],
        (pb::QosStatus::Available, pb::StatusInfo::Unspecified)
    );
    assert_eq!(expired.status_info(), pb::StatusInfo::DurationExpired);
    assert!(
        sequences[0] > 0 && sequences.windows(2).all(|w| w[0] < w[1]),
        "revisions increase: {sequences:?}"
    );

    let info = api
        .get_session(pb::GetSessionRequest { session_id: id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.qos_status(), pb::QosStatus::Unavailable);
    assert_eq!(info.status_info(), pb::StatusInfo::DurationExpired);
    assert_eq!(info.counters.expect("counters").uplink_packets, 5);

    let capture = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(
        &lab.device,
        sa(DEVICE_V4, 41000),
        sa(SERVER_V4, 7000),
        5,
        100,
    )
    .expect("udp");
    let after = capture.finish().expect("capture");
    assert_all_dscp(&flow(&after, DEVICE_V4, SERVER_V4, 7000), 0, "after expiry");
}

/// Bad input gets a precise code and CAMARA reason, and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_precisely_and_change_nothing() {
    use addr::*;
    let (lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let ok = || create_request(DEVICE_V4, SERVER_V4, &[5000], "QOS_E", 60);
    use tonic::Code::*;
    let cases: Vec<(&str, pb::CreateSessionRequest, tonic::Code, &str)> = vec![
        (
            "invalid device IP",
            {
                let mut r = ok();
                r.device = Some(device("10.0.1.300"));
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "invalid server prefix",
            {
                let mut r = ok();
                r.application_server = Some(server("10.0.2.0/33"));
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "port out of range",
            create_request(DEVICE_V4, SERVER_V4, &[70000], "QOS_E", 60),
            OutOfRange,
            "OUT_OF_RANGE",
        ),
        (
            "port zero",
            create_request(DEVICE_V4, SERVER_V4, &[0], "QOS_E", 60),
            OutOfRange,
            "OUT_OF_RANGE",
        ),
        (
            "empty device",
            {
                let mut r = ok();
                r.device = Some(pb::Device::default());
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "empty application server",
            {
                let mut r = ok();
                r.application_server = Some(pb::ApplicationServer::default());
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "empty ports",
            {
                let mut r = ok();
                r.device_ports = Some(pb::PortsSpec::default());
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "public address alone",
            {
                let mut r = ok();
                r.device = Some(pb::Device {
                    ipv4_address: Some(pb::DeviceIpv4Addr {
                        public_address: Some(DEVICE_V4.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                r
            },
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "unknown profile",
            create_request(DEVICE_V4, SERVER_V4, &[], "QOS_NOPE", 60),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "duration 0",
            create_request(DEVICE_V4, SERVER_V4, &[], "QOS_E", 0),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "duration above maximum",
            create_request(DEVICE_V4, SERVER_V4, &[], "QOS_E", 86_401),
            OutOfRange,
            "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE",
        ),
        (
            "no device",
            {
                let mut r = ok();
                r.device = None;
                r
            },
            FailedPrecondition,
            "MISSING_IDENTIFIER",
        ),
        (
            "http sink",
            {
                let mut r = ok();
                r.sink = Some("http://example.invalid/cb".into());
                r
            },
            InvalidArgument,
            "INVALID_SINK",
        ),
    ];
    for (what, req, code, want) in cases {
        let err = api.create_session(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert_eq!(reason(&err), want, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}: empty message");
    }
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(device(DEVICE_V4)),
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert!(
        listed.sessions.is_empty(),
        "a refused request left a session: {listed:?}"
    );

    // Conflict: a second session of the same device whose flow overlaps (same server, every port).
    let first = api.create_session(ok()).await.expect("first").into_inner();
    let err = api
        .create_session(create_request(DEVICE_V4, SERVER_V4, &[], "QOS_L", 60))
        .await
        .expect_err("conflict");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (AlreadyExists, "CONFLICT")
    );
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(device(DEVICE_V4)),
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    assert_eq!(listed.sessions[0].session_id, first.session_id);

    for (id, code) in [
        ("not-a-uuid", InvalidArgument),
        ("0b7c9bb0-5d3c-4f8e-9a57-2d1c5f8f0c11", NotFound),
    ] {
        let err = api
            .get_session(pb::GetSessionRequest {
                session_id: id.into(),
            })
            .await
            .expect_err(id);
        assert_eq!(err.code(), code);
    }
    // The refused conflicting flow is not marked: only the first session's flow is.
    let capture = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(
        &lab.device,
        sa(DEVICE_V4, 42000),
        sa(SERVER_V4, 6000),
        5,
        100,
    )
    .expect("udp");
    udp_send(
        &lab.device,
        sa(DEVICE_V4, 42001),
        sa(SERVER_V4, 5000),
        5,
        100,
    )
    .expect("udp");
    let seen = capture.finish().expect("capture");
    assert_all_dscp(
        &flow(&seen, DEVICE_V4, SERVER_V4, 6000),
        0,
        "refused session's flow",
    );
    assert_all_dscp(
        &flow(&seen, DEVICE_V4, SERVER_V4, 5000),
        QOS_E_DSCP,
        "first session's flow",
    );
}

/// Profiles are served as configured; health and reflection answer for grpcurl.
#[tokio::test(flavor = "multi_thread")]
async fn profiles_health_and_reflection() {
    require_root();
    let lab = Lab::new().expect("lab");
    let qodd = Qodd::start(&lab.edge, &[EDGE_DEV_IF], "")
        .await
        .expect("qodd");
    let mut profiles = qodd.profiles().await.expect("client");
    let all = profiles
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = all.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["QOS_E", "QOS_L", "QOS_M", "QOS_S"]);
    let e = profiles
        .get_qos_profile(pb::GetQosProfileRequest {
            name: "QOS_E".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(e.service_class, "real_time_interactive");
    assert_eq!(e.status(), pb::QosProfileStatus::Active);
    let err = profiles
        .get_qos_profile(pb::GetQosProfileRequest {
            name: "QOS_X".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (tonic::Code::NotFound, "NOT_FOUND")
    );
    let filtered = profiles
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
            name: Some("QOS_M".into()),
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner();
    assert_eq!(filtered.profiles.len(), 1);

    let channel = qodd.channel().await.expect("channel");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "qod.v1.QualityOnDemand".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(r)) = resp.next().await else {
        panic!("no reflection answer")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = r.message_response else {
        panic!("unexpected {r:?}")
    };
    let services: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"qod.v1.QualityOnDemand"), "{services:?}");
    assert!(services.contains(&"qod.v1.QosProfiles"), "{services:?}");
}

/// A bad configuration is refused before anything starts, with exit code 64.
#[test]
fn bad_config_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    for (text, needle) in [
        ("interfaces = [\"lo\"]\nmax_sessions = 0\n", "max_sessions"),
        ("interfaces = [\"lo\"]\nlisten = \"nowhere\"\n", "listen"),
        ("interfaces = [\"lo\"]\nunknown_key = 1\n", "unknown"),
        ("interfaces = []\n", "no managed interface"),
        (
            "interfaces = [\"lo\"]\n[limits]\nmax_connections = 0\n",
            "limits.max_connections = 0: must be 1 to 1000000",
        ),
        (
            "interfaces = [\"lo\"]\n[limits]\nmax_connections = 10\nmax_connections_per_peer = 11\n",
            "limits.max_connections_per_peer = 11: must be 1 to 10",
        ),
        (
            "interfaces = [\"lo\"]\n[limits]\nhandshake_timeout_ms = 5\n",
            "limits.handshake_timeout_ms = 5: must be 100 to 60000",
        ),
    ] {
        std::fs::write(&cfg, text).expect("write");
        let out = std::process::Command::new(qod_testkit::qodd_bin())
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run qodd");
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{text}: {err}");
    }
}

/// Descriptors run out (what ~1,000 idle connections under a 1024 limit did): qodd cannot read
/// the link state in full then, and that must not count as a link loss. Its limit is lowered to
/// what it has open for a few full reads (`link_resync_secs = 1`; link events need no new
/// descriptor), then raised again: the session is still AVAILABLE, still marked on the wire,
/// and the failure was logged.
async fn link_state_that_cannot_be_read_ends_no_session(mode: qod_testkit::Mode) {
    let (lab, qodd) = qod_testkit::lab_in(mode, "link_resync_secs = 1").await;
    let mut api = qodd.sessions().await.expect("client");
    let marked = qod_testkit::marked_flow(&mut api).await;
    let pid = qodd.pid().expect("pid").to_string();
    // A new descriptor takes the lowest free number, and the limit bounds numbers: at the
    // lowest free one, every open fails with EMFILE.
    let used: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let open = (0..).find(|n| !used.contains(n)).expect("a free number");
    let limit = |n: &str| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}")])
            .output()
            .expect("prlimit (util-linux)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The soft limit only: raising it back needs no privilege (this sandbox has no
    // CAP_SYS_RESOURCE to raise a hard one).
    limit(&format!("{open}:"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let hard = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .expect("hard limit");
    limit(&format!("{hard}:"));
    let log = qodd.log();
    assert!(
        log.contains("cannot read the link state"),
        "qodd ran out of descriptors while polling: {log}"
    );
    let info = qod_testkit::session_info(&mut api, &marked.session_id).await;
    assert_eq!(info.qos_status(), pb::QosStatus::Available, "{log}");
    assert_eq!(
        lab.uplink_dscp(addr::DEVICE_V4, 46600, addr::SERVER_V4, 5000)
            .expect("traffic"),
        [32; 5]
    );
}

qod_testkit::in_every_mode!(
    unreadable_link_state,
    link_state_that_cannot_be_read_ends_no_session
);

/// An API address already in use is found before the data plane is touched: qodd exits 64
/// saying which address, and attached nothing (no classifier on the interfaces).
#[tokio::test(flavor = "multi_thread")]
async fn an_address_in_use_exits_64_before_the_data_plane() {
    qod_testkit::api::require_root();
    let lab = qod_testkit::Lab::new().expect("lab");
    let addr: std::net::SocketAddr = "127.0.0.1:50052".parse().expect("addr");
    let _taken = lab
        .edge
        .run(move || Ok(std::net::TcpListener::bind(addr)?))
        .expect("occupy the port");
    let failed = qod_testkit::Qodd::start_with(
        &qod_testkit::qodd_bin(),
        &lab.edge,
        &[qod_testkit::EDGE_DEV_IF, qod_testkit::EDGE_SRV_IF],
        "",
        qod_daemon::devkit::DevPki::config_toml,
        qod_testkit::Launch {
            tcp_listen: Some(addr),
            ..qod_testkit::Launch::default()
        },
    )
    .await
    .err()
    .expect("qodd must not start")
    .to_string();
    assert!(failed.contains("exit status: 64"), "{failed}");
    assert!(
        failed.contains("cannot listen on 127.0.0.1:50052"),
        "{failed}"
    );
    assert!(!failed.contains("classifier attached"), "{failed}");
    let filters = lab
        .edge
        .exec(
            "tc",
            &["filter", "show", "dev", qod_testkit::EDGE_DEV_IF, "egress"],
        )
        .unwrap_or_default();
    assert!(!filters.contains("qod"), "{filters}");
}
