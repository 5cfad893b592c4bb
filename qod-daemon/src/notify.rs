//! Notifications to a session's `sink`: CloudEvents 1.0 in structured JSON mode, POSTed with the
//! session's bearer token, delivered in the background so a slow or dead sink never delays an API
//! call.
//!
//! Delivery: one bounded input queue ([`Notifier::enqueue`] never waits), one worker per sink
//! origin (events to one sink arrive in the order they happened; a stuck sink holds up only its
//! own server; a client's active sessions may name at most `max_sinks_per_client` origins),
//! a per-attempt timeout, retries with exponential backoff and full jitter for timeouts,
//! connection errors, 408, 429 and 5xx. `410 Gone` stops delivery of that session's events to
//! that sink (other sessions may share the URL and are not cut off); other 4xx
//! drop the event; an expired access token stops delivery for that session.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    model::{QosStatus, SessionId, StatusInfo},
    store::{Op, Store},
};

/// The CAMARA event type (quality-on-demand 1.1.0). CAMARA's own tests use
/// `org.camaraproject.qod.v1.qos-status-changed`; the type is configurable for them.
pub const DEFAULT_EVENT_TYPE: &str = "org.camaraproject.quality-on-demand.v1.qos-status-changed";

/// Which addresses a sink may be reached at. By default any address but loopback, link-local,
/// unspecified, multicast and broadcast (a sink chosen by a client must not reach the node's own
/// services or its link neighbours); `deny` adds ranges to that, and `allow` lets ranges through
/// whatever else says (a lab's loopback sink). Checked on the URL's literal address at create and
/// on every address a host name resolves to, at each connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkAddresses {
    pub allow: Vec<ipnetwork::IpNetwork>,
    pub deny: Vec<ipnetwork::IpNetwork>,
}

impl SinkAddresses {
    /// `Err` names why `ip` is refused.
    pub fn check(&self, ip: std::net::IpAddr) -> Result<(), String> {
        use std::net::IpAddr;
        // An IPv4-mapped IPv6 address reaches the IPv4 host.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        let class = match ip {
            IpAddr::V4(a) if a.is_loopback() => Some("loopback"),
            IpAddr::V4(a) if a.is_link_local() => Some("link-local"),
            IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
            IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
            IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
            IpAddr::V6(a) if a.is_loopback() => Some("loopback"),
            IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local"),
            IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
            IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
            _ => None,
        };
        if let Some(class) = class {
            return Err(format!(
                "{ip} is a {class} address, which a sink may not use"
            ));
        }
        if let Some(n) = self.deny.iter().find(|n| n.contains(ip)) {
            return Err(format!(
                "{ip} is in {n}, which notifications.deny_sink_ranges refuses"
            ));
        }
        Ok(())
    }
}

/// A sink's host resolved to refused addresses only (never retried: the answer is the
/// configuration's, not the network's).
#[derive(Debug)]
struct RefusedAddress(String);

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedAddress {}

/// Resolves a sink's host and keeps only the addresses [`SinkAddresses`] allows, so a name
/// cannot smuggle a refused address past the check made at create.
struct GuardedResolver(SinkAddresses);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let rules = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = None;
            let usable: Vec<_> = all
                .into_iter()
                .filter(|a| match rules.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        why.get_or_insert(e);
                        false
                    }
                })
                .collect();
            if usable.is_empty() {
                let why = why.unwrap_or_else(|| "no address".into());
                return Err(Box::new(RefusedAddress(format!("{host}: {why}")))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Delivery settings.
#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `source` prefix; the event's source is `<source>/sessions/<id>`.
    pub source: String,
    /// Notifications waiting for a worker before new ones are dropped (and counted).
    pub queue: usize,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max`, with full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// What a sink URL may be.
    pub sinks: SinkRules,
}

/// What a sink URL may be: `https://`, or plain `http://` to `http_hosts` (labs), reaching only
/// addresses `addresses` allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkRules {
    pub http_hosts: Vec<String>,
    pub addresses: SinkAddresses,
}

#[cfg(test)]
impl Default for NotifyConfig {
    /// The built-in configuration's (`qodd.toml`).
    fn default() -> Self {
        crate::config::Config::built_in().notify
    }
}

pub use crate::model::Notification;

/// Counters of what delivery did, for logs and tests.
#[derive(Debug, Default)]
pub struct NotifyStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    /// Dropped: queue full, sink gone, token expired, attempts exhausted, or refused by the sink.
    pub dropped: AtomicU64,
    /// Queued and not settled yet.
    pub pending: AtomicU64,
}

