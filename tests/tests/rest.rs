//! CAMARA's REST API over real HTTPS (reqwest, inside the lab's namespace) against a real
//! `qodd` with TLS and dev tokens: every operation, every error code CAMARA lists for it (status,
//! code, and that nothing changed), x-correlator, scopes, ownership, two- and three-legged
//! tokens, sessions shared with gRPC both ways, packets marked on the wire, body and time
//! limits. Needs root (namespaces, eBPF); run through `cargo xtask test`.

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use qod_daemon::devkit::TokenSpec;
use qod_proto::v1 as pb;
use qod_testkit::{
    Capture, Qodd, SERVER_IF, SinkServer, TEST_CLIENT, addr,
    api::{device, reason, sa},
    rest::{HttpReply, RestClient, RestTls},
    udp_send,
};
use serde_json::{Value, json};

const PORT: u16 = 9443;
const ROOT: &str = "/camara";
const QOD: &str = "/camara/quality-on-demand/v1";
const PROFILES: &str = "/camara/qos-profiles/v1";
const QOS_E_DSCP: u8 = 32;

/// The lab's pools and directory, a profile that may not be used, and the REST listener.
const CONFIG: &str = concat!(
    qod_testkit::lab_directory!(),
    r#"
[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
max_upstream_rate = { value = 500, unit = "kbps" }
max_downstream_rate = { value = 500, unit = "kbps" }
min_duration = { value = 1, unit = "Seconds" }
max_duration = { value = 1, unit = "Hours" }

[[profiles]]
name = "QOS_OLD"
status = "DEPRECATED"
service_class = "standard"
min_duration = { value = 1, unit = "Seconds" }
max_duration = { value = 1, unit = "Hours" }

[notifications]
allow_http_hosts = ["127.0.0.1"]
allow_sink_ranges = ["127.0.0.0/8"]

[rest]
listen = "127.0.0.1:9443"
api_root = "/camara"
request_timeout_ms = 1000
"#
);

/// A REST client of `qodd` in the lab's edge namespace, with `token`.
fn client(lab: &qod_testkit::Lab, qodd: &Qodd, token: Option<&str>) -> RestClient {
    let mut c = RestClient::new(
        &lab.edge,
        &format!("https://127.0.0.1:{PORT}"),
        RestTls {
            ca_pem: Some(qodd.pki.read("ca.crt").expect("ca")),
            ..Default::default()
        },
    )
    .expect("client");
    c.token = token.map(str::to_owned);
    c
}

fn v4(a: &str) -> Value {
    json!({"ipv4Address": {"publicAddress": a, "privateAddress": a}})
}

fn create_body(device: Option<Value>, server_port: u16) -> Value {
    let mut b = json!({
        "applicationServer": {"ipv4Address": addr::SERVER_V4},
        "applicationServerPorts": {"ports": [server_port]},
        "qosProfile": "QOS_E",
        "duration": 60,
    });
    if let Some(d) = device {
        b["device"] = d;
    }
    b
}

fn expect(r: &HttpReply, status: u16, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (status, code),
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    if status >= 400 {
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        let body = r.json();
        assert_eq!(body["status"], status, "{what}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// The ids of the sessions `c` sees for `dev`.
async fn sessions_of(c: &RestClient, dev: &str) -> Vec<String> {
    let r = c
        .call(
            "POST",
            &format!("{QOD}/retrieve-sessions"),
            Some(&json!({"device": v4(dev)})),
        )
        .await
        .expect("retrieve");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// One refusal: who calls, the body, the status and CAMARA code expected, what it is about.
type Case<'a> = (&'a RestClient, Value, u16, &'static str, &'static str);

/// Sends every case to `path` (POST) and checks its refusal.
async fn refused(path: &str, cases: Vec<Case<'_>>) {
    for (who, body, status, code, what) in cases {
        let r = who.call("POST", path, Some(&body)).await.expect(what);
        expect(&r, status, code, what);
    }
}

/// The device rules every operation that takes a device applies the same way.
fn device_cases<'a>(c: &'a RestClient, three_legged: &'a RestClient) -> Vec<Case<'a>> {
    vec![
        (
            c,
            json!({"device": v4("192.0.2.77")}),
            404,
            "IDENTIFIER_NOT_FOUND",
            "device not served",
        ),
        (
            three_legged,
            json!({"device": v4(addr::DEVICE_V4)}),
            422,
            "UNNECESSARY_IDENTIFIER",
            "three-legged with device",
        ),
        (
            c,
            json!({"device": {"networkAccessIdentifier": "a@b.example"}}),
            422,
            "UNSUPPORTED_IDENTIFIER",
            "NAI",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_over_https_shares_its_sessions_with_grpc() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let c = client(&lab, &qodd, Some(&qodd.token));
    let mut grpc = qodd.sessions().await.expect("grpc");

    // createSession: 201, CAMARA's SessionInfo, the correlator echoed, a Location.
    let r = c
        .call_with(
            "POST",
            &format!("{QOD}/sessions"),
            Some(&create_body(Some(v4(addr::DEVICE_V4)), 5000)),
            &[("x-correlator", "corr-create-1")],
        )
        .await
        .expect("create");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-correlator"), Some("corr-create-1"));
    let s = r.json();
    let id = s["sessionId"].as_str().expect("sessionId").to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("{QOD}/sessions/{id}").as_str())
    );
    assert_eq!(s["qosStatus"], "AVAILABLE");
    assert_eq!(s["duration"], 60);
    assert_eq!(s["qosProfile"], "QOS_E");
    assert_eq!(s["device"], v4(addr::DEVICE_V4));
    assert_eq!(s["applicationServer"]["ipv4Address"], addr::SERVER_V4);
    assert_eq!(s["applicationServerPorts"]["ports"], json!([5000]));
    assert!(s.get("statusInfo").is_none());
    let started = time::OffsetDateTime::parse(
        s["startedAt"].as_str().expect("startedAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    let expires = time::OffsetDateTime::parse(
        s["expiresAt"].as_str().expect("expiresAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    assert_eq!((expires - started).whole_seconds(), 60);

    // The session is real: its flow is marked on the wire.
    let at_server = Capture::start(&lab.server, SERVER_IF).expect("capture");
    let (dev, srv) = (addr::DEVICE_V4, addr::SERVER_V4);
    udp_send(&lab.device, sa(dev, 40000), sa(srv, 5000), 10, 200).expect("udp");
    let seen = at_server.finish().expect("capture");
    let flow: Vec<_> = seen
        .iter()
        .filter(|p| p.dport == 5000 && p.src.to_string() == dev)
        .collect();
    assert_eq!(flow.len(), 10, "every datagram arrived");
    assert!(flow.iter().all(|p| p.dscp == QOS_E_DSCP), "{flow:?}");

    // gRPC sees it, as the same client.
    let g = grpc
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("grpc get")
        .into_inner();
    assert_eq!(g.duration, 60);
    assert_eq!(g.qos_profile, "QOS_E");

    // getSession.
    let r = c
        .call("GET", &format!("{QOD}/sessions/{id}"), None)
        .await
        .expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["sessionId"], id.as_str());

    // extendQosSessionDuration over REST, then over gRPC; both seen by both.
    let r = c
        .call(
            "POST",
            &format!("{QOD}/sessions/{id}/extend"),
            Some(&json!({"requestedAdditionalDuration": 30})),
        )
        .await
        .expect("extend");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["duration"], 90);
    grpc.extend_qos_session_duration(pb::ExtendQosSessionDurationRequest {
        session_id: id.clone(),
        requested_additional_duration: 10,
    })
    .await
    .expect("grpc extend");
    let r = c
        .call("GET", &format!("{QOD}/sessions/{id}"), None)
        .await
        .expect("get");
    assert_eq!(r.json()["duration"], 100);
    // Beyond the profile's maximum the extension is capped (CAMARA), not refused.
    let r = c
        .call(
            "POST",
            &format!("{QOD}/sessions/{id}/extend"),
            Some(&json!({"requestedAdditionalDuration": 100_000})),
        )
        .await
        .expect("extend");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["duration"], 3600);

    // retrieveSessionsByDevice: the session for its device, [] for another.
    assert_eq!(
        sessions_of(&c, addr::DEVICE_V4).await,
        std::slice::from_ref(&id)
    );
    assert!(sessions_of(&c, addr::OTHER_DEVICE_V4).await.is_empty());

    // A session created over gRPC is read, extended and deleted over REST.
    let g = grpc
        .create_session(pb::CreateSessionRequest {
            device: Some(device(addr::OTHER_DEVICE_V4)),
            application_server: Some(pb::ApplicationServer {
                ipv4_address: Some(addr::SERVER_V4.into()),
                ..Default::default()
            }),
            qos_profile: "QOS_E".into(),
            duration: 60,
            ..Default::default()
        })
        .await
        .expect("grpc create")
        .into_inner();
    let r = c
        .call("GET", &format!("{QOD}/sessions/{}", g.session_id), None)
        .await
        .expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["device"], v4(addr::OTHER_DEVICE_V4));
    let r = c
        .call(
            "POST",
            &format!("{QOD}/sessions/{}/extend", g.session_id),
            Some(&json!({"requestedAdditionalDuration": 5})),
        )
        .await
        .expect("extend");
    assert_eq!(r.json()["duration"], 65);
    let r = c
        .call("DELETE", &format!("{QOD}/sessions/{}", g.session_id), None)
        .await
        .expect("delete");
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let status = grpc
        .get_session(pb::GetSessionRequest {
            session_id: g.session_id.clone(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(reason(&status), "NOT_FOUND");

    // The REST session deleted over gRPC: gone for REST too, and its flow unmarked.
    grpc.delete_session(pb::DeleteSessionRequest {
        session_id: id.clone(),
    })
    .await
    .expect("grpc delete");
    let r = c
        .call("GET", &format!("{QOD}/sessions/{id}"), None)
        .await
        .expect("get");
    expect(&r, 404, "NOT_FOUND", "deleted over gRPC");
    let at_server = Capture::start(&lab.server, SERVER_IF).expect("capture");
    udp_send(&lab.device, sa(dev, 40000), sa(srv, 5000), 5, 200).expect("udp");
    let seen = at_server.finish().expect("capture");
    assert!(
        seen.iter().filter(|p| p.dport == 5000).all(|p| p.dscp == 0),
        "unmarked after delete"
    );

    // Profiles: the list, filters, one by name.
    let r = c
        .call(
            "POST",
            &format!("{PROFILES}/retrieve-qos-profiles"),
            Some(&json!({})),
        )
        .await
        .expect("profiles");
    assert_eq!(r.status, 200);
    let mut names: Vec<String> = r
        .json()
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, ["QOS_E", "QOS_OLD"]);
    let r = c
        .call(
            "POST",
            &format!("{PROFILES}/retrieve-qos-profiles"),
            Some(&json!({"status": "DEPRECATED", "device": v4(addr::DEVICE_V4)})),
        )
        .await
        .expect("profiles");
    assert_eq!(r.json()[0]["name"], "QOS_OLD");
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    let r = c
        .call("GET", &format!("{PROFILES}/qos-profiles/QOS_E"), None)
        .await
        .expect("profile");
    assert_eq!(r.status, 200);
    let p = r.json();
    assert_eq!(p["status"], "ACTIVE");
    assert_eq!(
        p["maxDownstreamRate"],
        json!({"value": 500, "unit": "kbps"})
    );
    assert_eq!(p["maxDuration"], json!({"value": 1, "unit": "Hours"}));
    assert_eq!(p["serviceClass"], "real_time_interactive");

    // HTTP/2 over TLS (ALPN) serves as HTTP/1.1 does.
    let mut h2 = RestClient::new(
        &lab.edge,
        &format!("https://127.0.0.1:{PORT}"),
        RestTls {
            ca_pem: Some(qodd.pki.read("ca.crt").expect("ca")),
            http2_only: true,
            ..Default::default()
        },
    )
    .expect("h2 client");
    h2.token = Some(qodd.token.clone());
    let r = h2
        .call("GET", &format!("{PROFILES}/qos-profiles/QOS_E"), None)
        .await
        .expect("h2");
    assert_eq!((r.status, r.version.as_str()), (200, "HTTP/2.0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_camara_error_is_its_status_and_code_and_changes_nothing() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let c = client(&lab, &qodd, Some(&qodd.token));
    let sessions = format!("{QOD}/sessions");
    let mine = c
        .call(
            "POST",
            &sessions,
            Some(&create_body(Some(v4(addr::DEVICE_V4)), 5000)),
        )
        .await
        .expect("create");
    assert_eq!(mine.status, 201);
    let mine = mine.json()["sessionId"].as_str().expect("id").to_owned();

    let mint = |client: &str, scopes: &[&str], subject: Option<Value>| {
        qodd.pki
            .mint(&TokenSpec {
                client: client.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                device: subject,
                ttl: Duration::from_secs(600),
            })
            .expect("mint")
    };
    let all: Vec<&str> = qod_daemon::auth::scope::ALL.to_vec();
    let other = client(&lab, &qodd, Some(&mint("other-client", &all, None)));
    let three_legged = client(
        &lab,
        &qodd,
        Some(&mint(TEST_CLIENT, &all, Some(json!("ipv4:10.0.1.3")))),
    );
    let read_only = client(
        &lab,
        &qodd,
        Some(&mint(
            TEST_CLIENT,
            &["quality-on-demand:sessions:read"],
            None,
        )),
    );
    let no_token = client(&lab, &qodd, None);
    let expired = {
        let mut spec = TokenSpec::full(TEST_CLIENT);
        spec.ttl = Duration::ZERO;
        let mut claims = spec.claims();
        claims["exp"] = json!(qod_daemon::devkit::unix_now() - 3600);
        client(&lab, &qodd, Some(&qodd.pki.sign(&claims).expect("sign")))
    };
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    let sink = SinkServer::start(&lab.edge).expect("sink");
    let with = |patch: Value| {
        let mut b = create_body(Some(v4(addr::OTHER_DEVICE_V4)), 6000);
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                b.as_object_mut().expect("object").remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };

    // createSession, one case per code CAMARA lists for it.
    let cases: Vec<Case<'_>> = vec![
        (
            &c,
            with(json!({"extra": 1})),
            400,
            "INVALID_ARGUMENT",
            "unknown property",
        ),
        (
            &c,
            with(json!({"applicationServer": null})),
            400,
            "INVALID_ARGUMENT",
            "no applicationServer",
        ),
        (
            &c,
            with(json!({"applicationServer": {}})),
            400,
            "INVALID_ARGUMENT",
            "empty applicationServer",
        ),
        (
            &c,
            with(json!({"qosProfile": "QOS_NONE"})),
            400,
            "INVALID_ARGUMENT",
            "unknown profile",
        ),
        (
            &c,
            with(json!({"duration": 0})),
            400,
            "INVALID_ARGUMENT",
            "duration 0",
        ),
        (
            &c,
            with(json!({"duration": "60"})),
            400,
            "INVALID_ARGUMENT",
            "duration as text",
        ),
        (
            &c,
            with(json!({"device": {}})),
            400,
            "INVALID_ARGUMENT",
            "empty device",
        ),
        (
            &c,
            with(json!({"device": {"ipv4Address": {"publicAddress": addr::OTHER_DEVICE_V4}}})),
            400,
            "INVALID_ARGUMENT",
            "public address alone",
        ),
        (
            &c,
            with(json!({"devicePorts": {"ports": [70000]}})),
            400,
            "OUT_OF_RANGE",
            "port",
        ),
        (
            &c,
            with(json!({"duration": 7200})),
            400,
            "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE",
            "duration over the profile's",
        ),
        (
            &c,
            with(
                json!({"sink": sink.url("/s"), "sinkCredential": {"credentialType": "PLAIN", "identifier": "a", "secret": "b"}}),
            ),
            400,
            "INVALID_CREDENTIAL",
            "PLAIN",
        ),
        (
            &c,
            with(
                json!({"sink": sink.url("/s"), "sinkCredential": {"credentialType": "ACCESSTOKEN", "accessToken": "t", "accessTokenExpiresUtc": future, "accessTokenType": "mac"}}),
            ),
            400,
            "INVALID_TOKEN",
            "token type",
        ),
        (
            &c,
            with(json!({"sink": "ftp://sink.example/x"})),
            400,
            "INVALID_SINK",
            "sink scheme",
        ),
        (
            &c,
            with(json!({"device": v4("192.0.2.77")})),
            404,
            "IDENTIFIER_NOT_FOUND",
            "device not served",
        ),
        (
            &c,
            with(json!({"device": {"phoneNumber": "+34600000099"}})),
            404,
            "IDENTIFIER_NOT_FOUND",
            "unknown number",
        ),
        (
            &c,
            create_body(Some(v4(addr::DEVICE_V4)), 5000),
            409,
            "CONFLICT",
            "same flow again",
        ),
        (
            &c,
            with(json!({"device": null})),
            422,
            "MISSING_IDENTIFIER",
            "two-legged without device",
        ),
        (
            &three_legged,
            with(json!({})),
            422,
            "UNNECESSARY_IDENTIFIER",
            "three-legged with device",
        ),
        (
            &c,
            with(json!({"device": {"networkAccessIdentifier": "a@b.example"}})),
            422,
            "UNSUPPORTED_IDENTIFIER",
            "NAI",
        ),
        (
            &c,
            with(json!({"device": {"phoneNumber": "+34600000002"}})),
            422,
            "SERVICE_NOT_APPLICABLE",
            "a number whose device is not served",
        ),
        (
            &c,
            with(json!({"qosProfile": "QOS_OLD"})),
            422,
            "QUALITY_ON_DEMAND.QOS_PROFILE_NOT_APPLICABLE",
            "deprecated profile",
        ),
        (
            &no_token,
            with(json!({})),
            401,
            "UNAUTHENTICATED",
            "no token",
        ),
        (
            &expired,
            with(json!({})),
            401,
            "UNAUTHENTICATED",
            "expired token",
        ),
        (
            &read_only,
            with(json!({})),
            403,
            "PERMISSION_DENIED",
            "no create scope",
        ),
    ];
    refused(&sessions, cases).await;
    // Malformed JSON, a wrong or missing content type, an invalid x-correlator (not echoed).
    for (headers, body, what) in [
        (
            vec![("content-type", "application/json")],
            "{\"duration\":",
            "truncated JSON",
        ),
        (vec![("content-type", "text/plain")], "{}", "text/plain"),
        (vec![], "{}", "no content type"),
        (
            vec![
                ("content-type", "application/json"),
                ("x-correlator", "bad value!"),
            ],
            "{}",
            "invalid x-correlator",
        ),
    ] {
        let mut req = qod_testkit::rest::HttpRequest {
            method: "POST".into(),
            path: sessions.clone(),
            body: Some(body.as_bytes().to_vec()),
            ..Default::default()
        };
        req.headers = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        let r = c.send(req).await.expect(what);
        expect(&r, 400, "INVALID_ARGUMENT", what);
        assert_eq!(r.header("x-correlator"), None, "{what}");
    }
    // An error still echoes a valid correlator.
    let r = c
        .call_with(
            "POST",
            &sessions,
            Some(&with(json!({"extra": 1}))),
            &[("x-correlator", "corr-err-7")],
        )
        .await
        .expect("call");
    assert_eq!(r.header("x-correlator"), Some("corr-err-7"));

    // get / delete: malformed id, unknown id, another client's session, no scope.
    let unknown = uuid::Uuid::new_v4();
    for method in ["GET", "DELETE"] {
        let path = |id: &str| format!("{QOD}/sessions/{id}");
        expect(
            &c.call(method, &path("not-a-uuid"), None).await.expect("x"),
            400,
            "INVALID_ARGUMENT",
            "malformed id",
        );
        expect(
            &c.call(method, &path(&unknown.to_string()), None)
                .await
                .expect("x"),
            404,
            "NOT_FOUND",
            "unknown id",
        );
        expect(
            &other.call(method, &path(&mine), None).await.expect("x"),
            403,
            "PERMISSION_DENIED",
            "another client's",
        );
        expect(
            &no_token.call(method, &path(&mine), None).await.expect("x"),
            401,
            "UNAUTHENTICATED",
            "no token",
        );
    }
    expect(
        &read_only
            .call("DELETE", &format!("{QOD}/sessions/{mine}"), None)
            .await
            .expect("x"),
        403,
        "PERMISSION_DENIED",
        "no delete scope",
    );

    // extend: bad duration, unknown, another's, and a session no longer AVAILABLE.
    let extend = |id: &str| format!("{QOD}/sessions/{id}/extend");
    let add = |n: Value| json!({ "requestedAdditionalDuration": n });
    expect(
        &c.call("POST", &extend(&mine), Some(&add(json!(0))))
            .await
            .expect("x"),
        400,
        "INVALID_ARGUMENT",
        "0 s",
    );
    expect(
        &c.call("POST", &extend(&mine), Some(&json!({})))
            .await
            .expect("x"),
        400,
        "INVALID_ARGUMENT",
        "missing",
    );
    expect(
        &c.call("POST", &extend(&unknown.to_string()), Some(&add(json!(5))))
            .await
            .expect("x"),
        404,
        "NOT_FOUND",
        "unknown",
    );
    expect(
        &other
            .call("POST", &extend(&mine), Some(&add(json!(5))))
            .await
            .expect("x"),
        403,
        "PERMISSION_DENIED",
        "another's",
    );
    let short = c
        .call(
            "POST",
            &sessions,
            Some(&with(json!({"duration": 1, "device": v4("10.0.1.9")}))),
        )
        .await
        .expect("short");
    assert_eq!(short.status, 201);
    let short = short.json()["sessionId"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .call("GET", &format!("{QOD}/sessions/{short}"), None)
            .await
            .expect("get");
        if r.json()["qosStatus"] == "UNAVAILABLE" {
            assert_eq!(r.json()["statusInfo"], "DURATION_EXPIRED");
            break;
        }
        assert!(Instant::now() < deadline, "the 1 s session never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect(
        &c.call("POST", &extend(&short), Some(&add(json!(5))))
            .await
            .expect("x"),
        409,
        "QUALITY_ON_DEMAND.SESSION_EXTENSION_NOT_ALLOWED",
        "expired",
    );

    // retrieveSessionsByDevice.
    let retrieve = format!("{QOD}/retrieve-sessions");
    let mut cases: Vec<Case<'_>> = vec![
        (
            &c,
            json!({"device": v4(addr::DEVICE_V4), "x": 1}),
            400,
            "INVALID_ARGUMENT",
            "unknown property",
        ),
        (
            &c,
            json!({"device": {"ipv4Address": {"publicAddress": "10.0.1.2", "publicPort": 70000}}}),
            400,
            "OUT_OF_RANGE",
            "port",
        ),
        (
            &c,
            json!({}),
            422,
            "MISSING_IDENTIFIER",
            "two-legged without device",
        ),
        (
            &read_only,
            json!({"device": v4(addr::DEVICE_V4)}),
            403,
            "PERMISSION_DENIED",
            "no scope",
        ),
    ];
    cases.extend(device_cases(&c, &three_legged));
    refused(&retrieve, cases).await;
    // Another client sees none of this client's sessions; a three-legged token its own only.
    assert!(sessions_of(&other, addr::DEVICE_V4).await.is_empty());
    let r = three_legged
        .call("POST", &retrieve, Some(&json!({})))
        .await
        .expect("3-legged");
    assert_eq!((r.status, r.json()), (200, json!([])));

    // Profiles.
    let list = format!("{PROFILES}/retrieve-qos-profiles");
    let mut cases: Vec<Case<'_>> = vec![
        (
            &c,
            json!({"nme": "QOS_E"}),
            400,
            "INVALID_ARGUMENT",
            "unknown property",
        ),
        (
            &c,
            json!({"status": "GONE"}),
            400,
            "INVALID_ARGUMENT",
            "unknown status",
        ),
        (&no_token, json!({}), 401, "UNAUTHENTICATED", "no token"),
        (&read_only, json!({}), 403, "PERMISSION_DENIED", "no scope"),
    ];
    cases.extend(device_cases(&c, &three_legged));
    refused(&list, cases).await;
    expect(
        &c.call("GET", &format!("{PROFILES}/qos-profiles/QOS_NONE"), None)
            .await
            .expect("x"),
        404,
        "NOT_FOUND",
        "unknown profile",
    );
    expect(
        &c.call("GET", &format!("{PROFILES}/qos-profiles/x"), None)
            .await
            .expect("x"),
        400,
        "INVALID_ARGUMENT",
        "name too short",
    );

    // Paths and methods qodd does not serve.
    let r = c
        .call("PUT", &sessions, Some(&json!({})))
        .await
        .expect("put");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    expect(
        &c.call("GET", &format!("{ROOT}/nothing"), None)
            .await
            .expect("x"),
        404,
        "NOT_FOUND",
        "unknown path",
    );

    // Nothing changed: this client still has exactly its one session, and no sink was called.
    let mut seen = sessions_of(&c, addr::DEVICE_V4).await;
    seen.extend(sessions_of(&c, addr::OTHER_DEVICE_V4).await);
    assert_eq!(seen, std::slice::from_ref(&mine));
    assert!(sink.received("/s").is_empty());
    let r = c
        .call("GET", &format!("{QOD}/sessions/{mine}"), None)
        .await
        .expect("get");
    assert_eq!((r.status, r.json()["duration"].clone()), (200, json!(60)));
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_and_slow_clients_are_bounded_and_the_rate_is_per_client() {
    let config = CONFIG.replace(
        "[rest]",
        "[limits]\nrequests_per_second = 2\nrequest_burst = 6\nmax_message_bytes = 2048\nmax_active_sessions_per_client = 1\n\n[rest]",
    );
    let (lab, qodd) = qod_testkit::lab_with_qodd(&config).await;
    let c = client(&lab, &qodd, Some(&qodd.token));

    // The client's one AVAILABLE session is its quota.
    let r = c
        .call(
            "POST",
            &format!("{QOD}/sessions"),
            Some(&create_body(Some(v4(addr::DEVICE_V4)), 5000)),
        )
        .await
        .expect("create");
    assert_eq!(r.status, 201);
    let r = c
        .call(
            "POST",
            &format!("{QOD}/sessions"),
            Some(&create_body(Some(v4(addr::OTHER_DEVICE_V4)), 5000)),
        )
        .await
        .expect("create");
    expect(&r, 429, "QUOTA_EXCEEDED", "a second active session");

    // A body over limits.max_message_bytes.
    let mut big = create_body(Some(v4(addr::DEVICE_V4)), 5000);
    big["sink"] = json!(format!("https://a.example/{}", "x".repeat(4000)));
    let r = c
        .call("POST", &format!("{QOD}/sessions"), Some(&big))
        .await
        .expect("big");
    expect(&r, 400, "INVALID_ARGUMENT", "oversized body");

    // A client that sends its headers and never its body is answered within the timeout; one
    // that never finishes its headers is disconnected. Neither holds up another client.
    let started = Instant::now();
    let slow = lab
        .edge
        .tcp_connect(sa("127.0.0.1", PORT), None)
        .expect("connect");
    let stalled_headers = lab
        .edge
        .tcp_connect(sa("127.0.0.1", PORT), None)
        .expect("connect");
    let ca = qodd.pki.read("ca.crt").expect("ca");
    let token = qodd.token.clone();
    let waited = tokio::task::spawn_blocking(move || tls_stall(slow, &ca, Some(&token), true));
    let ca = qodd.pki.read("ca.crt").expect("ca");
    let headers_waited =
        tokio::task::spawn_blocking(move || tls_stall(stalled_headers, &ca, None, false));
    // Meanwhile another client is served at once.
    let other = client(
        &lab,
        &qodd,
        Some(
            &qodd
                .pki
                .mint(&TokenSpec::full("another-client"))
                .expect("mint"),
        ),
    );
    let r = other
        .call("GET", &format!("{PROFILES}/qos-profiles/QOS_E"), None)
        .await
        .expect("served");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let (answer, after) = waited.await.expect("join").expect("slow body");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not arrive within 1000 ms"), "{answer}");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "{after:?}"
    );
    let (answer, after) = headers_waited.await.expect("join").expect("slow headers");
    assert!(!answer.contains("201"), "{answer}");
    assert!(
        after < Duration::from_secs(5),
        "closed within the timeout: {after:?}"
    );

    // The request rate is per client: this one's burst runs out (429), the other's does not.
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = c
            .call("GET", &format!("{PROFILES}/qos-profiles/QOS_E"), None)
            .await
            .expect("call");
        codes.push((r.status, r.code()));
    }
    assert!(
        codes.contains(&(429, "TOO_MANY_REQUESTS".into())),
        "{codes:?}"
    );
    let r = other
        .call("GET", &format!("{PROFILES}/qos-profiles/QOS_E"), None)
        .await
        .expect("call");
    assert_eq!(r.status, 200);
}

/// Opens TLS on `tcp`, sends a request's headers (with a `Content-Length` it never honours when
/// `headers_done`, else half a header line) and reads what comes back until the server closes.
fn tls_stall(
    tcp: std::net::TcpStream,
    ca: &[u8],
    token: Option<&str>,
    headers_done: bool,
) -> anyhow::Result<(String, Duration)> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("127.0.0.1")?.to_owned(),
    )?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = if headers_done {
        format!(
            "POST {QOD}/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{{\"dur",
            token.unwrap_or_default()
        )
    } else {
        format!("GET {PROFILES}/qos-profiles/QOS_E HTTP/1.1\r\nhost: 12")
    };
    tls.write_all(head.as_bytes())?;
    tls.flush()?;
    let started = Instant::now();
    tls.sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_served_openapi_documents_describe_this_node() {
    let (lab, qodd) = qod_testkit::lab_with_qodd(CONFIG).await;
    let c = client(&lab, &qodd, None);
    let r = c
        .call("GET", &format!("{QOD}/openapi.json"), None)
        .await
        .expect("document");
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["info"]["version"], "1.1.0");
    assert_eq!(
        doc["servers"][0]["url"],
        format!("https://127.0.0.1:{PORT}{QOD}")
    );
    assert!(doc["paths"]["/sessions/{sessionId}/extend"]["post"].is_object());
    assert!(
        doc["info"]["x-qod-differences"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["openId"]["openIdConnectUrl"],
        format!(
            "{}/.well-known/openid-configuration",
            qod_daemon::devkit::DEV_ISSUER.trim_end_matches('/')
        )
    );
    let r = c
        .call("GET", &format!("{PROFILES}/openapi.json"), None)
        .await
        .expect("document");
    assert_eq!(
        r.json()["servers"][0]["url"],
        format!("https://127.0.0.1:{PORT}{PROFILES}")
    );
}

/// Mutual TLS on the REST listener, the client id taken from the certificate as on gRPC: no
/// certificate fails the handshake, a token issued to another client than the certificate's
/// is UNAUTHENTICATED, and the session belongs to the certificate's client on both APIs.
#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_name_the_rest_client() {
    use qod_testkit::{EDGE_DEV_IF, EDGE_SRV_IF, Lab, qodd_bin};
    qod_testkit::api::require_root();
    let lab = Lab::new().expect("lab");
    let qodd = Qodd::start_secured(
        &qodd_bin(),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        CONFIG,
        qod_testkit::mutual_tls,
    )
    .await
    .expect("qodd");
    let pki = &qodd.pki;
    let dev = qod_daemon::devkit::DEV_CLIENT;
    let identity = |cn: &str| {
        let (cert, key) = pki.client_cert(cn).expect("client certificate");
        format!("{cert}{key}").into_bytes()
    };
    let with = |cn: Option<&str>, token_client: &str| {
        let mut c = RestClient::new(
            &lab.edge,
            &format!("https://127.0.0.1:{PORT}"),
            RestTls {
                ca_pem: Some(pki.read("ca.crt").expect("ca")),
                identity_pem: cn.map(identity),
                ..Default::default()
            },
        )
        .expect("client");
        c.token = Some(pki.mint(&TokenSpec::full(token_client)).expect("token"));
        c
    };
    let body = create_body(Some(v4(addr::DEVICE_V4)), 5000);
    let sessions = format!("{QOD}/sessions");

    assert!(
        with(None, dev)
            .call("POST", &sessions, Some(&body))
            .await
            .is_err(),
        "no client certificate: no TLS session"
    );
    let r = with(Some(dev), TEST_CLIENT)
        .call("POST", &sessions, Some(&body))
        .await
        .expect("call");
    expect(&r, 401, "UNAUTHENTICATED", "a token of another client");
    let r = with(Some(dev), dev)
        .call("POST", &sessions, Some(&body))
        .await
        .expect("call");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["sessionId"].as_str().expect("id").to_owned();
    // The same certificate's client reads it over gRPC; another certificate's client may not.
    let token = pki.mint(&TokenSpec::full(dev)).expect("token");
    let mut grpc = qodd
        .sessions_with(&qodd.options(Some(&token)).expect("options"))
        .await
        .expect("grpc");
    let g = grpc
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("the certificate's client reads it over gRPC")
        .into_inner();
    assert_eq!(g.session_id, id);
    let r = with(Some("someone-else"), "someone-else")
        .call("GET", &format!("{QOD}/sessions/{id}"), None)
        .await
        .expect("call");
    expect(&r, 403, "PERMISSION_DENIED", "another certificate's client");
}
