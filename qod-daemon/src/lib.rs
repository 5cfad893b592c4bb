//! `qodd`: CAMARA Quality-on-Demand sessions enforced by an eBPF tc classifier.
//!
//! [`run`] is the whole daemon; `main.rs` only parses the command line, validates the
//! configuration and calls it, so tests can drive the same code.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dataplane;
pub mod devkit;
pub mod error;
pub mod exposition;
pub mod links;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod profile;
pub mod store;

use std::{sync::Arc, time::Duration};

use qod_proto::v1::{
    qos_profiles_server::QosProfilesServer, quality_on_demand_server::QualityOnDemandServer,
};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError, Listen},
    core::Core,
    dataplane::{AyaDataPlane, DataPlaneError},
};

/// How long in-flight calls get to finish after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long pending notifications get after that.
const NOTIFY_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("data plane set-up failed")]
    DataPlane(#[from] DataPlaneError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC reflection set-up failed")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    #[error("session store")]
    Store(#[from] store::StoreError),
    #[error(
        "incompatible pinned data plane: {0} (remove it, or set incompatible_pins = \"rebuild\")"
    )]
    IncompatiblePins(String),
    #[error("the REST API's TLS")]
    RestTls(#[from] api::rest::serve::TlsError),
    #[error("cluster")]
    Cluster(#[from] cluster::ClusterError),
    #[error("the classifier's profile table")]
    Profiles(#[from] core::ProfileTableError),
}

/// Re-reads the configuration (file and flags) for a SIGHUP reload.
pub type Reloader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Runs the daemon until `shutdown` completes, then drains and returns. With a `reload`, SIGHUP
/// re-reads the configuration and applies its policy (profiles, pools, device directory); other
/// keys need a restart.
pub async fn run(
    config: Config,
    reload: Option<Reloader>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    dataplane::ensure_bpffs(&config.bpffs)?;
    // The store first: a corrupt one, or one held by another qodd, stops start-up before the
    // data plane is touched.
    let store = store::Store::open_with(&config.state_dir, config.event_log_retention)?;
    let event_log = store.load_events()?;
    // The listeners next (after the store, which no other qodd holds then, so a socket file
    // removed here is not a live one): an address in use stops start-up before the data plane
    // is touched.
    let api_listener = bind_api(&config.listen).await?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let rest_listener =
        match &config.rest {
            Some(rest) => Some(tokio::net::TcpListener::bind(rest.listen).await.map_err(
                |source| RunError::Listen {
                    addr: rest.listen.to_string(),
                    source,
                },
            )?),
            None => None,
        };
    let rest_tls = match (&config.rest, &config.security) {
        (Some(_), config::Security::Secure { tls, .. }) => Some(api::rest::serve::tls_config(tls)?),
        _ => None,
    };
    let token = CancellationToken::new();
    let signal_token = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested; draining");
        notify_service_manager(sd_notify::NotifyState::Stopping);
        signal_token.cancel();
    });
    // A cluster node joins before it touches the data plane: one whose pools clash with
    // another's is refused with the reason and changes nothing here.
    let cluster = match &config.cluster {
        Some(settings) => {
            let me = node_record(&config, settings, cluster::instance_id(&config.state_dir)?);
            match cluster::Cluster::join(settings.clone(), me, token.clone()).await? {
                Some(c) => Some(c),
                // Stopped while waiting for etcd.
                None => return Ok(()),
            }
        }
        None => None,
    };
    // Sessions this node gives up at start, and with them their notifications not yet sent.
    let mut given_up = std::collections::HashSet::new();
    if let Some(c) = &cluster
        && (c.demoted() || c.ended_away())
    {
        // Its sessions were taken over (they live on, installed there) or ended and told by
        // the cluster: none is restored here, and a pinned data plane's rules for them go as
        // orphans.
        let ids = store.session_ids()?;
        // One commit for all of them.
        store
            .submit(ids.iter().copied().map(store::Op::RemoveSession).collect())
            .wait()?;
        given_up.extend(ids.iter().copied());
        info!(
            sessions = ids.len(),
            "sessions left to the cluster: taken over by another node, or ended while this one was away"
        );
    }
    prepare_pins(&config, &store)?;
    let mut dp = AyaDataPlane::load(config.max_sessions, &config.pin_path)?;
    let continuing = dp.reused();
    dp.manage(&config.interfaces, config.attach, config.teardown_on_exit)?;
    let notify_token = CancellationToken::new();
    let (notifier, _delivery) = notify::Notifier::start(
        config.notify.clone(),
        notify_token.clone(),
        Some(store.clone()),
    );
    // Notifications not settled when the last qodd stopped go out first, with their own ids;
    // those of sessions given up to the cluster are dropped: the node that took them over
    // tells what happens to them now, or the cluster told their end already (a session that
    // ended here by its duration while this node was cut off and stopped would be told twice).
    let (outbox, dropped): (Vec<_>, Vec<_>) = store
        .load_outbox()?
        .into_iter()
        .partition(|n| !given_up.contains(&n.session_id));
    if !dropped.is_empty() {
        info!(
            notifications = dropped.len(),
            "notifications of sessions given up to the cluster dropped (told elsewhere)"
        );
        store
            .submit(
                dropped
                    .iter()
                    .map(|n| store::Op::RemoveOutbox(n.event_id))
                    .collect(),
            )
            .wait()?;
    }
    if !outbox.is_empty() {
        info!(
            pending = outbox.len(),
            "delivering notifications left in the outbox"
        );
    }
    for n in outbox {
        notifier.enqueue(n);
    }
    let core = Arc::new(
        Core::new(
            Box::new(dp),
            config.policy.clone(),
            core::Limits {
                max_sessions: config.max_sessions,
                retention: config.unavailable_retention,
                interfaces: config.interfaces.clone(),
                event_log_retention: usize::try_from(config.event_log_retention)
                    .unwrap_or(usize::MAX),
                max_active_per_client: config.limits.max_active_sessions,
                max_sinks_per_client: config.limits.max_sinks,
                policer_burst: config.policer_burst,
            },
            Some(notifier.clone()),
        )?
        .with_store(store.clone()),
    );
    // Revisions carry on from the stored log (before any restored session's end is queued).
    core.restore_log(event_log);
    if let Some(c) = &cluster {
        let counted = core.clone();
        c.count_sessions_with(move || counted.live_sessions());
        let adopting = core.clone();
        c.adopt_with(move |sessions| adopting.adopt(sessions));
        let displaced = core.clone();
        c.displaced_with(move || displaced.relinquish());
        let own = notifier.clone();
        c.notices_with(move |what| match what {
            cluster::Notices::Hold => own.hold(),
            cluster::Notices::Release => drop(own.release()),
            cluster::Notices::Drop => drop(own.drop_held()),
        });
        let (ending_store, ending_notifier) = (store.clone(), notifier.clone());
        c.end_with(move |sessions| {
            notify::terminated_elsewhere(&sessions, &ending_store, &ending_notifier)
        });
        store.mirror_to(c.replicate(token.clone()));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    // Health answers from now on, NOT_SERVING until the store is restored; every other call
    // is refused with UNAVAILABLE until then.
    health
        .set_not_serving::<QualityOnDemandServer<api::SessionService>>()
        .await;
    health
        .set_not_serving::<QosProfilesServer<api::ProfileService>>()
        .await;
    // Reflection v1, and v1alpha for the grpcurl releases that distributions ship.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qod_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    let authenticator = authenticator(&config, &token).await;
    let gate = authenticator.gate();
    gate.store(false, std::sync::atomic::Ordering::SeqCst);
    let connections = listener::fit_descriptors(config.connections);
    // Dead peers are found by HTTP/2 pings; live ones answer them, so a quiet Watch stream
    // stays. Connection counts and silent newcomers are bounded in `listener`.
    let mut server = tonic::transport::Server::builder()
        .max_concurrent_streams(connections.max_streams_per_connection)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));
    if let config::Security::Secure { tls, .. } = &config.security {
        server = server.tls_config(tls.server_config().timeout(connections.handshake_timeout))?;
    }
    let max_message = config.limits.max_message_bytes;
    let ops =
        api::Operations::new(core.clone(), config.notify.sinks.clone()).in_cluster(cluster.clone());
    let installer = ops.installer();
    let rest_app = config.rest.as_ref().map(|rest| {
        let security = match &config.security {
            config::Security::Insecure => api::rest::openapi::Security::None,
            config::Security::Secure { auth, .. } => api::rest::openapi::Security::Bearer {
                issuer: auth.rules.issuer.clone(),
                audience: auth.rules.audience.clone(),
            },
        };
        api::rest::Rest::new(
            ops.clone(),
            authenticator.clone(),
            max_message,
            rest.request_timeout,
            rest.api_root.clone(),
            api::rest::openapi::Documents::new(&security, rest.public_url.clone()),
        )
        .router()
    });
    let sessions = Arc::new(api::SessionService::new(
        ops.clone(),
        token.clone(),
        config.limits.max_watches,
    ));
    // Health stays open for probes; everything else needs a valid token.
    let router = server
        .layer(api::correlator::CorrelatorLayer)
        // Health answers without a token: it gets the same message bound as everything else.
        .add_service(health_service.max_decoding_message_size(max_message))
        .add_service(InterceptedService::new(
            reflection.max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            reflection_v1alpha.max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            api::watch::Route::new(
                QualityOnDemandServer::from_arc(sessions.clone())
                    .max_decoding_message_size(max_message),
                sessions,
                max_message,
            ),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            QosProfilesServer::new(api::ProfileService::new(ops))
                .max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            qod_proto::v1::qod_node_server::QodNodeServer::new(api::node::NodeService {
                core: core.clone(),
                store: store.clone(),
                notify: notifier.stats.clone(),
                attach: config.attach,
                state_dir: config.state_dir.clone(),
                started: std::time::Instant::now(),
                cluster: cluster.clone(),
            })
            .max_decoding_message_size(max_message),
            authenticator,
        ));

    let stop = token.clone().cancelled_owned();
    let server = match api_listener {
        Bound::Tcp(listener) => {
            info!(listen = %config.listen, max_connections = connections.max_connections, "qodd listening");
            tokio::spawn(router.serve_with_incoming_shutdown(
                listener::incoming(listener, connections, token.clone()),
                stop,
            ))
        }
        Bound::Unix(listener) => {
            info!(listen = %config.listen, max_connections = connections.max_connections, "qodd listening");
            tokio::spawn(router.serve_with_incoming_shutdown(
                listener::incoming(listener, connections, token.clone()),
                stop,
            ))
        }
    };

    let rest_server = match (rest_listener, rest_app, &config.rest) {
        (Some(listener), Some(app), Some(rest)) => {
            info!(listen = %rest.listen, api_root = %rest.api_root, "CAMARA REST API listening");
            Some(tokio::spawn(api::rest::serve::serve(
                listener,
                app,
                rest_tls,
                connections,
                rest.request_timeout,
                token.clone(),
                DRAIN_GRACE,
            )))
        }
        _ => None,
    };

    {
        let (restoring, store) = (core.clone(), store.clone());
        let n =
            match tokio::task::spawn_blocking(move || restoring.restore_from(&store, continuing))
                .await
            {
                Ok(read) => read?,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
        info!(
            sessions = n,
            continuing, "session store loaded (continuing: the pinned data plane carried on)"
        );
        // The verifier ran beside the restore; the classifier treats from here (continuing,
        // the pinned links carried the last program until now).
        let attaching = core.clone();
        match tokio::task::spawn_blocking(move || attaching.attach_managed()).await {
            Ok(attached) => attached?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    // Health says SERVING before the gate opens: a call let through means health says so too.
    health
        .set_serving::<QualityOnDemandServer<api::SessionService>>()
        .await;
    health
        .set_serving::<QosProfilesServer<api::ProfileService>>()
        .await;
    // Creates handed over through etcd are installed from now on (after the restore: one
    // installed before a crash is found here, not installed twice), and the clients' quota
    // entries follow the ledger (before any call can take a place).
    if let Some(c) = &cluster {
        c.install_with(installer);
        // The clients' quota entries of this node, as restored.
        let (usage, clients, holds) = (core.clone(), core.clone(), core.clone());
        c.ledger_with(cluster::quota::Ledger {
            usage: Box::new(move |client| usage.client_usage(client)),
            clients: Box::new(move || clients.clients()),
            holds: Box::new(move |id| holds.holds(id)),
        });
        c.resync_quotas();
        c.set_ready();
    }
    gate.store(true, std::sync::atomic::Ordering::SeqCst);
    info!("qodd ready");
    // The store is restored and the API serves: tell systemd (Type=notify), if it started us.
    notify_service_manager(sd_notify::NotifyState::Ready);
    let expiry = tokio::spawn(core.clone().run_expiry(token.clone()));
    // Continuing over the pinned maps: the kernel entries no restored session accounts for go
    // now, beside the API (checking a million entries takes most of a second).
    {
        let reconciling = core.clone();
        let check = tokio::task::spawn_blocking(move || reconciling.remove_orphans());
        tokio::spawn(async move {
            if let Err(e) = check.await {
                tracing::error!(error = %e, "looking for orphaned kernel entries failed");
            }
        });
    }
    if let Some(listener) = metrics_listener {
        let collector = exposition::NodeCollector {
            core: core.clone(),
            store: store.clone(),
            notify: notifier.stats.clone(),
        };
        exposition::serve(listener, collector, token.clone());
    }
    tokio::spawn(links::watch(
        core.clone(),
        config.interfaces.iter().map(|i| i.name.clone()).collect(),
        config.link_resync,
        token.clone(),
    ));
    if let Some(reload) = reload {
        tokio::spawn(reload_on_sighup(core.clone(), reload, token.clone()));
    }

    token.cancelled().await;
    let served = match tokio::time::timeout(DRAIN_GRACE, server).await {
        Ok(Ok(result)) => result.map_err(RunError::from),
        Ok(Err(join)) => {
            warn!(error = %join, "server task ended abnormally");
            Ok(())
        }
        Err(_) => {
            warn!(grace = ?DRAIN_GRACE, "calls still in flight after the grace period; stopping anyway");
            Ok(())
        }
    };
    if let Some(rest) = rest_server {
        let _ = tokio::time::timeout(DRAIN_GRACE, rest).await;
    }
    let _ = expiry.await;
    if let Some(c) = &cluster {
        c.leave(!config.teardown_on_exit).await;
    }
    core.shutdown();
    // Writes queued without waiting (ends, purges) are on disk before qodd exits.
    if let Err(e) = store.flush() {
        warn!(error = %e, "the session store could not be flushed at exit");
    }
    // Notifications in flight get what is left of the grace period; whatever is still pending
    // then stays in the outbox and goes out after the next start.
    if !notifier.flush(NOTIFY_GRACE).await {
        warn!(
            pending = notifier
                .stats
                .pending
                .load(std::sync::atomic::Ordering::Relaxed),
            "notifications still pending at exit; kept in the outbox for the next start"
        );
    }
    notify_token.cancel();
    if let Listen::Unix(path) = &config.listen {
        let _ = std::fs::remove_file(path);
    }
    info!(
        writes = store.writes(),
        commits = store.commits(),
        "qodd stopped (store writes and the commits they shared)"
    );
    served
}

/// What this node tells the cluster about itself.
fn node_record(
    config: &Config,
    settings: &cluster::Settings,
    instance: String,
) -> cluster::node::NodeRecord {
    cluster::node::NodeRecord {
        v: cluster::node::RECORD_VERSION,
        id: settings.node_id.clone(),
        instance,
        role: settings.role,
        pools: settings.pools.clone(),
        advertise: settings.advertise.clone(),
        interfaces: config
            .interfaces
            .iter()
            .map(|i| cluster::node::InterfaceRecord {
                name: i.name.clone(),
                capacity_bps: i.scheduler.map_or(0, |s| s.capacity_bps),
            })
            .collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        sessions: 0,
        took_over: None,
    }
}

/// The API's bound socket.
enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Binds the API's address; a socket file left by a previous run is replaced.
async fn bind_api(listen: &Listen) -> Result<Bound, RunError> {
    match listen {
        Listen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Bound::Tcp)
            .map_err(|source| RunError::Listen {
                addr: addr.to_string(),
                source,
            }),
        Listen::Unix(path) => {
            let err = |source| RunError::Listen {
                addr: format!("unix:{}", path.display()),
                source,
            };
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                std::fs::remove_file(path).map_err(err)?;
            }
            tokio::net::UnixListener::bind(path)
                .map(Bound::Unix)
                .map_err(err)
        }
    }
}

