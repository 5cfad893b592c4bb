//! Durability benchmarks. Run with `cargo xtask bench recovery` / `cargo xtask bench creates`
//! (root; `cargo xtask bench` runs every part). Prints numbers; asserts nothing.
//!
//! 1. **Restart recovery** with 100k and 1M sessions: the release `qodd` runs in a namespace lab
//!    (default configuration: TLS, tokens) with `max_sessions` sized for them; it is killed, its
//!    store is filled with live QOS_E sessions (one per device address) written directly through
//!    the store library, and it is started again. Recovery time = from spawning the process to
//!    its first answer (it serves only once every session is restored), polled every 10 ms.
//!    Measured twice: *rebuild* (no pinned data plane: every rule installed anew, as after a
//!    reboot) and *continuing* (after a `kill -9`: the pinned maps are reused, entries rewritten
//!    in place, slots kept). Also printed: the store's size and qodd's resident memory.
//! 2. **Durable creates per second** over gRPC and over REST (both TLS, bearer token; REST
//!    through reqwest over HTTP/1.1, a client thread in the lab's namespace each): C concurrent
//!    clients (each its own connection) create sessions for distinct devices for 5 s; every create is
//!    acknowledged only after its commit is fsynced. Reported: creates/s, latency p50 / p99, and
//!    the store's commits per create (from qodd's exit log): group commit lets concurrent creates
//!    share one fsync. Two modes: *marking* (no interface scheduled, QOS_E) and *scheduled* (both
//!    edge interfaces with `capacity_mbit = 100000`, a rated profile that gets its own HTB class
//!    on each: two class changes per create, over rtnetlink).
//!
//!    Then each client deletes the sessions it created, one call at a time, for up to 5 s:
//!    deletes/s (every call acknowledged after its removal is fsynced) and their p99.
//!    Scheduled, a second round (*scheduled, warm*) follows on the same qodd: its sessions take
//!    the classes the first round's sessions left parked, as in a node's steady state, where
//!    sessions come and go and the tree holds the peak of concurrent classes. The commits per
//!    create are over both rounds. Meanwhile one more client reads one session (GetSession)
//!    every 2 ms: its latency p50 / p99 / max over the whole row. `QOD_BENCH_APIS=grpc` (or
//!    `rest`) runs one API.
//! 3. **Expiry storm** (`cargo xtask bench storm`): see [`storm`].
//! 4. **Open loop** (`cargo xtask bench openloop`): see [`openloop`].
//! 5. **Creates beside watchers** (`cargo xtask bench watchers`): see [`watchers`].
//! 6. **Reload at scale** (`cargo xtask bench reload`): see [`reload`].
//! 7. **Link flap** (`cargo xtask bench linkflap`): see [`linkflap`].
//! 8. **Memory at scale** (`cargo xtask bench scale`): see [`scale`].
//! 9. **Through a cluster** (`cargo xtask bench cluster`): see [`cluster`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use qod_proto::v1::quality_on_demand_client::QualityOnDemandClient;
use qod_testkit::{EDGE_DEV_IF, EDGE_SRV_IF, Lab, Qodd, addr, api::session};

/// The qodd measured: `$QOD_BENCH_QODD` (another commit's build, to compare back to back),
/// else the release build.
fn release_qodd() -> std::path::PathBuf {
    std::env::var_os("QOD_BENCH_QODD")
        .map(Into::into)
        .unwrap_or_else(|| qod_testkit::release_bin("qodd"))
}

fn rss_mib(qodd: &Qodd) -> f64 {
    rss_hwm_mib(qodd).0
}

async fn recovery() -> anyhow::Result<()> {
    println!("\nrestart recovery (release qodd, QOS_E sessions on a two-interface lab)");
    println!(
        "{:>9}  {:>11}  {:>14}  {:>10}  {:>9}",
        "sessions", "rebuild s", "continuing s", "store MiB", "RSS MiB"
    );
    let counts: Vec<u32> = std::env::var("QOD_BENCH_RECOVERY")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    for n in counts {
        let lab = Lab::new()?;
        let mut qodd = Qodd::start_bin(
            &release_qodd(),
            &lab.edge,
            &[EDGE_DEV_IF, EDGE_SRV_IF],
            &format!("max_sessions = {}\n", n + 1024),
        )
        .await?;
        qodd.start_timeout = Duration::from_secs(1200);
        qodd.start_poll = Duration::from_millis(10);
        qodd.kill9();
        let state = qodd.dir.path().join("state");
        qod_testkit::fill_store(&state, n, "QOS_E")?;
        let _ = std::fs::remove_dir_all(&qodd.pin_path);
        let t = Instant::now();
        qodd.restart().await?;
        let rebuild = t.elapsed();
        anyhow::ensure!(
            qodd.log().contains(&format!("restored={n}")),
            "not every session was restored:\n{}",
            qodd.log()
        );
        // Where the rebuild's time went, from qodd's own timestamps.
        if std::env::var_os("QOD_BENCH_SHOW_LOG").is_some() {
            eprintln!("{}", qodd.log());
        }
        let rss = rss_mib(&qodd);
        qodd.kill9();
        let t = Instant::now();
        qodd.restart().await?;
        let continuing = t.elapsed();
        let size = std::fs::metadata(state.join("sessions.redb"))?.len() as f64 / 1048576.0;
        println!(
            "{n:>9}  {:>11.2}  {:>14.2}  {size:>10.0}  {rss:>9.0}",
            rebuild.as_secs_f64(),
            continuing.as_secs_f64()
        );
    }
    Ok(())
}

/// The rated profile of the scheduled rows: a class of its own on each scheduled interface.
const RATED: &str = r#"
[[profiles]]
name = "QOS_B"
status = "ACTIVE"
target_min_downstream_rate = { value = 100, unit = "kbps" }
target_min_upstream_rate = { value = 100, unit = "kbps" }
max_downstream_rate = { value = 1, unit = "Mbps" }
max_upstream_rate = { value = 1, unit = "Mbps" }
"#;

/// One benchmark client, over either API.
enum Client {
    Grpc(QualityOnDemandClient<qod_proto::client::QodChannel>),
    Rest(qod_testkit::rest::RestClient),
}

