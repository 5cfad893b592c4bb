//! Sessions survive a crash: `kill -9` qodd, start it again on the same state, and every
//! acknowledged session is back and enforced; one whose time ran out meanwhile has ended, with its
//! event. Needs root.

use std::{collections::BTreeMap, time::Duration};

use qod_proto::v1 as pb;
use qod_testkit::{
    DEVICE_IF, EDGE_DEV_IF, Lab, Qodd, addr,
    api::{require_root, sa, session},
    udp_send,
};

qod_testkit::in_every_mode!(
    acknowledged_sessions_survive_kill_9,
    check_acknowledged_sessions_survive_kill_9
);
async fn check_acknowledged_sessions_survive_kill_9(mode: qod_testkit::Mode) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    let long = qod_testkit::marked_flow(&mut api).await;
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

    let got = qod_testkit::session_info(&mut api, &long.session_id).await;
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
    assert!(
        qodd.log()
            .contains("classifier of this build found pinned over these maps"),
        "the restart takes up the classifier it left verified and pinned:\n{}",
        qodd.log()
    );

    let ended = qod_testkit::session_info(&mut api, &short.session_id).await;
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

qod_testkit::in_every_mode!(
    a_watcher_cut_off_mid_storm_resumes_without_loss,
    check_a_watcher_cut_off_mid_storm_resumes_without_loss
);
/// Sessions ending together (spread over two seconds): a watcher that drops its stream partway
/// through and resumes after the last revision it saw receives every remaining end exactly once,
/// in revision order; a watcher that stayed gets them all. (Scheduled mode holds fewer QOS_E
/// sessions: each has a class from a 1 Gbit/s pool.)
async fn check_a_watcher_cut_off_mid_storm_resumes_without_loss(mode: qod_testkit::Mode) {
    use qod_testkit::api::next_change;
    use std::collections::HashSet;
    let n: u32 = match mode {
        qod_testkit::Mode::Marking => 2000,
        qod_testkit::Mode::Scheduled => 150,
    };
    let (_lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    qodd.kill9();
    let ends_at = time::OffsetDateTime::now_utc() + time::Duration::seconds(12);
    qod_testkit::fill_store_ending(
        &qodd.dir.path().join("state"),
        n,
        "QOS_E",
        ends_at,
        time::Duration::seconds(2),
    )
    .expect("fill the store");
    qodd.restart().await.expect("restart");
    assert!(
        ends_at - time::OffsetDateTime::now_utc() > time::Duration::seconds(1),
        "the restart took too long for the storm to begin after it"
    );
    let mut api = qodd.sessions().await.expect("client");
    let mut cut = qod_testkit::watch_all(&mut api).await;
    let mut stayed = qod_testkit::watch_all(&mut api).await;
    let end = |ev: &pb::SessionEvent| match &ev.kind {
        Some(pb::session_event::Kind::QosStatusChanged(c)) => {
            assert_eq!(c.qos_status(), pb::QosStatus::Unavailable, "{ev:?}");
            assert_eq!(c.status_info(), pb::StatusInfo::DurationExpired, "{ev:?}");
            c.session_id.clone()
        }
        other => panic!("not a status change: {other:?}"),
    };
    let wait = Duration::from_secs(30);
    let mut first = Vec::new();
    while first.len() < (n / 3) as usize {
        let ev = next_change(&mut cut, wait)
            .await
            .expect("an end")
            .expect("open");
        first.push((ev.revision, end(&ev)));
    }
    drop(cut);
    let last = first.last().expect("seen").0;
    let mut resumed = api
        .watch_session_events(pb::WatchSessionEventsRequest {
            after_revision: Some(last),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let mut rest = Vec::new();
    while first.len() + rest.len() < n as usize {
        let ev = next_change(&mut resumed, wait)
            .await
            .expect("every end after the cut")
            .expect("open");
        rest.push((ev.revision, end(&ev)));
    }
    let all: Vec<(u64, String)> = first.into_iter().chain(rest).collect();
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "revision order across the cut"
    );
    let ids: HashSet<&String> = all.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), n as usize, "each end exactly once");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), next_change(&mut resumed, wait))
            .await
            .is_err(),
        "nothing more"
    );
    let mut stayed_ids = HashSet::new();
    while stayed_ids.len() < n as usize {
        let ev = next_change(&mut stayed, wait)
            .await
            .expect("every end")
            .expect("open");
        assert!(stayed_ids.insert(end(&ev)), "a duplicate");
    }
    assert_eq!(stayed_ids, ids.into_iter().cloned().collect());
}