/// The sending side, held by the core.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    pub stats: Arc<NotifyStats>,
    /// While `Some`, what is queued waits here instead of going out (see [`Notifier::hold`]).
    held: Held,
    outbox: Option<Store>,
}

/// What delivery shares.
struct Ctx {
    client: reqwest::Client,
    config: NotifyConfig,
    stats: Arc<NotifyStats>,
    /// (sink, session) pairs a sink answered 410 Gone for: that session's events stop there.
    gone: Mutex<HashSet<(String, SessionId)>>,
    shutdown: CancellationToken,
    /// Where undelivered notifications wait across restarts.
    outbox: Option<Store>,
    /// The notifier's hold: a notification about to be sent (or sent again) while it is on
    /// waits there instead.
    held: Held,
}

/// What waits while a [`Notifier`] holds (`None` when it does not).
type Held = Arc<parking_lot::Mutex<Option<Vec<Notification>>>>;

impl Ctx {
    /// Delivery of `n` is over (delivered or given up): it leaves the outbox.
    fn settle(&self, n: &Notification) {
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        if let Some(store) = &self.outbox {
            // Not awaited: if it is lost, the event is delivered again (at least once).
            drop(store.submit(vec![Op::RemoveOutbox(n.event_id)]));
        }
    }
}

impl Notifier {
    /// Starts delivery; it runs until `shutdown` is cancelled and the queue drains. With an
    /// `outbox`, settled notifications are removed from it (the core writes them there).
    pub fn start(
        config: NotifyConfig,
        shutdown: CancellationToken,
        outbox: Option<Store>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(NotifyStats::default());
        let held = Held::default();
        let task = tokio::spawn(dispatch(
            rx,
            config,
            stats.clone(),
            shutdown,
            outbox.clone(),
            held.clone(),
        ));
        (
            Self {
                tx,
                stats,
                held,
                outbox,
            },
            task,
        )
    }

    /// From now on what is queued waits (in the outbox, and here) instead of going out, and so
    /// does what is on its way to a sink when its next attempt comes: a cluster node that
    /// cannot reach etcd does not know whether the cluster is ending its sessions itself, and an
    /// end told by both would reach a sink twice.
    pub fn hold(&self) {
        let mut held = self.held.lock();
        if held.is_none() {
            *held = Some(Vec::new());
        }
    }

    /// What waited goes out, and from now on what is queued goes out at once.
    pub fn release(&self) -> usize {
        let held = self.unhold(false);
        let n = held.len();
        for h in held {
            self.enqueue(h);
        }
        n
    }

    /// What waited is dropped, from the outbox too (the cluster told those ends, or took the
    /// sessions over), and from now on what is queued goes out at once.
    pub fn drop_held(&self) -> usize {
        let held = self.unhold(true);
        if let Some(store) = &self.outbox
            && !held.is_empty()
        {
            drop(store.submit(held.iter().map(|n| Op::RemoveOutbox(n.event_id)).collect()));
        }
        held.len()
    }

    /// Ends the hold: what waited, logged as released or `dropped`.
    fn unhold(&self, dropped: bool) -> Vec<Notification> {
        let held = self.held.lock().take().unwrap_or_default();
        if !held.is_empty() {
            info!(
                notifications = held.len(),
                dropped,
                "notifications held while out of touch with etcd: released, or dropped (told elsewhere)"
            );
        }
        held
    }

