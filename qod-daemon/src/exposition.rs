//! The node's `/metrics` and `/readyz` endpoint: qodd's own instruments (`crate::metrics`) and
//! what the core, the data plane, the store and delivery report, rendered as OpenMetrics.

use std::{
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{core::Core, metrics::METRICS, notify::NotifyStats, store::Store};

/// The node's state, read on each scrape.
pub struct NodeCollector {
    pub core: Arc<Core>,
    pub store: Store,
    pub notify: Arc<NotifyStats>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

fn gauge<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        unit,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in values {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge1(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let v = ConstGauge::new(i(value));
    v.encode(encoder.encode_descriptor(name, help, None, v.metric_type())?)
}

/// A counter without labels.
fn counter1(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let v = ConstCounter::new(value);
    v.encode(encoder.encode_descriptor(name, help, None, v.metric_type())?)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.core.node_stats();
        gauge(
            &mut e,
            "qod_build_info",
            "qodd's version",
            None,
            [(vec![("version", env!("CARGO_PKG_VERSION"))], 1)],
        )?;
        gauge(
            &mut e,
            "qod_sessions",
            "sessions held, by status and profile",
            None,
            stats.sessions.iter().map(|((status, profile), n)| {
                (
                    vec![
                        ("status", (*status).to_owned()),
                        ("profile", profile.clone()),
                    ],
                    i(*n),
                )
            }),
        )?;
        gauge1(
            &mut e,
            "qod_session_slots_used",
            "kernel map slots (counters and rules) held by AVAILABLE sessions",
            stats.slots_used,
        )?;
        gauge1(
            &mut e,
            "qod_session_slots_capacity",
            "kernel map slots (max_sessions)",
            stats.slots_capacity,
        )?;
        gauge(
            &mut e,
            "qod_admission_reserved_bits_per_second",
            "rate reserved by sessions, per scheduled interface and pool",
            None,
            stats.pools.iter().map(|p| {
                (
                    vec![
                        ("interface", p.interface.clone()),
                        ("pool", p.pool.to_owned()),
                    ],
                    i(p.reserved_bps),
                )
            }),
        )?;
        gauge(
            &mut e,
            "qod_admission_capacity_bits_per_second",
            "rate a pool may reserve, per scheduled interface and pool",
            None,
            stats.pools.iter().map(|p| {
                (
                    vec![
                        ("interface", p.interface.clone()),
                        ("pool", p.pool.to_owned()),
                    ],
                    i(p.capacity_bps),
                )
            }),
        )?;
        gauge(
            &mut e,
            "qod_link_up",
            "managed interface usable (1) or down / gone (0)",
            None,
            stats
                .links
                .iter()
                .map(|(name, up)| (vec![("interface", name.clone())], i64::from(*up))),
        )?;
        gauge(
            &mut e,
            "qod_scheduler_session_classes",
            "per-session scheduler classes held by AVAILABLE sessions, per scheduled interface",
            None,
            stats
                .session_classes
                .iter()
                .map(|(name, n)| (vec![("interface", name.clone())], i(*n))),
        )?;
        gauge(
            &mut e,
            "qod_scheduler_parked_classes",
            "per-session scheduler classes no session holds, parked for reuse, per scheduled interface",
            None,
            stats
                .parked_classes
                .iter()
                .map(|(name, n)| (vec![("interface", name.clone())], i(*n))),
        )?;
        let bands = || {
            stats.bands.iter().flat_map(|(name, bands)| {
                bands.iter().enumerate().filter_map(move |(code, c)| {
                    let band = crate::profile::Band::label(code);
                    (band != "unknown").then(|| ((name.clone(), band), c))
                })
            })
        };
        let labels = |(interface, band): (String, &'static str)| {
            vec![("interface", interface), ("band", band.to_owned())]
        };
        let dropped = |(interface, band): (String, &'static str)| {
            vec![
                ("interface", interface),
                ("band", band.to_owned()),
                ("reason", "policer".to_owned()),
            ]
        };
        counter(
            &mut e,
            "qod_classifier_packets",
            "packets of sessions the classifier passed on each managed interface's egress, by band",
            bands().map(|(k, c)| (labels(k), c.packets)),
        )?;
        counter(
            &mut e,
            "qod_classifier_bytes",
            "bytes (skb->len) of sessions the classifier passed on each managed interface, by band",
            bands().map(|(k, c)| (labels(k), c.bytes)),
        )?;
        counter(
            &mut e,
            "qod_classifier_dropped_packets",
            "packets of sessions the classifier dropped, by interface, band and reason",
            bands().map(|(k, c)| (dropped(k), c.policer_dropped_packets)),
        )?;
        counter(
            &mut e,
            "qod_classifier_dropped_bytes",
            "bytes of sessions the classifier dropped, by interface, band and reason",
            bands().map(|(k, c)| (dropped(k), c.policer_dropped_bytes)),
        )?;
        let queues = |f: fn(&crate::dataplane::TcStats) -> u64| {
            stats.queues.iter().flat_map(move |(interface, q)| {
                [
                    ("low_latency", &q.low_latency),
                    ("best_effort", &q.best_effort),
                    ("sessions", &q.sessions),
                ]
                .into_iter()
                .map(move |(queue, s)| {
                    (
                        vec![
                            ("interface", interface.clone()),
                            ("queue", queue.to_owned()),
                        ],
                        f(s),
                    )
                })
            })
        };
        counter(
            &mut e,
            "qod_scheduler_delivered_packets",
            "packets the scheduler sent on (after shaping) per scheduled interface and queue: the shared low-latency band, best effort, and the per-session classes together",
            queues(|s| s.packets),
        )?;
        counter(
            &mut e,
            "qod_scheduler_delivered_bytes",
            "bytes the scheduler sent on, per scheduled interface and queue",
            queues(|s| s.bytes),
        )?;
        counter(
            &mut e,
            "qod_scheduler_dropped_packets",
            "packets dropped because a queue was full, per scheduled interface and queue",
            queues(|s| s.drops),
        )?;
        gauge(
            &mut e,
            "qod_scheduler_backlog_bytes",
            "bytes queued now, per scheduled interface and queue",
            None,
            queues(|s| s.backlog_bytes).map(|(l, v)| (l, i(v))),
        )?;
        gauge(
            &mut e,
            "qod_scheduler_backlog_packets",
            "packets queued now, per scheduled interface and queue",
            None,
            queues(|s| s.backlog_packets).map(|(l, v)| (l, i(v))),
        )?;
        let parse = |reason: &'static str, f: fn(&qod_common::ParseCounters) -> u64| {
            stats.parse.iter().map(move |(i, c)| {
                (
                    vec![("interface", i.clone()), ("reason", reason.to_owned())],
                    f(c),
                )
            })
        };
        counter(
            &mut e,
            "qod_classifier_unparsed_packets",
            "packets whose ports the classifier could not read, so only sessions without ports could match them: an IPv6 extension chain longer than it walks, or a later fragment of a datagram whose first fragment matched no session (or was forgotten)",
            parse("ipv6_extension_chain", |c| c.ipv6_chain_too_long)
                .chain(parse("fragment_ports_unknown", |c| c.fragments_unknown)),
        )?;
        counter(
            &mut e,
            "qod_classifier_fragments",
            "fragments of sessions' datagrams: first fragments whose ports were remembered, later fragments given them",
            parse("remembered", |c| c.fragments_remembered)
                .chain(parse("followed", |c| c.fragments_followed)),
        )?;
        {
            use crate::listener::CONNECTIONS as c;
            gauge1(
                &mut e,
                "qod_api_connections_open",
                "API connections held (each takes a place of limits.max_connections)",
                c.open.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "qod_api_connections_refused",
                "API connections closed at once or before their first call, by reason",
                [
                    ("max_connections", &c.refused_total),
                    ("max_connections_per_peer", &c.refused_per_peer),
                    ("handshake_timeout", &c.handshake_timeouts),
                ]
                .map(|(reason, v)| (vec![("reason", reason)], v.load(Ordering::Relaxed))),
            )?;
            counter1(
                &mut e,
                "qod_api_accept_errors",
                "failed accepts (EMFILE, ENFILE...): qodd backs off and carries on",
                c.accept_errors.load(Ordering::Relaxed),
            )?;
        }
        counter1(
            &mut e,
            "qod_store_records_set_aside",
            "stored records that could not be read at start, moved to the store's set_aside_v1 table (the rest loaded)",
            crate::store::SET_ASIDE_RECORDS.load(Ordering::Relaxed),
        )?;
        counter1(
            &mut e,
            "qod_store_records_migrated",
            "stored records of an older schema rewritten in the current one at start",
            crate::store::MIGRATED_RECORDS.load(Ordering::Relaxed),
        )?;
        counter1(
            &mut e,
            "qod_link_read_failures",
            "times the link state could not be read (never counted as a link loss)",
            crate::links::LINK_READ_FAILURES.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "qod_notifications",
            "notification deliveries to sinks, by outcome",
            [
                ("delivered", &self.notify.delivered),
                ("retried", &self.notify.retried),
                ("dropped", &self.notify.dropped),
            ]
            .map(|(outcome, v)| (vec![("outcome", outcome)], v.load(Ordering::Relaxed))),
        )?;
        gauge1(
            &mut e,
            "qod_notifications_pending",
            "notifications queued or in flight (also kept in the store's outbox)",
            self.notify.pending.load(Ordering::Relaxed),
        )?;
        counter1(
            &mut e,
            "qod_store_writes",
            "session store writes",
            self.store.writes(),
        )?;
        counter1(
            &mut e,
            "qod_store_commits",
            "session store commits (writes share commits: group commit)",
            self.store.commits(),
        )?;
        Ok(())
    }
}

/// The whole exposition: counted metrics, then the node's state.
pub fn render(node: &Registry) -> String {
    let mut out = String::new();
    if text::encode_registry(&mut out, &METRICS.registry).is_err()
        || text::encode_registry(&mut out, node).is_err()
        || text::encode_eof(&mut out).is_err()
    {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

/// Serves `/metrics` and `/readyz` on `listener` until `stop`.
pub fn serve(listener: tokio::net::TcpListener, collector: NodeCollector, stop: CancellationToken) {
    use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get};
    let core = collector.core.clone();
    let mut node = Registry::default();
    node.register_collector(Box::new(collector));
    let node = Arc::new(node);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(node): State<Arc<Registry>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&node),
                )
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let core = core.clone();
                async move {
                    match core.not_ready() {
                        None => (StatusCode::OK, "ready\n".to_owned()).into_response(),
                        Some(why) => {
                            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
                        }
                    }
                }
            }),
        )
        .with_state(node);
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    info!(listen = %addr, "metrics served at /metrics, readiness at /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            warn!(error = %e, "the metrics server stopped");
        }
    });
}
