//! qodd as an operator installs it: the systemd unit (`systemd-analyze verify`), the readiness
//! protocol over a `NOTIFY_SOCKET` of the test's own (this machine kind runs no systemd as PID 1),
//! `--check-config`, and qodd running with only the unit's capabilities. Needs root.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use qod_daemon::devkit::DevPki;
use qod_testkit::{
    EDGE_DEV_IF, EDGE_SRV_IF, Lab, Launch, Qodd, addr,
    api::{CONGESTION_PROFILES, require_root, scheduled_interfaces},
    metric_value as value, qodctl, qodctl_as, qodd_bin, workspace_root,
};

fn unit_path() -> PathBuf {
    workspace_root().join("qod-daemon/packaging/qodd.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).expect("the unit file")
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists: point it at the one this build made.
    let dir = tempfile::tempdir().expect("dir");
    let unit = dir.path().join("qodd.service");
    let text = unit_text().replace("/usr/bin/qodd", &qodd_bin().display().to_string());
    std::fs::write(&unit, &text).expect("unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings to verify: none may name this unit.
    let about_us: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("qodd.service"))
        .collect();
    assert!(
        about_us.is_empty(),
        "warnings about the unit:\n{}",
        about_us.join("\n")
    );
    for wanted in [
        "Type=notify",
        "StateDirectory=qodd",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "ReadWritePaths=/sys/fs/bpf /var/lib/qodd",
    ] {
        assert!(text.contains(wanted), "the unit lacks {wanted}");
    }
}

/// The unit's `CapabilityBoundingSet`, e.g. `["CAP_BPF", "CAP_NET_ADMIN"]`.
fn unit_capabilities() -> Vec<String> {
    unit_text()
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn capability_number(name: &str) -> u32 {
    match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add {other} to the test's table"),
    }
}

/// The `CapEff` mask of process `pid`.
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

#[tokio::test(flavor = "multi_thread")]
async fn qodd_enforces_with_only_the_units_capabilities() {
    require_root();
    let caps = unit_capabilities();
    let setpriv_caps = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let lab = Lab::new().expect("lab");
    let interfaces = scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let launch = Launch {
        wrapper: vec![
            "setpriv".into(),
            "--no-new-privs".into(),
            "--bounding-set".into(),
            setpriv_caps,
            "--inh-caps".into(),
            "-all".into(),
        ],
        ..Launch::default()
    };
    let qodd = Qodd::start_with(
        &qodd_bin(),
        &lab.edge,
        &interfaces,
        CONGESTION_PROFILES,
        DevPki::config_toml,
        launch,
    )
    .await
    .expect("qodd starts with the unit's capabilities");
    let want = caps.iter().fold(0u64, |m, c| m | 1 << capability_number(c));
    assert_eq!(
        effective_capabilities(qodd.pid().expect("pid")),
        want,
        "qodd runs with exactly {caps:?}"
    );
    let mut api = qodd.sessions().await.expect("client");
    qod_testkit::marked_flow(&mut api).await;
    assert_eq!(
        lab.uplink_dscp(addr::DEVICE_V4, 46500, addr::SERVER_V4, 5000)
            .expect("traffic"),
        [32; 5],
        "marked on the wire:\n{}",
        qodd.log()
    );
    // tc ran too: the low-latency session has a class of its own on both sides.
    for interface in [EDGE_DEV_IF, EDGE_SRV_IF] {
        let classes = lab
            .edge
            .exec("tc", &["class", "show", "dev", interface])
            .expect("tc");
        assert!(classes.contains("1:100"), "{interface}: {classes}");
    }
}

/// Reads one datagram from the notify socket.
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_stopping_reach_the_service_manager() {
    require_root();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let lab = Lab::new().expect("lab");
    let mut qodd = Qodd::start_with(
        &qodd_bin(),
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        "",
        DevPki::config_toml,
        Launch {
            wrapper: Vec::new(),
            env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
            ..Launch::default()
        },
    )
    .await
    .expect("qodd");
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means serving: a real call answers at once.
    let mut api = qodd.sessions().await.expect("client");
    qod_testkit::marked_flow(&mut api).await;
    assert!(qodd.stop().expect("stopped").success());
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}

fn check_config(dir: &Path, toml: &str, extra: &[&str]) -> std::process::Output {
    let config = dir.join("qodd.toml");
    std::fs::write(&config, toml).expect("config");
    Command::new(qodd_bin())
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .args(extra)
        .output()
        .expect("run qodd --check-config")
}

#[test]
fn check_config_validates_prints_the_effective_config_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let socket = dir.path().join("qodd.sock");
    let good = format!(
        "listen = \"unix:{}\"\nstate_dir = \"{}\"\nmax_sessions = 1000\n",
        socket.display(),
        state.display()
    );
    let out = check_config(
        dir.path(),
        &good,
        &["--insecure", "--interface", "lo:server:100"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = stdout.parse().expect("the effective config is TOML");
    assert_eq!(
        effective["max_sessions"].as_integer(),
        Some(1000),
        "the file's value"
    );
    assert_eq!(
        effective["interfaces"][0]["capacity_mbit"].as_float(),
        Some(100.0),
        "the flag's value"
    );
    assert_eq!(
        effective["unavailable_retention_secs"].as_integer(),
        Some(360),
        "a default"
    );
    assert!(!state.exists(), "no state directory made");
    assert!(!socket.exists(), "nothing bound");

    for (bad, why) in [
        ("max_sessions = \"lots\"\n", "max_sessions"),
        ("no_such_key = 1\n", "no_such_key"),
        ("on_exit = \"explode\"\n", "on_exit"),
    ] {
        let out = check_config(
            dir.path(),
            &format!("{good}{bad}"),
            &["--insecure", "--interface", "lo"],
        );
        assert_eq!(out.status.code(), Some(64), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{bad}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "nothing printed as effective for {bad}"
        );
    }
}

#[test]
fn the_package_holds_qodd_qodctl_the_unit_and_the_conffile() {
    let deb = std::env::var_os("QOD_DEB").map(PathBuf::from).expect(
        "QOD_DEB names the package to check: `cargo xtask test` builds it (`cargo xtask package`)",
    );
    let run = |args: &[&str]| {
        let out = Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .output()
            .expect("dpkg-deb");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let contents = run(&["--contents"]);
    for path in [
        "./usr/bin/qodd",
        "./usr/bin/qodctl",
        "./lib/systemd/system/qodd.service",
        "./etc/qodd/qodd.toml",
    ] {
        assert!(
            contents.lines().any(|l| l.trim_end().ends_with(path)),
            "{path} missing from the package:\n{contents}"
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    let control = dir.path().join("control");
    let out = Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control)
        .output()
        .expect("dpkg-deb --control");
    assert!(out.status.success());
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/qodd/qodd.toml");
    let fields = run(&["--field"]);
    assert!(fields.contains("Package: qodd"), "{fields}");
    assert!(
        fields.contains("iproute2"),
        "depends on iproute2 (tc): {fields}"
    );
    // The packaged unit and config are the ones in the tree.
    let extract = dir.path().join("root");
    let out = Command::new("dpkg-deb")
        .arg("--extract")
        .arg(&deb)
        .arg(&extract)
        .output()
        .expect("dpkg-deb --extract");
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(extract.join("lib/systemd/system/qodd.service")).expect("unit"),
        unit_text()
    );
    assert_eq!(
        std::fs::read_to_string(extract.join("etc/qodd/qodd.toml")).expect("config"),
        qod_daemon::config::DEFAULT_CONFIG
    );
    let version = Command::new(extract.join("usr/bin/qodd"))
        .arg("--version")
        .output()
        .expect("packaged qodd runs");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("qodd "));
}

/// qodd's log as JSON objects, one a line; fails on a line that is not one.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The audit lines of `action` for `session`.
fn audit<'a>(
    lines: &'a [serde_json::Value],
    action: &str,
    session: &str,
) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| {
            l["target"] == "qod::audit"
                && l["fields"]["action"] == action
                && l["fields"]["session"] == session
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_call_and_one_audit_line_per_change() {
    let (lab, mut qodd) = qod_testkit::lab_with_qodd("log_format = \"json\"").await;
    let _ = &lab;
    let mut api = qodd.sessions().await.expect("client");
    let mut request = tonic::Request::new(qod_testkit::api::session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_E",
        &[],
        &[5000],
        600,
    ));
    request
        .metadata_mut()
        .insert("x-correlator", "audit-test-1".parse().expect("header"));
    let kept = api
        .create_session(request)
        .await
        .expect("create")
        .into_inner();
    let deleted = api
        .create_session(qod_testkit::api::session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_L",
            &[],
            &[],
            600,
        ))
        .await
        .expect("create")
        .into_inner();
    api.delete_session(qod_proto::v1::DeleteSessionRequest {
        session_id: deleted.session_id.clone(),
    })
    .await
    .expect("delete");
    let refused = api
        .create_session(qod_testkit::api::session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "NO_SUCH_PROFILE",
            &[],
            &[],
            600,
        ))
        .await
        .expect_err("unknown profile");
    qodd.kill9();
    qodd.restart().await.expect("restart");

    let log = qodd.log();
    assert!(!log.contains(&qodd.token), "a token was logged");
    let lines = json_lines(&log);
    let created = audit(&lines, "create", &kept.session_id);
    assert_eq!(created.len(), 1, "one create line:\n{log}");
    let line = created[0];
    assert_eq!(line["fields"]["client"], qod_testkit::TEST_CLIENT);
    assert_eq!(line["fields"]["device"], addr::DEVICE_V4);
    assert_eq!(line["fields"]["result"], "ok");
    assert_eq!(line["span"]["name"], "rpc", "{line}");
    assert_eq!(
        line["span"]["method"],
        "/qod.v1.QualityOnDemand/CreateSession"
    );
    assert_eq!(line["span"]["correlator"], "audit-test-1");
    assert_eq!(line["span"]["client"], qod_testkit::TEST_CLIENT);
    // (A create's span learns its session id once the core has made it; the line has it.)

    let gone = audit(&lines, "delete", &deleted.session_id);
    assert_eq!(gone.len(), 1, "{log}");
    assert_eq!(gone[0]["fields"]["device"], addr::OTHER_DEVICE_V4);
    assert_eq!(
        gone[0]["span"]["method"],
        "/qod.v1.QualityOnDemand/DeleteSession"
    );
    assert_eq!(gone[0]["span"]["session"], deleted.session_id.as_str());

    let refusal: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["target"] == "qod::audit"
                && l["fields"]["action"] == "create"
                && l["fields"]["result"] != "ok"
        })
        .collect();
    assert_eq!(refusal.len(), 1, "{log}");
    assert_eq!(
        refusal[0]["fields"]["result"],
        qod_testkit::api::reason(&refused).as_str()
    );

    // After the restart: restored (one line for the start, counting the one live session),
    // not created again; the deleted one stays gone.
    let restores: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "qod::audit" && l["fields"]["action"] == "restore")
        .collect();
    assert_eq!(restores.len(), 1, "{log}");
    assert_eq!(restores[0]["fields"]["sessions"], 1, "{log}");
    assert_eq!(restores[0]["fields"]["result"], "ok");
    assert_eq!(audit(&lines, "create", &kept.session_id).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_readiness_follow_sessions_calls_and_links() {
    const PORT: u16 = 9464;
    let (lab, qodd) =
        qod_testkit::scheduled_lab_with_qodd(&format!("metrics_listen = \"127.0.0.1:{PORT}\""))
            .await;
    let scrape = || {
        let (status, kind, body) = qod_testkit::http_get(&lab.edge, PORT, "/metrics");
        assert_eq!(status, 200);
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        qod_testkit::metric_samples(&body)
    };
    let before = scrape();
    assert_eq!(value(&before, "qod_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(value(&before, "qod_session_slots_used"), 0.0);
    assert_eq!(value(&before, "qod_link_up{interface=\"edge-dev\"}"), 1.0);
    let reserved =
        "qod_admission_reserved_bits_per_second{interface=\"edge-dev\",pool=\"guaranteed\"}";
    assert_eq!(value(&before, reserved), 0.0);
    assert_eq!(
        value(
            &before,
            "qod_admission_capacity_bits_per_second{interface=\"edge-dev\",pool=\"guaranteed\"}"
        ),
        80e6
    );
    assert_eq!(qod_testkit::http_get(&lab.edge, PORT, "/readyz").0, 200);

    let mut api = qodd.sessions().await.expect("client");
    let rated = qod_testkit::rated_session(&mut api, addr::OTHER_DEVICE_V4, 600).await;
    api.create_session(qod_testkit::api::session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_E",
        &[],
        &[],
        1,
    ))
    .await
    .expect("create a 1 s session");
    // Traffic the classifier counts per interface and band: 50 paced datagrams to the QOS_G
    // device (guaranteed, its own class) and a burst to a QOS_C flow (best effort, a capped
    // class of its own: shaped by HTB, so the classifier passes all of it).
    api.create_session(qod_testkit::api::session(
        addr::DEVICE_V4,
        addr::OTHER_SERVER_V4,
        "QOS_C",
        &[],
        &[],
        600,
    ))
    .await
    .expect("create a capped session");
    qod_testkit::udp_send(
        &lab.server,
        qod_testkit::api::sa(addr::SERVER_V4, 7000),
        qod_testkit::api::sa(addr::OTHER_DEVICE_V4, 7000),
        50,
        1000,
    )
    .expect("paced datagrams");
    const BURST: u64 = 200;
    udp_burst(&lab, addr::OTHER_SERVER_V4, addr::DEVICE_V4, BURST);
    let refused = qodd
        .profiles_as("not-a-jwt")
        .await
        .expect("client")
        .retrieve_qos_profiles(qod_proto::v1::RetrieveQosProfilesRequest::default())
        .await
        .expect_err("no valid token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let during = scrape();
    assert_eq!(
        value(
            &during,
            "qod_sessions{status=\"AVAILABLE\",profile=\"QOS_G\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&during, reserved),
        20e6,
        "QOS_G reserves its 20 Mbit/s"
    );
    let created = "qod_api_requests_total{method=\"qod.v1.QualityOnDemand/CreateSession\",code=\"Ok\",reason=\"\"}";
    assert_eq!(value(&during, created), 3.0);
    assert_eq!(
        value(
            &during,
            "qod_api_request_duration_seconds_count{method=\"qod.v1.QualityOnDemand/CreateSession\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &during,
            "qod_scheduler_session_classes{interface=\"edge-dev\"}"
        ),
        3.0,
        "QOS_E, QOS_G and QOS_C each hold a class on the device side"
    );
    let band = |name: &str, band: &str| {
        value(
            &during,
            &format!("{name}{{interface=\"edge-dev\",band=\"{band}\"}}"),
        )
    };
    assert_eq!(band("qod_classifier_packets_total", "guaranteed"), 50.0);
    // 1,000 B of payload + UDP, IPv4 and Ethernet headers.
    assert_eq!(
        band("qod_classifier_bytes_total", "guaranteed"),
        50.0 * 1042.0
    );
    assert_eq!(
        band("qod_classifier_packets_total", "best_effort"),
        BURST as f64
    );
    assert_eq!(
        value(
            &during,
            "qod_classifier_dropped_packets_total{interface=\"edge-dev\",band=\"best_effort\",reason=\"policer\"}"
        ),
        0.0,
        "a shaped class is not policed"
    );
    assert_eq!(band("qod_classifier_packets_total", "low_latency"), 0.0);
    assert_eq!(
        value(&during, "qod_token_refusals_total{reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        value(
            &during,
            "qod_api_requests_total{method=\"qod.v1.QosProfiles/RetrieveQosProfiles\",code=\"Unauthenticated\",reason=\"UNAUTHENTICATED\"}"
        ),
        1.0
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    api.delete_session(qod_proto::v1::DeleteSessionRequest {
        session_id: rated.session_id,
    })
    .await
    .expect("delete");
    let after = scrape();
    assert_eq!(value(&after, reserved), 0.0, "given back");
    assert_eq!(
        value(&after, "qod_session_slots_used"),
        1.0,
        "the policed session stays"
    );
    assert_eq!(
        value(
            &after,
            "qod_scheduler_session_classes{interface=\"edge-dev\"}"
        ),
        1.0,
        "QOS_C's class is left"
    );
    assert_eq!(
        value(
            &after,
            "qod_sessions{status=\"UNAVAILABLE\",profile=\"QOS_E\"}"
        ),
        1.0,
        "the 1 s session ended and stays readable"
    );
    assert_eq!(value(&after, "qod_expiry_lateness_seconds_count"), 1.0);
    assert!(
        value(&after, "qod_store_commit_duration_seconds_count") >= 3.0,
        "two creates and a delete were committed"
    );
    assert!(value(&after, "qod_store_writes_per_commit_count") >= 3.0);
    assert!(!after.contains_key("qod_sessions{status=\"AVAILABLE\",profile=\"QOS_G\"}"));

    // Every metric the shipped Grafana dashboard queries is served.
    let dashboard = std::fs::read_to_string(
        workspace_root().join("qod-daemon/packaging/grafana-dashboard.json"),
    )
    .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let served: std::collections::BTreeSet<String> = after
        .keys()
        .map(|k| k.split('{').next().unwrap_or(k).to_owned())
        .collect();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("qod_") {
                    assert!(
                        served.contains(word),
                        "the dashboard queries {word}, not served"
                    );
                }
            }
        }
    }

    lab.edge
        .ip(&["link", "set", EDGE_DEV_IF, "down"])
        .expect("link down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(value(&scrape(), "qod_link_up{interface=\"edge-dev\"}"), 0.0);
    let (status, _, why) = qod_testkit::http_get(&lab.edge, PORT, "/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("edge-dev"), "{why}");
}

/// Sends `n` datagrams of 1,400 B from `from` (in the server namespace) to `to` as fast as the
/// socket takes them.
fn udp_burst(lab: &Lab, from: &'static str, to: &'static str, n: u64) {
    lab.server
        .run(move || {
            let sock = std::net::UdpSocket::bind(qod_testkit::api::sa(from, 7001))?;
            for _ in 0..n {
                sock.send_to(&[0u8; 1400], qod_testkit::api::sa(to, 7001))?;
            }
            anyhow::Ok(())
        })
        .expect("a burst");
}

/// Where a maximum rate is policed in the classifier (no scheduler), a burst beyond the policer's
/// bucket is cut, and the drops are counted per interface, band and reason; the other
/// direction's interface counts nothing.
#[tokio::test(flavor = "multi_thread")]
async fn classifier_counts_treated_and_policed_packets_per_interface_and_band() {
    const PORT: u16 = 9465;
    require_root();
    let lab = Lab::new().expect("lab");
    let qodd = Qodd::start(
        &lab.edge,
        &[EDGE_DEV_IF, EDGE_SRV_IF],
        &format!("metrics_listen = \"127.0.0.1:{PORT}\"\n{CONGESTION_PROFILES}"),
    )
    .await
    .expect("qodd");
    let mut api = qodd.sessions().await.expect("client");
    api.create_session(qod_testkit::api::session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_C",
        &[],
        &[],
        600,
    ))
    .await
    .expect("create a policed session");
    // 10 Mbit/s with a 128 KiB bucket: 400 × 1,442 B back to back overflow it.
    const BURST: u64 = 400;
    udp_burst(&lab, addr::SERVER_V4, addr::DEVICE_V4, BURST);
    let (status, _, body) = qod_testkit::http_get(&lab.edge, PORT, "/metrics");
    assert_eq!(status, 200);
    let m = qod_testkit::metric_samples(&body);
    let at = |name: &str, interface: &str, extra: &str| {
        value(
            &m,
            &format!("{name}{{interface=\"{interface}\",band=\"best_effort\"{extra}}}"),
        )
    };
    let policer = ",reason=\"policer\"";
    let passed = at("qod_classifier_packets_total", EDGE_DEV_IF, "");
    let dropped = at("qod_classifier_dropped_packets_total", EDGE_DEV_IF, policer);
    assert!(
        passed >= 80.0 && dropped > 0.0 && passed + dropped == BURST as f64,
        "the burst: {passed} passed, {dropped} dropped by the policer, of {BURST}"
    );
    assert_eq!(
        at("qod_classifier_bytes_total", EDGE_DEV_IF, ""),
        passed * 1442.0
    );
    assert_eq!(
        at("qod_classifier_dropped_bytes_total", EDGE_DEV_IF, policer),
        dropped * 1442.0
    );
    assert_eq!(
        at("qod_classifier_dropped_packets_total", EDGE_SRV_IF, policer),
        0.0,
        "nothing is policed uplink (QOS_C has no upstream maximum)"
    );
}

/// A token of client `ops` with the scope qod:admin and `more`.
fn operator_token(qodd: &Qodd, more: &[&str]) -> String {
    let mut scopes = vec![qod_daemon::auth::scope::ADMIN.to_owned()];
    scopes.extend(more.iter().map(|s| (*s).to_owned()));
    qodd.pki
        .mint(&qod_daemon::devkit::TokenSpec {
            scopes,
            ..qod_daemon::devkit::TokenSpec::full("ops")
        })
        .expect("operator token")
}

#[tokio::test(flavor = "multi_thread")]
async fn qodctl_says_what_is_wrong_in_words_or_json_and_prints_one_object() {
    let (_lab, qodd) = qod_testkit::lab_with_qodd("").await;
    // Plain text against qodd's TLS.
    let (ok, _, stderr) = qodctl(&qodd, false, &["profiles"]);
    assert!(!ok);
    assert!(
        stderr.starts_with("qodctl: cannot talk to qodd at") && stderr.contains("pass --ca"),
        "{stderr}"
    );
    let (ok, stdout, _) = qodctl(&qodd, false, &["--json", "profiles"]);
    assert!(!ok);
    let error: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON error");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pass --ca")),
        "{error}"
    );

    let (ok, stdout, stderr) = qodctl(
        &qodd,
        true,
        &[
            "--json",
            "create",
            "--device-ipv4",
            addr::DEVICE_V4,
            "--server-ipv4",
            addr::SERVER_V4,
            "--profile",
            "QOS_E",
            "--duration",
            "60",
        ],
    );
    assert!(ok, "{stderr}");
    let created: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(created.is_object(), "one object, not a list: {created}");
    assert_eq!(created["qosStatus"], "AVAILABLE", "{created}");

    let (ok, stdout, _) = qodctl(
        &qodd,
        true,
        &["--json", "get", "00000000-0000-4000-8000-000000000000"],
    );
    assert!(!ok);
    let error: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON error");
    assert_eq!(error["error"]["code"], "NotFound", "{error}");
    assert_eq!(error["error"]["reason"], "NOT_FOUND", "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_show_the_node_and_verify_catches_planted_drift() {
    let (lab, qodd) = qod_testkit::scheduled_lab_with_qodd("").await;
    let admin = operator_token(&qodd, &[]);
    let ops = |args: &[&str]| -> (bool, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = qodctl_as(&qodd, &admin, true, &all);
        let v = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("qodctl {args:?}: not JSON ({e}): {stdout} {stderr}"));
        (ok, v)
    };
    let mut api = qodd.sessions().await.expect("client");
    let rated = qod_testkit::rated_session(&mut api, addr::OTHER_DEVICE_V4, 600).await;
    let marked = qod_testkit::marked_flow(&mut api).await;

    // Not for API clients: their tokens lack qod:admin.
    let (ok, refused) = {
        let (ok, stdout, _) = qodctl(&qodd, true, &["--json", "status"]);
        (
            ok,
            serde_json::from_str::<serde_json::Value>(&stdout).expect("JSON"),
        )
    };
    assert!(!ok);
    assert_eq!(refused["error"]["reason"], "PERMISSION_DENIED", "{refused}");

    let (ok, status) = ops(&["status"]);
    assert!(ok, "{status}");
    assert_eq!(status["slotsUsed"], 2, "{status}");
    assert_eq!(status["sessionsByStatus"]["AVAILABLE"], 2, "{status}");
    assert_eq!(status["interfaces"].as_array().map(Vec::len), Some(2));
    assert!(
        status["interfaces"][0]["linkUp"].as_bool().unwrap_or(false),
        "{status}"
    );
    let pool = status["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["interface"] == EDGE_DEV_IF && p["pool"] == "guaranteed")
        .expect("the device side's guaranteed pool")
        .clone();
    assert_eq!(pool["reservedBps"], 20_000_000, "{pool}");

    let (ok, listed) = ops(&["sessions", "--profile", "QOS_G"]);
    assert!(ok);
    let listed = listed["sessions"].as_array().expect("sessions").clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sessionId"], rated.session_id.as_str());
    assert_eq!(listed[0]["client"], qod_testkit::TEST_CLIENT);
    let (_, first) = ops(&["sessions", "--page-size", "1"]);
    let token = first["nextPageToken"].as_str().expect("token").to_owned();
    assert!(!token.is_empty(), "{first}");
    let (_, second) = ops(&["sessions", "--page-size", "1", "--page-token", &token]);
    assert_eq!(second["sessions"].as_array().map(Vec::len), Some(1));
    assert_ne!(
        first["sessions"][0]["sessionId"],
        second["sessions"][0]["sessionId"]
    );
    assert_eq!(second["nextPageToken"], "", "two sessions, two pages");

    let (ok, dump) = ops(&["dump"]);
    assert!(ok);
    let entry = dump["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["device"] == addr::DEVICE_V4)
        .expect("the marked device's entry")
        .clone();
    assert_eq!(
        entry["rules"][0]["sessionId"],
        marked.session_id.as_str(),
        "{entry}"
    );
    assert_eq!(entry["rules"][0]["dscp"], 32);
    assert_eq!(entry["rules"][0]["serverPorts"], "5000");
    assert_eq!(entry["rules"][0]["band"], "low_latency", "QOS_E's band");
    let classes = dump["classes"].as_array().expect("classes").clone();
    assert!(
        classes
            .iter()
            .any(|c| c["interface"] == EDGE_DEV_IF && c["sessionId"] == rated.session_id.as_str()),
        "{dump}"
    );
    assert!(classes.iter().all(|c| c["sessionId"] != ""), "{dump}");
    // Downlink leaves through the device side: the rated session's rule steers it into its
    // class there (each interface numbers its own classes, so each direction has its priority).
    let class = classes
        .iter()
        .find(|c| c["interface"] == EDGE_DEV_IF && c["sessionId"] == rated.session_id.as_str())
        .expect("the rated session's class");
    let rule = dump["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .flat_map(|e| e["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["sessionId"] == rated.session_id.as_str())
        .expect("the rated session's rule");
    assert_eq!(rule["skbPriorityDown"], class["classId"], "{dump}");
    assert_eq!(rule["profile"], "QOS_G", "the entry it follows: {dump}");

    let (ok, verified) = ops(&["verify"]);
    assert!(ok, "{verified}");
    assert_eq!(verified["drift"].as_array().map(Vec::len), Some(0));

    // Drift planted behind qodd's back: a class no session holds.
    lab.edge
        .exec(
            "tc",
            &[
                "class",
                "add",
                "dev",
                EDGE_DEV_IF,
                "parent",
                "1:1",
                "classid",
                "1:1ff",
                "htb",
                "rate",
                "1mbit",
            ],
        )
        .expect("plant a class");
    let (ok, verified) = ops(&["verify"]);
    assert!(!ok, "verify exits non-zero on drift");
    let drift = verified["drift"].as_array().expect("drift").clone();
    assert_eq!(drift.len(), 1, "{verified}");
    assert!(
        drift[0]
            .as_str()
            .is_some_and(|d| d.contains("1:1ff") && d.contains(EDGE_DEV_IF)),
        "{verified}"
    );
    let (_, dump) = ops(&["dump"]);
    assert!(
        dump["classes"]
            .as_array()
            .expect("classes")
            .iter()
            .any(|c| c["classId"] == "1:1ff" && c["sessionId"] == ""),
        "{dump}"
    );
    // The human form says the same.
    let (ok, text, _) = qodctl_as(&qodd, &admin, true, &["verify"]);
    assert!(!ok);
    assert!(text.contains("DRIFT: scheduler class 1:1ff"), "{text}");
}

/// A tmux session of the test's own, killed on drop.
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn qodctl_top_shows_live_rates_in_a_terminal() {
    let (lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let marked = qod_testkit::marked_flow(&mut api).await;
    let token = operator_token(&qodd, &[qod_daemon::auth::scope::PROFILES_READ]);
    let token_file = qodd.dir.path().join("top.token");
    std::fs::write(&token_file, token).expect("token file");
    // Uplink traffic of the session for the whole test: 20 × 500 B every 100 ms ≈ 800 kbit/s.
    let sender = lab.device.spawn(|| {
        let sock = std::net::UdpSocket::bind(qod_testkit::api::sa(addr::DEVICE_V4, 47100))?;
        let to = qod_testkit::api::sa(addr::SERVER_V4, 5000);
        for _ in 0..80 {
            for _ in 0..20 {
                sock.send_to(&[0u8; 500], to)?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::Ok(())
    });
    let name = format!("qodt-top-{}", std::process::id());
    let tmux = Tmux(name.clone());
    let command = format!(
        "env QODCTL_ADDR={} QODCTL_CA={} QODCTL_TOKEN_FILE={} {} top --interval 0.5",
        qodd.addr(),
        qodd.pki.path("ca.crt").display(),
        token_file.display(),
        qodd_bin().with_file_name("qodctl").display()
    );
    let out = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "160",
            "-y",
            "30",
            &command,
        ])
        .output()
        .expect("tmux");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pane = Command::new("tmux")
        .args(["capture-pane", "-p", "-t", &name])
        .output()
        .expect("capture-pane");
    let screen = String::from_utf8_lossy(&pane.stdout).into_owned();
    let line = screen
        .lines()
        .find(|l| l.contains(&marked.session_id))
        .unwrap_or_else(|| panic!("the session is on screen:\n{screen}"));
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == '│')
        .filter(|w| !w.is_empty())
        .collect();
    let at = words
        .iter()
        .position(|w| *w == marked.session_id)
        .expect("id");
    assert_eq!(words[at + 1], qod_testkit::TEST_CLIENT, "{line}");
    assert_eq!(words[at + 2], "QOS_E", "{line}");
    let up: f64 = words[at + 3].parse().expect("UP kbit/s");
    assert!(up > 100.0, "the uplink rate is live: {line}\n{screen}");
    assert!(line.contains("500 kbps"), "the granted maximum: {line}");
    // q quits and gives the terminal back.
    Command::new("tmux")
        .args(["send-keys", "-t", &name, "q"])
        .output()
        .expect("send-keys");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alive = Command::new("tmux")
        .args(["has-session", "-t", &name])
        .output()
        .expect("has-session");
    assert!(!alive.status.success(), "qodctl top ended on q");
    drop(tmux);
    let _ = sender.join();
}