    /// Queues `n` without ever waiting; when the queue is full it stays in the outbox only (and
    /// goes out after the next start). While held, it waits (one already on its way waits at
    /// its next attempt, in `deliver_once`).
    pub fn enqueue(&self, n: Notification) {
        let n = {
            let mut held = self.held.lock();
            match held.as_mut() {
                Some(waiting) => {
                    waiting.push(n);
                    return;
                }
                None => n,
            }
        };
        // Counted before it is sent: delivery may settle it before `try_send` returns.
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(n) {
            Ok(()) => {}
            Err(e) => {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "notification queue full; the event waits in the outbox for the next start");
            }
        }
    }

    /// Waits until every queued notification is settled, or `grace` runs out.
    pub async fn flush(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.stats.pending.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// CAMARA `qosStatus` / `statusInfo` spellings.
/// Tells each sink of `sessions` (another node's, which ended with that node: the cluster had
/// no standby for it) that its session is UNAVAILABLE / NETWORK_TERMINATED: written to this
/// node's outbox first (so it is delivered even across a restart here), then queued. The event
/// id is derived from the session, so the same end told twice (a claimant that died between
/// telling and removing) is one event to a receiver that deduplicates. How many were told.
pub fn terminated_elsewhere(
    sessions: &[crate::store::StoredSession],
    store: &crate::store::Store,
    notifier: &Notifier,
) -> usize {
    let mut told = 0;
    for s in sessions {
        let Some(sink) = &s.request.sink else {
            continue;
        };
        let n = Notification {
            event_id: uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("qod:session:{}:network-terminated", s.id).as_bytes(),
            ),
            time: OffsetDateTime::now_utc(),
            sink: sink.clone(),
            credential: s.request.sink_credential.as_deref().cloned(),
            session_id: s.id,
            status: QosStatus::Unavailable,
            info: Some(crate::model::StatusInfo::NetworkTerminated),
        };
        match store
            .submit(vec![crate::store::Op::PutOutbox(n.clone())])
            .wait()
        {
            Ok(()) => {
                notifier.enqueue(n);
                told += 1;
            }
            Err(e) => {
                warn!(session = %s.id, error = %crate::anyhow_like(&e), "cannot queue the end of a lost node's session")
            }
        }
    }
    told
}

pub fn status_str(s: QosStatus) -> &'static str {
    match s {
        QosStatus::Requested => "REQUESTED",
        QosStatus::Available => "AVAILABLE",
        QosStatus::Unavailable => "UNAVAILABLE",
    }
}

pub fn info_str(i: StatusInfo) -> &'static str {
    match i {
        StatusInfo::DurationExpired => "DURATION_EXPIRED",
        StatusInfo::NetworkTerminated => "NETWORK_TERMINATED",
        StatusInfo::DeleteRequested => "DELETE_REQUESTED",
    }
}

