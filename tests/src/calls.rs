//! Calls the tests make over the real gRPC API, with their answers unwrapped.

#[allow(unused_imports)]
use super::*;

/// Every session of `device` the caller may see (RetrieveSessionsByDevice).
pub async fn sessions_of_device(
    api: &mut QualityOnDemandClient<QodChannel>,
    device: &str,
) -> Vec<qod_proto::v1::SessionInfo> {
    api.retrieve_sessions_by_device(qod_proto::v1::RetrieveSessionsByDeviceRequest {
        device: Some(api::device(device)),
    })
    .await
    .expect("retrieve sessions by device")
    .into_inner()
    .sessions
}

/// Session `id` as GetSession returns it (the test fails if the call does).
pub async fn session_info(
    api: &mut QualityOnDemandClient<QodChannel>,
    id: &str,
) -> qod_proto::v1::SessionInfo {
    api.get_session(qod_proto::v1::GetSessionRequest {
        session_id: id.to_owned(),
    })
    .await
    .unwrap_or_else(|e| panic!("get session {id}: {e:?}"))
    .into_inner()
}

/// A QOS_G session (20 Mbit/s guaranteed downlink under [`api::CONGESTION_PROFILES`]) for
/// `device`, any server port, `duration` seconds.
pub async fn rated_session(
    api: &mut QualityOnDemandClient<QodChannel>,
    device: &str,
    duration: i32,
) -> qod_proto::v1::SessionInfo {
    api.create_session(api::session(
        device,
        addr::SERVER_V4,
        "QOS_G",
        &[],
        &[],
        duration,
    ))
    .await
    .expect("create a rated session")
    .into_inner()
}

/// A QOS_E session (DSCP 32) for the lab device's uplink to the server's port 5000, 10 minutes.
pub async fn marked_flow(
    api: &mut QualityOnDemandClient<QodChannel>,
) -> qod_proto::v1::SessionInfo {
    marked_flow_of(api, addr::DEVICE_V4).await
}

/// As [`marked_flow`] for `device` (one of the lab device's addresses).
pub async fn marked_flow_of(
    api: &mut QualityOnDemandClient<QodChannel>,
    device: &str,
) -> qod_proto::v1::SessionInfo {
    api.create_session(api::session(
        device,
        addr::SERVER_V4,
        "QOS_E",
        &[],
        &[5000],
        600,
    ))
    .await
    .expect("create the marked flow's session")
    .into_inner()
}

/// Every session event from now on.
pub async fn watch_all(
    api: &mut QualityOnDemandClient<QodChannel>,
) -> tonic::Streaming<qod_proto::v1::SessionEvent> {
    api.watch_session_events(qod_proto::v1::WatchSessionEventsRequest::default())
        .await
        .expect("watch")
        .into_inner()
}