/// Sends `state` to the service manager named by `NOTIFY_SOCKET`, if any (systemd's
/// `Type=notify` readiness protocol).
fn notify_service_manager(state: sd_notify::NotifyState<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, &[state]) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// The boot this host runs in (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Decides what happens to a data plane pinned by a previous qodd: reused as it is when it has
/// this layout and capacity and was made in this boot; otherwise removed (rebuilt from the
/// store) or, if configured, start-up is refused. Records this boot in the store.
fn prepare_pins(config: &Config, store: &store::Store) -> Result<(), RunError> {
    let boot = boot_id();
    let last = store.boot_id()?;
    let rebooted = last.as_deref().is_some_and(|b| b != boot);
    match dataplane::inspect_pins(&config.pin_path, config.max_sessions) {
        dataplane::Pinned::Nothing => {
            if rebooted {
                info!("the host rebooted since the store was written; rebuilding from the store");
            }
        }
        dataplane::Pinned::Compatible if !rebooted => {
            info!(pins = %config.pin_path.display(), "reusing the pinned data plane; installed sessions kept their treatment");
        }
        dataplane::Pinned::Compatible => {
            // Kernel times in the maps belong to another boot's clock.
            warn!(pins = %config.pin_path.display(), "the store was written in another boot; discarding the pinned data plane and rebuilding from the store");
            dataplane::remove_pins(&config.pin_path)?;
        }
        dataplane::Pinned::Incompatible(why) => match config.incompatible_pins {
            config::IncompatiblePins::Refuse => {
                return Err(RunError::IncompatiblePins(why));
            }
            config::IncompatiblePins::Rebuild => {
                warn!(reason = %why, "incompatible pinned data plane removed; rebuilding from the store (treatment pauses until sessions are restored)");
                dataplane::remove_pins(&config.pin_path)?;
            }
        },
    }
    store.set_boot_id(&boot)?;
    Ok(())
}