impl Client {
    async fn connect(api: &str, lab: &Lab, qodd: &Qodd) -> anyhow::Result<Self> {
        Ok(match api {
            "grpc" => Self::Grpc(QualityOnDemandClient::new(qodd.channel().await?)),
            _ => {
                let mut c = qod_testkit::rest::RestClient::new(
                    &lab.edge,
                    "https://127.0.0.1:9443",
                    qod_testkit::rest::RestTls {
                        ca_pem: Some(qodd.pki.read("ca.crt")?),
                        ..Default::default()
                    },
                )?;
                c.token = Some(qodd.token.clone());
                Self::Rest(c)
            }
        })
    }

    /// Creates a session for `ip`; its id.
    async fn create(&mut self, ip: &str, profile: &str) -> anyhow::Result<String> {
        match self {
            Self::Grpc(api) => Ok(api
                .create_session(session(ip, addr::SERVER_V4, profile, &[], &[], 3600))
                .await?
                .into_inner()
                .session_id),
            Self::Rest(c) => {
                let body = serde_json::json!({
                    "device": {"ipv4Address": {"publicAddress": ip, "privateAddress": ip}},
                    "applicationServer": {"ipv4Address": addr::SERVER_V4},
                    "qosProfile": profile,
                    "duration": 3600,
                });
                let r = c
                    .call("POST", "/quality-on-demand/v1/sessions", Some(&body))
                    .await?;
                anyhow::ensure!(
                    r.status == 201,
                    "create: {}",
                    String::from_utf8_lossy(&r.body)
                );
                Ok(r.json()["sessionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned())
            }
        }
    }

    async fn get(&mut self, id: &str) -> anyhow::Result<()> {
        match self {
            Self::Grpc(api) => {
                api.get_session(qod_proto::v1::GetSessionRequest {
                    session_id: id.to_owned(),
                })
                .await?;
            }
            Self::Rest(c) => {
                let r = c
                    .call("GET", &format!("/quality-on-demand/v1/sessions/{id}"), None)
                    .await?;
                anyhow::ensure!(r.status == 200, "get: {}", r.status);
            }
        }
        Ok(())
    }

    async fn delete(&mut self, id: String) -> anyhow::Result<()> {
        match self {
            Self::Grpc(api) => {
                api.delete_session(qod_proto::v1::DeleteSessionRequest { session_id: id })
                    .await?;
            }
            Self::Rest(c) => {
                let r = c
                    .call(
                        "DELETE",
                        &format!("/quality-on-demand/v1/sessions/{id}"),
                        None,
                    )
                    .await?;
                anyhow::ensure!(r.status == 204, "delete: {}", r.status);
            }
        }
        Ok(())
    }
}

/// Waits (polling qodd's log every 10 ms, up to 300 s) for the first line holding `needle`:
/// the time it took from `since`, and the value of its `key=` field ("-" when it has none).
async fn await_log_field(
    qodd: &Qodd,
    since: Instant,
    needle: &str,
    key: &str,
) -> anyhow::Result<(Duration, String)> {
    loop {
        if let Some(v) = qodd.log().lines().find(|l| l.contains(needle)).map(|l| {
            l.split(&format!("{key}="))
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("-")
                .to_owned()
        }) {
            return Ok((since.elapsed(), v));
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(300),
            "no line with {needle:?}:\n{}",
            qodd.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When qodd wrote its first log line containing `needle` (the line's RFC 3339 timestamp).
fn log_time(log: &str, needle: &str) -> Option<time::OffsetDateTime> {
    let line = log.lines().find(|l| l.contains(needle))?;
    time::OffsetDateTime::parse(
        line.split_whitespace().next()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
}

/// "p50 / p99 / max" of sorted `lat`, in ms.
fn p50_p99_max(lat: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.2} / {:.2} / {:.1}",
        ms(quantile(lat, 0.5)),
        ms(quantile(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    )
}

/// Latency at quantile `p` of sorted `lat`.
fn quantile(lat: &[Duration], p: f64) -> Duration {
    lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Every client creates sessions for devices of its own (client `c`'s `n`th is
/// 10.128.0.0 + c × 65,536 + n, counting on from `from[c]`) for 5 s, or until it made
/// `limit[c]`; their latencies, the time taken, and the clients back with the ids each created.
async fn create_phase(
    clients: Vec<Client>,
    from: &[u32],
    limit: Option<&[usize]>,
    profile: &'static str,
) -> anyhow::Result<(Vec<Duration>, f64, Vec<(Client, Vec<String>)>)> {
    let started = Instant::now();
    let end = started + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for (c, mut api) in clients.into_iter().enumerate() {
        let mut i = from.get(c).copied().unwrap_or(0);
        let most = limit.and_then(|l| l.get(c).copied()).unwrap_or(usize::MAX);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ids = Vec::new();
            while Instant::now() < end && ids.len() < most {
                let ip = std::net::Ipv4Addr::from(0x0a80_0000 + ((c as u32) << 16) + i);
                i += 1;
                let t = Instant::now();
                let created = api.create(&ip.to_string(), profile).await?;
                lat.push(t.elapsed());
                ids.push(created);
            }
            anyhow::Ok((api, lat, ids))
        }));
    }
    let mut lat = Vec::new();
    let mut back = Vec::new();
    for t in tasks {
        let (api, l, ids) = t.await??;
        lat.extend(l);
        back.push((api, ids));
    }
    lat.sort();
    Ok((lat, started.elapsed().as_secs_f64(), back))
}

/// Every client deletes what it created, one call at a time, for up to 5 s: the latencies, the
/// time taken, and the clients back.
async fn delete_phase(
    clients: Vec<(Client, Vec<String>)>,
) -> anyhow::Result<(Vec<Duration>, f64, Vec<Client>)> {
    let started = Instant::now();
    let end = started + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for (mut api, ids) in clients {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for id in ids {
                if Instant::now() >= end {
                    break;
                }
                let t = Instant::now();
                api.delete(id).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok((api, lat))
        }));
    }
    let mut del = Vec::new();
    let mut back = Vec::new();
    for t in tasks {
        let (api, l) = t.await??;
        del.extend(l);
        back.push(api);
    }
    del.sort();
    Ok((del, started.elapsed().as_secs_f64(), back))
}

async fn creates() -> anyhow::Result<()> {
    println!(
        "\ndurable creates over gRPC and REST (TLS + bearer token, release qodd, 5 s per row)"
    );
    println!(
        "{:>4}  {:>15}  {:>7}  {:>10}  {:>9}  {:>9}  {:>17}  {:>10}  {:>9}",
        "api",
        "mode",
        "clients",
        "creates/s",
        "p50 ms",
        "p99 ms",
        "commits per create",
        "deletes/s",
        "p99 ms"
    );
    let scheduled = [
        format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100000 }}"),
        format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 100000 }}"),
    ];
    let limits = "max_sessions = 1000000\n[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\nmax_active_sessions_per_client = 1000000\n";
    // QOD_BENCH_APIS=grpc (or rest) runs one API only.
    let apis = std::env::var("QOD_BENCH_APIS").unwrap_or_else(|_| "grpc,rest".into());
    for api in apis.split(',') {
        for (mode, interfaces, profile, extra) in [
            (
                "marking",
                vec![EDGE_DEV_IF, EDGE_SRV_IF],
                "QOS_E",
                limits.to_owned(),
            ),
            (
                "scheduled",
                scheduled.iter().map(String::as_str).collect(),
                "QOS_B",
                format!("{limits}{RATED}"),
            ),
        ] {
            for clients in [1usize, 4, 16, 64] {
                let lab = Lab::new()?;
                let extra = format!("{extra}\n[rest]\nlisten = \"127.0.0.1:9443\"\n");
                let mut qodd =
                    Qodd::start_bin(&release_qodd(), &lab.edge, &interfaces, &extra).await?;
                let mut api_clients = Vec::new();
                for _ in 0..clients {
                    api_clients.push(Client::connect(api, &lab, &qodd).await?);
                }
                // Scheduled, a second round follows the first on the same qodd: each client
                // makes at most as many sessions as in the first, so every one takes a class the
                // first round's sessions left parked (a change, not an add).
                let rounds: &[&str] = if mode == "scheduled" {
                    &["scheduled", "scheduled, warm"]
                } else {
                    &["marking"]
                };
                // A reader of its own reads one session over and over meanwhile.
                let mut reader = Client::connect(api, &lab, &qodd).await?;
                let watched = reader.create("10.127.0.1", profile).await?;
                let reading = Arc::new(AtomicBool::new(true));
                let gets = read_meanwhile(reader, watched, reading.clone());
                let mut rows = Vec::new();
                let mut from = vec![0u32; clients];
                let mut limit: Option<Vec<usize>> = None;
                for round in rounds {
                    let (lat, creating, created) =
                        create_phase(api_clients, &from, limit.as_deref(), profile).await?;
                    for (f, (_, ids)) in from.iter_mut().zip(&created) {
                        *f += ids.len() as u32;
                    }
                    limit = Some(created.iter().map(|(_, ids)| ids.len()).collect());
                    let (del, deleting, back) = delete_phase(created).await?;
                    api_clients = back;
                    rows.push((round, lat, creating, del, deleting));
                }
                reading.store(false, Ordering::Relaxed);
                let mut gets: Vec<Duration> = gets.await??.into_iter().map(|(_, d)| d).collect();
                gets.sort();
                qodd.stop();
                let commits = qodd
                    .log()
                    .lines()
                    .rev()
                    .find_map(|l| {
                        let c = l.split("commits=").nth(1)?.split_whitespace().next()?;
                        let w = l.split("writes=").nth(1)?.split_whitespace().next()?;
                        Some(c.parse::<f64>().ok()? / w.parse::<f64>().ok()?.max(1.0))
                    })
                    .unwrap_or(f64::NAN);
                for (round, lat, creating, del, deleting) in rows {
                    println!(
                        "{api:>4}  {round:>15}  {clients:>7}  {:>10.0}  {:>9.2}  {:>9.2}  {commits:>17.2}  {:>10.0}  {:>9.2}",
                        lat.len() as f64 / creating,
                        quantile(&lat, 0.5).as_secs_f64() * 1e3,
                        quantile(&lat, 0.99).as_secs_f64() * 1e3,
                        del.len() as f64 / deleting,
                        quantile(&del, 0.99).as_secs_f64() * 1e3,
                    );
                }
                println!(
                    "{api:>4}  {:>15}  {clients:>7}  GetSession of one session every 2 ms meanwhile: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    "",
                    quantile(&gets, 0.5).as_secs_f64() * 1e3,
                    quantile(&gets, 0.99).as_secs_f64() * 1e3,
                    gets.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                );
            }
        }
    }
    Ok(())
}

