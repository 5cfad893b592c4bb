//! Access control through the real gRPC API of a real `qodd`: TLS on its socket, JWT bearer
//! tokens from a dev PKI, CAMARA scopes, ownership, two- and three-legged tokens, mutual TLS and
//! per-client limits. Every refusal is checked for its exact status and CAMARA reason, and for
//! changing nothing. Needs root (namespaces, eBPF); run through `cargo xtask test`.

use std::{fmt::Debug, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use qod_daemon::devkit::{DevPki, TokenSpec, unix_now};
use qod_proto::{
    client,
    v1::{self as pb, qos_profiles_client::QosProfilesClient},
};
use qod_testkit::{
    EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, Reply, SinkServer, TEST_CLIENT, addr,
    api::{device, reason, require_root},
    qodd_bin,
};
use serde_json::{Value, json};
use tonic::{Code, Status};

const QOS_E_DSCP: u8 = 32;

fn create(device: Option<pb::Device>, server_port: u32) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device,
        application_server: Some(pb::ApplicationServer {
            ipv4_address: Some(addr::SERVER_V4.into()),
            ..Default::default()
        }),
        application_server_ports: Some(pb::PortsSpec {
            ports: vec![server_port],
            ranges: vec![],
        }),
        qos_profile: "QOS_E".into(),
        duration: 60,
        ..Default::default()
    }
}

/// Code and CAMARA reason of a call that must be refused.
fn refusal<T: Debug>(r: Result<T, Status>) -> (Code, String) {
    let s = r.expect_err("must be refused");
    (s.code(), reason(&s))
}

fn is(code: Code, reason: &str) -> (Code, String) {
    (code, reason.to_owned())
}

fn get(id: &str) -> pb::GetSessionRequest {
    pb::GetSessionRequest {
        session_id: id.into(),
    }
}

fn retrieve(device: Option<pb::Device>) -> pb::RetrieveSessionsByDeviceRequest {
    pb::RetrieveSessionsByDeviceRequest { device }
}

/// Every profile, as the bearer of `token`.
async fn list_profiles(
    qodd: &Qodd,
    token: String,
) -> Result<tonic::Response<pb::RetrieveQosProfilesResponse>, Status> {
    qodd.profiles_as(&token)
        .await
        .expect("profiles client")
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
        .await
}

/// The caller's sessions of device `addr` (the retrieve must succeed: `why`).
async fn sessions_of(
    api: &mut pb::quality_on_demand_client::QualityOnDemandClient<client::QodChannel>,
    addr: &str,
    why: &str,
) -> pb::RetrieveSessionsByDeviceResponse {
    api.retrieve_sessions_by_device(retrieve(Some(device(addr))))
        .await
        .unwrap_or_else(|e| panic!("{why}: {e:?}"))
        .into_inner()
}

/// The claims of a valid full-scope token of `client`, to spoil one way or another.
fn claims(client: &str) -> serde_json::Map<String, Value> {
    match TokenSpec::full(client).claims() {
        Value::Object(m) => m,
        _ => unreachable!("claims are an object"),
    }
}

async fn lab() -> (Lab, Qodd) {
    qod_testkit::lab_with_qodd(
        "ue_pools = [\"10.0.1.0/24\", \"fd00:1::/64\", \"fd00:11::/64\"]\n[[devices]]\nphone_number = \"+34600000003\"\nipv4_address = \"10.0.1.3\"\n",
    )
    .await
}

