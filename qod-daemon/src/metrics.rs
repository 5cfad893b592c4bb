//! Prometheus / OpenMetrics metrics, served on `metrics_listen` (off by default) at `/metrics`,
//! with `/readyz` beside it for load balancers.
//!
//! Names follow Prometheus: the `qod_` prefix, base units (seconds, bits per second), `_total`
//! counters. No label carries a session, client or device (cardinality): per-session counters
//! stay on the API. Events counted where they happen (API calls, token refusals, expiry
//! lateness) live in [`METRICS`]; the node's state (sessions, pools, slots, links, store,
//! notifications) is read at scrape time by [`crate::exposition::NodeCollector`].

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `Service/Method` (gRPC), `rest/<operationId>` (REST), or `unknown` for a method qodd
    /// does not serve.
    pub method: String,
    /// The gRPC status code's name, or the HTTP status (REST).
    pub code: String,
    /// The CAMARA reason (`ErrorInfo.reason`), empty on success.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The etcd request: `grant`, `keepalive`, `register`, `read`, `update`, `revoke`.
    pub op: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// What is counted as it happens.
pub struct Metrics {
    pub(crate) registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Histograms<MethodLabels>,
    pub token_refusals: Family<ReasonLabels, Counter>,
    pub expiry_lateness: Histogram,
    pub event_lateness: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_writes_per_commit: Histogram,
    pub etcd_seconds: Histograms<OpLabels>,
    pub etcd_errors: Family<OpLabels, Counter>,
    /// 1 while this node holds a live etcd lease (cluster mode).
    pub cluster_lease_up: Gauge,
    /// Nodes registered in the cluster, as last read.
    pub cluster_nodes: Gauge,
    /// Pools and sessions of a lost active node taken over here (a standby).
    pub cluster_takeovers: Counter,
    /// Sessions of lost nodes without a standby ended here.
    pub cluster_orphans_ended: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let calls = Family::<CallLabels, Counter>::default();
    registry.register(
        "qod_api_requests",
        "API calls by method, gRPC code and CAMARA reason",
        calls.clone(),
    );
    let call_seconds: Histograms<MethodLabels> = Family::new_with_constructor(latency_histogram);
    registry.register_with_unit(
        "qod_api_request_duration",
        "API call latency by method",
        Unit::Seconds,
        call_seconds.clone(),
    );
    let token_refusals = Family::<ReasonLabels, Counter>::default();
    registry.register(
        "qod_token_refusals",
        "calls refused at authentication, by reason",
        token_refusals.clone(),
    );
    let expiry_lateness = latency_histogram();
    registry.register_with_unit(
        "qod_expiry_lateness",
        "how long after its scheduled end a session was ended",
        Unit::Seconds,
        expiry_lateness.clone(),
    );
    let event_lateness = latency_histogram();
    registry.register_with_unit(
        "qod_event_lateness",
        "from an event's time (a session's scheduled end, or the decision) to its announcement to watchers and sinks, once durable",
        Unit::Seconds,
        event_lateness.clone(),
    );
    let store_commit_seconds = latency_histogram();
    registry.register_with_unit(
        "qod_store_commit_duration",
        "how long one store commit (fsync included) took",
        Unit::Seconds,
        store_commit_seconds.clone(),
    );
    let store_writes_per_commit = Histogram::new(exponential_buckets(1.0, 2.0, 12));
    registry.register(
        "qod_store_writes_per_commit",
        "writes that shared one commit (group commit)",
        store_writes_per_commit.clone(),
    );
    let etcd_seconds: Histograms<OpLabels> = Family::new_with_constructor(latency_histogram);
    registry.register_with_unit(
        "qod_cluster_etcd_request_duration",
        "etcd request latency by request (cluster mode)",
        Unit::Seconds,
        etcd_seconds.clone(),
    );
    let etcd_errors = Family::<OpLabels, Counter>::default();
    registry.register(
        "qod_cluster_etcd_errors",
        "etcd requests that failed or timed out, by request",
        etcd_errors.clone(),
    );
    let cluster_lease_up = Gauge::default();
    registry.register(
        "qod_cluster_lease_up",
        "1 while this node holds a live etcd lease (cluster mode)",
        cluster_lease_up.clone(),
    );
    let cluster_nodes = Gauge::default();
    registry.register(
        "qod_cluster_nodes",
        "nodes registered in the cluster, as last read",
        cluster_nodes.clone(),
    );
    let cluster_takeovers = Counter::default();
    registry.register(
        "qod_cluster_takeovers",
        "pools and sessions of a lost active node this standby took over",
        cluster_takeovers.clone(),
    );
    let cluster_orphans_ended = Counter::default();
    registry.register(
        "qod_cluster_orphan_sessions_ended",
        "sessions of lost nodes without a standby this node ended (NETWORK_TERMINATED)",
        cluster_orphans_ended.clone(),
    );
    Metrics {
        registry,
        cluster_takeovers,
        cluster_orphans_ended,
        etcd_seconds,
        etcd_errors,
        cluster_lease_up,
        cluster_nodes,
        calls,
        call_seconds,
        token_refusals,
        expiry_lateness,
        event_lateness,
        store_commit_seconds,
        store_writes_per_commit,
    }
});

/// The `method` label of a request path: `Service/Method` for qodd's own services, health and
/// reflection (`code` decides `unknown`: a method nobody serves is UNIMPLEMENTED).
pub fn method_label(path: &str, code: tonic::Code) -> String {
    let known = [
        "/qod.v1.QualityOnDemand/",
        "/qod.v1.QosProfiles/",
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    if code == tonic::Code::Unimplemented || !known.iter().any(|k| path.starts_with(k)) {
        return "unknown".into();
    }
    path.trim_start_matches('/').to_owned()
}

/// Records one finished REST call: `method` is `rest/<operationId>`, `code` the HTTP status.
pub fn observe_rest(operation: &str, status: u16, reason: &str, elapsed: Duration) {
    observe(
        format!("rest/{operation}"),
        status.to_string(),
        reason.to_owned(),
        elapsed,
    );
}

fn observe(method: String, code: String, reason: String, elapsed: Duration) {
    METRICS
        .calls
        .get_or_create(&CallLabels {
            method: method.clone(),
            code,
            reason,
        })
        .inc();
    METRICS
        .call_seconds
        .get_or_create(&MethodLabels { method })
        .observe(elapsed.as_secs_f64());
}

/// Records one finished API call.
pub fn observe_call(path: &str, status: Option<&tonic::Status>, elapsed: Duration) {
    use tonic_types::StatusExt as _;
    let code = status.map_or(tonic::Code::Ok, tonic::Status::code);
    let reason = status
        .and_then(|s| s.get_details_error_info())
        .map(|i| i.reason)
        .unwrap_or_default();
    observe(
        method_label(path, code),
        format!("{code:?}"),
        reason,
        elapsed,
    );
}
