//! Schemathesis (property-based, from PyPI) against the REST API of a real `qodd` in the lab,
//! driven by CAMARA's published OpenAPI files (`../shared/camara`), not qod's own: every check,
//! every phase (examples, coverage, fuzzing, stateful links inferred from `sessionId` and
//! `Location`), a fixed seed and a bounded number of examples per operation. It must end with no
//! failure: no server error, no answer that violates the schema, no undocumented status
//! (`tests/schemathesis/schemathesis.toml` says which refusals count as accepting valid input).
//!
//! `cargo xtask test` installs schemathesis and passes its path in `QOD_SCHEMATHESIS`.
//! `QOD_SCHEMATHESIS_EXAMPLES` sets the examples per operation (default 25); the long run of
//! BENCHMARKS.md uses 1000. Needs root (namespaces, eBPF).

use std::{path::PathBuf, process::Command, time::Instant};

use qod_daemon::devkit::TokenSpec;
use qod_testkit::{EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, TEST_CLIENT, workspace_root};

const PORT: u16 = 9443;

/// CAMARA's example device, profile and server are served here, so the examples and the
/// stateful links reach real sessions; limits are loose so the run is not throttled.
const CONFIG: &str = r#"
ue_pools = ["10.0.1.0/24", "203.0.113.0/24", "2001:db8:85a3::/48"]

[[devices]]
phone_number = "+123456789"
ipv4_address = "203.0.113.5"

[[profiles]]
name = "voice"
status = "ACTIVE"
service_class = "microsoft_voice"
target_min_upstream_rate = { value = 100, unit = "kbps" }
target_min_downstream_rate = { value = 100, unit = "kbps" }
min_duration = { value = 1, unit = "Seconds" }
max_duration = { value = 10, unit = "Days" }

[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
max_upstream_rate = { value = 500, unit = "kbps" }
max_downstream_rate = { value = 500, unit = "kbps" }
min_duration = { value = 1, unit = "Seconds" }
max_duration = { value = 1, unit = "Days" }

[notifications]
# CAMARA's example sink is a name that resolves nowhere here: nothing leaves the lab.
max_attempts = 1

[limits]
requests_per_second = 100000
request_burst = 100000
max_active_sessions_per_client = 100000

[rest]
listen = "127.0.0.1:9443"
"#;

/// While alive, the namespace resolves names through a file of its own pointing at loopback
/// (`ip netns exec` binds it over /etc/resolv.conf), so no lookup can leave the machine.
struct LocalResolver(PathBuf);

impl LocalResolver {
    fn new(ns: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
        Self(dir)
    }
}

impl Drop for LocalResolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn schemathesis() -> PathBuf {
    let st = std::env::var_os("QOD_SCHEMATHESIS").map_or_else(
        || PathBuf::from("/var/cache/qod/schemathesis-4.32.5/bin/st"),
        PathBuf::from,
    );
    assert!(
        st.exists(),
        "schemathesis is not installed at {}: run the suite with `cargo xtask test`, which installs it",
        st.display()
    );
    st
}

/// Runs `st` for one CAMARA file against `base` and returns its report.
fn run(
    st: &PathBuf,
    qodd: &Qodd,
    lab: &Lab,
    (file, base, token): (&str, &str, &str),
) -> (bool, String) {
    let examples = std::env::var("QOD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let phases = std::env::var("QOD_SCHEMATHESIS_PHASES")
        .unwrap_or_else(|_| "examples,coverage,fuzzing,stateful".into());
    let spec = workspace_root()
        .parent()
        .expect("workspace parent")
        .join("shared/camara")
        .join(file);
    assert!(spec.exists(), "CAMARA's file {} is missing", spec.display());
    let config = workspace_root().join("tests/schemathesis/schemathesis.toml");
    let work = qodd
        .dir
        .path()
        .join(format!("st-{file}-{}", &token[token.len() - 8..]));
    std::fs::create_dir_all(&work).expect("work dir");
    let junit = work.join("report.xml");
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.edge.name])
        .arg(st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("https://127.0.0.1:{PORT}/{base}")])
        .arg("--tls-verify")
        .arg(qodd.pki.path("ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--seed", "42", "--max-examples", &examples])
        .args(["--checks", "all"])
        .args(["--phases", &phases])
        .args(["--request-timeout", "10", "--workers", "1"])
        .args(["--generation-database", "none", "--no-color"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .current_dir(&work)
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("Seed"))
        .collect();
    println!(
        "schemathesis {file} ({examples} examples per operation, {:.0?}): {}",
        started.elapsed(),
        summary.join(" | ")
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn camaras_published_openapi_holds_against_the_rest_api() {
    let st = schemathesis();
    qod_testkit::api::require_root();
    let lab = Lab::new().expect("lab");
    let _resolver = LocalResolver::new(&lab.edge.name);
    let qodd = Qodd::start(&lab.edge, &[EDGE_DEV_IF, EDGE_SRV_IF], CONFIG)
        .await
        .expect("qodd");
    // A two-legged token names the device in each call; a three-legged one speaks for
    // CAMARA's example device, so bodies without a device (most of what is generated) reach
    // real sessions, which the stateful phase then reads, extends and deletes.
    let three_legged = qodd
        .pki
        .mint(&TokenSpec {
            device: Some(serde_json::json!("ipv4:203.0.113.5")),
            ..TokenSpec::full(TEST_CLIENT)
        })
        .expect("token");
    for (file, base, token) in [
        (
            "quality-on-demand.yaml",
            "quality-on-demand/v1",
            qodd.token.as_str(),
        ),
        (
            "quality-on-demand.yaml",
            "quality-on-demand/v1",
            three_legged.as_str(),
        ),
        ("qos-profiles.yaml", "qos-profiles/v1", qodd.token.as_str()),
        (
            "qos-profiles.yaml",
            "qos-profiles/v1",
            three_legged.as_str(),
        ),
    ] {
        let (ok, report) = run(&st, &qodd, &lab, (file, base, token));
        let connections: Vec<String> = qodd
            .log()
            .lines()
            .filter(|l| l.contains("REST connection"))
            .map(str::to_owned)
            .collect();
        assert!(
            ok,
            "schemathesis found failures against {file}:\n{report}\nqodd's REST connection errors:\n{}",
            connections.join("\n")
        );
        assert!(
            report.contains("Stateful"),
            "the stateful phase did not run:\n{report}"
        );
    }
    // The run reached real sessions: created, extended and deleted through the links.
    let log = qodd.log();
    let done = |action: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("action=\"{action}\"")) && l.contains("result=\"ok\""))
            .count()
    };
    let (created, extended, deleted) = (done("create"), done("extend"), done("delete"));
    println!("schemathesis reached {created} creates, {extended} extends, {deleted} deletes");
    assert!(
        created > 0 && extended > 0 && deleted > 0,
        "{created} creates, {extended} extends, {deleted} deletes succeeded; audit:\n{}",
        log.lines()
            .filter(|l| l.contains("audit"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Nothing the run sent made qodd panic.
    assert!(!log.contains("panicked"), "{log}");
}
