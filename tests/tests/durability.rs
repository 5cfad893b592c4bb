//! Sessions survive a crash: `kill -9` qodd, start it again on the same state, and every
//! acknowledged session is back and enforced; one whose time ran out meanwhile has ended, with its
//! event. Needs root.

use std::time::Duration;

use qod_proto::v1 as pb;
use qod_testkit::{
    EDGE_DEV_IF, Lab, Qodd, addr,
    api::{require_root, session},
};

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_sessions_survive_kill_9() {
    let (lab, mut qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let long = api
        .create_session(session(
            addr::DEVICE_V4,
            addr::SERVER_V4,
            "QOS_E",
            &[],
            &[5000],
            600,
        ))
        .await
        .expect("long")
        .into_inner();
    let short = api
        .create_session(session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_L",
            &[],
            &[],
            2,
        ))
        .await
        .expect("short")
        .into_inner();
    let extended = api
        .extend_qos_session_duration(pb::ExtendQosSessionDurationRequest {
            session_id: long.session_id.clone(),
            requested_additional_duration: 60,
        })
        .await
        .expect("extend")
        .into_inner();
    assert_eq!(extended.duration, 660);

    qodd.kill9();
    // The short session's 2 s run out while qodd is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    qodd.restart().await.expect("restart");
    let mut api = qodd.sessions().await.expect("client");

    let got = api
        .get_session(pb::GetSessionRequest {
            session_id: long.session_id.clone(),
        })
        .await
        .expect("the long session is back")
        .into_inner();
    assert_eq!(got.qos_status(), pb::QosStatus::Available);
    assert_eq!(got.duration, 660, "its extension too");
    assert_eq!(got.started_at, long.started_at);
    let dscp = lab
        .uplink_dscp(addr::DEVICE_V4, 46000, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert!(
        !dscp.is_empty() && dscp.iter().all(|d| *d == 32),
        "enforced again: {dscp:?}"
    );

    let ended = api
        .get_session(pb::GetSessionRequest {
            session_id: short.session_id.clone(),
        })
        .await
        .expect("the short session is readable")
        .into_inner();
    assert_eq!(ended.qos_status(), pb::QosStatus::Unavailable);
    assert_eq!(ended.status_info(), pb::StatusInfo::DurationExpired);
    assert_eq!(ended.duration, 2, "it ended at its scheduled end");
    assert!(
        qodd.log().contains("session ended while qodd was down"),
        "{}",
        qodd.log()
    );

    // A deleted session stays deleted across a restart.
    api.delete_session(pb::DeleteSessionRequest {
        session_id: long.session_id.clone(),
    })
    .await
    .expect("delete");
    qodd.restart().await.expect("restart");
    let mut api = qodd.sessions().await.expect("client");
    let err = api
        .get_session(pb::GetSessionRequest {
            session_id: long.session_id,
        })
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// A corrupt store stops start-up with a clear error instead of starting empty.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_store_is_refused() {
    require_root();
    let lab = Lab::new().expect("lab");
    let mut qodd = Qodd::start(&lab.edge, &[EDGE_DEV_IF], "")
        .await
        .expect("qodd");
    qodd.kill9();
    let file = qodd.dir.path().join("state/sessions.redb");
    std::fs::write(&file, vec![0x5au8; 8192]).expect("corrupt the store");
    let err = qodd
        .restart()
        .await
        .expect_err("must not start on a corrupt store");
    let text = format!("{err:#}");
    assert!(
        text.contains("session store") && text.contains("sessions.redb"),
        "{text}"
    );
}