/// The CloudEvent body of `n`.
pub fn cloud_event(n: &Notification, config: &NotifyConfig) -> serde_json::Value {
    let mut data =
        json!({ "sessionId": n.session_id.to_string(), "qosStatus": status_str(n.status) });
    if let Some(info) = n.info {
        data["statusInfo"] = json!(info_str(info));
    }
    json!({
        "id": n.event_id.to_string(),
        "source": format!("{}/sessions/{}", config.source.trim_end_matches('/'), n.session_id),
        "specversion": "1.0",
        "type": config.event_type,
        "time": n.time.format(&Rfc3339).unwrap_or_default(),
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// The IP address a URL names literally (none for a host name, which is checked at each
/// connection by the resolver instead).
pub fn literal_address(url: &url::Url) -> Option<std::net::IpAddr> {
    match url.host() {
        Some(url::Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
        _ => None,
    }
}

/// The origin a sink URL is delivered to (scheme, host, port): one delivery worker each, so a
/// client choosing many paths on one server costs one worker.
pub fn sink_origin(sink: &str) -> String {
    url::Url::parse(sink).map_or_else(|_| sink.to_owned(), |u| u.origin().ascii_serialization())
}

/// Per-sink queue depth; beyond it a sink's new events are dropped.
const SINK_QUEUE: usize = 1_000;

async fn dispatch(
    mut rx: mpsc::Receiver<Notification>,
    config: NotifyConfig,
    stats: Arc<NotifyStats>,
    shutdown: CancellationToken,
    outbox: Option<Store>,
    held: Held,
) {
    // No redirects: a sink could otherwise send the event (and its token) past the https rule.
    let client = match reqwest::Client::builder()
        .timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver(config.sinks.addresses.clone())))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build the HTTP client; notifications disabled");
            return;
        }
    };
    let ctx = Arc::new(Ctx {
        client,
        config,
        stats,
        gone: Mutex::default(),
        shutdown,
        outbox,
        held,
    });
    let mut workers: HashMap<String, mpsc::Sender<Notification>> = HashMap::new();
    while let Some(n) = rx.recv().await {
        let key = (n.sink.clone(), n.session_id);
        if ctx
            .gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            ctx.settle(&n);
            continue;
        }
        // A worker exits when its sink has been idle; start a new one then (also when it closed
        // between the check and the send).
        let worker = workers
            .entry(sink_origin(&n.sink))
            .or_insert_with(|| spawn_worker(ctx.clone()));
        if worker.is_closed() {
            *worker = spawn_worker(ctx.clone());
        }
        let failed = match worker.try_send(n) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Closed(n)) => {
                *worker = spawn_worker(ctx.clone());
                worker.try_send(n).err()
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            // Still in the outbox: it goes out after the next start.
            ctx.stats.pending.fetch_sub(1, Ordering::Relaxed);
            warn!(error = %e, "sink queue full; the event waits in the outbox for the next start");
        }
        workers.retain(|_, w| !w.is_closed());
    }
}

fn spawn_worker(ctx: Arc<Ctx>) -> mpsc::Sender<Notification> {
    let (tx, mut rx) = mpsc::channel::<Notification>(SINK_QUEUE);
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(n)) => deliver(&ctx, n).await,
                Ok(None) => return,
                Err(_) => {
                    // Idle: take no new events, deliver what raced in, then exit (the dispatcher
                    // starts a new worker for the sink's next event).
                    rx.close();
                    while let Ok(n) = rx.try_recv() {
                        deliver(&ctx, n).await;
                    }
                    return;
                }
            }
        }
    });
    tx
}

enum Outcome {
    Delivered,
    Retry(String),
    Stop(String),
}

/// Delivers `n` with retries; settles it unless shutdown interrupted it (then it stays in the
/// outbox for the next start).
async fn deliver(ctx: &Ctx, n: Notification) {
    if deliver_once(ctx, &n).await {
        ctx.settle(&n);
    }
}

/// `true` when delivery is over, `false` when shutdown cut it short.
async fn deliver_once(ctx: &Ctx, n: &Notification) -> bool {
    let (client, config, stats, gone, shutdown) = (
        &ctx.client,
        &ctx.config,
        &*ctx.stats,
        &ctx.gone,
        &ctx.shutdown,
    );
    let body = cloud_event(n, config).to_string();
    let key = (n.sink.clone(), n.session_id);
    for attempt in 1..=config.max_attempts {
        // Held (a cluster node out of touch with etcd): it waits with the rest, unsettled.
        if let Some(waiting) = ctx.held.lock().as_mut() {
            debug!(event = %n.event_id, sink = %n.sink, attempt, "notification held");
            waiting.push(n.clone());
            stats.pending.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let outcome = if gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            Outcome::Stop("the sink answered 410 Gone earlier".into())
        } else if n
            .credential
            .as_ref()
            .is_some_and(|c| c.expires <= OffsetDateTime::now_utc())
        {
            Outcome::Stop("the sink access token has expired".into())
        } else {
            post(client, n, &body, &config.sinks.addresses).await
        };
        match outcome {
            Outcome::Delivered => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                debug!(event = %n.event_id, sink = %n.sink, attempt, "notification delivered");
                return true;
            }
            Outcome::Stop(why) => {
                if why.contains("410") {
                    gone.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
                }
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                info!(event = %n.event_id, sink = %n.sink, reason = %why, "notification not delivered; stopping");
                return true;
            }
            Outcome::Retry(why) if attempt < config.max_attempts => {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(config, attempt);
                debug!(event = %n.event_id, sink = %n.sink, reason = %why, ?delay, "notification failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => {
                        info!(event = %n.event_id, sink = %n.sink, "stopping with a retry pending; the event stays in the outbox");
                        return false;
                    }
                }
            }
            Outcome::Retry(why) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(event = %n.event_id, sink = %n.sink, reason = %why, attempts = attempt, "notification abandoned");
            }
        }
    }
    true
}