/// Reads session `id` every 2 ms while `reading` holds: each read's (end, latency).
fn read_meanwhile(
    mut reader: Client,
    id: String,
    reading: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<(time::OffsetDateTime, Duration)>>> {
    tokio::spawn(async move {
        let mut lat = Vec::new();
        while reading.load(Ordering::Relaxed) {
            let t = Instant::now();
            reader.get(&id).await?;
            lat.push((time::OffsetDateTime::now_utc(), t.elapsed()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(lat)
    })
}

/// Seconds since the epoch of a protobuf timestamp.
fn epoch_s(t: Option<&prost_types::Timestamp>) -> f64 {
    t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

/// Quantile `p` of sorted seconds, in ms.
fn ms_at(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)] * 1e3
}

/// What a storm watcher saw: (observed − time, received − time) per end, and resyncs.
type Watched = (Vec<(f64, f64)>, u32);

/// A watcher of every event: each status change's (observed − time, received − time) in
/// seconds, and the resync notices; it waits `delay` before its first read (a slow client).
fn storm_watcher(
    mut api: QualityOnDemandClient<qod_proto::client::QodChannel>,
    n: usize,
    delay: Duration,
    within: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<Watched>> {
    use qod_proto::v1 as pb;
    tokio::spawn(async move {
        let mut stream = api
            .watch_session_events(pb::WatchSessionEventsRequest::default())
            .await?
            .into_inner();
        tokio::time::sleep(delay).await;
        let mut seen = Vec::with_capacity(n);
        let mut resyncs = 0;
        let end = tokio::time::Instant::now() + within;
        while seen.len() < n {
            let Ok(Some(ev)) =
                tokio::time::timeout_at(end, futures::StreamExt::next(&mut stream)).await
            else {
                break;
            };
            let ev = ev?;
            let now = time::OffsetDateTime::now_utc();
            let now = now.unix_timestamp_nanos() as f64 / 1e9;
            match ev.kind {
                Some(pb::session_event::Kind::QosStatusChanged(c))
                    if c.qos_status() == pb::QosStatus::Unavailable =>
                {
                    let t = epoch_s(ev.time.as_ref());
                    seen.push((epoch_s(ev.observed_time.as_ref()) - t, now - t));
                }
                Some(pb::session_event::Kind::ResyncNeeded(_)) => resyncs += 1,
                _ => {}
            }
        }
        Ok((seen, resyncs))
    })
}

/// How the storm's ends are spread: evenly over one second (the issue's "ending in the same
/// second"; `QOD_BENCH_STORM_SPREAD_MS=0` puts them all on one instant).
static STORM_SPREAD: std::sync::LazyLock<time::Duration> = std::sync::LazyLock::new(|| {
    time::Duration::milliseconds(
        std::env::var("QOD_BENCH_STORM_SPREAD_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    )
});

/// 3. **Expiry storm**: the release qodd (marking, default configuration) is killed, its
///    store filled with N live sessions that end spread evenly over one second, about 15 s after it
///    is started again. Two watchers are open before the ends: one reads as events come, one
///    reads nothing for 10 s first (a slow client). Reported per watcher: the share of the N
///    ends it received, resync notices, and lateness p50 / p99 / max of qodd observing each end
///    (`observed_time − time`) and of the watcher receiving it (`received − time`); meanwhile a
///    reader does GetSession every 2 ms: p50 / p99 / max over the storm.
///
///    `QOD_BENCH_STORM_SCHEDULED=N`: instead, N sessions on two scheduled interfaces (100 Gbit/s
///    each, so the pools admit them): every end also parks two HTB classes.
async fn storm() -> anyhow::Result<()> {
    let scheduled: Option<u32> = std::env::var("QOD_BENCH_STORM_SCHEDULED")
        .ok()
        .and_then(|v| v.parse().ok());
    let interfaces: Vec<String> = match scheduled {
        Some(_) => [(EDGE_DEV_IF, "device"), (EDGE_SRV_IF, "server")]
            .iter()
            .map(|(name, side)| {
                format!("{{ name = \"{name}\", side = \"{side}\", capacity_mbit = 100000 }}")
            })
            .collect(),
        None => vec![EDGE_DEV_IF.into(), EDGE_SRV_IF.into()],
    };
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    println!(
        "\nexpiry storm (release qodd, {}; N sessions ending in the same second)",
        if scheduled.is_some() {
            "both interfaces scheduled"
        } else {
            "marking"
        }
    );
    for n in [scheduled.unwrap_or(100_000)] {
        let lab = Lab::new()?;
        let mut qodd = Qodd::start_bin(
            &release_qodd(),
            &lab.edge,
            &interfaces,
            &format!(
                "max_sessions = {}\n[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\nmax_active_sessions_per_client = {}\n",
                n + 1024,
                n + 1024
            ),
        )
        .await?;
        qodd.start_timeout = Duration::from_secs(600);
        qodd.kill9();
        let state = qodd.dir.path().join("state");
        let ends_at = time::OffsetDateTime::now_utc() + time::Duration::seconds(25);
        qod_testkit::fill_store_ending(&state, n, "QOS_E", ends_at, *STORM_SPREAD)?;
        qodd.restart().await?;
        let to_end = (ends_at - time::OffsetDateTime::now_utc()).as_seconds_f64();
        anyhow::ensure!(
            to_end > 2.0,
            "the restart took too long: the storm began before the watchers ({to_end:.1} s left)"
        );
        let within = Duration::from_secs_f64(to_end + 60.0);
        let fast = storm_watcher(qodd.sessions().await?, n as usize, Duration::ZERO, within);
        let slow = storm_watcher(
            qodd.sessions().await?,
            n as usize,
            Duration::from_secs_f64(to_end + 10.0),
            within,
        );
        let mut reader = Client::connect("grpc", &lab, &qodd).await?;
        let watched = reader.create("10.127.0.1", "QOS_E").await?;
        let reading = Arc::new(AtomicBool::new(true));
        let gets = read_meanwhile(reader, watched, reading.clone());
        let (fast_seen, fast_resyncs) = fast.await??;
        let (slow_seen, slow_resyncs) = slow.await??;
        reading.store(false, Ordering::Relaxed);
        let last = fast_seen.iter().map(|(_, r)| *r).fold(0.0, f64::max);
        let mut during: Vec<Duration> = gets
            .await??
            .into_iter()
            .filter(|(at, _)| {
                let since = (*at - ends_at).as_seconds_f64();
                (-1.0..=last + 1.0).contains(&since)
            })
            .map(|(_, d)| d)
            .collect();
        during.sort();
        println!(
            "{:>8}  {:>10}  {:>8}  {:>28}  {:>28}",
            "watcher",
            "delivered",
            "resyncs",
            "observed late p50/p99/max ms",
            "received late p50/p99/max ms"
        );
        for (name, seen, resyncs) in [
            ("live", fast_seen, fast_resyncs),
            ("slow", slow_seen, slow_resyncs),
        ] {
            let mut obs: Vec<f64> = seen.iter().map(|(o, _)| *o).collect();
            let mut rec: Vec<f64> = seen.iter().map(|(_, r)| *r).collect();
            obs.sort_by(f64::total_cmp);
            rec.sort_by(f64::total_cmp);
            println!(
                "{name:>8}  {:>10}  {resyncs:>8}  {:>28}  {:>28}",
                format!("{}/{n}", seen.len()),
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    ms_at(&obs, 0.5),
                    ms_at(&obs, 0.99),
                    ms_at(&obs, 1.0)
                ),
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    ms_at(&rec, 0.5),
                    ms_at(&rec, 0.99),
                    ms_at(&rec, 1.0)
                ),
            );
        }
        println!(
            "GetSession during the storm ({} reads): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            during.len(),
            quantile(&during, 0.5).as_secs_f64() * 1e3,
            quantile(&during, 0.99).as_secs_f64() * 1e3,
            during.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

/// The lab's two interfaces for a mode: marking only, or both scheduled at 100 Gbit/s (so the
/// pools admit every session) with the rated profile of its own class on each.
fn mode_setup(mode: &str) -> (Vec<String>, &'static str, String) {
    let limits = "max_sessions = 1000000\n[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\nmax_active_sessions_per_client = 1000000\nmax_watches_per_client = 4096\n";
    match mode {
        "scheduled" => (
            vec![
                format!(
                    "{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100000 }}"
                ),
                format!(
                    "{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 100000 }}"
                ),
            ],
            "QOS_B",
            format!("{limits}{RATED}"),
        ),
        _ => (
            vec![EDGE_DEV_IF.into(), EDGE_SRV_IF.into()],
            "QOS_E",
            limits.to_owned(),
        ),
    }
}

/// 4. **Open loop**: creates are sent at a fixed rate (1,000 / 2,000 / 5,000 a second) for 5 s
///    whatever the answers do, spread over 64 gRPC connections (each create its own HTTP/2
///    stream), in marking and in scheduled mode (both interfaces, a class each per create).
///    Each create's latency counts from the moment it was due, not from when it was sent, so a
///    queue building up in qodd (or in the sender) shows instead of slowing the sender down.
///    Reported: the rate achieved (answers per second over the time to the last answer), p50
///    / p99 / max, failures, and GetSession every 2 ms meanwhile.
async fn openloop() -> anyhow::Result<()> {
    use qod_proto::v1 as pb;
    println!("\nopen-loop creates (gRPC, TLS + token, release qodd, 5 s per row, 64 connections)");
    println!(
        "{:>9}  {:>7}  {:>10}  {:>8}  {:>9}  {:>9}  {:>9}  {:>8}  {:>22}",
        "mode",
        "rate/s",
        "achieved/s",
        "answers",
        "p50 ms",
        "p99 ms",
        "max ms",
        "failures",
        "GetSession p99 / max ms"
    );
    for mode in ["marking", "scheduled"] {
        for rate in [1000u32, 2000, 5000] {
            let (interfaces, profile, extra) = mode_setup(mode);
            let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
            let lab = Lab::new()?;
            let qodd = Qodd::start_bin(&release_qodd(), &lab.edge, &interfaces, &extra).await?;
            let mut conns = Vec::new();
            for _ in 0..64 {
                conns.push(QualityOnDemandClient::new(qodd.channel().await?));
            }
            let mut reader = Client::connect("grpc", &lab, &qodd).await?;
            let watched = reader.create("10.127.0.1", profile).await?;
            let reading = Arc::new(AtomicBool::new(true));
            let gets = read_meanwhile(reader, watched, reading.clone());
            let n = rate * 5;
            let start = tokio::time::Instant::now() + Duration::from_millis(100);
            let mut tasks = Vec::with_capacity(n as usize);
            for i in 0..n {
                let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
                tokio::time::sleep_until(due).await;
                let mut api = conns[i as usize % conns.len()].clone();
                let ip = std::net::Ipv4Addr::from(0x0a80_0000 + i);
                tasks.push(tokio::spawn(async move {
                    let r = api
                        .create_session(session(
                            &ip.to_string(),
                            addr::SERVER_V4,
                            profile,
                            &[],
                            &[],
                            3600,
                        ))
                        .await;
                    (
                        due.elapsed(),
                        r.map(|_: tonic::Response<pb::SessionInfo>| ()).is_ok(),
                    )
                }));
            }
            let mut lat = Vec::with_capacity(tasks.len());
            let mut failures = 0usize;
            for t in tasks {
                let (d, ok) = t.await?;
                if ok {
                    lat.push(d);
                } else {
                    failures += 1;
                }
            }
            let took = start.elapsed().as_secs_f64();
            reading.store(false, Ordering::Relaxed);
            let mut gets: Vec<Duration> = gets.await??.into_iter().map(|(_, d)| d).collect();
            gets.sort();
            lat.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{mode:>9}  {rate:>7}  {:>10.0}  {:>8}  {:>9.2}  {:>9.2}  {:>9.1}  {failures:>8}  {:>22}",
                lat.len() as f64 / took,
                lat.len(),
                ms(quantile(&lat, 0.5)),
                ms(quantile(&lat, 0.99)),
                ms(lat.last().copied().unwrap_or_default()),
                format!(
                    "{:.2} / {:.1}",
                    ms(quantile(&gets, 0.99)),
                    ms(gets.last().copied().unwrap_or_default())
                ),
            );
        }
    }
    Ok(())
}

/// 5. **Creates beside watchers**: 16 clients create QOS_E sessions for 5 s (closed loop, as in
///    `creates`) while 0 / 100 / 1,000 Watch streams are open (over 16 connections of their
///    own), each reading every event as it comes. Reported: creates/s, p50 / p99, the share of
///    the no-watcher rate, the events the watchers received in all (each create is one
///    AVAILABLE event, so 1,000 watchers should get 1,000 × the creates), and the CPUs qodd and
///    the benchmark itself (its creating clients and its watchers) kept busy meanwhile (CPU
///    seconds per second, of the machine's two). The watchers take each message as bytes and
///    read it only as far as its kind ([`EventKind`]).
async fn watchers() -> anyhow::Result<()> {
    use qod_proto::v1 as pb;
    println!("\ncreates beside watchers (gRPC, release qodd, marking, 16 clients, 5 s per row)");
    println!(
        "{:>9}  {:>10}  {:>9}  {:>9}  {:>11}  {:>20}  {:>10}  {:>10}",
        "watchers",
        "creates/s",
        "p50 ms",
        "p99 ms",
        "of 0 rate",
        "events received",
        "qodd CPUs",
        "bench CPUs"
    );
    let mut base = None;
    // QOD_BENCH_WATCHERS=1000 (a comma-separated list) runs those rows only.
    let counts: Vec<usize> = std::env::var("QOD_BENCH_WATCHERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 100, 1000]);
    for n in counts {
        let (interfaces, profile, extra) = mode_setup("marking");
        let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
        let lab = Lab::new()?;
        let qodd = Qodd::start_bin(&release_qodd(), &lab.edge, &interfaces, &extra).await?;
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut conns = Vec::new();
        for _ in 0..16 {
            conns.push(qodd.channel().await?);
        }
        let mut streams = Vec::new();
        for w in 0..n {
            let mut grpc = tonic::client::Grpc::new(conns[w % conns.len()].clone());
            grpc.ready().await?;
            let mut stream = grpc
                .server_streaming(
                    tonic::Request::new(prost::Message::encode_to_vec(
                        &pb::WatchSessionEventsRequest::default(),
                    )),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/qod.v1.QualityOnDemand/WatchSessionEvents",
                    ),
                    qod_testkit::raw::Raw,
                )
                .await?
                .into_inner();
            let received = received.clone();
            streams.push(tokio::spawn(async move {
                while let Some(Ok(ev)) = futures::StreamExt::next(&mut stream).await {
                    let kind: Result<EventKind, _> = prost::Message::decode(&ev[..]);
                    if kind.is_ok_and(|k| k.qos_status_changed.is_some()) {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(Client::connect("grpc", &lab, &qodd).await?);
        }
        let cpu_before = (
            cpu_seconds(qodd.pid()),
            cpu_seconds(Some(std::process::id())),
        );
        let (lat, took, _) = create_phase(clients, &[0; 16], None, profile).await?;
        let cpu = (
            (cpu_seconds(qodd.pid()) - cpu_before.0) / took,
            (cpu_seconds(Some(std::process::id())) - cpu_before.1) / took,
        );
        // Let the streams catch up with the last creates before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for s in &streams {
            s.abort();
        }
        let rate = lat.len() as f64 / took;
        let base = *base.get_or_insert(rate);
        println!(
            "{n:>9}  {rate:>10.0}  {:>9.2}  {:>9.2}  {:>10.0}%  {:>20}  {:>10.2}  {:>10.2}",
            quantile(&lat, 0.5).as_secs_f64() * 1e3,
            quantile(&lat, 0.99).as_secs_f64() * 1e3,
            rate / base * 100.0,
            format!("{} of {}", received.load(Ordering::Relaxed), lat.len() * n),
            cpu.0,
            cpu.1,
        );
    }
    Ok(())
}

/// A watch message read only as far as its kind: the benchmark's watchers share qodd's two
/// vCPUs, and decoding each of a thousand streams' events in full would weigh on qodd's side of
/// the measurement. Only whether it is a status change is kept (the nested session is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct EventKind {
    #[prost(message, optional, tag = "3")]
    qos_status_changed: Option<Skipped>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Skipped {}

/// QOS_E as built in, but for its DSCP: what the reload benchmark changes.
fn qos_e_with_dscp(dscp: u8) -> String {
    format!(
        r#"
[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
dscp = {dscp}
priority = 10
max_upstream_rate = {{ value = 500, unit = "kbps" }}
max_downstream_rate = {{ value = 500, unit = "kbps" }}
min_duration = {{ value = 1, unit = "Seconds" }}
max_duration = {{ value = 1, unit = "Days" }}
"#
    )
}

/// 6. **Reload at scale**: N live QOS_E sessions (100,000; `QOD_BENCH_RELOAD=1000000,…` for
///    other counts) are read back at start; the configuration is rewritten with QOS_E's DSCP
///    changed and qodd gets SIGHUP. Reported: the time from the signal to qodd's line saying
///    the profiles' new treatments are in the kernel, in effect for every session of theirs
///    (`profile treatments reloaded`; "-" for a qodd from before the profile table), and to its
///    line saying the reload has reached every live session (`policy reloaded … updated=N`, the
///    rules it wrote again), both polled every 10 ms; that N; and GetSession every 2 ms from the
///    signal to the last line: p50 / p99 / max.
async fn reload() -> anyhow::Result<()> {
    println!("\nreload at scale (release qodd, marking, QOS_E's DSCP 32 -> 46 by SIGHUP)");
    println!(
        "{:>9}  {:>12}  {:>10}  {:>9}  {:>28}",
        "sessions", "in effect ms", "reload ms", "updated", "GetSession p50/p99/max ms"
    );
    let counts: Vec<u32> = std::env::var("QOD_BENCH_RELOAD")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000]);
    for n in counts {
        let lab = Lab::new()?;
        let base = format!(
            "max_sessions = {}\n[limits]\nmax_active_sessions_per_client = {}\nrequests_per_second = 1000000\nrequest_burst = 1000000\n",
            n + 1024,
            n + 1024
        );
        let mut qodd = Qodd::start_bin(
            &release_qodd(),
            &lab.edge,
            &[EDGE_DEV_IF, EDGE_SRV_IF],
            &format!("{base}{}", qos_e_with_dscp(32)),
        )
        .await?;
        qodd.start_timeout = Duration::from_secs(1200);
        qodd.kill9();
        qod_testkit::fill_store(&qodd.dir.path().join("state"), n, "QOS_E")?;
        qodd.restart().await?;
        let mut reader = Client::connect("grpc", &lab, &qodd).await?;
        let watched = reader.create("10.127.0.1", "QOS_E").await?;
        let reading = Arc::new(AtomicBool::new(true));
        let gets = read_meanwhile(reader, watched, reading.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let config = std::fs::read_to_string(qodd.config_path())?;
        std::fs::write(qodd.config_path(), config.replace("dscp = 32", "dscp = 46"))?;
        let signalled = time::OffsetDateTime::now_utc();
        let t = Instant::now();
        qodd.reload()?;
        // (A qodd from before the batched reload logs no count: "-".)
        let (took, updated) = await_log_field(&qodd, t, "policy reloaded", "updated").await?;
        // Polled after the fact: the line's own timestamp says when it was written.
        let in_effect = log_time(&qodd.log(), "profile treatments reloaded")
            .map(|at| format!("{:.0}", (at - signalled).as_seconds_f64() * 1e3))
            .unwrap_or_else(|| "-".into());
        tokio::time::sleep(Duration::from_millis(200)).await;
        reading.store(false, Ordering::Relaxed);
        let mut during: Vec<Duration> = gets
            .await??
            .into_iter()
            .filter(|(at, _)| {
                let since = (*at - signalled).as_seconds_f64();
                (0.0..=took.as_secs_f64() + 0.1).contains(&since)
            })
            .map(|(_, d)| d)
            .collect();
        during.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{n:>9}  {in_effect:>12}  {:>10.0}  {updated:>9}  {:>28}",
            ms(took),
            p50_p99_max(&during),
        );
    }
    Ok(())
}

/// 7. **Link flap**: 10,000 rated sessions (`QOD_BENCH_FLAP` for another count; both interfaces
///    scheduled, so each holds a class on each) are created over 64 connections; then the
///    device-side edge link goes down (every session ends NETWORK_TERMINATED, each parking its
///    two classes) and up again. Reported: the time from the link going down to qodd's line
///    saying the sessions ended, how many, and GetSession of one of them every 2 ms from the
///    link going down to that line: p50 / p99 / max; beside it the same reads while the
///    sessions were created (a create storm growing both trees to 10,000 classes).
///    `QOD_BENCH_SHOW_LOG=1` prints the reads over 2 ms and qodd's log.
async fn linkflap() -> anyhow::Result<()> {
    println!("\nlink flap (release qodd, both interfaces scheduled, rated sessions)");
    println!(
        "{:>9}  {:>9}  {:>9}  {:>28}  {:>32}",
        "sessions",
        "ended in ms",
        "ended",
        "GetSession p50/p99/max ms",
        "the same while they were created"
    );
    let n: usize = std::env::var("QOD_BENCH_FLAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (interfaces, profile, extra) = mode_setup("scheduled");
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let lab = Lab::new()?;
    let qodd = Qodd::start_bin(&release_qodd(), &lab.edge, &interfaces, &extra).await?;
    // One session read every 2 ms from the start: while the others are created (each makes a
    // class on both interfaces, a tree growing to `n` classes each) and through the flap.
    let mut reader = Client::connect("grpc", &lab, &qodd).await?;
    let watched = reader.create("10.127.0.1", profile).await?;
    let reading = Arc::new(AtomicBool::new(true));
    let gets = read_meanwhile(reader, watched, reading.clone());
    let creating = time::OffsetDateTime::now_utc();
    let per = n.div_ceil(64);
    let mut tasks = Vec::new();
    for c in 0..64u32 {
        let mut api = Client::connect("grpc", &lab, &qodd).await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per as u32 {
                let ip = std::net::Ipv4Addr::from(0x0a80_0000 + (c << 16) + i);
                api.create(&ip.to_string(), profile).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let created = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let down = time::OffsetDateTime::now_utc();
    let t = Instant::now();
    lab.edge.ip(&["link", "set", EDGE_DEV_IF, "down"])?;
    let (took, ended) =
        await_log_field(&qodd, t, "sessions ended by the link loss", "ended").await?;
    lab.edge.ip(&["link", "set", EDGE_DEV_IF, "up"])?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    reading.store(false, Ordering::Relaxed);
    let gets = gets.await??;
    // The slow reads and qodd's lines of the flap, to see what they waited for.
    if std::env::var_os("QOD_BENCH_SHOW_LOG").is_some() {
        for (at, d) in gets.iter().filter(|(_, d)| *d > Duration::from_millis(2)) {
            eprintln!("GetSession at {at} took {d:?}");
        }
        eprintln!("link down at {down}\n{}", qodd.log());
    }
    let between = |from: time::OffsetDateTime, to: time::OffsetDateTime| {
        let mut v: Vec<Duration> = gets
            .iter()
            .filter(|(at, _)| (from..=to).contains(at))
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        v
    };
    let during = between(down, down + took + Duration::from_millis(100));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:>9}  {:>9.0}  {ended:>9}  {:>28}  {:>32}",
        per * 64 + 1,
        ms(took),
        p50_p99_max(&during),
        p50_p99_max(&between(creating, created)),
    );
    Ok(())
}

/// `VmRSS` and `VmHWM` (the high-water mark) of `qodd`, MiB.
/// CPU time a process has used (user and system), seconds.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let stat = pid
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .unwrap_or_default();
    // After the command's closing parenthesis: fields 3 on; utime and stime are 14 and 15.
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

fn rss_hwm_mib(qodd: &Qodd) -> (f64, f64) {
    let status = qodd
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The kernel's slab and per-CPU memory (`/proc/meminfo` `Slab` + `Percpu`), MiB: what maps
/// and their entries take (the whole machine's, so read as a difference between two points).
fn kernel_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    ["Slab:", "Percpu:"]
        .iter()
        .filter_map(|name| {
            info.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

/// 8. **Memory at scale**: qodd's resident memory and high-water mark with 0, 100,000 and
///    1,000,000 live QOS_E sessions (`QOD_BENCH_SCALE` for other counts) read back at start
///    (maps sized `max_sessions` = N + 1,024, as an operator would), and the kernel's slab and
///    per-CPU memory beside an idle qodd of the same map size; per session: each divided by N.
async fn scale() -> anyhow::Result<()> {
    println!("\nmemory at scale (release qodd, marking, QOS_E sessions read back at start)");
    println!(
        "{:>9}  {:>8}  {:>8}  {:>11}  {:>13}  {:>15}  {:>15}",
        "sessions",
        "RSS MiB",
        "HWM MiB",
        "kernel MiB",
        "RSS B/session",
        "HWM B/session",
        "kernel B/session"
    );
    let counts: Vec<u32> = std::env::var("QOD_BENCH_SCALE")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 100_000, 1_000_000]);
    for n in counts {
        let lab = Lab::new()?;
        let mut qodd = Qodd::start_bin(
            &release_qodd(),
            &lab.edge,
            &[EDGE_DEV_IF, EDGE_SRV_IF],
            &format!("max_sessions = {}\n", n + 1024),
        )
        .await?;
        qodd.start_timeout = Duration::from_secs(1200);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle_rss, _) = rss_hwm_mib(&qodd);
        let idle_kernel = kernel_mib();
        qodd.kill9();
        qod_testkit::fill_store(&qodd.dir.path().join("state"), n, "QOS_E")?;
        qodd.restart().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss, hwm) = rss_hwm_mib(&qodd);
        let kernel = kernel_mib() - idle_kernel;
        let per = |mib: f64| {
            if n == 0 {
                "-".to_owned()
            } else {
                format!("{:.0}", mib * 1048576.0 / f64::from(n))
            }
        };
        println!(
            "{n:>9}  {rss:>8.0}  {hwm:>8.0}  {kernel:>11.0}  {:>13}  {:>15}  {:>15}",
            per(rss - idle_rss),
            per(hwm - idle_rss),
            per(kernel),
        );
    }
    Ok(())
}

/// Creates through a cluster beside the single node (`cargo xtask bench cluster`): a real
/// three-member etcd cluster (TLS, client certificates) in a namespace of its own, and two
/// release qodd nodes on labs of their own, wired to it: `b` serves every device address the
/// clients use, `a` none. C gRPC clients (each its own connection) create QOS_E sessions for
/// distinct devices for 5 s, closed loop, then delete them: *direct* to `b`, then *through a*
/// (each call passed on to `b` with the caller's token: one more TLS hop and `b`'s answer
/// relayed). Both nodes run all along, on the same two vCPUs as etcd and the clients. Then the
/// failover gap to a standby, at two lease lengths.
async fn cluster() -> anyhow::Result<()> {
    println!("\ncreates through a cluster (release qodd, 3 etcd members, 5 s per row)");
    println!(
        "{:>10}  {:>7}  {:>10}  {:>9}  {:>9}  {:>10}  {:>9}",
        "path", "clients", "creates/s", "p50 ms", "p99 ms", "deletes/s", "p99 ms"
    );
    let etcd = qod_testkit::EtcdCluster::start(3)?;
    let limits = "max_sessions = 1000000\n[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\nmax_active_sessions_per_client = 1000000\n";
    let (_a_lab, a) = etcd
        .node(
            &release_qodd(),
            qod_testkit::Mode::Marking,
            "a",
            11,
            &["10.0.200.0/24"],
            limits,
            "",
        )
        .await?;
    let (_b_lab, b) = etcd
        .node(
            &release_qodd(),
            qod_testkit::Mode::Marking,
            "b",
            12,
            &["10.128.0.0/10"],
            limits,
            "",
        )
        .await?;
    // Until a's routing view has b (it reads the registrations every second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut from = 0u32;
    for clients in [1usize, 4, 16, 64] {
        for (path, entry) in [("direct", &b), ("through a", &a)] {
            let mut api_clients = Vec::new();
            for _ in 0..clients {
                api_clients.push(Client::Grpc(QualityOnDemandClient::new(
                    entry.channel().await?,
                )));
            }
            // Each row its own device addresses (the deleted sessions' flows are free again,
            // but a fresh range keeps the rows independent).
            let starts = vec![from; clients];
            let (lat, creating, created) =
                create_phase(api_clients, &starts, None, "QOS_E").await?;
            from += created
                .iter()
                .map(|(_, ids)| ids.len() as u32)
                .max()
                .unwrap_or(0);
            let (del, deleting, _) = delete_phase(created).await?;
            println!(
                "{path:>10}  {clients:>7}  {:>10.0}  {:>9.2}  {:>9.2}  {:>10.0}  {:>9.2}",
                lat.len() as f64 / creating,
                quantile(&lat, 0.50).as_secs_f64() * 1e3,
                quantile(&lat, 0.99).as_secs_f64() * 1e3,
                del.len() as f64 / deleting,
                quantile(&del, 0.99).as_secs_f64() * 1e3,
            );
        }
    }
    // The failover gap: an active node with a standby for the lab device's pool, a marked
    // session, kill -9 of the active; the time until the standby's own lab marks the device's
    // uplink (probes back to back, each about a capture's start and stop). A fresh pair per
    // run; the standby, active after the run, is stopped before the next.
    println!("\nfailover to a standby (kill -9 of the active; the standby's first marked probe)");
    println!("{:>8}  {:>4}  {:>8}", "lease s", "run", "gap s");
    let pools = ["10.0.1.0/24"];
    let mut host = 20u8;
    for lease in [2u64, 5] {
        for run in 0..3 {
            let section = format!("lease_ttl_secs = {lease}");
            let (b_lab, mut active) = etcd
                .node(
                    &release_qodd(),
                    qod_testkit::Mode::Marking,
                    &format!("b{host}"),
                    host,
                    &pools,
                    limits,
                    &section,
                )
                .await?;
            let (d_lab, mut standby) = etcd
                .node(
                    &release_qodd(),
                    qod_testkit::Mode::Marking,
                    &format!("d{host}"),
                    host + 1,
                    &pools,
                    limits,
                    &format!("{section}\nrole = \"standby\""),
                )
                .await?;
            host += 2;
            let mut api = QualityOnDemandClient::new(active.channel().await?);
            qod_testkit::marked_flow(&mut api).await;
            let probe = |lab: &Lab| lab.uplink_dscp(addr::DEVICE_V4, 40000, addr::SERVER_V4, 5000);
            anyhow::ensure!(probe(&b_lab)? == [32; 5], "the active does not mark");
            let killed = Instant::now();
            active.kill9();
            while probe(&d_lab)? != [32; 5] {
                anyhow::ensure!(
                    killed.elapsed() < Duration::from_secs(60),
                    "no takeover:\n{}",
                    standby.log()
                );
            }
            println!(
                "{lease:>8}  {run:>4}  {:>8.2}",
                killed.elapsed().as_secs_f64()
            );
            standby.stop();
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "benchmarks build namespaces and load eBPF: run as root (cargo xtask bench)"
    );
    anyhow::ensure!(
        release_qodd().exists(),
        "release qodd not found at {} (cargo xtask bench builds it)",
        release_qodd().display()
    );
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if wanted("creates") {
        creates().await?;
    }
    if wanted("recovery") {
        recovery().await?;
    }
    if wanted("storm") {
        storm().await?;
    }
    if wanted("openloop") {
        openloop().await?;
    }
    if wanted("watchers") {
        watchers().await?;
    }
    if wanted("reload") {
        reload().await?;
    }
    if wanted("linkflap") {
        linkflap().await?;
    }
    if wanted("scale") {
        scale().await?;
    }
    if wanted("cluster") {
        cluster().await?;
    }
    Ok(())
}
