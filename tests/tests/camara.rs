//! The CAMARA session contract over the real gRPC API of a real `qodd`, and notifications to a
//! real HTTP server as the sink. Needs root (namespaces, eBPF); run through `cargo xtask test`.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use qod_proto::v1 as pb;
use qod_testkit::{
    Capture, Reply, SERVER_IF, SinkServer, addr,
    api::{device, reason},
    udp_send,
};
use tonic::{Code, Request};

const EVENT_TYPE: &str = "org.camaraproject.quality-on-demand.v1.qos-status-changed";

/// Pools, a directory and fast notification retries for the lab.
const CONFIG: &str = concat!(
    "unavailable_retention_secs = 360\n",
    qod_testkit::lab_directory!(),
    r#"
[notifications]
allow_http_hosts = ["127.0.0.1"]
allow_sink_ranges = ["127.0.0.0/8"]
source = "https://qod.example/quality-on-demand/v1"
timeout_ms = 1000
backoff_base_ms = 100
backoff_max_ms = 400
max_attempts = 4
"#
);

fn request(device: pb::Device, duration: i32) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device: Some(device),
        application_server: Some(pb::ApplicationServer {
            ipv4_address: Some(addr::SERVER_V4.into()),
            ..Default::default()
        }),
        qos_profile: "QOS_E".into(),
        duration,
        ..Default::default()
    }
}