async fn post(
    client: &reqwest::Client,
    n: &Notification,
    body: &str,
    addresses: &SinkAddresses,
) -> Outcome {
    // A literal address is never resolved, so it is checked here (the rules may have changed
    // since the create, by a reload or a restart).
    let literal = url::Url::parse(&n.sink)
        .ok()
        .and_then(|u| literal_address(&u));
    if let Some(Err(why)) = literal.map(|ip| addresses.check(ip)) {
        return Outcome::Stop(format!("sink address refused: {why}"));
    }
    let mut req = client
        .post(&n.sink)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/cloudevents+json",
        )
        .body(body.to_owned());
    if let Some(c) = &n.credential {
        req = req.bearer_auth(&c.token);
    }
    match req.send().await {
        Ok(resp) => {
            let s = resp.status();
            if s.is_success() {
                Outcome::Delivered
            } else if s == reqwest::StatusCode::GONE {
                Outcome::Stop("410 Gone".into())
            } else if s.is_server_error()
                || s == reqwest::StatusCode::REQUEST_TIMEOUT
                || s == reqwest::StatusCode::TOO_MANY_REQUESTS
            {
                Outcome::Retry(format!("status {s}"))
            } else {
                Outcome::Stop(format!("status {s}"))
            }
        }
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(cause) = source {
                if let Some(refused) = cause.downcast_ref::<RefusedAddress>() {
                    return Outcome::Stop(format!("sink address refused: {refused}"));
                }
                source = cause.source();
            }
            Outcome::Retry(e.to_string())
        }
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base·2^(attempt-1))], at least
/// 10 ms.
fn backoff(config: &NotifyConfig, attempt: u32) -> Duration {
    let cap = config
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(config.backoff_max);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis).max(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink on loopback that answers 500 until `open` is set, then 204; counts the POSTs.
    async fn gated_sink() -> (String, Arc<AtomicU64>, Arc<std::sync::atomic::AtomicBool>) {
        let hits = Arc::new(AtomicU64::new(0));
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counted, gate) = (hits.clone(), open.clone());
        let app = axum::Router::new().route(
            "/ends",
            axum::routing::post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let open = gate.load(Ordering::SeqCst);
                async move {
                    if open {
                        axum::http::StatusCode::NO_CONTENT
                    } else {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/ends"), hits, open)
    }

    fn end_of_a_session(sink: &str) -> Notification {
        Notification {
            event_id: uuid::Uuid::new_v4(),
            time: OffsetDateTime::now_utc(),
            sink: sink.to_owned(),
            credential: None,
            session_id: SessionId::random(),
            status: QosStatus::Unavailable,
            info: Some(crate::model::StatusInfo::DurationExpired),
        }
    }

    /// What the hold does: a notification being retried when it begins waits at its next
    /// attempt, so does one queued meanwhile; released, they go out; dropped, they never do.
    #[tokio::test]
    async fn held_notifications_wait_then_go_out_or_are_dropped() {
        let (sink, hits, open) = gated_sink().await;
        let config = NotifyConfig {
            backoff_base: Duration::from_millis(300),
            backoff_max: Duration::from_millis(300),
            sinks: SinkRules {
                http_hosts: vec!["127.0.0.1".into()],
                addresses: SinkAddresses {
                    allow: vec!["127.0.0.0/8".parse().expect("net")],
                    deny: vec![],
                },
            },
            ..Default::default()
        };
        let (notifier, _task) = Notifier::start(config, CancellationToken::new(), None);
        let settle = || tokio::time::sleep(Duration::from_millis(900));
        let until_hits = |n: u64| {
            let hits = hits.clone();
            async move {
                for _ in 0..100 {
                    if hits.load(Ordering::SeqCst) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("the sink was not reached {n} times");
            }
        };
        notifier.enqueue(end_of_a_session(&sink));
        until_hits(1).await; // refused: retried after a jittered backoff (10-300 ms)
        notifier.hold();
        // A POST already in flight when the hold began ends (refused); none starts after it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = hits.load(Ordering::SeqCst);
        notifier.enqueue(end_of_a_session(&sink));
        settle().await;
        assert_eq!(
            hits.load(Ordering::SeqCst),
            before,
            "nothing goes out while held"
        );
        assert_eq!(notifier.stats.pending.load(Ordering::SeqCst), 0);
        open.store(true, Ordering::SeqCst);
        assert_eq!(notifier.release(), 2);
        until_hits(before + 2).await;
        settle().await;
        assert_eq!(hits.load(Ordering::SeqCst), before + 2);
        assert_eq!(notifier.stats.delivered.load(Ordering::SeqCst), 2);

        notifier.hold();
        notifier.enqueue(end_of_a_session(&sink));
        assert_eq!(notifier.drop_held(), 1);
        settle().await;
        assert_eq!(
            hits.load(Ordering::SeqCst),
            before + 2,
            "a dropped one never goes out"
        );
        // Not held any more: the next goes out at once.
        notifier.enqueue(end_of_a_session(&sink));
        until_hits(before + 3).await;
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let c = NotifyConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..Default::default()
        };
        for attempt in 1..30 {
            let d = backoff(&c, attempt);
            let cap = Duration::from_millis(100 * (1u64 << (attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            assert!(
                d <= cap.max(Duration::from_millis(10)),
                "attempt {attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn sink_addresses_refuse_local_classes_unless_allowed() {
        let net = |s: &str| s.parse::<ipnetwork::IpNetwork>().expect("net");
        let default = SinkAddresses::default();
        for refused in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                default.check(refused.parse().expect("ip")).is_err(),
                "{refused}"
            );
        }
        for fine in ["192.0.2.10", "10.1.2.3", "2001:db8::1", "fd00::5"] {
            assert!(default.check(fine.parse().expect("ip")).is_ok(), "{fine}");
        }
        let lab = SinkAddresses {
            allow: vec![net("127.0.0.0/8")],
            deny: vec![net("10.0.0.0/8")],
        };
        assert!(lab.check("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(lab.check("::1".parse().expect("ip")).is_err());
        let e = lab
            .check("10.9.9.9".parse().expect("ip"))
            .expect_err("denied");
        assert!(e.contains("deny_sink_ranges"), "{e}");
    }

    #[test]
    fn cloud_event_shape() {
        let n = Notification {
            event_id: uuid::Uuid::nil(),
            time: OffsetDateTime::UNIX_EPOCH,
            sink: "https://sink.example/cb".into(),
            credential: None,
            session_id: "6f1a0e1c-0000-4000-8000-000000000001".parse().expect("id"),
            status: QosStatus::Unavailable,
            info: Some(StatusInfo::DurationExpired),
        };
        let v = cloud_event(
            &n,
            &NotifyConfig {
                source: "https://qod.example/qod/v1/".into(),
                ..Default::default()
            },
        );
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], DEFAULT_EVENT_TYPE);
        assert_eq!(
            v["source"],
            "https://qod.example/qod/v1/sessions/6f1a0e1c-0000-4000-8000-000000000001"
        );
        assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["data"]["qosStatus"], "UNAVAILABLE");
        assert_eq!(v["data"]["statusInfo"], "DURATION_EXPIRED");
    }
}