/// Missing, malformed, badly signed, wrongly signed (`none`, HS256 keyed with the public key),
/// expired, not yet valid, foreign issuer or audience, or nameless tokens: UNAUTHENTICATED,
/// and nothing is created. A token just past `exp` but within the leeway still works.
#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_unauthenticated_and_change_nothing() {
    let (_lab, qodd) = lab().await;
    let pki = &qodd.pki;
    let other = tempfile::tempdir().expect("dir");
    let other_pki = DevPki::ensure(other.path()).expect("pki");
    let now = unix_now();
    let signed = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut c = claims(TEST_CLIENT);
        edit(&mut c);
        pki.sign(&Value::Object(c)).expect("sign")
    };
    let b64 = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(Value::Object(claims(TEST_CLIENT)))
    );
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("qod-dev-es256".into());
    let hs256_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &claims(TEST_CLIENT),
        &EncodingKey::from_secret(&pki.read("jwks.json").expect("jwks")),
    )
    .expect("hs256");
    let typed = |typ: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("qod-dev-es256".into());
        h.typ = Some(typ.into());
        jsonwebtoken::encode(
            &h,
            &claims(TEST_CLIENT),
            &EncodingKey::from_ec_pem(&pki.read("jwt-signing.key").expect("key")).expect("key"),
        )
        .expect("sign")
    };
    // RFC 9068's type, and plain JWT, are access tokens.
    for typ in ["at+jwt", "application/at+jwt", "JWT"] {
        list_profiles(&qodd, typed(typ))
            .await
            .unwrap_or_else(|e| panic!("typ {typ}: {e:?}"));
    }
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "a DPoP proof, not an access token (typ)",
            Some(typed("dpop+jwt")),
        ),
        ("malformed", Some("not.a-jwt".into())),
        (
            "signed by an untrusted key",
            Some(other_pki.mint(&TokenSpec::full(TEST_CLIENT)).expect("mint")),
        ),
        ("alg none", Some(alg_none)),
        (
            "HS256 keyed with the public key",
            Some(hs256_with_public_key),
        ),
        (
            "expired beyond the leeway",
            Some(signed(&|c| {
                c.insert("exp".into(), (now - 120).into());
                c.insert("nbf".into(), (now - 3600).into());
            })),
        ),
        (
            "not yet valid",
            Some(signed(&|c| {
                c.insert("nbf".into(), (now + 300).into());
            })),
        ),
        (
            "no exp",
            Some(signed(&|c| {
                c.remove("exp");
            })),
        ),
        (
            "wrong issuer",
            Some(signed(&|c| {
                c.insert("iss".into(), "https://other-idp.invalid".into());
            })),
        ),
        (
            "wrong audience",
            Some(signed(&|c| {
                c.insert("aud".into(), "another-api".into());
            })),
        ),
        (
            "no client id",
            Some(signed(&|c| {
                c.remove("client_id");
            })),
        ),
        (
            "an opaque subject (a user's device this node cannot identify)",
            Some(signed(&|c| {
                c.insert("sub".into(), "pairwise-4f2a9c".into());
            })),
        ),
    ];
    for (what, token) in &cases {
        let channel = qodd
            .channel_with(&qodd.options(token.as_deref()).expect("options"))
            .await
            .expect("channel");
        let mut api = pb::quality_on_demand_client::QualityOnDemandClient::new(channel.clone());
        let r = api
            .create_session(create(Some(device(addr::DEVICE_V4)), 443))
            .await;
        assert_eq!(
            refusal(r),
            is(Code::Unauthenticated, "UNAUTHENTICATED"),
            "{what}"
        );
        let r = QosProfilesClient::new(channel)
            .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
            .await;
        assert_eq!(
            refusal(r),
            is(Code::Unauthenticated, "UNAUTHENTICATED"),
            "{what} (profiles)"
        );
    }
    // Within the 30 s leeway an expired token still works.
    let lenient = signed(&|c| {
        c.insert("exp".into(), (now - 5).into());
    });
    let mut api = qodd.sessions_as(&lenient).await.expect("client");
    let none = sessions_of(&mut api, addr::DEVICE_V4, "within leeway").await;
    assert!(none.sessions.is_empty(), "a refused call created {none:?}");

    // A watch stream ends when its token does.
    let short = signed(&|c| {
        c.insert("exp".into(), (now + 3).into());
    });
    watch_ends_with(&qodd, &short, "a whole-second exp").await;

    // RFC 7519 NumericDate may be fractional: honoured as such, expired or not.
    let fractional_expired = signed(&|c| {
        c.insert("exp".into(), (now as f64 - 120.5).into());
    });
    let r = QosProfilesClient::new(
        qodd.channel_with(&qodd.options(Some(&fractional_expired)).expect("options"))
            .await
            .expect("channel"),
    )
    .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
    .await;
    assert_eq!(
        refusal(r),
        is(Code::Unauthenticated, "UNAUTHENTICATED"),
        "a fractional exp two minutes ago"
    );
    let fractional = signed(&|c| {
        c.insert("exp".into(), (now as f64 + 3.25).into());
    });
    watch_ends_with(&qodd, &fractional, "a fractional exp").await;
}