fn with_sink(
    mut r: pb::CreateSessionRequest,
    sink: String,
    token: &str,
    expires_in: Duration,
) -> pb::CreateSessionRequest {
    let expires = std::time::SystemTime::now() + expires_in;
    r.sink = Some(sink);
    r.sink_credential = Some(pb::SinkCredential {
        credential_type: pb::CredentialType::Accesstoken.into(),
        access_token: Some(token.into()),
        access_token_expires_utc: Some(prost_types::Timestamp::from(expires)),
        access_token_type: pb::AccessTokenType::Bearer.into(),
    });
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn every_transition_is_notified_as_a_cloud_event() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let sink = SinkServer::start(&lab.edge).expect("sink");
    let mut api = qodd.sessions().await.expect("client");

    // Expiry: AVAILABLE, then UNAVAILABLE / DURATION_EXPIRED.
    let a = api
        .create_session(with_sink(
            request(device(addr::DEVICE_V4), 2),
            sink.url("/a"),
            "tok-a",
            Duration::from_secs(3600),
        ))
        .await
        .expect("create")
        .into_inner();
    let echoed = a.sink_credential.clone().expect("credential type echoed");
    assert_eq!(
        echoed.access_token, None,
        "the access token is never echoed"
    );
    let got = sink
        .wait_for("/a", 2, Duration::from_secs(15))
        .await
        .expect("two events");
    for r in &got {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/cloudevents+json")
        );
        assert_eq!(r.authorization.as_deref(), Some("Bearer tok-a"));
        assert_eq!(r.body["specversion"], "1.0");
        assert_eq!(r.body["type"], EVENT_TYPE);
        assert_eq!(r.body["datacontenttype"], "application/json");
        assert_eq!(
            r.body["source"],
            format!(
                "https://qod.example/quality-on-demand/v1/sessions/{}",
                a.session_id
            )
        );
        assert_eq!(r.body["data"]["sessionId"], a.session_id.as_str());
        assert!(
            time::OffsetDateTime::parse(
                r.body["time"].as_str().unwrap_or(""),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
    }
    assert_eq!(got[0].body["data"]["qosStatus"], "AVAILABLE");
    assert!(got[0].body["data"].get("statusInfo").is_none());
    assert_eq!(got[1].body["data"]["qosStatus"], "UNAVAILABLE");
    assert_eq!(got[1].body["data"]["statusInfo"], "DURATION_EXPIRED");

    // Delete while AVAILABLE: DELETE_REQUESTED.
    let b = api
        .create_session(with_sink(
            request(device(addr::OTHER_DEVICE_V4), 600),
            sink.url("/b"),
            "tok-b",
            Duration::from_secs(3600),
        ))
        .await
        .expect("create")
        .into_inner();
    api.delete_session(pb::DeleteSessionRequest {
        session_id: b.session_id.clone(),
    })
    .await
    .expect("delete");
    let got = sink
        .wait_for("/b", 2, Duration::from_secs(10))
        .await
        .expect("two events");
    assert_eq!(got[1].body["data"]["qosStatus"], "UNAVAILABLE");
    assert_eq!(got[1].body["data"]["statusInfo"], "DELETE_REQUESTED");

    // Delete while UNAVAILABLE (the expired one): no event.
    api.delete_session(pb::DeleteSessionRequest {
        session_id: a.session_id.clone(),
    })
    .await
    .expect("delete");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sink.received("/a").len(),
        2,
        "no event for deleting an UNAVAILABLE session"
    );

    let ids: HashSet<String> = ["/a", "/b"]
        .iter()
        .flat_map(|p| sink.received(p))
        .map(|r| r.body["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids.len(), 4, "unique event ids");
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_retries_stops_on_gone_and_never_delays_the_api() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let sink = SinkServer::start(&lab.edge).expect("sink");
    let mut api = qodd.sessions().await.expect("client");
    let hour = Duration::from_secs(3600);

    // 500, then success: retried, delivered, same event id both times.
    sink.script("/flaky", &[Reply::Status(500), Reply::Status(204)]);
    api.create_session(with_sink(
        request(device("10.0.1.10"), 600),
        sink.url("/flaky"),
        "t",
        hour,
    ))
    .await
    .expect("create");
    let got = sink
        .wait_for("/flaky", 2, Duration::from_secs(10))
        .await
        .expect("retried");
    assert_eq!((got[0].status, got[1].status), (500, 204));
    assert_eq!(
        got[0].body["id"], got[1].body["id"],
        "a retry carries the same event id"
    );

    // 410 Gone: nothing more is sent to that sink.
    sink.script("/gone", &[Reply::Status(410)]);
    let gone = api
        .create_session(with_sink(
            request(device("10.0.1.11"), 600),
            sink.url("/gone"),
            "t",
            hour,
        ))
        .await
        .expect("create")
        .into_inner();
    sink.wait_for("/gone", 1, Duration::from_secs(10))
        .await
        .expect("first event");
    api.delete_session(pb::DeleteSessionRequest {
        session_id: gone.session_id,
    })
    .await
    .expect("delete");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sink.received("/gone").len(),
        1,
        "no delivery after 410 Gone"
    );

    // A sink that hangs: API calls return at once and other sinks are served meanwhile.
    sink.script("/hang", &[Reply::Hang(Duration::from_secs(30))]);
    let started = Instant::now();
    api.create_session(with_sink(
        request(device("10.0.1.12"), 600),
        sink.url("/hang"),
        "t",
        hour,
    ))
    .await
    .expect("create");
    api.create_session(with_sink(
        request(device("10.0.1.13"), 600),
        sink.url("/ok"),
        "t",
        hour,
    ))
    .await
    .expect("create");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "API delayed by a hanging sink: {:?}",
        started.elapsed()
    );
    sink.wait_for("/ok", 1, Duration::from_secs(5))
        .await
        .expect("other sinks are not held up");
    // The hanging sink times out (1 s) and is retried: a second attempt arrives, same event.
    let hung = sink
        .wait_for("/hang", 2, Duration::from_secs(10))
        .await
        .expect("retried after the timeout");
    assert_eq!(hung[0].body["id"], hung[1].body["id"]);

    // Connection refused: retried then abandoned; the API is unaffected.
    let started = Instant::now();
    api.create_session(with_sink(
        request(device("10.0.1.14"), 600),
        "http://127.0.0.1:9/none".into(),
        "t",
        hour,
    ))
    .await
    .expect("create");
    assert!(started.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qodd.log().contains("notification abandoned") {
        assert!(
            Instant::now() < deadline,
            "no abandonment logged:\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An expired sink token stops delivery: the AVAILABLE event goes out, the expiry one not.
    api.create_session(with_sink(
        request(device("10.0.1.15"), 3),
        sink.url("/short"),
        "t",
        Duration::from_millis(1500),
    ))
    .await
    .expect("create");
    sink.wait_for("/short", 1, Duration::from_secs(5))
        .await
        .expect("AVAILABLE");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        sink.received("/short").len(),
        1,
        "nothing sent with an expired token"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sinks_and_credentials_are_validated() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let mut api = qodd.sessions().await.expect("client");
    let hour = Duration::from_secs(3600);
    let dev = || request(device(addr::DEVICE_V4), 60);
    let cred = |f: fn(&mut pb::SinkCredential)| {
        let mut r = with_sink(dev(), "https://sink.example/cb".into(), "t", hour);
        if let Some(c) = r.sink_credential.as_mut() {
            f(c);
        }
        r
    };
    let cases = [
        (
            "http to a host not allowed",
            with_sink(dev(), "http://192.0.2.1/cb".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "not a URL",
            with_sink(dev(), "https//x".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "credentials in the URL",
            with_sink(dev(), "https://u:p@sink.example/".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "PLAIN credential",
            cred(|c| c.credential_type = pb::CredentialType::Plain.into()),
            "INVALID_CREDENTIAL",
        ),
        (
            "REFRESHTOKEN credential",
            cred(|c| c.credential_type = pb::CredentialType::Refreshtoken.into()),
            "INVALID_CREDENTIAL",
        ),
        (
            "token type unknown",
            cred(|c| c.access_token_type = 7),
            "INVALID_TOKEN",
        ),
        (
            "token type missing",
            cred(|c| c.access_token_type = pb::AccessTokenType::Unspecified.into()),
            "INVALID_ARGUMENT",
        ),
        (
            "an empty sinkCredential: credentialType missing",
            cred(|c| *c = pb::SinkCredential::default()),
            "INVALID_ARGUMENT",
        ),
        (
            "an access token already expired",
            cred(|c| {
                c.access_token_expires_utc = Some(prost_types::Timestamp::from(
                    std::time::SystemTime::now() - Duration::from_secs(60),
                ));
            }),
            "INVALID_ARGUMENT",
        ),
        (
            "an expiry in the year 10000",
            cred(|c| {
                c.access_token_expires_utc = Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                });
            }),
            "INVALID_ARGUMENT",
        ),
        (
            "negative nanos",
            cred(|c| {
                if let Some(t) = c.access_token_expires_utc.as_mut() {
                    t.nanos = -1;
                }
            }),
            "INVALID_ARGUMENT",
        ),
        (
            "an access token over 4096 characters",
            cred(|c| c.access_token = Some("t".repeat(4097))),
            "INVALID_ARGUMENT",
        ),
        (
            "a loopback literal (loopback allowed only as 127.0.0.0/8)",
            with_sink(dev(), "https://[::1]:8443/cb".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "a link-local literal (cloud metadata)",
            with_sink(dev(), "https://169.254.169.254/latest".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "a multicast literal",
            with_sink(dev(), "https://224.0.0.1/cb".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "an unspecified literal",
            with_sink(dev(), "https://0.0.0.0/cb".into(), "t", hour),
            "INVALID_SINK",
        ),
        (
            "a mapped link-local literal",
            with_sink(dev(), "https://[::ffff:a9fe:a9fe]/cb".into(), "t", hour),
            "INVALID_SINK",
        ),
    ];
    for (what, req, want) in cases {
        let err = api.create_session(req).await.expect_err(what);
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::InvalidArgument, want),
            "{what}: {err:?}"
        );
        assert!(
            !err.message().contains("is required") || what.contains("missing"),
            "{what}: a precise message, not a generic one: {err:?}"
        );
    }
    let ok = api
        .create_session(with_sink(
            dev(),
            "https://sink.example/cb".into(),
            "t",
            hour,
        ))
        .await
        .expect("https sink");
    assert_eq!(
        ok.into_inner().sink.as_deref(),
        Some("https://sink.example/cb")
    );
}

/// A sink host name that resolves to a refused address is never dialled, though it passed the
/// create (only a literal address can be judged then); with the loopback range allowed, the same
/// sink is reached.
#[tokio::test(flavor = "multi_thread")]
async fn sink_addresses_are_checked_at_every_connection() {
    let config = |allow: &str| {
        format!(
            "ue_pools = [\"10.0.1.0/24\"]\n[notifications]\nallow_http_hosts = [\"localhost\", \"127.0.0.1\"]\n{allow}max_attempts = 2\nbackoff_base_ms = 50\n"
        )
    };
    let (lab, qodd) = qod_testkit::lab_with_qodd(&config("")).await;
    let sink = SinkServer::start(&lab.edge).expect("sink");
    let mut api = qodd.sessions().await.expect("client");
    let hour = Duration::from_secs(3600);
    let literal = api
        .create_session(with_sink(
            request(device(addr::DEVICE_V4), 60),
            sink.url("/literal"),
            "t",
            hour,
        ))
        .await
        .expect_err("a loopback literal");
    assert_eq!(reason(&literal), "INVALID_SINK", "{literal:?}");
    let by_name = format!("http://localhost:{}/named", sink.port);
    api.create_session(with_sink(
        request(device(addr::DEVICE_V4), 60),
        by_name.clone(),
        "t",
        hour,
    ))
    .await
    .expect("a host name passes the create");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qodd.log().contains("sink address refused") {
        assert!(
            Instant::now() < deadline,
            "the refusal was never logged:\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sink.received("/named").is_empty(),
        "a refused address was dialled"
    );
    drop(qodd);

    let qodd = qod_testkit::Qodd::start(
        &lab.edge,
        &[qod_testkit::EDGE_DEV_IF, qod_testkit::EDGE_SRV_IF],
        &config("allow_sink_ranges = [\"127.0.0.0/8\", \"::1\"]\n"),
    )
    .await
    .expect("qodd");
    let mut api = qodd.sessions().await.expect("client");
    api.create_session(with_sink(
        request(device("10.0.1.9"), 60),
        by_name,
        "t",
        hour,
    ))
    .await
    .expect("create");
    sink.wait_for("/named", 1, Duration::from_secs(10))
        .await
        .expect("an allowed range is reached by name");
}

#[tokio::test(flavor = "multi_thread")]
async fn correlator_is_validated_and_echoed_on_every_response() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let mut api = qodd.sessions().await.expect("client");
    let with = |value: &str, id: &str| {
        let mut r = Request::new(pb::GetSessionRequest {
            session_id: id.into(),
        });
        r.metadata_mut()
            .insert("x-correlator", value.parse().expect("ascii"));
        r
    };
    let created = api
        .create_session(request(device(addr::DEVICE_V4), 60))
        .await
        .expect("create")
        .into_inner();
    let ok = api
        .get_session(with(
            "b4333c46-49c0-4f62-80d7-f0ef930f1c46",
            &created.session_id,
        ))
        .await
        .expect("get");
    assert_eq!(
        ok.metadata()
            .get("x-correlator")
            .and_then(|v| v.to_str().ok()),
        Some("b4333c46-49c0-4f62-80d7-f0ef930f1c46")
    );
    let err = api
        .get_session(with("corr-404", "0b7c9bb0-5d3c-4f8e-9a57-2d1c5f8f0c11"))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.metadata()
            .get("x-correlator")
            .and_then(|v| v.to_str().ok()),
        Some("corr-404")
    );
    let bad = api
        .get_session(with("not valid!", &created.session_id))
        .await
        .expect_err("invalid correlator");
    assert_eq!(
        (bad.code(), reason(&bad).as_str()),
        (Code::InvalidArgument, "INVALID_ARGUMENT")
    );
    let mut profiles = qodd.profiles().await.expect("client");
    let mut r = Request::new(pb::RetrieveQosProfilesRequest::default());
    r.metadata_mut()
        .insert("x-correlator", "p-1".parse().expect("ascii"));
    let p = profiles.retrieve_qos_profiles(r).await.expect("profiles");
    assert_eq!(
        p.metadata()
            .get("x-correlator")
            .and_then(|v| v.to_str().ok()),
        Some("p-1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_resolve_through_pools_and_directory() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let mut api = qodd.sessions().await.expect("client");
    let mut profiles = qodd.profiles().await.expect("client");
    let phone = |p: &str| pb::Device {
        phone_number: Some(p.into()),
        ..Default::default()
    };

    // A phone number from the directory is the device at 10.0.1.2: its traffic is treated.
    let s = api
        .create_session(request(phone("+34600000001"), 60))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        s.device.as_ref().and_then(|d| d.phone_number.as_deref()),
        Some("+34600000001")
    );
    assert!(
        s.device.as_ref().is_some_and(|d| d.ipv4_address.is_none()),
        "exactly one identifier echoed"
    );
    let capture = Capture::start(&lab.server, SERVER_IF).expect("capture");
    let sa = |ip: &str, port| SocketAddr::new(ip.parse().expect("ip"), port);
    udp_send(
        &lab.device,
        sa(addr::DEVICE_V4, 43000),
        sa(addr::SERVER_V4, 5000),
        5,
        64,
    )
    .expect("udp");
    let seen = capture.finish().expect("capture");
    assert!(
        seen.iter()
            .filter(|p| p.dport == 5000)
            .all(|p| p.dscp == 32)
            && seen.iter().any(|p| p.dport == 5000)
    );

    // A device is echoed exactly as given (CAMARA), not in canonical form, on every read.
    let mut v6 = request(
        pb::Device {
            ipv6_address: Some("FD00:1:0:0:0:0:0:2".into()),
            ..Default::default()
        },
        60,
    );
    v6.application_server = Some(pb::ApplicationServer {
        ipv6_address: Some(addr::SERVER_V6.into()),
        ..Default::default()
    });
    let created = api
        .create_session(v6)
        .await
        .expect("create v6")
        .into_inner();
    let echoed = |s: &pb::SessionInfo| {
        s.device
            .as_ref()
            .and_then(|d| d.ipv6_address.clone())
            .unwrap_or_default()
    };
    assert_eq!(echoed(&created), "FD00:1:0:0:0:0:0:2");
    let read = qod_testkit::session_info(&mut api, &created.session_id).await;
    assert_eq!(echoed(&read), "FD00:1:0:0:0:0:0:2");
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(pb::Device {
                ipv6_address: Some(addr::DEVICE_V6.into()),
                ..Default::default()
            }),
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert_eq!(
        listed.sessions.iter().map(echoed).collect::<Vec<_>>(),
        ["FD00:1:0:0:0:0:0:2"]
    );

    // Both identifiers given: one is picked, no cross-check, one is echoed.
    let mut both = phone("+34600000001");
    both.ipv4_address = device(addr::DEVICE_V4).ipv4_address;
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(phone("+34600000001")),
        })
        .await
        .expect("retrieve by phone")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    let err = api
        .create_session(request(both, 60))
        .await
        .expect_err("same device again");
    assert_eq!(reason(&err), "CONFLICT");

    let none = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(device(addr::OTHER_DEVICE_V4)),
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert!(none.sessions.is_empty(), "an empty list, not an error");

    for (what, device, code, want) in [
        (
            "unknown phone",
            phone("+34600000999"),
            Code::NotFound,
            "IDENTIFIER_NOT_FOUND",
        ),
        (
            "address outside the pools",
            device("192.0.2.7"),
            Code::NotFound,
            "IDENTIFIER_NOT_FOUND",
        ),
        (
            "a device the directory knows at an address this node does not serve",
            phone("+34600000002"),
            Code::FailedPrecondition,
            "SERVICE_NOT_APPLICABLE",
        ),
        (
            "bad phone",
            phone("0034600"),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "NAI only",
            pb::Device {
                network_access_identifier: Some("u@example.com".into()),
                ..Default::default()
            },
            Code::FailedPrecondition,
            "UNSUPPORTED_IDENTIFIER",
        ),
    ] {
        let err = api
            .create_session(request(device.clone(), 60))
            .await
            .expect_err(what);
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (code, want),
            "{what}: {err:?}"
        );
        assert!(
            !format!("{err:?}").contains("192.0.2.50"),
            "{what}: an error never names what the directory maps a number to: {err:?}"
        );
        let err = api
            .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
                device: Some(device.clone()),
            })
            .await
            .expect_err(what);
        assert_eq!(reason(&err), want, "retrieve, {what}");
        assert!(
            !format!("{err:?}").contains("192.0.2.50"),
            "{what}: {err:?}"
        );
        if want != "INVALID_ARGUMENT" {
            let err = profiles
                .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
                    device: Some(device),
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_eq!(reason(&err), want, "profiles, {what}");
        }
    }
    let err = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest { device: None })
        .await
        .expect_err("no device");
    assert_eq!(reason(&err), "MISSING_IDENTIFIER");
}

