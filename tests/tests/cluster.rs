//! Cluster mode on a real three-member etcd cluster (TLS with client certificates), with qodd
//! nodes each on a lab of its own, wired to etcd's namespace: membership under leases, pools
//! checked across nodes at every join, and what etcd failures do to a node's standing.

use std::time::{Duration, Instant};

use qod_testkit::{
    EtcdCluster, Lab, Mode, Qodd, api::require_root, in_every_mode, metric_samples, metric_value,
    qodctl_as, qodd_bin,
};
use serde_json::Value;

/// A lab whose qodd (the debug build) is cluster node `id`.
async fn node(
    etcd: &EtcdCluster,
    mode: Mode,
    id: &str,
    host: u8,
    pools: &[&str],
    extra: &str,
) -> anyhow::Result<(Lab, Qodd)> {
    require_root();
    etcd.node(&qodd_bin(), mode, id, host, pools, "", extra)
        .await
}

/// Node "d", the standby of `pools` (lease 3 s).
async fn standby_d(etcd: &EtcdCluster, mode: Mode, pools: &[&str]) -> (Lab, Qodd) {
    node(
        etcd,
        mode,
        "d",
        14,
        pools,
        "role = \"standby\"\nlease_ttl_secs = 3",
    )
    .await
    .expect("standby d")
}