/// A watch stream opened with `token` ends (within 15 s) when the token does.
async fn watch_ends_with(qodd: &Qodd, token: &str, what: &str) {
    let mut watch = qodd
        .sessions_as(token)
        .await
        .expect("client")
        .watch_session_events(pb::WatchSessionEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let end = qod_testkit::api::next_change(&mut watch, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("the stream ends at the token's exp ({what}): {e:#}"));
    assert!(end.is_none(), "{what}: {end:?}");
}

/// Scopes per operation, ownership (another client's session is PERMISSION_DENIED on get,
/// delete and extend, and invisible to retrieve and watch), and two- / three-legged tokens.
#[tokio::test(flavor = "multi_thread")]
async fn scopes_ownership_and_three_legged_tokens() {
    let (lab, qodd) = lab().await;
    let pki = &qodd.pki;
    let token = |client: &str, scopes: &[&str], device: Option<&str>| {
        let mut spec = TokenSpec::full(client);
        if !scopes.is_empty() {
            spec.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        }
        spec.device = device.map(Value::from);
        pki.mint(&spec).expect("mint")
    };
    let mut a = qodd
        .sessions_as(&token("app-a", &[], None))
        .await
        .expect("a");
    let mut b = qodd
        .sessions_as(&token("app-b", &[], None))
        .await
        .expect("b");

    let s = a
        .create_session(create(Some(device(addr::DEVICE_V4)), 443))
        .await
        .expect("create")
        .into_inner();
    let id = s.session_id.clone();

    // Scopes.
    let mut a_read = qodd
        .sessions_as(&token("app-a", &["quality-on-demand:sessions:read"], None))
        .await
        .expect("a read-only");
    assert_eq!(
        refusal(
            a_read
                .create_session(create(Some(device(addr::DEVICE_V4)), 444))
                .await
        ),
        is(Code::PermissionDenied, "PERMISSION_DENIED")
    );
    assert_eq!(
        refusal(
            a_read
                .delete_session(pb::DeleteSessionRequest {
                    session_id: id.clone()
                })
                .await
        ),
        is(Code::PermissionDenied, "PERMISSION_DENIED")
    );
    a_read
        .get_session(get(&id))
        .await
        .expect("read scope reads");
    let mut no_profiles = qodd
        .profiles_as(&token("app-a", &["quality-on-demand:sessions:read"], None))
        .await
        .expect("client");
    assert_eq!(
        refusal(
            no_profiles
                .get_qos_profile(pb::GetQosProfileRequest {
                    name: "QOS_E".into()
                })
                .await
        ),
        is(Code::PermissionDenied, "PERMISSION_DENIED")
    );

    // Another client: denied, blind, and its watch stream never shows app-a's sessions.
    let mut watch = b
        .watch_session_events(pb::WatchSessionEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let denied = is(Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(refusal(b.get_session(get(&id)).await), denied);
    assert_eq!(
        refusal(
            b.extend_qos_session_duration(pb::ExtendQosSessionDurationRequest {
                session_id: id.clone(),
                requested_additional_duration: 30,
            })
            .await
        ),
        denied
    );
    assert_eq!(
        refusal(
            b.delete_session(pb::DeleteSessionRequest {
                session_id: id.clone()
            })
            .await
        ),
        denied
    );
    let err = b.get_session(get(&id)).await.expect_err("denied");
    assert!(
        !err.message().contains("app-a") && !err.message().contains(&id),
        "the refusal reveals the session: {}",
        err.message()
    );
    assert_eq!(
        refusal(
            b.watch_session_events(pb::WatchSessionEventsRequest {
                session_id: Some(id.clone()),
                ..Default::default()
            })
            .await
        ),
        denied
    );
    let seen = sessions_of(&mut b, addr::DEVICE_V4, "retrieve").await;
    assert!(seen.sessions.is_empty(), "app-b sees {seen:?}");
    // app-a creates and deletes another session, then app-b one of its own: the first event
    // app-b's stream carries is its own.
    let s2 = a
        .create_session(create(Some(device(addr::DEVICE_V4)), 445))
        .await
        .expect("second")
        .into_inner();
    a.delete_session(pb::DeleteSessionRequest {
        session_id: s2.session_id,
    })
    .await
    .expect("delete second");
    let own = b
        .create_session(create(Some(device(addr::DEVICE_V4)), 446))
        .await
        .expect("app-b's own")
        .into_inner();
    let first = qod_testkit::api::next_change(&mut watch, Duration::from_secs(10))
        .await
        .expect("an event")
        .expect("stream");
    match first.kind {
        Some(pb::session_event::Kind::QosStatusChanged(c)) => {
            assert_eq!(c.session.map(|s| s.session_id), Some(own.session_id))
        }
        other => panic!("unexpected {other:?}"),
    }
    // Nothing changed by the refusals.
    let still = a.get_session(get(&id)).await.expect("get").into_inner();
    assert_eq!(
        (still.qos_status(), still.duration),
        (pb::QosStatus::Available, 60)
    );

    // Two-legged without a device.
    assert_eq!(
        refusal(a.create_session(create(None, 447)).await),
        is(Code::FailedPrecondition, "MISSING_IDENTIFIER")
    );
    assert_eq!(
        refusal(a.retrieve_sessions_by_device(retrieve(None)).await),
        is(Code::FailedPrecondition, "MISSING_IDENTIFIER")
    );

    // Three-legged: the token names the device; naming it again is refused.
    let three = token(
        "app-a",
        &[],
        Some(&format!("ipv4:{}", addr::OTHER_DEVICE_V4)),
    );
    let mut a3 = qodd.sessions_as(&three).await.expect("three-legged");
    let unnecessary = is(Code::FailedPrecondition, "UNNECESSARY_IDENTIFIER");
    assert_eq!(
        refusal(
            a3.create_session(create(Some(device(addr::OTHER_DEVICE_V4)), 443))
                .await
        ),
        unnecessary
    );
    assert_eq!(
        refusal(
            a3.retrieve_sessions_by_device(retrieve(Some(device(addr::OTHER_DEVICE_V4))))
                .await
        ),
        unnecessary
    );
    let mut profiles = qodd.profiles_as(&three).await.expect("profiles");
    assert_eq!(
        refusal(
            profiles
                .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
                    device: Some(device(addr::OTHER_DEVICE_V4)),
                    ..Default::default()
                })
                .await
        ),
        unnecessary
    );
    assert!(
        !profiles
            .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
            .await
            .expect("profiles for the subject")
            .into_inner()
            .profiles
            .is_empty()
    );
    let s3 = a3
        .create_session(create(None, 5000))
        .await
        .expect("three-legged create")
        .into_inner();
    assert_eq!(
        s3.device, None,
        "a three-legged session's device is not echoed"
    );
    let mine = a3
        .retrieve_sessions_by_device(retrieve(None))
        .await
        .expect("retrieve")
        .into_inner();
    assert_eq!(
        mine.sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        [s3.session_id.as_str()]
    );
    // The same client's session of another device is not this subject's.
    assert_eq!(refusal(a3.get_session(get(&id)).await), denied);

    // A CAMARA Device object as the default `sub` claim names the same device.
    let object = {
        let mut spec = TokenSpec::full("app-a");
        spec.device = Some(serde_json::json!({
            "ipv4Address": {
                "publicAddress": addr::OTHER_DEVICE_V4,
                "privateAddress": addr::OTHER_DEVICE_V4,
            }
        }));
        pki.mint(&spec).expect("mint")
    };
    let mut by_object = qodd.sessions_as(&object).await.expect("client");
    let theirs = by_object
        .retrieve_sessions_by_device(retrieve(None))
        .await
        .expect("a Device object in `sub` identifies the device")
        .into_inner();
    assert_eq!(
        theirs
            .sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        [s3.session_id.as_str()]
    );

    // A profile is available to a three-legged token only if this node serves its device.
    let unserved = token("app-a", &[], Some("ipv4:192.0.2.9"));
    let mut unserved = qodd.profiles_as(&unserved).await.expect("profiles");
    assert_eq!(
        refusal(
            unserved
                .get_qos_profile(pb::GetQosProfileRequest {
                    name: "QOS_E".into()
                })
                .await
        ),
        is(Code::NotFound, "NOT_FOUND")
    );
    assert_eq!(
        refusal(
            unserved
                .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
                .await
        ),
        is(Code::NotFound, "IDENTIFIER_NOT_FOUND")
    );
    profiles
        .get_qos_profile(pb::GetQosProfileRequest {
            name: "QOS_E".into(),
        })
        .await
        .expect("a served subject gets the profile");
    // On the wire: the token's device is the one treated.
    let dscp = lab
        .uplink_dscp(addr::OTHER_DEVICE_V4, 47000, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert!(
        !dscp.is_empty() && dscp.iter().all(|d| *d == QOS_E_DSCP),
        "three-legged session not applied: {dscp:?}"
    );
}

/// A lab qodd with mutual TLS (client certificates from its dev CA required, the client id
/// taken from the certificate), and `limits` appended.
async fn mtls_qodd(lab: &Lab, limits: &str) -> Qodd {
    Qodd::start_secured(
        &qodd_bin(),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        limits,
        qod_testkit::mutual_tls,
    )
    .await
    .expect("qodd")
}

/// TLS is required (a plain-text client gets nothing), mutual TLS refuses a certificate from
/// an untrusted CA and a missing one, and the certificate names the client: a token issued to
/// another client is UNAUTHENTICATED, and sessions belong to the certificate's client.
#[tokio::test(flavor = "multi_thread")]
async fn transport_security_and_client_certificates() {
    require_root();
    let lab = Lab::new().expect("lab");
    let qodd = mtls_qodd(&lab, "").await;
    let pki = &qodd.pki;
    let other = tempfile::tempdir().expect("dir");
    let other_pki = DevPki::ensure(other.path()).expect("pki");
    let token = qodd.token.clone();
    let identity = |p: &DevPki| {
        Some((
            p.read("client.crt").expect("cert"),
            p.read("client.key").expect("key"),
        ))
    };
    let attempt = |options: client::Options| {
        let qodd = &qodd;
        async move {
            qodd.sessions_with(&options)
                .await?
                .create_session(create(Some(device(addr::DEVICE_V4)), 443))
                .await
                .map_err(|s| anyhow::anyhow!("{s:?}"))
        }
    };
    let plain = client::Options {
        token: Some(token.clone()),
        ..Default::default()
    };
    let no_cert = client::Options {
        identity: None,
        ..qodd.options(Some(&token)).expect("options")
    };
    let untrusted = client::Options {
        identity: identity(&other_pki),
        ..no_cert.clone()
    };
    for (what, options) in [
        ("plain text", plain),
        ("TLS without a client certificate", no_cert),
        ("a certificate from an untrusted CA", untrusted),
    ] {
        assert!(attempt(options).await.is_err(), "{what} was served");
    }

    // The dev CA's client certificate (CN dev-client) with a token of another client id.
    let trusted = client::Options {
        identity: identity(pki),
        ..qodd.options(Some(&token)).expect("options")
    };
    let err = attempt(trusted.clone())
        .await
        .expect_err("token of another client");
    assert!(
        err.to_string().contains("Unauthenticated"),
        "expected UNAUTHENTICATED: {err}"
    );
    // A token without a client id: the certificate names the client.
    let mut c = claims("x");
    c.remove("client_id");
    c.insert("sub".into(), "dev-client".into());
    let cert_token = pki.sign(&Value::Object(c)).expect("sign");
    let with_cert = client::Options {
        token: Some(cert_token.clone()),
        ..trusted
    };
    let s = attempt(with_cert.clone())
        .await
        .expect("served")
        .into_inner();
    // Another certificate of the same CA is another client: dev-client's token (its `sub`
    // names dev-client) is refused with it, and its own token is denied dev-client's session.
    let (cert, key) = pki.client_cert("someone-else").expect("cert");
    let someone = |token: String| {
        let (cert, key) = (cert.clone(), key.clone());
        let options = client::Options {
            identity: Some((cert.into_bytes(), key.into_bytes())),
            token: Some(token),
            ..with_cert.clone()
        };
        let qodd = &qodd;
        async move { qodd.sessions_with(&options).await.expect("client") }
    };
    assert_eq!(
        refusal(
            someone(cert_token.clone())
                .await
                .get_session(get(&s.session_id))
                .await
        ),
        is(Code::Unauthenticated, "UNAUTHENTICATED")
    );
    let mut c = claims("x");
    c.remove("client_id");
    c.remove("sub");
    let nameless = pki.sign(&Value::Object(c)).expect("sign");
    assert_eq!(
        refusal(
            someone(nameless)
                .await
                .get_session(get(&s.session_id))
                .await
        ),
        is(Code::Unauthenticated, "UNAUTHENTICATED"),
        "a token naming no client is bound to none"
    );
    let mut c = claims("x");
    c.remove("client_id");
    c.insert("sub".into(), "someone-else".into());
    let own_token = pki.sign(&Value::Object(c)).expect("sign");
    assert_eq!(
        refusal(
            someone(own_token)
                .await
                .get_session(get(&s.session_id))
                .await
        ),
        is(Code::PermissionDenied, "PERMISSION_DENIED")
    );
    let mut api = qodd.sessions_with(&with_cert).await.expect("client");
    let all = sessions_of(&mut api, addr::DEVICE_V4, "retrieve").await;
    assert_eq!(all.sessions.len(), 1, "refused calls created sessions");
}

/// Per client: its request rate (RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS, others unaffected),
/// its active sessions (RESOURCE_EXHAUSTED / QUOTA_EXCEEDED) and the message size.
#[tokio::test(flavor = "multi_thread")]
async fn per_client_limits() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(
        "[limits]\nrequests_per_second = 1\nrequest_burst = 6\nmax_active_sessions_per_client = 1\nmax_message_bytes = 1024\n",
    )
    .await;
    let mint = |c: &str| qodd.pki.mint(&TokenSpec::full(c)).expect("mint");
    let mut a = qodd.sessions_as(&mint("app-a")).await.expect("a");
    let mut b = qodd.sessions_as(&mint("app-b")).await.expect("b");
    a.create_session(create(Some(device(addr::DEVICE_V4)), 443))
        .await
        .expect("first");
    assert_eq!(
        refusal(
            a.create_session(create(Some(device(addr::DEVICE_V4)), 444))
                .await
        ),
        is(Code::ResourceExhausted, "QUOTA_EXCEEDED")
    );
    let mut big = create(Some(device(addr::DEVICE_V4)), 445);
    big.sink = Some(format!("https://sink.example/{}", "x".repeat(2000)));
    let err = b.create_session(big).await.expect_err("too large");
    assert_eq!(
        (err.code(), reason(&err)),
        is(Code::InvalidArgument, "INVALID_ARGUMENT")
    );
    assert!(err.message().contains("too large"), "{}", err.message());
    // app-a has used 2 of its burst of 6: within 10 more calls it is throttled.
    let mut throttled = None;
    for _ in 0..10 {
        if let Err(s) = a
            .retrieve_sessions_by_device(retrieve(Some(device(addr::DEVICE_V4))))
            .await
        {
            throttled = Some(s);
            break;
        }
    }
    let s = throttled.expect("app-a was never throttled");
    assert_eq!(
        (s.code(), reason(&s)),
        is(Code::ResourceExhausted, "TOO_MANY_REQUESTS")
    );
    let seen = sessions_of(&mut b, addr::DEVICE_V4, "app-b is not throttled by app-a").await;
    assert!(seen.sessions.is_empty(), "app-b sees {seen:?}");
}

/// A client cannot hold devices from others with sessions that ended: with a quota of 2 live
/// sessions, app-a runs short catch-all sessions on six devices in turn; once they end, app-b
/// gets every one of those devices (with app-c and app-d), and app-a can still read its ended
/// records.
#[tokio::test(flavor = "multi_thread")]
async fn ended_sessions_hold_no_device() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(
        "unavailable_retention_secs = 360\n[limits]\nmax_active_sessions_per_client = 2\n",
    )
    .await;
    let mint = |c: &str| qodd.pki.mint(&TokenSpec::full(c)).expect("mint");
    let mut a = qodd.sessions_as(&mint("app-a")).await.expect("a");
    let catch_all = |ip: &str, duration: i32| pb::CreateSessionRequest {
        device: Some(device(ip)),
        application_server: Some(pb::ApplicationServer {
            ipv4_address: Some("0.0.0.0/0".into()),
            ..Default::default()
        }),
        qos_profile: "QOS_E".into(),
        duration,
        ..Default::default()
    };
    let devices: Vec<String> = (10..16).map(|n| format!("10.0.1.{n}")).collect();
    let mut ended = Vec::new();
    for pair in devices.chunks(2) {
        for ip in pair {
            ended.push(
                a.create_session(catch_all(ip, 1))
                    .await
                    .expect("within the quota")
                    .into_inner()
                    .session_id,
            );
        }
        // Wait for the pair to end before the next (the quota counts live sessions).
        for id in &ended[ended.len() - 2..] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while qod_testkit::session_info(&mut a, id).await.qos_status
                != i32::from(pb::QosStatus::Unavailable)
            {
                assert!(std::time::Instant::now() < deadline, "{id} never ended");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Other clients (two devices each, their own quota) get every device.
    for (i, pair) in devices.chunks(2).enumerate() {
        let mut other = qodd
            .sessions_as(&mint(&format!("app-{}", ["b", "c", "d"][i])))
            .await
            .expect("client");
        for ip in pair {
            other
                .create_session(catch_all(ip, 60))
                .await
                .unwrap_or_else(|e| panic!("{ip} is held by an ended session: {e:?}"));
        }
    }
    for id in &ended {
        assert_eq!(
            qod_testkit::session_info(&mut a, id).await.qos_status,
            i32::from(pb::QosStatus::Unavailable),
            "the ended record stays readable for its retention"
        );
    }
    // A live session still holds its device.
    assert_eq!(
        refusal(a.create_session(catch_all(&devices[0], 60)).await),
        is(Code::AlreadyExists, "CONFLICT")
    );
}

/// One client can neither open unbounded Watch streams nor make qodd run a delivery worker for
/// every sink it invents: both are capped per client, and another client is unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_and_sinks_are_capped_per_client() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd(
        "[limits]\nmax_watches_per_client = 3\nmax_sinks_per_client = 2\n",
    )
    .await;
    let mint = |c: &str| qodd.pki.mint(&TokenSpec::full(c)).expect("mint");
    let mut a = qodd.sessions_as(&mint("app-a")).await.expect("a");
    let mut b = qodd.sessions_as(&mint("app-b")).await.expect("b");
    let watch = pb::WatchSessionEventsRequest::default;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            a.watch_session_events(watch())
                .await
                .expect("within the cap")
                .into_inner(),
        );
    }
    assert_eq!(
        refusal(a.watch_session_events(watch()).await),
        is(Code::ResourceExhausted, "QUOTA_EXCEEDED")
    );
    let _theirs = b
        .watch_session_events(watch())
        .await
        .expect("another client is not capped by app-a");
    // Closing a stream frees its place (once the server sees the reset).
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _again = loop {
        match a.watch_session_events(watch()).await {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(reason(&e), "QUOTA_EXCEEDED", "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "a closed stream kept its place"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    let with_sink = |ip: &str, sink: &str| {
        let mut r = create(Some(device(ip)), 443);
        r.sink = Some(sink.into());
        r
    };
    a.create_session(with_sink("10.0.1.20", "https://one.example/a"))
        .await
        .expect("first origin");
    a.create_session(with_sink("10.0.1.21", "https://one.example/other/path"))
        .await
        .expect("the same origin on another path");
    let two = a
        .create_session(with_sink("10.0.1.22", "https://two.example/x"))
        .await
        .expect("second origin")
        .into_inner();
    let third = refusal(
        a.create_session(with_sink("10.0.1.23", "https://three.example/x"))
            .await,
    );
    assert_eq!(third, is(Code::ResourceExhausted, "QUOTA_EXCEEDED"));
    b.create_session(with_sink("10.0.1.24", "https://three.example/x"))
        .await
        .expect("another client's own sinks");
    a.delete_session(pb::DeleteSessionRequest {
        session_id: two.session_id,
    })
    .await
    .expect("delete");
    a.create_session(with_sink("10.0.1.23", "https://three.example/x"))
        .await
        .expect("an origin freed by its last session's end");
}

/// RS256 and EdDSA keys in the JWKS verify their tokens as ES256 does; a token claiming one
/// key's id with another algorithm does not.
#[tokio::test(flavor = "multi_thread")]
async fn rs256_es256_and_eddsa_keys_verify() {
    require_root();
    let lab = Lab::new().expect("lab");
    let keys = tempfile::tempdir().expect("dir");
    let rsa_pem = keys.path().join("rsa.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa_pem)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl genpkey failed");
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(&rsa_pem).expect("rsa")).expect("rsa key");
    let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
    let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).expect("ed key");
    let jwk = |key: &EncodingKey, alg: Algorithm, kid: &str| {
        let mut j = Jwk::from_encoding_key(key, alg).expect("jwk");
        j.common.key_id = Some(kid.into());
        serde_json::to_value(j).expect("json")
    };
    let rsa_jwk = jwk(&rsa, Algorithm::RS256, "rsa-1");
    // jsonwebtoken cannot derive an OKP JWK; it is the raw public key.
    let ed_jwk = json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "kid": "ed-1",
        "x": URL_SAFE_NO_PAD.encode(ed_pair.public_key_raw()),
    });
    let qodd = Qodd::start_secured(
        &qodd_bin(),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        "",
        |pki| {
            let mut set: Value =
                serde_json::from_slice(&pki.read("jwks.json").expect("jwks")).expect("json");
            if let Some(k) = set["keys"].as_array_mut() {
                k.extend([rsa_jwk, ed_jwk]);
            }
            let path = pki.path("jwks-all.json");
            std::fs::write(&path, set.to_string()).expect("write");
            pki.config_toml().replace(
                &format!("{:?}", pki.path("jwks.json")),
                &format!("{path:?}"),
            )
        },
    )
    .await
    .expect("qodd");
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims(TEST_CLIENT), key).expect("sign")
    };
    let profiles = |token: String| list_profiles(&qodd, token);
    for (what, token) in [
        ("RS256", sign(Algorithm::RS256, "rsa-1", &rsa)),
        ("EdDSA", sign(Algorithm::EdDSA, "ed-1", &ed)),
        ("ES256", qodd.token.clone()),
    ] {
        profiles(token)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    }
    assert_eq!(
        refusal(profiles(sign(Algorithm::EdDSA, "rsa-1", &ed)).await),
        is(Code::Unauthenticated, "UNAUTHENTICATED")
    );
}