qod_testkit::in_every_mode!(
    a_watcher_resumes_across_kill_9_without_loss,
    check_a_watcher_resumes_across_kill_9_without_loss
);
/// A watcher that saw revision R resumes after it once qodd is back from a `kill -9`: it gets
/// the events it missed before the crash (the same ids), the end that happened while qodd was
/// down (its scheduled time and the later moment qodd observed it), and those after the
/// restart, each once and in order. A watcher resuming from before what the log keeps (here 5
/// events) is told to resync.
async fn check_a_watcher_resumes_across_kill_9_without_loss(mode: qod_testkit::Mode) {
    use qod_testkit::api::next_change;
    let (_lab, mut qodd) = qod_testkit::lab_in(mode, "event_log_retention = 5").await;
    let mut api = qodd.sessions().await.expect("client");
    let mut early = qod_testkit::watch_all(&mut api).await;
    let mut live = qod_testkit::watch_all(&mut api).await;
    let long = qod_testkit::marked_flow(&mut api).await;
    let wait = Duration::from_secs(10);
    let seen = next_change(&mut early, wait)
        .await
        .expect("event")
        .expect("open");
    let resume_from = seen.revision;
    drop(early);
    let short = api
        .create_session(session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_L",
            &[],
            &[],
            1,
        ))
        .await
        .expect("short")
        .into_inner();
    // What a watcher that stayed saw before the crash.
    let mut before = Vec::new();
    for _ in 0..2 {
        before.push(
            next_change(&mut live, wait)
                .await
                .expect("event")
                .expect("open"),
        );
    }
    drop(live);

    qodd.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    qodd.restart().await.expect("restart");
    let mut api = qodd.sessions().await.expect("client");
    let third = api
        .create_session(session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_L",
            &[],
            &[],
            60,
        ))
        .await
        .expect("after the restart")
        .into_inner();
    api.delete_session(pb::DeleteSessionRequest {
        session_id: long.session_id.clone(),
    })
    .await
    .expect("delete");

    let mut resumed = api
        .watch_session_events(pb::WatchSessionEventsRequest {
            after_revision: Some(resume_from),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            next_change(&mut resumed, wait)
                .await
                .expect("event")
                .expect("open"),
        );
    }
    let change = |ev: &pb::SessionEvent| match &ev.kind {
        Some(pb::session_event::Kind::QosStatusChanged(c)) => {
            (c.session_id.clone(), c.qos_status(), c.status_info())
        }
        other => panic!("not a status change: {other:?}"),
    };
    use pb::{QosStatus as Q, StatusInfo as I};
    assert_eq!(
        got.iter().map(change).collect::<Vec<_>>(),
        [
            (short.session_id.clone(), Q::Available, I::Unspecified),
            (short.session_id.clone(), Q::Unavailable, I::DurationExpired),
            (third.session_id.clone(), Q::Available, I::Unspecified),
            (long.session_id.clone(), Q::Unavailable, I::DeleteRequested),
        ]
    );
    assert!(
        got.windows(2).all(|w| w[0].revision < w[1].revision) && got[0].revision > resume_from,
        "revisions carry on after {resume_from}: {:?}",
        got.iter().map(|e| e.revision).collect::<Vec<_>>()
    );
    // The events from before the crash are the same events (ids and revisions), not re-made.
    assert_eq!(
        (got[0].event_id.as_str(), got[0].revision),
        (before[1].event_id.as_str(), before[1].revision)
    );
    assert_eq!(before[0].event_id, seen.event_id);
    // The end that happened while qodd was down: CAMARA's time is the scheduled end; qodd
    // observed it after it came back.
    let ts = |t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref().expect("time");
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    let lateness = ts(&got[1].observed_time) - ts(&got[1].time);
    assert!(lateness >= 0.5, "lateness {lateness} s");
    // Nothing more: no duplicate.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), next_change(&mut resumed, wait))
            .await
            .is_err(),
        "one copy of each event"
    );

    // A sixth event, five kept: resuming from before the oldest is a resync.
    api.delete_session(pb::DeleteSessionRequest {
        session_id: third.session_id.clone(),
    })
    .await
    .expect("delete the third");
    let mut stale = api
        .watch_session_events(pb::WatchSessionEventsRequest {
            after_revision: Some(0),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let first = next_change(&mut stale, wait)
        .await
        .expect("message")
        .expect("open");
    match first.kind {
        Some(pb::session_event::Kind::ResyncNeeded(r)) => {
            assert!(first.revision > got[3].revision, "{first:?}");
            assert_eq!(r.oldest_revision, first.revision - 4);
        }
        other => panic!("expected resync_needed: {other:?}"),
    }
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

/// Sends one uplink datagram every `every` from `from` to `to` in `ns` until `stop`; returns how
/// many were sent.
fn udp_stream(
    ns: &qod_testkit::Netns,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    ns.spawn(move || {
        let sock = std::net::UdpSocket::bind(from)?;
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            sock.send_to(&[0x5a; 64], to)?;
            sent += 1;
            std::thread::sleep(every);
        }
        Ok(sent)
    })
}

qod_testkit::in_every_mode!(
    kill_9_under_load_loses_nothing_and_treatment_never_stops,
    check_kill_9_under_load_loses_nothing_and_treatment_never_stops
);
/// `kill -9` while a client creates sessions at a steady rate and an installed session's traffic
/// flows. After the restart every acknowledged session is there and enforced, the traffic was
/// marked the whole time (no packet left unmarked while qodd was down) and the session's counters
/// match what the server received (no gap, no reset), and a session whose time ran out during the
/// downtime has ended, with its notification.
async fn check_kill_9_under_load_loses_nothing_and_treatment_never_stops(mode: qod_testkit::Mode) {
    use std::sync::{Arc, Mutex, atomic::AtomicBool};
    let (lab, mut qodd) = qod_testkit::lab_in(mode,
        "[notifications]\nallow_http_hosts = [\"127.0.0.1\"]\nallow_sink_ranges = [\"127.0.0.0/8\"]\nbackoff_base_ms = 100\nbackoff_max_ms = 400\n",
    )
    .await;
    let sink = qod_testkit::SinkServer::start(&lab.edge).expect("sink");
    let mut api = qodd.sessions().await.expect("client");
    let flow = qod_testkit::marked_flow(&mut api).await;
    let mut short = session(addr::OTHER_DEVICE_V4, addr::SERVER_V4, "QOS_L", &[], &[], 3);
    short.sink = Some(sink.url("/short"));
    let short = api
        .create_session(short)
        .await
        .expect("short session")
        .into_inner();

    let capture = qod_testkit::Capture::start(&lab.server, qod_testkit::SERVER_IF).expect("cap");
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = udp_stream(
        &lab.device,
        qod_testkit::api::sa(addr::DEVICE_V4, 47001),
        qod_testkit::api::sa(addr::SERVER_V4, 5000),
        Duration::from_millis(5),
        stop.clone(),
    );

    // The creator: one create at a time, every 50 ms, each for its own device address.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(String, std::time::Instant)>>> = Arc::default();
    let creator = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        let options = qodd.options(Some(&qodd.token)).expect("options");
        let addr = qodd.addr();
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let device = format!("10.0.9.{}", i % 250 + 1);
                let started = std::time::Instant::now();
                let result = async {
                    let ch = qod_proto::client::connect(&addr, &options)
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    pb::quality_on_demand_client::QualityOnDemandClient::new(ch)
                        .create_session(session(&device, addr::SERVER_V4, "QOS_E", &[], &[], 600))
                        .await
                }
                .await;
                match result {
                    Ok(r) => acked
                        .lock()
                        .expect("lock")
                        .push((r.into_inner().session_id, device)),
                    Err(_) => failed.lock().expect("lock").push((device, started)),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if i >= 240 {
                    break;
                }
            }
        })
    };

    assert_eq!(
        lab.uplink_dscp(addr::OTHER_DEVICE_V4, 47100, addr::SERVER_V4, 6000)
            .expect("traffic"),
        [QOS_L_DSCP; 5],
        "the short session marks before the kill"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = std::time::Instant::now();
    qodd.kill9();
    // Down for 4 s: the kernel keeps marking the long session, and ends the short one (3 s) on
    // time by itself.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        lab.uplink_dscp(addr::OTHER_DEVICE_V4, 47101, addr::SERVER_V4, 6000)
            .expect("traffic"),
        [0; 5],
        "the kernel ended the short session while qodd was down"
    );
    qodd.restart().await.expect("restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    creator.await.expect("creator");
    let sent = traffic.join().expect("traffic thread").expect("traffic");

    let seen: Vec<u8> = capture
        .finish()
        .expect("capture")
        .iter()
        .filter(|p| p.dport == 5000 && p.sport == 47001)
        .map(|p| p.dscp)
        .collect();
    assert_eq!(seen.len() as u64, sent, "every datagram reached the server");
    let unmarked = seen.iter().filter(|d| **d != 32).count();
    assert_eq!(unmarked, 0, "{unmarked} of {sent} datagrams went unmarked");

    let mut api = qodd.sessions().await.expect("client");
    let got = qod_testkit::session_info(&mut api, &flow.session_id).await;
    assert_eq!(
        got.counters.map(|c| c.uplink_packets),
        Some(sent),
        "the counters carried on through the restart"
    );

    let acked = acked.lock().expect("lock").clone();
    let failed = failed.lock().expect("lock").clone();
    // Enough creates for the check to mean something. Scheduled, each create also runs `tc` for
    // its classes (four processes, #11), so fewer fit in the same window.
    let enough = match mode {
        qod_testkit::Mode::Marking => 40,
        qod_testkit::Mode::Scheduled => 25,
    };
    assert!(
        acked.len() >= enough,
        "only {} creates were acknowledged",
        acked.len()
    );
    assert!(!failed.is_empty(), "no create hit the downtime");
    for (id, device) in &acked {
        let s = api
            .get_session(pb::GetSessionRequest {
                session_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged session {id} ({device}) lost: {e:?}"))
            .into_inner();
        assert_eq!(s.qos_status(), pb::QosStatus::Available);
    }
    // A create refused while qodd was down never appears. (One in flight at the kill may have
    // been committed before its answer was lost: that one may exist.)
    let mut in_flight = 0;
    for (device, started) in &failed {
        let found = qod_testkit::sessions_of_device(&mut api, device)
            .await
            .into_iter()
            .filter(|s| !acked.iter().any(|(id, _)| *id == s.session_id))
            .count();
        if found > 0 {
            assert!(*started <= killed_at, "{device}: refused yet created");
            in_flight += found;
        }
    }
    assert!(
        in_flight <= 1,
        "{in_flight} unacknowledged sessions appeared"
    );

    let ended = qod_testkit::session_info(&mut api, &short.session_id).await;
    assert_eq!(
        (ended.qos_status(), ended.status_info()),
        (pb::QosStatus::Unavailable, pb::StatusInfo::DurationExpired)
    );
    let events = sink
        .wait_for("/short", 2, Duration::from_secs(10))
        .await
        .expect("notifications");
    assert_eq!(
        events[1].body["data"]["statusInfo"], "DURATION_EXPIRED",
        "{events:?}"
    );
    assert!(
        qodd.log().contains("reusing the pinned data plane"),
        "{}",
        qodd.log()
    );
}

/// QOS_L's DSCP (AF11) in the default profiles.
const QOS_L_DSCP: u8 = 10;

qod_testkit::in_every_mode!(
    a_reboot_is_detected_and_the_data_plane_rebuilt,
    check_a_reboot_is_detected_and_the_data_plane_rebuilt
);
/// A store written in another boot (the host rebooted): the pinned data plane, whose kernel times
/// belong to the old boot, is discarded and rebuilt from the store; sessions are enforced again
/// with fresh counters.
async fn check_a_reboot_is_detected_and_the_data_plane_rebuilt(mode: qod_testkit::Mode) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    let s = qod_testkit::marked_flow(&mut api).await;
    // A second session of the same device (another server port, another profile): one kernel
    // entry holds both rules, and the rebuild writes it with both.
    api.create_session(qod_testkit::api::session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_S",
        &[],
        &[5001],
        600,
    ))
    .await
    .expect("the sibling session");
    let before = lab
        .uplink_dscp(addr::DEVICE_V4, 46100, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert_eq!(before, [32; 5]);
    let sibling = |port| {
        lab.uplink_dscp(addr::DEVICE_V4, port, addr::SERVER_V4, 5001)
            .expect("traffic")
    };
    assert_eq!(sibling(46102), [10; 5]);
    qodd.kill9();
    qod_daemon::store::Store::open(&qodd.dir.path().join("state"))
        .and_then(|st| st.set_boot_id("a-boot-before-this-one"))
        .expect("rewrite the boot id");
    qodd.restart().await.expect("restart");
    assert!(
        qodd.log().contains("written in another boot"),
        "{}",
        qodd.log()
    );
    let after = lab
        .uplink_dscp(addr::DEVICE_V4, 46101, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert_eq!(after, [32; 5], "enforced after the rebuild");
    assert_eq!(sibling(46103), [10; 5], "its sibling too");
    let got = qodd
        .sessions()
        .await
        .expect("client")
        .get_session(pb::GetSessionRequest {
            session_id: s.session_id,
        })
        .await
        .expect("restored")
        .into_inner();
    assert_eq!(
        got.counters.map(|c| c.uplink_packets),
        Some(5),
        "rebuilt maps count from zero"
    );
}

qod_testkit::in_every_mode!(
    incompatible_pinned_maps_are_refused_or_rebuilt,
    check_incompatible_pinned_maps_are_refused_or_rebuilt
);
/// A pinned data plane this qodd cannot reuse (another capacity, another layout version): with
/// `incompatible_pins = "refuse"` start-up stops with the reason and the old data plane keeps
/// enforcing untouched; with "rebuild" it is replaced and the sessions come back from the store.
async fn check_incompatible_pinned_maps_are_refused_or_rebuilt(mode: qod_testkit::Mode) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    qod_testkit::marked_flow(&mut api).await;
    qodd.kill9();
    let path = qodd.config_path();
    let config = std::fs::read_to_string(&path).expect("config");
    let with = |extra: &str| {
        std::fs::write(&path, format!("{extra}\n{config}")).expect("config");
    };

    with("max_sessions = 4096\nincompatible_pins = \"refuse\"");
    let err = qodd.restart().await.expect_err("refused");
    assert!(
        format!("{err:#}").contains("incompatible pinned data plane"),
        "{err:#}"
    );
    assert_eq!(
        lab.uplink_dscp(addr::DEVICE_V4, 46200, addr::SERVER_V4, 5000)
            .expect("traffic"),
        [32; 5],
        "the old data plane still enforces"
    );

    with("max_sessions = 4096\nincompatible_pins = \"rebuild\"");
    qodd.restart().await.expect("rebuilt");
    assert!(
        qodd.log()
            .contains("incompatible pinned data plane removed")
    );
    assert_eq!(
        qod_daemon::dataplane::inspect_pins(&qodd.pin_path, 4096),
        qod_daemon::dataplane::Pinned::Compatible
    );
    assert_eq!(
        lab.uplink_dscp(addr::DEVICE_V4, 46201, addr::SERVER_V4, 5000)
            .expect("traffic"),
        [32; 5],
        "restored from the store"
    );

    // Another layout version's directory.
    qodd.kill9();
    std::fs::create_dir(qodd.pin_path.join("v999")).expect("fake layout");
    with("max_sessions = 4096\nincompatible_pins = \"refuse\"");
    let err = qodd.restart().await.expect_err("refused");
    assert!(format!("{err:#}").contains("another layout"), "{err:#}");
}

qod_testkit::in_every_mode!(
    undelivered_notifications_survive_kill_9_and_sigterm,
    check_undelivered_notifications_survive_kill_9_and_sigterm
);
/// Notifications are delivered at least once across restarts with stable ids: one still being
/// retried when qodd is killed (`kill -9`), or still pending when it is stopped (SIGTERM, after
/// the grace period), is delivered after the next start with the same event id.
async fn check_undelivered_notifications_survive_kill_9_and_sigterm(mode: qod_testkit::Mode) {
    use qod_testkit::{Reply, SinkServer};
    let (lab, mut qodd) = qod_testkit::lab_in(mode,
        "[notifications]\nallow_http_hosts = [\"127.0.0.1\"]\nallow_sink_ranges = [\"127.0.0.0/8\"]\nbackoff_base_ms = 200\nbackoff_max_ms = 400\nmax_attempts = 100\ntimeout_ms = 1000\n",
    )
    .await;
    let sink = SinkServer::start(&lab.edge).expect("sink");
    sink.script("/cb", &[Reply::Status(503)]);
    let mut api = qodd.sessions().await.expect("client");
    let mut req = session(addr::DEVICE_V4, addr::SERVER_V4, "QOS_E", &[], &[5000], 600);
    req.sink = Some(sink.url("/cb"));
    let s = api.create_session(req).await.expect("create").into_inner();
    let first = sink
        .wait_for("/cb", 2, Duration::from_secs(10))
        .await
        .expect("retried");
    let id = first[0].body["id"].clone();
    assert_eq!(first[1].body["id"], id, "a retry carries the same id");

    // Crash while the AVAILABLE event is being retried; the sink recovers meanwhile.
    qodd.kill9();
    sink.script("/cb", &[Reply::Status(204)]);
    qodd.restart().await.expect("restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = sink.received("/cb");
        if got.iter().any(|r| r.status == 204) {
            let ok: Vec<_> = got.iter().filter(|r| r.status == 204).collect();
            assert_eq!(ok.len(), 1, "delivered once after the restart");
            assert_eq!(ok[0].body["id"], id, "with its original id");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never delivered: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM with the DELETE_REQUESTED event pending at a failing sink: the grace period
    // passes, qodd exits cleanly, and the event goes out after the next start.
    sink.script("/cb", &[Reply::Status(503)]);
    let mut api = qodd.sessions().await.expect("client");
    api.delete_session(pb::DeleteSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .expect("delete");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let delete_id = loop {
        if let Some(r) = sink
            .received("/cb")
            .iter()
            .find(|r| r.body["data"]["statusInfo"] == "DELETE_REQUESTED")
        {
            assert_eq!(r.status, 503);
            break r.body["id"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no delete event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = qodd.stop().expect("stopped");
    assert!(status.success(), "graceful exit: {status}");
    assert!(qodd.log().contains("kept in the outbox"), "{}", qodd.log());
    sink.script("/cb", &[Reply::Status(204)]);
    qodd.restart().await.expect("restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = sink.received("/cb");
        if got
            .iter()
            .any(|r| r.status == 204 && r.body["id"] == delete_id)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never delivered: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

qod_testkit::in_every_mode!(
    one_second_sessions_are_told_available_before_unavailable,
    check_one_second_sessions_are_told_available_before_unavailable
);
/// Sessions of one second, created all at once, race their own expiry (their end may be decided
/// while their create still waits for its commit): for every one, on the Watch stream and at its
/// sink, AVAILABLE comes before UNAVAILABLE / DURATION_EXPIRED, each exactly once, and the
/// stream's revisions increase.
async fn check_one_second_sessions_are_told_available_before_unavailable(mode: qod_testkit::Mode) {
    use qod_testkit::SinkServer;
    const N: usize = 24;
    let (lab, qodd) = qod_testkit::lab_in(
        mode,
        "[notifications]\nallow_http_hosts = [\"127.0.0.1\"]\nallow_sink_ranges = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let sink = SinkServer::start(&lab.edge).expect("sink");
    let mut api = qodd.sessions().await.expect("client");
    let mut events = qod_testkit::watch_all(&mut api).await;
    let creates: Vec<_> = (0..N)
        .map(|i| {
            let mut api = api.clone();
            let mut req = session(
                &format!("10.99.0.{}", i + 1),
                addr::SERVER_V4,
                "QOS_E",
                &[],
                &[],
                1,
            );
            req.sink = Some(sink.url("/cb"));
            tokio::spawn(async move {
                api.create_session(req)
                    .await
                    .map(|r| r.into_inner().session_id)
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for c in creates {
        ids.insert(c.await.expect("task").expect("create"));
    }

    // On the stream: per session, (revision, status, info) in the order received.
    let mut seen: BTreeMap<String, Vec<(u64, pb::QosStatus, pb::StatusInfo)>> = BTreeMap::new();
    let mut revisions = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.values().map(Vec::len).sum::<usize>() < 2 * N {
            let ev = futures::StreamExt::next(&mut events)
                .await
                .expect("stream")
                .expect("event");
            let Some(pb::session_event::Kind::QosStatusChanged(c)) = ev.kind else {
                continue;
            };
            revisions.push(ev.revision);
            seen.entry(c.session_id.clone()).or_default().push((
                ev.revision,
                c.qos_status(),
                c.status_info(),
            ));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not every start and end was watched: {seen:?}"));
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions increase: {revisions:?}"
    );
    assert_eq!(
        seen.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        ids
    );
    for (id, got) in &seen {
        let statuses: Vec<_> = got.iter().map(|(_, s, i)| (*s, *i)).collect();
        assert_eq!(
            statuses,
            [
                (pb::QosStatus::Available, pb::StatusInfo::Unspecified),
                (pb::QosStatus::Unavailable, pb::StatusInfo::DurationExpired)
            ],
            "{id} on the stream"
        );
    }

    // At the sink: per session, in the order the notifications arrived.
    let got = sink
        .wait_for("/cb", 2 * N, Duration::from_secs(30))
        .await
        .expect("every notification delivered");
    let mut arrived: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &got {
        let data = &r.body["data"];
        arrived
            .entry(data["sessionId"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(data["qosStatus"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        arrived
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        ids
    );
    for (id, statuses) in &arrived {
        assert_eq!(statuses, &["AVAILABLE", "UNAVAILABLE"], "{id} at the sink");
    }
}

qod_testkit::in_every_mode!(
    a_graceful_stop_keeps_the_data_plane_unless_told_to_tear_it_down,
    check_a_graceful_stop_keeps_the_data_plane_unless_told_to_tear_it_down
);
/// A graceful stop leaves the data plane enforcing by default; with `on_exit = "teardown"` it
/// removes it: the classifier is detached, nothing is pinned any more, traffic goes unmarked.
async fn check_a_graceful_stop_keeps_the_data_plane_unless_told_to_tear_it_down(
    mode: qod_testkit::Mode,
) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    qod_testkit::marked_flow(&mut api).await;
    let mark = |port| {
        lab.uplink_dscp(addr::DEVICE_V4, port, addr::SERVER_V4, 5000)
            .expect("traffic")
    };
    assert!(qodd.stop().expect("stopped").success());
    assert_eq!(mark(46300), [32; 5], "kept after a graceful stop");

    let path = qodd.config_path();
    let config = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, format!("on_exit = \"teardown\"\n{config}")).expect("config");
    qodd.restart().await.expect("restart");
    assert_eq!(mark(46301), [32; 5], "carried on");
    assert!(qodd.stop().expect("stopped").success());
    assert_eq!(mark(46302), [0; 5], "torn down");
    assert!(
        !qod_daemon::dataplane::pin_dir(&qodd.pin_path).exists(),
        "nothing left pinned"
    );
}

/// How `tc` shows a parked class's rate (`ClassSpec::parked`).
const PARKED: &str = "rate 64Kbit ceil 100Mbit";

/// `tc -s class show dev interface` in the lab's edge: each per-session HTB class (parent 1:1,
/// minor 0x100 and up) → (its `rate … ceil …` words, bytes sent).
fn session_classes(lab: &Lab, interface: &str) -> BTreeMap<String, (String, u64)> {
    let text = lab
        .edge
        .exec("tc", &["-s", "class", "show", "dev", interface])
        .expect("tc class show");
    let mut classes = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["class", "htb", handle, "parent", "1:1", rest @ ..] = words.as_slice() {
            let minor = handle
                .strip_prefix("1:")
                .and_then(|m| u16::from_str_radix(m, 16).ok());
            current = minor.filter(|m| *m >= 0x100).map(|_| {
                let rate = rest
                    .iter()
                    .skip_while(|w| **w != "rate")
                    .take(4)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ");
                ((*handle).to_owned(), rate)
            });
        } else if let (Some((handle, rate)), ["Sent", bytes, "bytes", ..]) =
            (current.take(), words.as_slice())
        {
            classes.insert(handle, (rate, bytes.parse().unwrap_or(0)));
        }
    }
    classes
}

/// The per-session class that downlink UDP to `device` goes through on the edge's device side,
/// with its rate words: the one whose byte count grows by what was sent.
fn class_of(lab: &Lab, device: &str, port: u16) -> (String, String) {
    let before = session_classes(lab, EDGE_DEV_IF);
    udp_send(
        &lab.server,
        sa(addr::SERVER_V4, 47000),
        sa(device, port),
        20,
        500,
    )
    .expect("downlink traffic");
    let after = session_classes(lab, EDGE_DEV_IF);
    let grown: Vec<(String, String)> = after
        .into_iter()
        .filter(|(h, (_, bytes))| *bytes >= before.get(h).map_or(0, |b| b.1) + 20 * 500)
        .map(|(h, (rate, _))| (h, rate))
        .collect();
    assert_eq!(
        grown.len(),
        1,
        "one class carried the flow to {device}: {grown:?}"
    );
    grown.into_iter().next().expect("one")
}

/// Restart with both edge interfaces scheduled (HTB trees qodd owns), after `kill -9` and after
/// a graceful stop that keeps the data plane: qodd adopts the tree it left instead of failing to
/// replace its root, the live sessions' traffic still goes through a class of their rate and
/// carries their marking, and the class of a session that ended while qodd was down is parked
/// for reuse (classes are made once: adding or deleting one costs the kernel a walk of them all).
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_sessions_keep_their_treatment_across_kill_9_and_graceful_restart() {
    let (lab, mut qodd) = qod_testkit::scheduled_lab_with_qodd("").await;
    lab.device
        .ip(&["addr", "add", "10.0.1.4/24", "dev", DEVICE_IF])
        .expect("third device address");
    let mut api = qodd.sessions().await.expect("client");
    qod_testkit::rated_session(&mut api, addr::OTHER_DEVICE_V4, 600).await;
    qod_testkit::rated_session(&mut api, "10.0.1.4", 2).await;
    qod_testkit::marked_flow(&mut api).await;
    let mark = |port| {
        lab.uplink_dscp(addr::DEVICE_V4, port, addr::SERVER_V4, 5000)
            .expect("uplink traffic")
    };
    let marked = mark(46400);
    assert!(
        marked.len() == 5 && marked[0] != 0,
        "marked at first: {marked:?}"
    );
    let (_, rate) = class_of(&lab, addr::OTHER_DEVICE_V4, 9000);
    assert!(rate.starts_with("rate 20Mbit ceil 20Mbit"), "{rate}");
    assert_eq!(
        session_classes(&lab, EDGE_DEV_IF).len(),
        3,
        "a class each: two guaranteed, one low latency"
    );

    qodd.kill9();
    // The short session ends while qodd is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // After each restart: still marked, the rated flow still in a class of its rate, and only
    // the live sessions' classes left.
    let treated = |after: &str, port: u16, qodd: &Qodd| {
        assert_eq!(
            mark(46400 + port),
            marked,
            "marked after {after}\n{}",
            qodd.log()
        );
        assert_eq!(
            class_of(&lab, addr::OTHER_DEVICE_V4, 9000 + port).1,
            rate,
            "same class rate after {after}"
        );
        let classes = session_classes(&lab, EDGE_DEV_IF);
        let parked = classes
            .values()
            .filter(|(rate, _)| rate.starts_with(PARKED))
            .count();
        assert_eq!(
            (classes.len() - parked, parked),
            (2, 1),
            "after {after}, two classes held and the ended session's parked: {classes:?}\n{}",
            qodd.log()
        );
    };
    qodd.restart()
        .await
        .expect("qodd starts again on the tree it left");
    treated("kill -9", 1, &qodd);
    assert!(qodd.log().contains("scheduler adopted"), "{}", qodd.log());

    assert!(qodd.stop().expect("stopped").success());
    assert_eq!(mark(46402), marked, "kept enforcing while stopped");
    qodd.restart()
        .await
        .expect("qodd starts again after a graceful stop");
    treated("a graceful restart", 3, &qodd);
    let live = api_sessions(&qodd).await;
    assert_eq!(live, 2, "both long sessions AVAILABLE");
}

/// AVAILABLE sessions of the test client, over the API.
async fn api_sessions(qodd: &Qodd) -> usize {
    let mut api = qodd.sessions().await.expect("client");
    let mut n = 0;
    for device in [addr::DEVICE_V4, addr::OTHER_DEVICE_V4, "10.0.1.4"] {
        n += qod_testkit::sessions_of_device(&mut api, device)
            .await
            .iter()
            .filter(|s| s.qos_status == pb::QosStatus::Available as i32)
            .count();
    }
    n
}

qod_testkit::in_every_mode!(
    health_is_not_serving_until_the_store_is_restored,
    check_health_is_not_serving_until_the_store_is_restored
);
/// While a large store is restored, health answers NOT_SERVING and every other call is refused
/// UNAVAILABLE (nothing can race the restore); then health says SERVING and the restored
/// sessions are there.
async fn check_health_is_not_serving_until_the_store_is_restored(mode: qod_testkit::Mode) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    // Scheduled, a rated session gets a class each (and the pools hold a few dozen): the store
    // is filled with a profile of no rates, so the restore takes as long in both modes.
    let (profile, profiles) = match mode {
        qod_testkit::Mode::Marking => ("QOS_E", ""),
        qod_testkit::Mode::Scheduled => (
            "QOS_PLAIN",
            "[[profiles]]\nname = \"QOS_PLAIN\"\nstatus = \"ACTIVE\"\n",
        ),
    };
    let (_lab, mut qodd) = qod_testkit::lab_in(mode, profiles).await;
    assert!(qodd.stop().expect("stopped").success());
    qod_testkit::fill_store(&qodd.dir.path().join("state"), 50_000, profile)
        .expect("fill the store");
    qodd.restart_no_wait().expect("spawn");
    let (mut not_serving, mut refused) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(std::time::Instant::now() < deadline, "{}", qodd.log());
        let Ok(channel) = qodd.channel().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "qod.v1.QualityOnDemand".into(),
            })
            .await
            .map(|r| r.into_inner().status());
        match status {
            Ok(ServingStatus::Serving) => break,
            Ok(ServingStatus::NotServing) => {
                not_serving += 1;
                let mut api = qodd.sessions().await.expect("client");
                match api
                    .create_session(session(
                        addr::DEVICE_V4,
                        addr::SERVER_V4,
                        "QOS_E",
                        &[],
                        &[],
                        60,
                    ))
                    .await
                {
                    Err(e) if e.code() == tonic::Code::Unavailable => {
                        assert_eq!(qod_testkit::api::reason(&e), "UNAVAILABLE");
                        refused += 1;
                    }
                    // The restore ended meanwhile: a call gets through only once health says
                    // SERVING.
                    other => {
                        let now = HealthClient::new(qodd.channel().await.expect("channel"))
                            .check(HealthCheckRequest {
                                service: "qod.v1.QualityOnDemand".into(),
                            })
                            .await
                            .map(|r| r.into_inner().status());
                        assert_eq!(now.ok(), Some(ServingStatus::Serving), "{other:?}");
                        break;
                    }
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_serving > 0, "health said NOT_SERVING while restoring");
    assert!(refused > 0, "calls were refused while restoring");
    let mut api = qodd.sessions().await.expect("client");
    let restored = qod_testkit::sessions_of_device(&mut api, "10.64.0.7").await;
    assert_eq!(restored.len(), 1, "a restored session");
}

qod_testkit::in_every_mode!(
    old_records_are_migrated_and_unreadable_ones_set_aside,
    check_old_records_are_migrated_and_unreadable_ones_set_aside
);
/// A record of the first schema (bare JSON) is read, enforced and written back in the current
/// one; an undecodable record is set aside and never stops the start.
async fn check_old_records_are_migrated_and_unreadable_ones_set_aside(mode: qod_testkit::Mode) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    let s = qod_testkit::marked_flow(&mut api).await;
    drop(api);
    qodd.stop();
    {
        let store =
            qod_daemon::store::Store::open(&qodd.dir.path().join("state")).expect("the store");
        let raw = store
            .raw_session_record(&s.session_id)
            .expect("read")
            .expect("the session's record");
        let (record, schema) =
            qod_daemon::store::decode_session_record(&raw).expect("a session record");
        assert_eq!(schema, qod_daemon::store::SESSION_SCHEMA);
        store
            .put_raw_session(
                &s.session_id,
                &qod_daemon::store::session_record_v1(&record),
            )
            .expect("write the old record");
        store
            .put_raw_session("a-record-nobody-can-read", b"\x00\x01 not json")
            .expect("write garbage");
    }
    qodd.restart()
        .await
        .expect("starts despite the unreadable record");
    let mut api = qodd.sessions().await.expect("client");
    let info = qod_testkit::session_info(&mut api, &s.session_id).await;
    assert_eq!(info.qos_status(), pb::QosStatus::Available);
    let dscp = lab
        .uplink_dscp(addr::DEVICE_V4, 46000, addr::SERVER_V4, 5000)
        .expect("traffic");
    assert!(
        !dscp.is_empty() && dscp.iter().all(|d| *d == 32),
        "the migrated session is enforced: {dscp:?}"
    );
    let log = qodd.log();
    assert!(
        log.contains("a-record-nobody-can-read") && log.contains("set aside"),
        "{log}"
    );
    assert!(log.contains("stored records migrated"), "{log}");
    qodd.stop();
    let store = qod_daemon::store::Store::open(&qodd.dir.path().join("state")).expect("the store");
    let (_, schema) = qod_daemon::store::decode_session_record(
        &store
            .raw_session_record(&s.session_id)
            .expect("read")
            .expect("the record"),
    )
    .expect("a session record");
    assert_eq!(schema, qod_daemon::store::SESSION_SCHEMA, "written back");
    let aside = store.set_aside().expect("set aside");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(aside[0].key, "a-record-nobody-can-read");
}

/// A root qdisc qodd did not install is someone else's shaping: qodd refuses to start on it and
/// leaves it as it was, unless the interface says `replace_foreign_root = true`.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_root_qdisc_is_refused_unless_replacing_it_is_allowed() {
    require_root();
    let lab = Lab::new().expect("lab");
    lab.edge
        .exec(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                EDGE_DEV_IF,
                "root",
                "handle",
                "5:",
                "tbf",
                "rate",
                "50mbit",
                "burst",
                "20kb",
                "latency",
                "50ms",
            ],
        )
        .expect("an operator's own root qdisc");
    let root = || {
        lab.edge
            .exec("tc", &["qdisc", "show", "dev", EDGE_DEV_IF, "root"])
            .expect("tc")
    };
    let interface =
        format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100 }}");
    let Err(err) = Qodd::start(&lab.edge, &[&interface], "").await else {
        panic!("started on a foreign root: {}", root());
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("tbf 5:") && text.contains("replace_foreign_root"),
        "{text}"
    );
    assert!(
        root().contains("qdisc tbf 5: root"),
        "left as it was: {}",
        root()
    );
    let interface = format!(
        "{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100, replace_foreign_root = true }}"
    );
    let _qodd = Qodd::start(&lab.edge, &[&interface], "")
        .await
        .expect("replaces it when told to");
    assert!(root().contains("qdisc htb 1: root"), "{}", root());
}

/// Waits (20 s at most) for the restarted `qodd` to have reconciled the kernel's entries with
/// what it restored (it does so once it serves).
async fn reconciled(qodd: &Qodd) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !qodd.log().contains("kernel entries reconciled") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reconciliation:\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

qod_testkit::in_every_mode!(
    an_entry_whose_session_left_the_store_stops_treating_after_a_crash,
    check_an_entry_whose_session_left_the_store_stops_treating_after_a_crash
);
/// A crash can leave the kernel with a rule whose session the store no longer holds (an
/// orphan): the restart serves, then removes it. On the wire, the orphan's device is no longer
/// marked; the restored session's device still is.
async fn check_an_entry_whose_session_left_the_store_stops_treating_after_a_crash(
    mode: qod_testkit::Mode,
) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, "").await;
    let mut api = qodd.sessions().await.expect("client");
    let kept = qod_testkit::marked_flow(&mut api).await;
    let orphan = qod_testkit::marked_flow_of(&mut api, addr::OTHER_DEVICE_V4).await;
    let dscp = |device: &str| {
        lab.uplink_dscp(device, 46000, addr::SERVER_V4, 5000)
            .expect("traffic")
    };
    let marked = |seen: &[u8]| !seen.is_empty() && seen.iter().all(|d| *d == 32);
    assert!(
        marked(&dscp(addr::OTHER_DEVICE_V4)),
        "marked before the crash"
    );
    qodd.kill9();
    qod_daemon::store::Store::open(&qodd.dir.path().join("state"))
        .expect("the store")
        .remove(orphan.session_id.parse().expect("session id"))
        .expect("remove the orphan's session");
    qodd.restart().await.expect("restart");
    // Looked for once qodd serves.
    reconciled(&qodd).await;
    assert!(
        qodd.log()
            .contains("removed kernel entries no session accounts for removed=1"),
        "{}",
        qodd.log()
    );
    let seen = dscp(addr::OTHER_DEVICE_V4);
    assert!(
        !seen.is_empty() && seen.iter().all(|d| *d == 0),
        "orphan still treated: {seen:?}"
    );
    assert!(
        marked(&dscp(addr::DEVICE_V4)),
        "the restored session's device"
    );
    let mut api = qodd.sessions().await.expect("client");
    assert_eq!(
        qod_testkit::session_info(&mut api, &kept.session_id)
            .await
            .qos_status(),
        pb::QosStatus::Available
    );
}

/// Profiles as [`check_profiles_changed_while_down_apply_at_the_restart`] starts with.
const CHANGING_PROFILES: &str = r#"
[[profiles]]
name = "QOS_A"
status = "ACTIVE"
dscp = 10

[[profiles]]
name = "QOS_B"
status = "ACTIVE"
dscp = 26
"#;

qod_testkit::in_every_mode!(
    profiles_changed_while_down_apply_at_the_restart,
    check_profiles_changed_while_down_apply_at_the_restart
);
/// The configuration changes while qodd is down: one profile marks otherwise, one is gone, a
/// new one comes first. Over the pinned maps, each profile finds its entry of the classifier's
/// profile table where it was, so on the wire the changed profile's session carries the new
/// DSCP, the gone profile's session ends and its device is left alone, and a session of the new
/// profile marks as that profile says.
async fn check_profiles_changed_while_down_apply_at_the_restart(mode: qod_testkit::Mode) {
    let (lab, mut qodd) = qod_testkit::lab_in(mode, CHANGING_PROFILES).await;
    let mut api = qodd.sessions().await.expect("client");
    let create = |device: &'static str, profile: &'static str| {
        session(device, addr::SERVER_V4, profile, &[], &[5000], 600)
    };
    let a = api
        .create_session(create(addr::DEVICE_V4, "QOS_A"))
        .await
        .expect("create QOS_A")
        .into_inner();
    let b = api
        .create_session(create(addr::OTHER_DEVICE_V4, "QOS_B"))
        .await
        .expect("create QOS_B")
        .into_inner();
    let dscp = |device: &str, port: u16| {
        lab.uplink_dscp(device, port, addr::SERVER_V4, 5000)
            .expect("traffic")
    };
    assert_eq!(dscp(addr::DEVICE_V4, 46100), [10; 5], "QOS_A before");
    assert_eq!(dscp(addr::OTHER_DEVICE_V4, 46101), [26; 5], "QOS_B before");

    qodd.kill9();
    let config = std::fs::read_to_string(qodd.config_path()).expect("config");
    let config = config
        .replace("dscp = 10", "dscp = 18")
        .replace(
            "[[profiles]]\nname = \"QOS_B\"\nstatus = \"ACTIVE\"\ndscp = 26\n",
            "",
        )
        .replace(
            "[[profiles]]\nname = \"QOS_A\"",
            "[[profiles]]\nname = \"QOS_C\"\nstatus = \"ACTIVE\"\ndscp = 40\n\n[[profiles]]\nname = \"QOS_A\"",
        );
    assert!(
        config.contains("QOS_C") && !config.contains("QOS_B"),
        "{config}"
    );
    std::fs::write(qodd.config_path(), config).expect("rewrite config");
    qodd.restart().await.expect("restart");
    reconciled(&qodd).await;

    assert_eq!(
        dscp(addr::DEVICE_V4, 46102),
        [18; 5],
        "QOS_A's new DSCP after the restart"
    );
    assert_eq!(
        dscp(addr::OTHER_DEVICE_V4, 46103),
        [0; 5],
        "the gone profile's device left alone"
    );
    let mut api = qodd.sessions().await.expect("client");
    let ended = qod_testkit::session_info(&mut api, &b.session_id).await;
    assert_eq!(
        (ended.qos_status(), ended.status_info()),
        (
            pb::QosStatus::Unavailable,
            pb::StatusInfo::NetworkTerminated
        )
    );
    assert_eq!(
        qod_testkit::session_info(&mut api, &a.session_id)
            .await
            .qos_status(),
        pb::QosStatus::Available
    );
    api.create_session(create(addr::OTHER_DEVICE_V4, "QOS_C"))
        .await
        .expect("create QOS_C");
    assert_eq!(
        dscp(addr::OTHER_DEVICE_V4, 46104),
        [40; 5],
        "the new profile's session"
    );
}