/// Profiles for the rule tests: a short maximum, an INACTIVE and a DEPRECATED profile.
const PROFILES: &str = r#"
[[profiles]]
name = "QOS_T"
status = "ACTIVE"
dscp = 10
min_duration = { value = 2, unit = "Seconds" }
max_duration = { value = 20, unit = "Seconds" }

[[profiles]]
name = "QOS_U"
status = "ACTIVE"
dscp = 26

[[profiles]]
name = "QOS_OFF"
status = "INACTIVE"

[[profiles]]
name = "QOS_OLD"
status = "DEPRECATED"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn profile_duration_and_extension_rules() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(PROFILES).await;
    let mut api = qodd.sessions().await.expect("client");
    let with_profile = |p: &str, ip: &str, d: i32| {
        let mut r = request(device(ip), d);
        r.qos_profile = p.into();
        r
    };
    for (p, d, code, want) in [
        (
            "QOS_OFF",
            10,
            Code::FailedPrecondition,
            "QUALITY_ON_DEMAND.QOS_PROFILE_NOT_APPLICABLE",
        ),
        (
            "QOS_OLD",
            10,
            Code::FailedPrecondition,
            "QUALITY_ON_DEMAND.QOS_PROFILE_NOT_APPLICABLE",
        ),
        ("QOS_E", 10, Code::InvalidArgument, "INVALID_ARGUMENT"),
        (
            "QOS_T",
            1,
            Code::OutOfRange,
            "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE",
        ),
        (
            "QOS_T",
            21,
            Code::OutOfRange,
            "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE",
        ),
    ] {
        let err = api
            .create_session(with_profile(p, addr::DEVICE_V4, d))
            .await
            .expect_err(p);
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (code, want),
            "{p} {d}: {err:?}"
        );
    }

    let s = api
        .create_session(with_profile("QOS_T", addr::DEVICE_V4, 15))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(s.duration, 15);
    let extend = |id: &str, by: i32| pb::ExtendQosSessionDurationRequest {
        session_id: id.into(),
        requested_additional_duration: by,
    };
    let e = api
        .extend_qos_session_duration(extend(&s.session_id, 3))
        .await
        .expect("extend")
        .into_inner();
    assert_eq!(e.duration, 18);
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map_or(0, |t| t.seconds);
    assert_eq!(ts(&e.expires_at) - ts(&e.started_at), 18, "expiresAt moved");
    let e = api
        .extend_qos_session_duration(extend(&s.session_id, 100))
        .await
        .expect("capped")
        .into_inner();
    assert_eq!(e.duration, 20, "silently capped at maxDuration");
    let e = api
        .extend_qos_session_duration(extend(&s.session_id, 1))
        .await
        .expect("at the cap")
        .into_inner();
    assert_eq!(e.duration, 20);
    let err = api
        .extend_qos_session_duration(extend(&s.session_id, 0))
        .await
        .expect_err("zero");
    assert_eq!(err.code(), Code::InvalidArgument);

    // UNAVAILABLE: no extension; duration is the effective one; statusInfo and expiresAt set.
    let short = api
        .create_session(with_profile("QOS_T", addr::OTHER_DEVICE_V4, 2))
        .await
        .expect("create")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let err = api
        .extend_qos_session_duration(extend(&short.session_id, 5))
        .await
        .expect_err("unavailable");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (
            Code::FailedPrecondition,
            "QUALITY_ON_DEMAND.SESSION_EXTENSION_NOT_ALLOWED"
        )
    );
    let got = qod_testkit::session_info(&mut api, &short.session_id).await;
    assert_eq!(got.qos_status(), pb::QosStatus::Unavailable);
    assert_eq!(got.status_info(), pb::StatusInfo::DurationExpired);
    assert!(
        (2..=3).contains(&got.duration),
        "effective duration {}",
        got.duration
    );
    // An ended session holds its device no more (only live sessions do), and stays readable.
    api.create_session(with_profile("QOS_U", addr::OTHER_DEVICE_V4, 60))
        .await
        .expect("device free once its session ended");
    assert_eq!(
        qod_testkit::session_info(&mut api, &short.session_id)
            .await
            .qos_status(),
        pb::QosStatus::Unavailable
    );
    api.delete_session(pb::DeleteSessionRequest {
        session_id: short.session_id,
    })
    .await
    .expect("delete");

    // Profile filters.
    let mut profiles = qodd.profiles().await.expect("client");
    let active = profiles
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
            status: pb::QosProfileStatus::Active.into(),
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner();
    let names: Vec<_> = active.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["QOS_T", "QOS_U"]);
    let err = profiles
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
            device: Some(device("192.0.2.1")),
            ..Default::default()
        })
        .await;
    assert!(
        err.is_ok(),
        "no pools configured here: every device is served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_profiles_and_live_sessions_follow() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(PROFILES).await;
    let mut api = qodd.sessions().await.expect("client");
    let mut events = qod_testkit::watch_all(&mut api).await;
    let mut t = request(device(addr::DEVICE_V4), 20);
    t.qos_profile = "QOS_T".into();
    t.application_server_ports = Some(pb::PortsSpec {
        ports: vec![5000],
        ranges: vec![],
    });
    let t = api.create_session(t).await.expect("create").into_inner();
    let mut u = request(device(addr::OTHER_DEVICE_V4), 60);
    u.qos_profile = "QOS_U".into();
    let u = api.create_session(u).await.expect("create").into_inner();

    // The device directory does not know this phone number yet.
    let phone = || pb::RetrieveSessionsByDeviceRequest {
        device: Some(pb::Device {
            phone_number: Some("+34600000077".into()),
            ..Default::default()
        }),
    };
    let err = api
        .retrieve_sessions_by_device(phone())
        .await
        .expect_err("unknown phone");
    assert_eq!(reason(&err), "IDENTIFIER_NOT_FOUND");

    // QOS_T now marks AF21 (18); QOS_U is gone; the directory learns the phone number.
    let text = std::fs::read_to_string(qodd.config_path()).expect("config");
    let text = format!(
        "{text}\n[[devices]]\nphone_number = \"+34600000077\"\nipv4_address = \"{}\"\n",
        addr::DEVICE_V4
    );
    let text = text.replace("dscp = 10", "dscp = 18").replace(
        "name = \"QOS_U\"\nstatus = \"ACTIVE\"\ndscp = 26\n",
        "name = \"QOS_V\"\nstatus = \"ACTIVE\"\n",
    );
    std::fs::write(qodd.config_path(), text).expect("rewrite config");
    qodd.reload().expect("SIGHUP");

    let ended = qod_testkit::api::next_unavailable(&mut events, Duration::from_secs(10))
        .await
        .expect("termination event");
    assert_eq!(ended.session_id, u.session_id);
    assert_eq!(ended.status_info(), pb::StatusInfo::NetworkTerminated);

    let dscp = lab
        .uplink_dscp(addr::DEVICE_V4, 44000, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert!(
        !dscp.is_empty() && dscp.iter().all(|d| *d == 18),
        "reloaded DSCP applied: {dscp:?}"
    );
    let still = api
        .get_session(pb::GetSessionRequest {
            session_id: t.session_id,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(still.qos_status(), pb::QosStatus::Available);

    let mut profiles = qodd.profiles().await.expect("client");
    let names: Vec<String> = profiles
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .profiles
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(
        names.contains(&"QOS_V".to_owned()) && !names.contains(&"QOS_U".to_owned()),
        "{names:?}"
    );
    let by_phone = api
        .retrieve_sessions_by_device(phone())
        .await
        .expect("directory reloaded")
        .into_inner();
    assert_eq!(
        by_phone.sessions.len(),
        1,
        "the phone's device holds the QOS_T session"
    );

    // A broken file is refused and the running policy kept.
    std::fs::write(qodd.config_path(), "this is = not toml [").expect("write");
    qodd.reload().expect("SIGHUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = profiles
        .get_qos_profile(pb::GetQosProfileRequest {
            name: "QOS_V".into(),
        })
        .await;
    assert!(again.is_ok(), "policy kept after a bad reload");
    assert!(qodd.log().contains("reload refused"), "{}", qodd.log());
}