/// With `jwks_url` the keys come from a real HTTP server, and a token naming a key id qodd has
/// not seen makes it read the set again: a key rotated in at the identity provider is honoured
/// within seconds, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_url_follows_key_rotation() {
    require_root();
    let lab = Lab::new().expect("lab");
    let idp = SinkServer::start(&lab.edge).expect("idp");
    let next = tempfile::tempdir().expect("dir");
    let next = DevPki::ensure(next.path()).expect("pki");
    let jwks = |p: &DevPki| -> Value {
        serde_json::from_slice(&p.read("jwks.json").expect("jwks")).expect("json")
    };
    let qodd = Qodd::start_secured(
        &qodd_bin(),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        "",
        |pki| {
            idp.script("/jwks", &[Reply::Json(jwks(pki).to_string())]);
            pki.config_toml().replace(
                &format!("jwks_file = {:?}", pki.path("jwks.json")),
                &format!("jwks_url = {:?}\njwks_allow_http = true", idp.url("/jwks")),
            )
        },
    )
    .await
    .expect("qodd");
    let profiles = |token: String| list_profiles(&qodd, token);
    profiles(qodd.token.clone())
        .await
        .expect("the fetched key verifies");

    // The provider rotates a new key in; a token signed with it names its new kid.
    let mut rotated = jwks(&next)["keys"][0].clone();
    rotated["kid"] = "rotated-2".into();
    let mut both = jwks(&qodd.pki);
    if let Some(k) = both["keys"].as_array_mut() {
        k.push(rotated);
    }
    idp.script("/jwks", &[Reply::Json(both.to_string())]);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rotated-2".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(TEST_CLIENT),
        &EncodingKey::from_ec_pem(&next.read("jwt-signing.key").expect("key")).expect("key"),
    )
    .expect("sign");
    assert_eq!(
        refusal(profiles(token.clone()).await),
        is(Code::Unauthenticated, "UNAUTHENTICATED"),
        "an unknown key is refused until the set is read again"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if profiles(token.clone()).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated key was never fetched:\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        idp.received("/jwks").len() >= 2,
        "the JWKS was fetched at start and again"
    );
}