/// The call authenticator: token verification with its key set (kept fresh in the background)
/// and the per-client rate, or the loud insecure mode.
async fn authenticator(config: &Config, stop: &CancellationToken) -> auth::Authenticator {
    let config::Security::Secure { auth: settings, .. } = &config.security else {
        warn!(
            "INSECURE MODE (--insecure): no TLS and no access tokens; any process that reaches {:?} can create, read and delete every session. Labs only.",
            config.listen
        );
        return auth::Authenticator::new(None, &config.limits);
    };
    let keys = match auth::jwt::fetch(&settings.jwks)
        .await
        .and_then(|t| auth::jwt::parse_jwks(&t, &settings.rules.algorithms))
    {
        Ok(keys) => keys,
        Err(e) => {
            // Fail closed: every token is refused until a refresh succeeds.
            warn!(source = %settings.jwks, error = %e, "no usable JWKS yet; all calls are refused until it loads");
            auth::jwt::KeySet::empty()
        }
    };
    if keys.kids().any(|k| k.starts_with(devkit::DEV_KID_PREFIX)) {
        warn!(
            "the JWKS trusts a DEV-ONLY signing key made by `qodctl dev`; never use it in production"
        );
    }
    info!(source = %settings.jwks, keys = keys.len(), issuer = %settings.rules.issuer, "access tokens required");
    let empty = keys.is_empty();
    let verifier = Arc::new(auth::Verifier::new(settings.rules.clone(), keys));
    if empty {
        verifier.request_refresh();
    }
    tokio::spawn(verifier.clone().refresh_loop(
        settings.jwks.clone(),
        settings.jwks_refresh,
        stop.clone(),
    ));
    auth::Authenticator::new(Some(((**settings).clone(), verifier)), &config.limits)
}

/// Applies the policy of a re-read configuration on every SIGHUP; a bad file is logged and the
/// running policy kept.
async fn reload_on_sighup(core: Arc<Core>, reload: Reloader, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; configuration reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            () = stop.cancelled() => return,
        }
        // Reading the files and sweeping the live sessions block: off the async workers, so
        // the API they serve goes on meanwhile.
        let (core, reload) = (core.clone(), reload.clone());
        let done = tokio::task::spawn_blocking(move || match reload() {
            Ok(config) => core.reload(config.policy),
            Err(e) => {
                warn!(error = %anyhow_like(&e), "configuration reload refused; keeping the running one")
            }
        });
        if let Err(e) = done.await {
            tracing::error!(error = %e, "the configuration reload failed");
        }
    }
}

/// `error: cause: cause` without pulling anyhow into the library.
pub(crate) fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