/// `qodctl --json status` of `qodd`: its `cluster` object.
fn cluster_status(qodd: &Qodd) -> Value {
    let admin = qodd
        .pki
        .mint(&qod_daemon::devkit::TokenSpec {
            scopes: vec![qod_daemon::auth::scope::ADMIN.into()],
            ..qod_daemon::devkit::TokenSpec::full("ops")
        })
        .expect("operator token");
    let (ok, out, err) = qodctl_as(qodd, &admin, true, &["--json", "status"]);
    assert!(ok, "qodctl status: {out}{err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    status["cluster"].clone()
}

fn node_ids(cluster: &Value) -> Vec<String> {
    cluster["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|n| n["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `qodd`'s cluster status until `done` holds (within `within`), returning it.
async fn await_status(qodd: &Qodd, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let c = cluster_status(qodd);
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "cluster status not as expected within {within:?}: {c:#}\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A QOS_E create for `device` to the lab's server, port `port`, for 600 s.
fn qos_e(device: &str, port: u32) -> qod_proto::v1::CreateSessionRequest {
    qod_testkit::api::session(
        device,
        qod_testkit::addr::SERVER_V4,
        "QOS_E",
        &[],
        &[port],
        600,
    )
}

/// A token of another API client, minted by `qodd`'s identity provider.
fn someone_else(qodd: &Qodd) -> String {
    qodd.pki
        .mint(&qod_daemon::devkit::TokenSpec::full("someone-else"))
        .expect("token")
}

/// A notification sink on etcd's bridge, and the `[notifications]` section that lets nodes
/// reach it (plain HTTP there, short retries).
fn sink_on_etcds_bridge(etcd: &EtcdCluster) -> (qod_testkit::SinkServer, String) {
    let sink = qod_testkit::SinkServer::start_on(&etcd.ns, qod_testkit::ETCD_HOST).expect("sink");
    let notify = format!(
        "[notifications]\nallow_http_hosts = [{:?}]\nallow_sink_ranges = [\"10.77.0.0/24\"]\nbackoff_base_ms = 100\nbackoff_max_ms = 400\n",
        qod_testkit::ETCD_HOST
    );
    (sink, notify)
}

/// The metric samples of the qodd in `lab`.
fn metrics(lab: &Lab) -> std::collections::BTreeMap<String, f64> {
    let (code, _, body) = qod_testkit::http_get(&lab.edge, 9464, "/metrics");
    assert_eq!(code, 200);
    metric_samples(&body)
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_join_under_leases_and_pools_that_clash_are_refused() {
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (_a_lab, a) = node(
        &etcd,
        Mode::Marking,
        "a",
        11,
        &["10.0.1.0/24"],
        "lease_ttl_secs = 3",
    )
    .await
    .expect("node a");
    let (_b_lab, mut b) = node(
        &etcd,
        Mode::Marking,
        "b",
        12,
        &["10.0.9.0/24", "fd00:9::/64"],
        "lease_ttl_secs = 3",
    )
    .await
    .expect("node b");

    // Every node sees every registration: roles, pools, API addresses and a live lease.
    let c = await_status(&a, Duration::from_secs(5), |c| node_ids(c) == ["a", "b"]).await;
    assert_eq!(c["nodeId"], "a");
    assert_eq!(c["leaseUp"], true, "{c:#}");
    let nodes = c["nodes"].as_array().expect("nodes");
    assert_eq!(nodes[0]["role"], "active");
    assert_eq!(nodes[0]["pools"], serde_json::json!(["10.0.1.0/24"]));
    assert_eq!(
        nodes[1]["pools"],
        serde_json::json!(["10.0.9.0/24", "fd00:9::/64"])
    );
    assert_eq!(
        nodes[1]["advertise"],
        serde_json::json!(["10.77.0.12:50051"])
    );
    assert!(
        nodes
            .iter()
            .all(|n| n["leaseTtlSeconds"].as_i64().is_some_and(|t| t > 0)),
        "{c:#}"
    );
    // What qodd wrote is what etcd holds, under the prefix.
    let keys = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/qod/nodes/"])
        .expect("etcdctl get");
    assert!(
        keys.contains("/qod/nodes/a") && keys.contains("/qod/nodes/b"),
        "{keys}"
    );

    // An active node whose pools overlap a's is refused at start, with the reason (exit 64).
    let clash = node(&etcd, Mode::Marking, "c", 13, &["10.0.1.128/25"], "")
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("node c must be refused");
    assert!(clash.contains("exit status: 64"), "{clash}");
    assert!(
        clash.contains(
            "10.0.1.128/25 of this active node overlaps 10.0.1.0/24 of active node \"a\""
        ),
        "{clash}"
    );
    // A node id in use by another qodd is refused too.
    let twin = node(&etcd, Mode::Marking, "b", 14, &["10.0.77.0/24"], "")
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a second node b must be refused");
    assert!(
        twin.contains("node id \"b\" is registered by another qodd"),
        "{twin}"
    );
    // A standby for a's pools pairs with it; one that covers only part of them does not.
    let (_d_lab, mut d) = node(
        &etcd,
        Mode::Marking,
        "d",
        15,
        &["10.0.1.0/24"],
        "role = \"standby\"\nlease_ttl_secs = 60",
    )
    .await
    .expect("standby d");
    let half = node(
        &etcd,
        Mode::Marking,
        "e",
        16,
        &["10.0.1.0/25"],
        "role = \"standby\"",
    )
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .expect("a partial standby must be refused");
    assert!(half.contains("its ue_pools must be the same"), "{half}");
    let c = await_status(&a, Duration::from_secs(5), |c| {
        node_ids(c) == ["a", "b", "d"]
    })
    .await;
    assert_eq!(c["nodes"][2]["role"], "standby");

    // kill -9: b's lease lapses (3 s) and b is gone from the cluster.
    b.kill9();
    await_status(&a, Duration::from_secs(15), |c| node_ids(c) == ["a", "d"]).await;
    // A graceful stop revokes the lease: d (a 60 s lease) is gone well before it would lapse.
    let stopped = Instant::now();
    d.stop();
    await_status(&a, Duration::from_secs(20), |c| node_ids(c) == ["a"]).await;
    assert!(stopped.elapsed() < Duration::from_secs(30));
    // The join and the keep-alives are measured.
    let m = metrics(&_a_lab);
    assert!(
        metric_value(
            &m,
            "qod_cluster_etcd_request_duration_seconds_count{op=\"register\"}"
        ) >= 1.0,
        "{m:?}"
    );
    assert_eq!(metric_value(&m, "qod_cluster_lease_up"), 1.0);
}

/// kill -9 and a restart before the lease lapses: the node recognises its own registration
/// (the instance kept in its state directory), takes it over and is listed once; its sessions
/// and their treatment carry on across the restart, as on a single node.
async fn a_node_killed_and_restarted_takes_its_own_registration_back(mode: Mode) {
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (lab, mut a) = node(
        &etcd,
        mode,
        "a",
        11,
        &["10.0.1.0/24"],
        "lease_ttl_secs = 60",
    )
    .await
    .expect("node a");
    let mut api = a.sessions().await.expect("client");
    let s = qod_testkit::marked_flow(&mut api).await;
    let before = cluster_status(&a);
    let lease = before["leaseId"].as_str().expect("lease").to_owned();
    a.kill9();
    a.restart_no_wait().expect("restart");
    a.wait_serving().await.expect("serving again");
    let c = await_status(&a, Duration::from_secs(10), |c| {
        c["leaseUp"] == true && c["leaseId"] != lease.as_str()
    })
    .await;
    assert_eq!(node_ids(&c), ["a"], "{c:#}");
    // The old lease went with the old registration.
    let leases = etcd.etcdctl(&["lease", "list"]).expect("lease list");
    assert!(!leases.contains(&lease), "{leases}");
    let mut api = a.sessions().await.expect("client");
    let got = qod_testkit::session_info(&mut api, &s.session_id).await;
    assert_eq!(got.qos_status, s.qos_status);
    let dscp = lab
        .uplink_dscp(
            qod_testkit::addr::DEVICE_V4,
            40000,
            qod_testkit::addr::SERVER_V4,
            5000,
        )
        .expect("capture");
    assert_eq!(dscp, [32; 5], "QOS_E marks CS4 across the restart");
}
in_every_mode!(
    killed_node_takes_its_registration_back,
    a_node_killed_and_restarted_takes_its_own_registration_back
);

/// One etcd member of three down changes nothing: the lease is kept and nodes still join. Two
/// down: the node cannot keep its lease, says so (status, metrics), keeps serving reads; when
/// the members are back it joins again by itself.
#[tokio::test(flavor = "multi_thread")]
async fn losing_one_etcd_member_changes_nothing_and_losing_two_is_survived() {
    let mut etcd = EtcdCluster::start(3).expect("etcd");
    let (a_lab, a) = node(
        &etcd,
        Mode::Marking,
        "a",
        11,
        &["10.0.1.0/24"],
        "lease_ttl_secs = 5",
    )
    .await
    .expect("node a");
    let mut api = a.sessions().await.expect("client");
    let s = qod_testkit::marked_flow(&mut api).await;
    etcd.kill_member(0);
    // Two lease lifetimes on two members (a new etcd leader elected meanwhile, if the killed
    // member led): still registered, the lease never lapsed.
    let lease = cluster_status(&a)["leaseId"].clone();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let c = cluster_status(&a);
    assert_eq!(c["leaseUp"], true, "{c:#}\n{}", a.log());
    assert_eq!(c["leaseId"], lease, "{c:#}\n{}", a.log());
    let (_b_lab, _b) = node(
        &etcd,
        Mode::Marking,
        "b",
        12,
        &["10.0.9.0/24"],
        "lease_ttl_secs = 3",
    )
    .await
    .expect("a node joins with one member down");
    await_status(&a, Duration::from_secs(5), |c| node_ids(c) == ["a", "b"]).await;

    // No majority: the lease cannot be kept.
    etcd.kill_member(1);
    let c = await_status(&a, Duration::from_secs(20), |c| c["leaseUp"] == false).await;
    assert!(
        !c["problem"].as_str().unwrap_or_default().is_empty(),
        "{c:#}"
    );
    let m = metrics(&a_lab);
    assert_eq!(metric_value(&m, "qod_cluster_lease_up"), 0.0);
    assert!(metric_value(&m, "qod_cluster_etcd_errors_total{op=\"keepalive\"}") >= 1.0);
    // Reads are still served, writes refused with the reason, and the session this node
    // holds keeps its treatment on the wire.
    assert_eq!(
        qod_testkit::session_info(&mut api, &s.session_id)
            .await
            .qos_profile,
        "QOS_E"
    );
    let refused = api
        .create_session(qod_testkit::api::session(
            qod_testkit::addr::OTHER_DEVICE_V4,
            qod_testkit::addr::SERVER_V4,
            "QOS_E",
            &[],
            &[],
            60,
        ))
        .await
        .expect_err("no writes out of the cluster");
    assert_eq!(qod_testkit::api::reason(&refused), "UNAVAILABLE");
    assert!(
        refused.message().contains("out of the cluster"),
        "{refused:?}"
    );
    assert_eq!(
        a_lab
            .uplink_dscp(
                qod_testkit::addr::DEVICE_V4,
                40000,
                qod_testkit::addr::SERVER_V4,
                5000
            )
            .expect("capture"),
        [32; 5]
    );

    etcd.start_member(0).expect("member 0 back");
    etcd.start_member(1).expect("member 1 back");
    etcd.wait_healthy(Duration::from_secs(30)).expect("healthy");
    let c = await_status(&a, Duration::from_secs(30), |c| {
        c["leaseUp"] == true && node_ids(c).contains(&"a".to_owned())
    })
    .await;
    assert_ne!(c["leaseId"], lease, "joined again under a new lease");
    let keys = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/qod/nodes/"])
        .expect("etcdctl get");
    assert_eq!(keys.matches("/qod/nodes/a").count(), 1, "{keys}");
    // Writes again.
    api.delete_session(qod_proto::v1::DeleteSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .expect("delete once back");
}

/// Any node takes any call: a create through node a for a device of node b's pool is installed
/// by b and marks b's traffic on the wire; the same flow through node c is a CONFLICT; c reads,
/// lists and deletes it, and b's traffic goes unmarked again.
#[tokio::test(flavor = "multi_thread")]
async fn any_node_takes_any_call_and_the_node_that_serves_the_device_installs_it() {
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (_a_lab, a) = node(&etcd, Mode::Marking, "a", 11, &["10.0.200.0/24"], "")
        .await
        .expect("node a");
    let (b_lab, b) = node(
        &etcd,
        Mode::Marking,
        "b",
        12,
        &["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"],
        "",
    )
    .await
    .expect("node b");
    let (_c_lab, c) = node(&etcd, Mode::Marking, "c", 13, &["10.0.201.0/24"], "")
        .await
        .expect("node c");
    for n in [&a, &c] {
        await_status(n, Duration::from_secs(5), |c| {
            node_ids(c) == ["a", "b", "c"]
        })
        .await;
    }
    assert_eq!(
        b_lab
            .uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture"),
        [0; 5],
        "unmarked before any session"
    );

    let mut via_a = a.sessions().await.expect("client a");
    let s = qod_testkit::marked_flow(&mut via_a).await;
    assert_eq!(s.qos_status(), qod_proto::v1::QosStatus::Available);
    // b installed it: b holds it, and b's traffic is marked.
    let mut at_b = b.sessions().await.expect("client b");
    assert_eq!(
        qod_testkit::session_info(&mut at_b, &s.session_id)
            .await
            .session_id,
        s.session_id
    );
    assert_eq!(
        b_lab
            .uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture"),
        [32; 5]
    );

    // The conflict rule holds across nodes.
    let mut via_c = c.sessions().await.expect("client c");
    let conflict = via_c
        .create_session(qos_e(DEVICE_V4, 5000))
        .await
        .expect_err("the same flow through c");
    assert_eq!(
        qod_testkit::api::reason(&conflict),
        "CONFLICT",
        "{conflict:?}"
    );
    // Another client cannot reach it through any node.
    let other = someone_else(&a);
    let mut as_other = c.sessions_as(&other).await.expect("client");
    let denied = as_other
        .get_session(qod_proto::v1::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .expect_err("another client's session");
    assert!(
        matches!(
            qod_testkit::api::reason(&denied).as_str(),
            "PERMISSION_DENIED" | "NOT_FOUND"
        ),
        "{denied:?}"
    );
    // Read and list through c.
    assert_eq!(
        qod_testkit::session_info(&mut via_c, &s.session_id)
            .await
            .qos_profile,
        "QOS_E"
    );
    let listed = qod_testkit::sessions_of_device(&mut via_c, DEVICE_V4).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    // Delete through c: b ends it and its traffic goes unmarked.
    via_c
        .delete_session(qod_proto::v1::DeleteSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .expect("delete through c");
    assert_eq!(
        b_lab
            .uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture"),
        [0; 5]
    );
    // Deleted is gone, wherever it is asked; so is a session no node ever had.
    for id in [s.session_id.clone(), uuid::Uuid::new_v4().to_string()] {
        let gone = via_a
            .get_session(qod_proto::v1::GetSessionRequest { session_id: id })
            .await
            .expect_err("gone");
        assert_eq!(qod_testkit::api::reason(&gone), "NOT_FOUND", "{gone:?}");
    }
}

/// A client's quota of live sessions holds across the cluster, not per node: creates racing
/// through two nodes for devices of both get exactly the quota between them, whichever node
/// serves each (places taken ahead included); another client is not affected; a deleted
/// session gives its place back. Node b (in `mode`) killed and started again counts what it
/// holds again: still full through either node, and a delete frees a place.
async fn a_clients_quota_holds_across_the_cluster(mode: Mode) {
    let etcd = EtcdCluster::start(3).expect("etcd");
    let limits = "[limits]\nmax_active_sessions_per_client = 10\n";
    let (_a_lab, a) = etcd
        .node(
            &qodd_bin(),
            Mode::Marking,
            "a",
            11,
            &["10.0.200.0/24"],
            limits,
            "",
        )
        .await
        .expect("node a");
    let (_b_lab, mut b) = etcd
        .node(&qodd_bin(), mode, "b", 12, &["10.0.1.0/24"], limits, "")
        .await
        .expect("node b");
    for n in [&a, &b] {
        await_status(n, Duration::from_secs(5), |c| node_ids(c) == ["a", "b"]).await;
    }
    async fn create(via: &Qodd, device: String) -> Result<String, tonic::Status> {
        via.sessions()
            .await
            .expect("client")
            .create_session(qos_e(&device, 5000))
            .await
            .map(|r| r.into_inner().session_id)
    }
    // 24 creates at once, each node taking twelve: six for its own devices, six passed on.
    let racing = (0..24u8).map(|i| {
        let via = if i % 2 == 0 { &a } else { &b };
        let device = if i < 12 {
            format!("10.0.200.{}", 10 + i)
        } else {
            format!("10.0.1.{}", 10 + i)
        };
        create(via, device)
    });
    let outcomes = futures::future::join_all(racing).await;
    let created: Vec<String> = outcomes.iter().filter_map(|o| o.clone().ok()).collect();
    assert_eq!(created.len(), 10, "{outcomes:#?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(
            qod_testkit::api::reason(refused),
            "QUOTA_EXCEEDED",
            "{refused:?}"
        );
        assert!(
            refused.message().contains("across the cluster"),
            "{refused:?}"
        );
    }
    // However they are spread over the nodes, one more is refused through either.
    for via in [&a, &b] {
        let over = create(via, "10.0.200.30".into())
            .await
            .expect_err("over quota");
        assert_eq!(
            qod_testkit::api::reason(&over),
            "QUOTA_EXCEEDED",
            "{over:?}"
        );
    }
    // Bad input is told as such, quota or not (checked before a place is asked for).
    let mut bad = qos_e("10.0.200.32", 5000);
    bad.qos_profile = "QOS_NOPE".into();
    let refused = b
        .sessions()
        .await
        .expect("client")
        .create_session(bad)
        .await
        .expect_err("unknown profile");
    assert_eq!(
        qod_testkit::api::reason(&refused),
        "INVALID_ARGUMENT",
        "{refused:?}"
    );
    // Another client has its own quota.
    let other = someone_else(&a);
    b.sessions_as(&other)
        .await
        .expect("client")
        .create_session(qos_e("10.0.200.31", 5000))
        .await
        .expect("another client's create");
    // A session deleted (through the node that does not hold it) gives its place back: one
    // more create fits, and the next does not.
    let mut via_b = b.sessions().await.expect("client b");
    via_b
        .delete_session(qod_proto::v1::DeleteSessionRequest {
            session_id: created[0].clone(),
        })
        .await
        .expect("delete");
    create(&a, "10.0.1.40".into())
        .await
        .expect("a place was given back");
    let over = create(&b, "10.0.200.41".into())
        .await
        .expect_err("full again");
    assert_eq!(
        qod_testkit::api::reason(&over),
        "QUOTA_EXCEEDED",
        "{over:?}"
    );
    // No client name in etcd: the quota entries are under pseudonyms.
    let keys = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/"])
        .expect("etcdctl get");
    assert!(keys.contains("quota/"), "{keys}");
    assert!(!keys.contains("someone-else"), "{keys}");

    // b killed and back: its entry is written from its restored ledger, never lost meanwhile.
    b.kill9();
    b.restart().await.expect("b back");
    for n in [&a, &b] {
        await_status(n, Duration::from_secs(10), |c| node_ids(c) == ["a", "b"]).await;
    }
    for (via, device) in [(&a, "10.0.1.43"), (&b, "10.0.200.43")] {
        let over = create(via, device.into()).await.expect_err("still full");
        assert_eq!(
            qod_testkit::api::reason(&over),
            "QUOTA_EXCEEDED",
            "{over:?}"
        );
    }
    let mut via_a = a.sessions().await.expect("client a");
    for id in &created[1..] {
        via_a
            .delete_session(qod_proto::v1::DeleteSessionRequest {
                session_id: id.clone(),
            })
            .await
            .expect("delete");
    }
    create(&b, "10.0.1.44".into())
        .await
        .expect("places freed after the restart");
}
in_every_mode!(
    client_quota_across_the_cluster,
    a_clients_quota_holds_across_the_cluster
);

/// CAMARA's asynchronous create across nodes. With node b (which serves the device) killed but
/// still registered, creates through node a are answered REQUESTED (no startedAt / expiresAt)
/// and read back REQUESTED through a; one is withdrawn by a delete; one of them conflicts with
/// another. When b is back it installs them from etcd, in the order they were asked: the sink
/// hears AVAILABLE for the first, UNAVAILABLE / NETWORK_TERMINATED for the one that conflicts,
/// nothing for the withdrawn one, and b marks the traffic. Then, b running but cut off from a,
/// a create through a waits the bound, is answered REQUESTED, and b installs it.
async fn a_create_for_an_owner_that_does_not_answer_is_requested_then_installed(mode: Mode) {
    use qod_proto::v1::{QosStatus, StatusInfo};
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (sink, notify) = sink_on_etcds_bridge(&etcd);
    let (a_lab, a) = etcd
        .node(
            &qodd_bin(),
            Mode::Marking,
            "a",
            11,
            &["10.0.200.0/24"],
            &notify,
            "install_wait_ms = 1000",
        )
        .await
        .expect("node a");
    let pools = ["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"];
    let (b_lab, mut b) = etcd
        .node(
            &qodd_bin(),
            mode,
            "b",
            12,
            &pools,
            &notify,
            "lease_ttl_secs = 60",
        )
        .await
        .expect("node b");
    await_status(&a, Duration::from_secs(5), |c| node_ids(c) == ["a", "b"]).await;
    let mut via_a = a.sessions().await.expect("client a");
    let request = |port: u16| {
        let mut r = qos_e(DEVICE_V4, u32::from(port));
        r.sink = Some(sink.url("/s"));
        r
    };
    let get = |id: &str| qod_proto::v1::GetSessionRequest {
        session_id: id.to_owned(),
    };

    b.kill9();
    let first = via_a
        .create_session(request(5000))
        .await
        .expect("create while b is down")
        .into_inner();
    assert_eq!(first.qos_status(), QosStatus::Requested, "{first:?}");
    assert!(
        first.started_at.is_none() && first.expires_at.is_none(),
        "{first:?}"
    );
    assert_eq!(first.duration, 600);
    let read = qod_testkit::session_info(&mut via_a, &first.session_id).await;
    assert_eq!(read.qos_status(), QosStatus::Requested, "{read:?}");
    let extend = via_a
        .extend_qos_session_duration(qod_proto::v1::ExtendQosSessionDurationRequest {
            session_id: first.session_id.clone(),
            requested_additional_duration: 60,
        })
        .await
        .expect_err("a REQUESTED session is not extended");
    assert_eq!(
        qod_testkit::api::reason(&extend),
        "QUALITY_ON_DEMAND.SESSION_EXTENSION_NOT_ALLOWED",
        "{extend:?}"
    );
    let withdrawn = via_a
        .create_session(request(6000))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(withdrawn.qos_status(), QosStatus::Requested);
    via_a
        .delete_session(qod_proto::v1::DeleteSessionRequest {
            session_id: withdrawn.session_id.clone(),
        })
        .await
        .expect("a REQUESTED session is withdrawn");
    let conflicting = via_a
        .create_session(request(5000))
        .await
        .expect("the same flow again")
        .into_inner();
    assert_eq!(conflicting.qos_status(), QosStatus::Requested);

    b.restart().await.expect("b back");
    let told = sink
        .wait_for("/s", 2, Duration::from_secs(15))
        .await
        .expect("b installs what was handed over");
    let said = |id: &str| -> Vec<(String, String)> {
        sink.received("/s")
            .iter()
            .filter(|r| r.body["data"]["sessionId"] == id)
            .map(|r| {
                (
                    r.body["data"]["qosStatus"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    r.body["data"]["statusInfo"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(
        said(&first.session_id),
        [("AVAILABLE".into(), String::new())]
    );
    assert_eq!(
        said(&conflicting.session_id),
        [("UNAVAILABLE".into(), "NETWORK_TERMINATED".into())]
    );
    let probe = |port: u16| {
        b_lab
            .uplink_dscp(DEVICE_V4, 40000, SERVER_V4, port)
            .expect("capture")
    };
    assert_eq!(
        probe(5000),
        [32; 5],
        "b marks the installed session's traffic"
    );
    assert_eq!(probe(6000), [0; 5], "the withdrawn one is not installed");
    let mut at_b = b.sessions().await.expect("client b");
    let installed = qod_testkit::session_info(&mut at_b, &first.session_id).await;
    assert_eq!(installed.qos_status(), QosStatus::Available);
    assert_eq!(installed.status_info(), StatusInfo::Unspecified);
    for id in [&withdrawn.session_id, &conflicting.session_id] {
        let gone = at_b.get_session(get(id)).await.expect_err("not installed");
        assert_eq!(qod_testkit::api::reason(&gone), "NOT_FOUND", "{gone:?}");
    }

    // b runs but a cannot reach it: the create waits the bound, then is handed over.
    a_lab
        .edge
        .ip(&["route", "add", "blackhole", "10.77.0.12/32"])
        .expect("cut a from b");
    let started = Instant::now();
    let late = via_a
        .create_session(request(7000))
        .await
        .expect("create with b out of reach")
        .into_inner();
    let waited = started.elapsed();
    assert_eq!(late.qos_status(), QosStatus::Requested, "{late:?}");
    sink.wait_for("/s", 3, Duration::from_secs(15))
        .await
        .expect("b installs it");
    assert_eq!(
        said(&late.session_id),
        [("AVAILABLE".into(), String::new())]
    );
    assert_eq!(probe(7000), [32; 5]);
    println!("create handed over after {waited:?}: b unreachable");
    a_lab
        .edge
        .ip(&["route", "del", "blackhole", "10.77.0.12/32"])
        .expect("heal");

    // b reached but slow (stopped): the create passed on waits the bound and is handed over;
    // b, resumed, finds it twice (the call passed on, and the record in etcd), under one id,
    // and installs it once.
    let pid = b.pid().expect("b runs").to_string();
    qod_testkit::sh("kill", &["-STOP", &pid]).expect("stop b");
    let started = Instant::now();
    let slow = via_a.create_session(request(8000)).await;
    let waited = started.elapsed();
    qod_testkit::sh("kill", &["-CONT", &pid]).expect("resume b");
    let slow = slow.expect("create with b stopped").into_inner();
    assert_eq!(slow.qos_status(), QosStatus::Requested, "{slow:?}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    println!("create handed over after {waited:?}: b stopped (install_wait_ms = 1000)");
    sink.wait_for("/s", 4, Duration::from_secs(15))
        .await
        .expect("b installs it");
    assert_eq!(
        said(&slow.session_id),
        [("AVAILABLE".into(), String::new())]
    );
    assert_eq!(probe(8000), [32; 5]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.received("/s").len(), 4, "nothing told twice");
}
in_every_mode!(
    requested_then_installed,
    a_create_for_an_owner_that_does_not_answer_is_requested_then_installed
);

/// kill -9 of an active node with a standby for its pools: the standby becomes the active node,
/// installs the session for what is left of it and marks the device's traffic; calls reach it
/// through any node. The killed node, back, joins as the standby and installs nothing. The
/// enforcement gap (from the kill to the standby's first marked probe) is printed.
async fn a_standby_takes_over_when_its_active_is_killed(mode: Mode) {
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let pools = ["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"];
    let (_a_lab, a) = node(
        &etcd,
        Mode::Marking,
        "a",
        11,
        &["10.0.200.0/24"],
        "lease_ttl_secs = 3",
    )
    .await
    .expect("node a");
    let (b_lab, mut b) = node(&etcd, mode, "b", 12, &pools, "lease_ttl_secs = 3")
        .await
        .expect("node b");
    let (d_lab, d) = standby_d(&etcd, mode, &pools).await;
    await_status(&a, Duration::from_secs(5), |c| {
        node_ids(c) == ["a", "b", "d"]
    })
    .await;
    let mut via_a = a.sessions().await.expect("client a");
    let s = qod_testkit::marked_flow(&mut via_a).await;
    let probe = |lab: &Lab| {
        lab.uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture")
    };
    assert_eq!(probe(&b_lab), [32; 5], "b installed it");
    assert_eq!(probe(&d_lab), [0; 5], "the standby holds nothing yet");
    // What etcd holds of it is sealed: not even the device address is there in clear.
    let copy = etcd
        .etcdctl(&["get", "--prefix", "/qod/sessions/b/"])
        .expect("etcdctl get");
    assert!(
        copy.contains(&s.session_id),
        "the copy is keyed by session: {copy}"
    );
    assert!(!copy.contains(DEVICE_V4), "{copy}");

    let killed = Instant::now();
    b.kill9();
    loop {
        if probe(&d_lab) == [32; 5] {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the standby did not take over:\n{}",
            d.log()
        );
    }
    eprintln!(
        "enforcement gap at the standby ({mode:?}): {:?} (lease 3 s)",
        killed.elapsed()
    );
    let c = await_status(&a, Duration::from_secs(10), |c| {
        node_ids(c) == ["a", "d"] && c["nodes"][1]["role"] == "active"
    })
    .await;
    assert_eq!(c["nodes"][1]["pools"].as_array().map(Vec::len), Some(3));
    // It is the same session, reached through a at its new node.
    let got = qod_testkit::session_info(&mut via_a, &s.session_id).await;
    assert_eq!(got.qos_status(), qod_proto::v1::QosStatus::Available);
    assert!(
        d.log()
            .contains("took over the pools and sessions of the lost active node")
    );

    // b back: d holds its pools, so b joins as d's standby and restores nothing; its pinned
    // data plane's rule for the session goes.
    b.restart_no_wait().expect("restart b");
    b.wait_serving().await.expect("b serving");
    let c = await_status(&a, Duration::from_secs(10), |c| {
        node_ids(c) == ["a", "b", "d"]
    })
    .await;
    assert_eq!(c["nodes"][1]["role"], "standby", "{c:#}");
    assert_eq!(probe(&b_lab), [0; 5], "b does not enforce what d holds now");
    assert_eq!(probe(&d_lab), [32; 5]);

    // Deleted through a: d ends it.
    via_a
        .delete_session(qod_proto::v1::DeleteSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .expect("delete through a");
    assert_eq!(probe(&d_lab), [0; 5]);
}
in_every_mode!(
    standby_takes_over,
    a_standby_takes_over_when_its_active_is_killed
);

/// A standby started only after its active was killed and its lease had lapsed, with no other
/// active node in the cluster to end the lost node's sessions: it finds them in etcd (the lost
/// node's copy, with exactly its pools) and takes them over; the session is enforced and read
/// at the standby, the same session.
async fn a_standby_started_after_its_active_was_lost_takes_its_sessions_over(mode: Mode) {
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let pools = ["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"];
    let (b_lab, mut b) = node(&etcd, mode, "b", 12, &pools, "lease_ttl_secs = 3")
        .await
        .expect("node b");
    let mut via_b = b.sessions().await.expect("client b");
    let s = qod_testkit::marked_flow(&mut via_b).await;
    let probe = |lab: &Lab| {
        lab.uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture")
    };
    assert_eq!(probe(&b_lab), [32; 5], "b installed it");
    b.kill9();
    // b's registration goes with its lease (3 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/qod/nodes/"])
        .expect("etcdctl get")
        .contains("/qod/nodes/b")
    {
        assert!(Instant::now() < deadline, "b's registration did not lapse");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (d_lab, d) = standby_d(&etcd, mode, &pools).await;
    let started = Instant::now();
    while probe(&d_lab) != [32; 5] {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the late standby did not take over:\n{}",
            d.log()
        );
    }
    let c = await_status(&d, Duration::from_secs(10), |c| {
        node_ids(c) == ["d"] && c["nodes"][0]["role"] == "active"
    })
    .await;
    assert_eq!(c["nodes"][0]["pools"].as_array().map(Vec::len), Some(3));
    let mut via_d = d.sessions().await.expect("client d");
    let got = qod_testkit::session_info(&mut via_d, &s.session_id).await;
    assert_eq!(got.qos_status(), qod_proto::v1::QosStatus::Available);
    assert!(
        d.log()
            .contains("found the lost active node of this standby's pools"),
        "{}",
        d.log()
    );
    // The lost node's copy is now d's: nothing is left under b.
    let left = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/qod/sessions/b/"])
        .expect("etcdctl get");
    assert!(left.trim().is_empty(), "{left}");
}
in_every_mode!(
    late_standby_takes_over,
    a_standby_started_after_its_active_was_lost_takes_its_sessions_over
);

/// kill -9 of an active node without a standby: one surviving node (of two that could) ends
/// its session, and the sink hears UNAVAILABLE / NETWORK_TERMINATED exactly once; the node,
/// back, restores nothing and enforces nothing.
async fn without_a_standby_a_lost_nodes_sessions_end_once(mode: Mode) {
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (sink, notify) = sink_on_etcds_bridge(&etcd);
    let start = |id: &'static str, host: u8, pools: &'static [&'static str], mode: Mode| {
        let (etcd, notify) = (&etcd, notify.clone());
        async move {
            etcd.node(
                &qod_testkit::qodd_bin(),
                mode,
                id,
                host,
                pools,
                &notify,
                "lease_ttl_secs = 3",
            )
            .await
            .expect("node")
        }
    };
    let (_a_lab, a) = start("a", 11, &["10.0.200.0/24"], Mode::Marking).await;
    let (b_lab, mut b) = start(
        "b",
        12,
        &["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"],
        mode,
    )
    .await;
    let (_c_lab, c) = start("c", 13, &["10.0.201.0/24"], Mode::Marking).await;
    await_status(&a, Duration::from_secs(5), |c| {
        node_ids(c) == ["a", "b", "c"]
    })
    .await;
    let mut via_a = a.sessions().await.expect("client a");
    let mut req = qos_e(DEVICE_V4, 5000);
    req.sink = Some(sink.url("/ends"));
    let s = via_a
        .create_session(req)
        .await
        .expect("create")
        .into_inner();
    let probe = |lab: &Lab| {
        lab.uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture")
    };
    assert_eq!(probe(&b_lab), [32; 5]);
    sink.wait_for("/ends", 1, Duration::from_secs(10))
        .await
        .expect("AVAILABLE told");

    b.kill9();
    // A create for b's device while b is dead but still registered: handed over, REQUESTED;
    // b never comes back in time, so it ends with b's sessions.
    let mut req = qos_e(DEVICE_V4, 6000);
    req.sink = Some(sink.url("/ends"));
    let handed = via_a
        .create_session(req)
        .await
        .expect("create for a dead node's device")
        .into_inner();
    assert_eq!(
        handed.qos_status(),
        qod_proto::v1::QosStatus::Requested,
        "{handed:?}"
    );
    let told = sink
        .wait_for("/ends", 3, Duration::from_secs(30))
        .await
        .expect("the ends told by a surviving node");
    for id in [&s.session_id, &handed.session_id] {
        let end = told
            .iter()
            .skip(1)
            .find(|r| r.body["data"]["sessionId"] == id.as_str())
            .map(|r| &r.body["data"]);
        let end = end.unwrap_or_else(|| panic!("{id} told: {told:?}"));
        assert_eq!(end["qosStatus"], "UNAVAILABLE");
        assert_eq!(end["statusInfo"], "NETWORK_TERMINATED");
    }
    // Exactly once, though two nodes could have told it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        sink.received("/ends").len(),
        3,
        "{:?}",
        sink.received("/ends")
    );
    let ended_by = |q: &Qodd| {
        q.log()
            .contains("ended the sessions of a lost node without a standby")
    };
    assert!(
        ended_by(&a) != ended_by(&c),
        "one claimant: a {} c {}",
        ended_by(&a),
        ended_by(&c)
    );

    // b back: the cluster ended what it held, so it restores nothing and its pinned rule goes.
    b.restart_no_wait().expect("restart b");
    b.wait_serving().await.expect("b serving");
    assert!(
        b.log()
            .contains("the cluster ended this node's sessions while it was away")
    );
    assert_eq!(probe(&b_lab), [0; 5]);
    let gone = via_a
        .get_session(qod_proto::v1::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .expect_err("ended and not restored");
    assert_eq!(qod_testkit::api::reason(&gone), "NOT_FOUND");
    let gone = via_a
        .get_session(qod_proto::v1::GetSessionRequest {
            session_id: handed.session_id.clone(),
        })
        .await
        .expect_err("ended, never installed");
    assert_eq!(qod_testkit::api::reason(&gone), "NOT_FOUND");
    assert_eq!(sink.received("/ends").len(), 3, "b told nothing more");
}
in_every_mode!(
    lost_node_without_standby,
    without_a_standby_a_lost_nodes_sessions_end_once
);

/// A partition longer than the lease, without a standby: the node cut off from etcd keeps
/// enforcing; the cluster ends its session (the sink told once, by another node); when the
/// link is back the node re-joins, finds its session ended, and gives it up silently — its
/// traffic unmarked, nothing more told.
async fn a_node_back_from_a_partition_gives_up_what_the_cluster_ended(mode: Mode) {
    back_from_a_partition(mode, false).await;
}
in_every_mode!(
    back_from_a_partition_running,
    a_node_back_from_a_partition_gives_up_what_the_cluster_ended
);

/// The same, with the node killed while cut off and started again (still cut off; it waits
/// for etcd before it restores anything): it gives up what the cluster ended, and the end it
/// recorded itself meanwhile, left in its outbox, is dropped rather than told a second time.
async fn a_node_restarted_while_cut_off_gives_up_what_the_cluster_ended(mode: Mode) {
    back_from_a_partition(mode, true).await;
}
in_every_mode!(
    back_from_a_partition_restarted,
    a_node_restarted_while_cut_off_gives_up_what_the_cluster_ended
);

async fn back_from_a_partition(mode: Mode, restarted: bool) {
    use qod_testkit::addr::{DEVICE_V4, SERVER_V4};
    let etcd = EtcdCluster::start(3).expect("etcd");
    let (sink, notify) = sink_on_etcds_bridge(&etcd);
    let section = "lease_ttl_secs = 3";
    let (_a_lab, a) = etcd
        .node(
            &qodd_bin(),
            Mode::Marking,
            "a",
            11,
            &["10.0.200.0/24"],
            &notify,
            // The survivor's lease is not what this test is about: long enough that a loaded
            // machine does not make it lapse too (then nobody would end b's sessions).
            "lease_ttl_secs = 10",
        )
        .await
        .expect("node a");
    let pools = ["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"];
    let (b_lab, mut b) = etcd
        .node(&qodd_bin(), mode, "b", 12, &pools, &notify, section)
        .await
        .expect("node b");
    await_status(&a, Duration::from_secs(5), |c| node_ids(c) == ["a", "b"]).await;
    let mut via_a = a.sessions().await.expect("client a");
    let mut req = qos_e(DEVICE_V4, 5000);
    req.sink = Some(sink.url("/ends"));
    via_a.create_session(req).await.expect("create");
    sink.wait_for("/ends", 1, Duration::from_secs(10))
        .await
        .expect("AVAILABLE told");
    // A second session whose duration ends while b is cut off: b's own expiry and the cluster
    // could both tell its end; the sink must hear it once.
    let mut short = qod_testkit::api::session(DEVICE_V4, SERVER_V4, "QOS_E", &[], &[6000], 5);
    short.sink = Some(sink.url("/ends"));
    via_a.create_session(short).await.expect("create short");
    let short_ends = Instant::now() + Duration::from_secs(5);
    sink.wait_for("/ends", 2, Duration::from_secs(10))
        .await
        .expect("AVAILABLE told");
    let probe = |lab: &Lab| {
        lab.uplink_dscp(DEVICE_V4, 40000, SERVER_V4, 5000)
            .expect("capture")
    };

    // Cut b off from etcd (and from the other nodes).
    b_lab
        .edge
        .ip(&["link", "set", "etcd0", "down"])
        .expect("cut");
    let told = match sink.wait_for("/ends", 4, Duration::from_secs(30)).await {
        Ok(told) => told,
        Err(e) => panic!(
            "the cluster did not end b's sessions: {e}\n--- a:\n{}\n--- b:\n{}",
            a.log(),
            b.log()
        ),
    };
    assert_eq!(told[2].body["data"]["statusInfo"], "NETWORK_TERMINATED");
    assert_eq!(probe(&b_lab), [32; 5], "b keeps enforcing while cut off");
    // The short session ends at b (by its duration) before b is back.
    tokio::time::sleep(
        (short_ends + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    )
    .await;
    if restarted {
        b.kill9();
        b.restart_no_wait().expect("restart b");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    b_lab
        .edge
        .ip(&["link", "set", "etcd0", "up"])
        .expect("heal");
    if restarted {
        b.wait_serving().await.expect("b serving again");
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while probe(&b_lab) != [0; 5] {
        assert!(
            Instant::now() < deadline,
            "b did not give the session up:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let given_up = if restarted {
        "sessions left to the cluster"
    } else {
        "given up here, silently"
    };
    assert!(b.log().contains(given_up), "{}", b.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Each session: told AVAILABLE once and UNAVAILABLE once (b's own end of the short one,
    // held while it was cut off, was dropped once it found the cluster had told it).
    let got = sink.received("/ends");
    assert_eq!(
        got.len(),
        4,
        "{:#?}",
        got.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    let mut per_session = std::collections::BTreeMap::<String, Vec<String>>::new();
    for r in &got {
        per_session
            .entry(
                r.body["data"]["sessionId"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
            .or_default()
            .push(
                r.body["data"]["qosStatus"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            );
    }
    assert_eq!(per_session.len(), 2, "{per_session:?}");
    for told in per_session.values() {
        assert_eq!(told, &["AVAILABLE", "UNAVAILABLE"], "{per_session:?}");
    }
    let dropped = if restarted {
        "notifications of sessions given up to the cluster dropped"
    } else {
        "dropped=true"
    };
    assert!(
        b.log().contains("dropped (told elsewhere)") && b.log().contains(dropped),
        "{}",
        b.log()
    );
}