/// RFC 6750: the `Bearer` scheme is case-insensitive; other schemes are still refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_scheme_is_case_insensitive() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let channel = qodd
        .channel_with(&qodd.options(None).expect("options"))
        .await
        .expect("channel");
    for (header, ok) in [
        (format!("BEARER {}", qodd.token), true),
        (format!("bearer {}", qodd.token), true),
        (format!("BeArEr  {}", qodd.token), true),
        (format!("Basic {}", qodd.token), false),
        ("Bearer".to_owned(), false),
    ] {
        let mut request = tonic::Request::new(pb::RetrieveQosProfilesRequest::default());
        request
            .metadata_mut()
            .insert("authorization", header.parse().expect("header"));
        let result = QosProfilesClient::new(channel.clone())
            .retrieve_qos_profiles(request)
            .await;
        match (ok, result) {
            (true, Ok(_)) => {}
            (false, Err(e)) => assert_eq!(e.code(), Code::Unauthenticated, "{header}: {e:?}"),
            (want, got) => panic!("{header:.12}: wanted ok={want}, got {got:?}"),
        }
    }
}

/// Health answers without a token, so it is bound like everything else: a message over
/// `max_message_bytes` is refused before it is decoded, with CAMARA's error.
#[tokio::test(flavor = "multi_thread")]
async fn health_is_bounded_by_max_message_bytes() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let channel = qodd
        .channel_with(&qodd.options(None).expect("options"))
        .await
        .expect("channel");
    let err = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(1 << 20),
        })
        .await
        .expect_err("a 1 MiB health check");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
}
