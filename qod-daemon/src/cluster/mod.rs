//! Cluster mode: qodd nodes on one etcd cluster (`[cluster]` in the config).
//!
//! Membership: each node registers `<prefix>nodes/<id>` (a [`node::NodeRecord`]) under an etcd
//! lease it keeps alive. A join is a compare-and-swap on `<prefix>members`, whose revision every
//! join bumps: a node reads the registrations, checks [`node::may_join`] against them, and writes
//! its own only if no other join came in between, so two nodes racing with clashing pools cannot
//! both get in. A node whose lease lapses (it did not reach etcd for a whole TTL) is gone from
//! the cluster; it joins again, checked again, when etcd answers.
//!
//! Every etcd request has a deadline (`etcd_timeout_ms`) and is timed and counted in the
//! metrics (`qod_cluster_etcd_*`).

pub mod node;
pub mod peer;
pub mod pending;
pub mod quota;
pub mod seal;

use std::{
    path::Path,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::node::{Clash, NodeRecord};
use crate::metrics::{METRICS, OpLabels};
use crate::store::{Mirror, MirrorMsg, Mirrored, StoredSession};

/// A node's role for its pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves its pools.
    Active,
    /// Stands by for the active node with the same pools.
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Standby => "standby",
        }
    }
}

/// The validated `[cluster]` section.
#[derive(Clone)]
pub struct Settings {
    pub etcd: Vec<String>,
    pub node_id: String,
    pub role: Role,
    pub advertise: Vec<String>,
    pub prefix: String,
    pub lease_ttl: Duration,
    pub timeout: Duration,
    pub tls: Option<EtcdTls>,
    /// `ue_pools`: what this node serves.
    pub pools: Vec<IpNetwork>,
    /// What other nodes' API certificates chain to (PEM; `None`: plain HTTP/2, insecure only).
    pub peer_ca: Option<Vec<u8>>,
    /// Seals the cluster's copy of each node's sessions (`record_key_file`).
    pub record_key: [u8; 32],
    /// How long a gracefully stopped node without a standby may stay away before the cluster
    /// ends its sessions.
    pub away_grace: Duration,
    /// How long a create passed on to another node may wait for its answer before it is
    /// handed over through etcd and answered REQUESTED.
    pub install_wait: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("etcd", &self.etcd)
            .field("node_id", &self.node_id)
            .field("role", &self.role)
            .field("advertise", &self.advertise)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .field("pools", &self.pools)
            .field("peer_ca", &self.peer_ca.is_some())
            .field("record_key", &"…")
            .finish()
    }
}

/// TLS towards etcd: the CA its certificates chain to, and a client identity (PEM).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Why cluster membership failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd {op}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("refused by the cluster")]
    Refused(#[from] Clash),
    #[error("etcd lease {0:x} has expired")]
    LeaseExpired(i64),
    #[error("cannot seal the record for {0}")]
    Seal(String),
    #[error("the node instance file {path}")]
    Instance {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// This node's standing in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// The lease held, while registered.
    pub lease: Option<i64>,
    /// Why the node is not registered (etcd unreachable, a clash at re-join), if it is not.
    pub problem: Option<String>,
}

/// One registered node, as read from etcd.
#[derive(Clone, Debug)]
pub struct Member {
    pub record: NodeRecord,
    /// Seconds left on its lease (-1: unknown).
    pub lease_ttl: i64,
}

/// Where `<prefix>nodes/<id>` of every node live.
fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}nodes/")
}

/// The id of this node's process lineage: random, kept in `state_dir` (which one qodd holds at
/// a time, through the store's lock), so a restart recognises its own registration.
pub fn instance_id(state_dir: &Path) -> Result<String, ClusterError> {
    let path = state_dir.join("node-instance");
    let err = |source| ClusterError::Instance {
        path: path.clone(),
        source,
    };
    let create = || {
        let id = uuid::Uuid::new_v4().to_string();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(id)
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Ok(_) => create(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(),
        Err(source) => Err(err(source)),
    }
}

/// What a cluster node's own notifications do (see [`Cluster::notices_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notices {
    /// Wait: the node cannot tell whether the cluster is ending its sessions itself.
    Hold,
    /// Go out, those that waited too.
    Release,
    /// Those that waited were told elsewhere (or their sessions live on elsewhere): drop them.
    Drop,
}

/// A node's membership of the cluster: its etcd client, its registration and the lease under
/// it, kept alive in the background until [`Cluster::leave`].
pub struct Cluster {
    settings: Settings,
    client: Client,
    me: parking_lot::Mutex<NodeRecord>,
    standing: watch::Sender<Standing>,
    /// Live sessions of this node, published in its record.
    sessions: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// The registered nodes as last read (every [`VIEW_REFRESH`]): where calls are routed.
    view: parking_lot::RwLock<Vec<NodeRecord>>,
    peers: peer::Peers,
    sealer: seal::Sealer,
    /// Where barriers go, behind the store's mirrored changes (set by [`Cluster::replicate`]).
    mirror: OnceLock<Mirror>,
    /// Installs another node's sessions here (a standby taking over): how many it installed.
    adopt: OnceLock<Box<dyn Fn(Vec<StoredSession>) -> usize + Send + Sync>>,
    /// Joined as a standby because another node took its pools over while it was away.
    demoted: std::sync::atomic::AtomicBool,
    /// Ends the sessions of a lost node that had no standby: each with a sink is told
    /// UNAVAILABLE / NETWORK_TERMINATED once; how many were told.
    end: OnceLock<Box<dyn Fn(Vec<StoredSession>) -> usize + Send + Sync>>,
    /// The cluster ended this node's sessions while it was away (it had no standby).
    ended_away: std::sync::atomic::AtomicBool,
    /// Gives this node's sessions up silently (back from a partition to find them taken over or
    /// ended): how many live ones it held.
    displaced: OnceLock<Arc<dyn Fn() -> usize + Send + Sync>>,
    notices: OnceLock<Box<dyn Fn(Notices) + Send + Sync>>,
    /// Installs the creates handed over to this node through etcd (`pending`).
    install: OnceLock<pending::Installer>,
    /// This node's side of the per-client quotas (`quota`).
    quotas: quota::Book,
    /// The node has restored its sessions and set its hooks: it may take sessions over, end a
    /// lost node's and install handed-over creates.
    ready: std::sync::atomic::AtomicBool,
}

/// Changes written to etcd in one transaction at most (up to two operations each; etcd allows
/// 128).
const REPLICA_BATCH: usize = 60;

/// How often the registrations are read again for routing.
const VIEW_REFRESH: Duration = Duration::from_secs(1);

impl Cluster {
    /// Connects to etcd and registers `me`, retrying while etcd cannot be reached (until
    /// `stop`), and returns once registered; a clash with the registered nodes is final. Then
    /// keeps the lease alive until `stop`.
    pub async fn join(
        settings: Settings,
        me: NodeRecord,
        stop: CancellationToken,
    ) -> Result<Option<Arc<Self>>, ClusterError> {
        let client = loop {
            match connect(&settings).await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %crate::anyhow_like(&e), endpoints = ?settings.etcd, "cannot reach etcd; retrying");
                    if pause(&stop, settings.lease_ttl / 4).await {
                        return Ok(None);
                    }
                }
            }
        };
        let (standing, _) = watch::channel(Standing::default());
        let peers = peer::Peers::new(
            settings.node_id.clone(),
            settings.peer_ca.clone(),
            settings.timeout,
        );
        let sealer = seal::Sealer::new(&settings.record_key);
        let cluster = Arc::new(Self {
            settings,
            client,
            me: parking_lot::Mutex::new(me),
            standing,
            sessions: OnceLock::new(),
            view: parking_lot::RwLock::new(Vec::new()),
            peers,
            sealer,
            mirror: OnceLock::new(),
            adopt: OnceLock::new(),
            demoted: std::sync::atomic::AtomicBool::new(false),
            end: OnceLock::new(),
            ended_away: std::sync::atomic::AtomicBool::new(false),
            displaced: OnceLock::new(),
            notices: OnceLock::new(),
            install: OnceLock::new(),
            quotas: quota::Book::default(),
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        cluster.run_quotas(stop.clone());
        loop {
            match cluster.register().await {
                Ok(lease) => {
                    cluster.set_standing(Some(lease), None);
                    break;
                }
                Err(ClusterError::Refused(clash)) => return Err(clash.into()),
                Err(e) => {
                    warn!(error = %crate::anyhow_like(&e), "cannot join the cluster; retrying");
                    cluster.set_standing(None, Some(crate::anyhow_like(&e)));
                    if pause(&stop, cluster.settings.lease_ttl / 4).await {
                        return Ok(None);
                    }
                }
            }
        }
        cluster.back().await;
        tokio::spawn(cluster.clone().keep_alive(stop.clone()));
        tokio::spawn(cluster.clone().follow(stop));
        Ok(Some(cluster))
    }

    /// Reads the registrations every [`VIEW_REFRESH`] for routing (a failed read keeps the last
    /// view: the pools of live nodes do not move while etcd is away).
    /// A standby also watches its active: when the active's registration is gone (it stopped,
    /// or its lease lapsed), the standby takes its sessions over; one that never saw its active
    /// looks for a lost one in etcd ([`Self::take_over_a_lost_pair`]).
    async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let mut partner: Option<String> = None;
        while !pause(&stop, VIEW_REFRESH).await {
            if self.records().await.is_err() || self.standing.borrow().lease.is_none() {
                continue;
            }
            // Nothing is taken over, ended or installed before this node's own sessions are
            // restored and its hooks set (a standby started late would otherwise find its lost
            // active before it can install anything, and lose the sessions).
            if !self.ready.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            if let Err(e) = self.track_handed().await {
                warn!(error = %crate::anyhow_like(&e), "cannot read the creates handed over yet");
            }
            let me = self.me.lock().clone();
            if me.role == Role::Active {
                if let Err(e) = self.end_orphans().await {
                    warn!(error = %crate::anyhow_like(&e), "cannot end the sessions of a lost node yet");
                }
                if let Err(e) = self.install_handed().await {
                    warn!(error = %crate::anyhow_like(&e), "cannot install the creates handed over to this node yet");
                }
                continue;
            }
            let active = self
                .view
                .read()
                .iter()
                .find(|n| n.role == Role::Active && node::overlap_any(&n.pools, &me.pools))
                .map(|n| n.id.clone());
            match (active, &partner) {
                (Some(a), _) => partner = Some(a),
                (None, Some(gone)) => {
                    let gone = gone.clone();
                    if self.take_over(&gone).await {
                        partner = None;
                    }
                }
                (None, None) => {
                    // Started after its active was lost: that node's sessions may still wait
                    // in etcd (no active node ended them: none was there, or it had not yet).
                    if let Err(e) = self.take_over_a_lost_pair(&me).await {
                        warn!(error = %crate::anyhow_like(&e), "cannot look for a lost active node of this standby's pools yet");
                    }
                }
            }
        }
    }

    /// For a standby that never saw its active: a node whose copy of its sessions is still in
    /// etcd (`owners/`), with exactly this standby's pools, and no registration any more, is the
    /// lost active of the pair. Its sessions are claimed the way a lost node's are ended (the
    /// `ending/` key, under this node's lease, so an active node ending them at the same moment
    /// and this standby cannot both act), then taken over.
    async fn take_over_a_lost_pair(&self, me: &NodeRecord) -> Result<(), ClusterError> {
        let view = self.view.read().clone();
        let lost = self.owners().await?.into_iter().find_map(|(id, pools)| {
            (id != me.id && node::same_pools(&pools, &me.pools) && !view.iter().any(|n| n.id == id))
                .then_some(id)
        });
        let Some(gone) = lost else {
            return Ok(());
        };
        let Some(claim) = self.claim_ending(&gone).await? else {
            return Ok(());
        };
        info!(node = %gone, "found the lost active node of this standby's pools; taking its sessions over");
        let _ = self.take_over(&gone).await;
        let mut kv = self.client.kv_client();
        self.call("update", kv.delete(claim, None)).await?;
        Ok(())
    }

    /// The `owners/` entries: each node that keeps a copy of its sessions here, with its pools.
    async fn owners(&self) -> Result<Vec<(String, Vec<IpNetwork>)>, ClusterError> {
        let mut kv = self.client.kv_client();
        let owners = self
            .call(
                "read",
                kv.get(
                    self.key("owners", ""),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        Ok(owners
            .kvs()
            .iter()
            .filter_map(|o| {
                let id = String::from_utf8_lossy(o.key())
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let pools: Vec<IpNetwork> = serde_json::from_slice(o.value()).unwrap_or_default();
                (!id.is_empty()).then_some((id, pools))
            })
            .collect())
    }

    /// Claims the sessions of the lost node `gone` for this node (to end them, or take them
    /// over): `ending/<gone>` created under this node's lease, so one node wins and a claim dies
    /// with its claimant. The claim's key when won.
    async fn claim_ending(&self, gone: &str) -> Result<Option<String>, ClusterError> {
        let Some(lease) = self.standing.borrow().lease else {
            return Ok(None);
        };
        let claim = self.key("ending", gone);
        let mut kv = self.client.kv_client();
        let won = self
            .call(
                "update",
                kv.txn(
                    Txn::new()
                        // Unclaimed, and not ended yet: a claimant that finished removed the
                        // node's ownership record before its claim, so a node that listed the
                        // owners before that does not claim (and end nothing) after it.
                        .when([
                            Compare::create_revision(claim.clone(), CompareOp::Equal, 0),
                            Compare::create_revision(
                                self.key("owners", gone),
                                CompareOp::Greater,
                                0,
                            ),
                        ])
                        .and_then([TxnOp::put(
                            claim.clone(),
                            self.settings.node_id.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]),
                ),
            )
            .await?
            .succeeded();
        Ok(won.then_some(claim))
    }

    /// Becomes the active node for the pools of `gone` (whose registration is gone) and
    /// installs its sessions here for their remaining time; true when done.
    async fn take_over(&self, gone: &str) -> bool {
        let started = Instant::now();
        let Some(lease) = self.standing.borrow().lease else {
            return false;
        };
        if self.adopt.get().is_none() {
            // Not ready to install them: nothing taken, for the next look.
            return false;
        }
        {
            let mut me = self.me.lock();
            me.role = Role::Active;
            me.took_over = Some(gone.to_owned());
        }
        if let Err(e) = self.register_under(lease).await {
            {
                let mut me = self.me.lock();
                me.role = Role::Standby;
                me.took_over = None;
            }
            warn!(node = gone, error = %crate::anyhow_like(&e), "cannot take the pools of the lost active node over yet");
            return false;
        }
        let prefix = format!("{}sessions/{gone}/", self.settings.prefix);
        let mut kv = self.client.kv_client();
        let records = match self
            .call(
                "read",
                kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Active now: the next round finds no active and tries again.
                error!(node = gone, error = %crate::anyhow_like(&e), "cannot read the lost node's sessions");
                return false;
            }
        };
        let mut sessions = Vec::with_capacity(records.kvs().len());
        for kv in records.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match self
                .sealer
                .open(&key, kv.value())
                .map_err(|_| "not sealed with this cluster's record key".to_owned())
                .and_then(|plain| crate::store::decode_session_record(&plain))
            {
                Ok((s, _)) => sessions.push(s),
                Err(e) => {
                    warn!(key, error = %e, "a session of the lost node cannot be read; it is left in etcd")
                }
            }
        }
        let found = sessions.len();
        let adopted = self.adopt.get().map_or(0, |adopt| adopt(sessions));
        // They are this node's now: its store holds them, its copy in etcd follows, and so do
        // its clients' quota entries.
        self.drop_quotas_of(gone);
        self.resync_quotas();
        if let Err(e) = self
            .call(
                "update",
                kv.delete(
                    prefix,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            )
            .await
        {
            warn!(node = gone, error = %crate::anyhow_like(&e), "cannot remove the lost node's copy of its sessions");
        }
        let _ = self
            .call("update", kv.delete(self.key("owners", gone), None))
            .await;
        METRICS.cluster_takeovers.inc();
        info!(
            node = gone,
            found,
            adopted,
            took_ms = started.elapsed().as_millis() as u64,
            "took over the pools and sessions of the lost active node"
        );
        true
    }

    /// Back in the cluster at start: no longer away, and told whether the cluster ended its
    /// sessions meanwhile (it had no standby, and stayed away too long or crashed).
    async fn back(&self) {
        let mut kv = self.client.kv_client();
        let me = self.settings.node_id.clone();
        let _ = self
            .call("update", kv.delete(self.key("away", &me), None))
            .await;
        if self.ended_meanwhile().await {
            warn!(
                "the cluster ended this node's sessions while it was away (NETWORK_TERMINATED, notified by another node); none is restored"
            );
            self.ended_away
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether the cluster ended this node's sessions while it was out (its `terminated`
    /// marker, taken away as it is read).
    async fn ended_meanwhile(&self) -> bool {
        let mut kv = self.client.kv_client();
        let marker = self.key("terminated", &self.settings.node_id);
        let ended = self
            .call("read", kv.get(marker.clone(), None))
            .await
            .is_ok_and(|r| !r.kvs().is_empty());
        if ended {
            let _ = self.call("update", kv.delete(marker, None)).await;
        }
        ended
    }

    /// How this node gives its sessions up when, back from a partition, it finds them taken
    /// over or ended by the cluster.
    pub fn displaced_with(&self, f: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.displaced.set(Arc::new(f));
    }

    /// What this node's own notifications do while its standing is in doubt: held from the
    /// first failed keep-alive (the cluster may be ending its sessions itself), released when
    /// etcd answers again or the node is back with its sessions, dropped when it is back to
    /// find them taken over or ended (told elsewhere).
    pub fn notices_with(&self, f: impl Fn(Notices) + Send + Sync + 'static) {
        let _ = self.notices.set(Box::new(f));
    }

    fn notices(&self, n: Notices) {
        if let Some(f) = self.notices.get() {
            f(n);
        }
    }

    /// Back in the cluster after its lease lapsed: if its pools were taken over meanwhile (it
    /// joined as a standby) or its sessions ended, it gives them up, silently; true then.
    async fn check_displaced(&self, was_demoted: bool) -> bool {
        let taken = !was_demoted && self.demoted();
        let ended = self.ended_meanwhile().await;
        if !(taken || ended) {
            return false;
        }
        let Some(f) = self.displaced.get().cloned() else {
            return true;
        };
        let gave_up = tokio::task::spawn_blocking(move || f()).await.unwrap_or(0);
        self.resync_quotas();
        warn!(
            sessions = gave_up,
            taken_over = taken,
            ended_by_cluster = ended,
            "back in the cluster to find this node's sessions taken over or ended meanwhile: given up here, silently (they live on, or were told, elsewhere)"
        );
        true
    }

    /// Whether the cluster ended this node's sessions while it was away.
    pub fn ended_away(&self) -> bool {
        self.ended_away.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Where the sessions of a lost node without a standby are ended (their notifications).
    pub fn end_with(&self, f: impl Fn(Vec<StoredSession>) -> usize + Send + Sync + 'static) {
        let _ = self.end.set(Box::new(f));
    }

    /// Ends the sessions of every node that is gone (its registration lapsed), had no standby
    /// for its pools and is not away on a graceful stop: one node claims each such node (an
    /// etcd key under its own lease, so a claim dies with its claimant), tells each session's
    /// sink once, and removes the copy.
    async fn end_orphans(&self) -> Result<(), ClusterError> {
        let owners = self.owners().await?;
        let mut kv = self.client.kv_client();
        let away = self
            .call(
                "read",
                kv.get(
                    self.key("away", ""),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await?;
        let away: Vec<String> = away
            .kvs()
            .iter()
            .map(|k| {
                String::from_utf8_lossy(k.key())
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        let view = self.view.read().clone();
        for (id, pools) in owners {
            let covered = view
                .iter()
                .any(|n| n.id == id || node::overlap_any(&n.pools, &pools));
            if covered || away.contains(&id) {
                continue;
            }
            // No claim without a lease (claim_ending answers None then).
            if self.claim_ending(&id).await?.is_some() {
                self.end_sessions_of(&id).await?;
            }
        }
        Ok(())
    }

    async fn end_sessions_of(&self, gone: &str) -> Result<(), ClusterError> {
        let started = Instant::now();
        let prefix = format!("{}sessions/{gone}/", self.settings.prefix);
        let mut kv = self.client.kv_client();
        let records = self
            .call(
                "read",
                kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let (mut ended, mut told) = (0usize, 0usize);
        for r in records.kvs() {
            let key = String::from_utf8_lossy(r.key()).into_owned();
            let session = self
                .sealer
                .open(&key, r.value())
                .map_err(|_| "not sealed with this cluster's record key".to_owned())
                .and_then(|plain| crate::store::decode_session_record(&plain));
            match session {
                Ok((s, _)) => {
                    // Told (durably queued here) before the copy goes: a claimant that dies
                    // in between leaves the rest to the next, and a session told twice
                    // carries the same event id both times.
                    told += self.end.get().map_or(0, |f| f(vec![s]));
                    ended += 1;
                }
                Err(e) => {
                    warn!(key, error = %e, "a session of the lost node cannot be read; it is dropped")
                }
            }
            self.call("update", kv.delete(key, None)).await?;
        }
        let handed = self.end_handed_to(gone).await?;
        self.drop_quotas_of(gone);
        // The node, back, restores none of them.
        self.call(
            "update",
            kv.put(
                self.key("terminated", gone),
                self.settings.node_id.clone(),
                None,
            ),
        )
        .await?;
        self.call("update", kv.delete(self.key("owners", gone), None))
            .await?;
        self.call("update", kv.delete(self.key("ending", gone), None))
            .await?;
        METRICS.cluster_orphans_ended.inc_by(ended as u64);
        info!(
            node = gone,
            ended,
            told,
            handed,
            took_ms = started.elapsed().as_millis() as u64,
            "ended the sessions of a lost node without a standby (NETWORK_TERMINATED)"
        );
        Ok(())
    }

    /// Whether this node found its pools taken over when it joined (then it is a standby, and
    /// the sessions it held live on at the node that took them over).
    pub fn demoted(&self) -> bool {
        self.demoted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The node's sessions are restored and its hooks set: from now on it takes sessions over,
    /// ends a lost node's and installs handed-over creates.
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Where a standby installs the sessions of the active it takes over from.
    pub fn adopt_with(&self, f: impl Fn(Vec<StoredSession>) -> usize + Send + Sync + 'static) {
        let _ = self.adopt.set(Box::new(f));
    }

    /// Keeps the cluster's copy of this node's live sessions (`<prefix>sessions/<node>/<id>`,
    /// sealed) following the store's commits, in order, batched; retried while etcd is away.
    /// Returns the mirror to hand to the store.
    pub fn replicate(self: &Arc<Self>, stop: CancellationToken) -> Mirror {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<MirrorMsg>();
        let _ = self.mirror.set(tx.clone());
        let cluster = self.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < REPLICA_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let mut changes: Vec<Mirrored> = Vec::new();
                let mut barriers = Vec::new();
                for m in batch {
                    match m {
                        MirrorMsg::Change(c) => {
                            // One operation per key in a transaction: the last change wins.
                            changes.retain(|o| o.id() != c.id());
                            changes.push(c);
                        }
                        MirrorMsg::Barrier(b) => barriers.push(b),
                    }
                }
                while let Err(e) = cluster.write_copy(&changes).await {
                    warn!(changes = changes.len(), error = %crate::anyhow_like(&e), "cannot update the cluster's copy of this node's sessions; retrying");
                    if pause(&stop, RETRY_PAUSE * 5).await {
                        return;
                    }
                }
                // Each end frees a place in its client's quota, once.
                for c in &changes {
                    if let Mirrored::Gone(_, Some(holder)) = c {
                        cluster.session_ended(&holder.client);
                    }
                }
                for b in barriers {
                    let _ = b.send(());
                }
            }
        });
        tx
    }

    async fn write_copy(&self, changes: &[Mirrored]) -> Result<(), ClusterError> {
        if changes.is_empty() {
            return Ok(());
        }
        let base = format!(
            "{}sessions/{}/",
            self.settings.prefix, self.settings.node_id
        );
        let mut ops = Vec::with_capacity(changes.len() * 2);
        for c in changes {
            match c {
                Mirrored::Live(id, record) => {
                    let key = format!("{base}{id}");
                    let sealed = self
                        .sealer
                        .seal(&key, record)
                        .map_err(|_| ClusterError::Seal(key.clone()))?;
                    ops.push(TxnOp::put(key, sealed, None));
                }
                Mirrored::Gone(id, holder) => {
                    ops.push(TxnOp::delete(format!("{base}{id}"), None));
                    // An end or a delete: a create of the same id still waiting in etcd
                    // (handed over while the call passed on was slow) is not installed after.
                    if holder.is_some() {
                        ops.push(TxnOp::delete(self.handed_key(*id), None));
                    }
                }
            }
        }
        let mut kv = self.client.kv_client();
        self.call("replicate", kv.txn(Txn::new().and_then(ops)))
            .await
            .map(|_| ())
    }

    /// Waits until every session change committed before this call is in the cluster's copy
    /// (bounded by the etcd timeout: false when it is not there yet).
    pub async fn replicated(&self) -> bool {
        let Some(m) = self.mirror.get() else {
            return true;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if m.send(MirrorMsg::Barrier(tx)).is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(self.settings.timeout, rx).await,
            Ok(Ok(()))
        )
    }

    /// The active node that serves `addr`, as last read.
    pub fn serving(&self, addr: std::net::IpAddr) -> Option<NodeRecord> {
        node::serving(addr, &self.view.read()).cloned()
    }

    /// The other active nodes, as last read.
    pub fn other_actives(&self) -> Vec<NodeRecord> {
        self.view
            .read()
            .iter()
            .filter(|n| n.role == Role::Active && n.id != self.settings.node_id)
            .cloned()
            .collect()
    }

    /// Whether this node may change sessions: only while it is in the cluster (holds its
    /// lease). Cut off from etcd it keeps enforcing what it has, and refuses writes.
    pub fn writable(&self) -> Result<(), crate::error::CamaraError> {
        if self.standing.borrow().lease.is_some() {
            return Ok(());
        }
        Err(crate::error::CamaraError::new(
            crate::error::CamaraCode::Unavailable,
            "this node is out of the cluster (etcd cannot be reached): sessions cannot be created or changed here until it is back; sessions it holds keep their treatment",
        ))
    }

    /// The channels to the other nodes.
    pub fn peers(&self) -> &peer::Peers {
        &self.peers
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This node's standing, as it changes.
    pub fn standing(&self) -> watch::Receiver<Standing> {
        self.standing.subscribe()
    }

    /// Where this node's live session count comes from (published in its record).
    pub fn count_sessions_with(&self, f: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.sessions.set(Box::new(f));
    }

    fn set_standing(&self, lease: Option<i64>, problem: Option<String>) {
        METRICS.cluster_lease_up.set(i64::from(lease.is_some()));
        self.standing.send_replace(Standing { lease, problem });
    }

    /// `<prefix><kind>/<id>`.
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}/{id}", self.settings.prefix)
    }

    fn node_key(&self) -> String {
        format!(
            "{}{}",
            nodes_prefix(&self.settings.prefix),
            self.settings.node_id
        )
    }

    /// Runs one etcd request with the deadline, timed and counted under `op`.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        self.call_within(op, self.settings.timeout, f).await
    }

    /// As [`Cluster::call`] with the deadline `timeout`.
    async fn call_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        let started = Instant::now();
        let out = tokio::time::timeout(timeout, f).await;
        let labels = OpLabels { op };
        METRICS
            .etcd_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => {
                METRICS.etcd_errors.get_or_create(&labels).inc();
                Err(ClusterError::Etcd { op, source })
            }
            Err(_) => {
                METRICS.etcd_errors.get_or_create(&labels).inc();
                Err(ClusterError::Timeout { op, timeout })
            }
        }
    }

    /// The registered nodes (records that do not decode are logged and left out).
    async fn records(&self) -> Result<Vec<(NodeRecord, i64)>, ClusterError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(
                "read",
                kv.get(
                    nodes_prefix(&self.settings.prefix),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(r) => out.push((r, kv.lease())),
                Err(e) => warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    error = %e,
                    "a node registration that does not decode is left out"
                ),
            }
        }
        METRICS.cluster_nodes.set(out.len() as i64);
        *self.view.write() = out.iter().map(|(r, _)| r.clone()).collect();
        Ok(out)
    }

    /// Grants a lease and registers this node under it, if [`node::may_join`] lets it.
    async fn register(&self) -> Result<i64, ClusterError> {
        let ttl = i64::try_from(self.settings.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut lease_client = self.client.lease_client();
        let lease = self
            .call("grant", lease_client.grant(ttl, None))
            .await?
            .id();
        match self.register_under(lease).await {
            Ok(()) => Ok(lease),
            Err(e) => {
                // Not left to lapse: it holds nothing, but counts against etcd until it does.
                let _ = self.call("revoke", lease_client.revoke(lease)).await;
                Err(e)
            }
        }
    }

    async fn register_under(&self, lease: i64) -> Result<(), ClusterError> {
        let members = format!("{}members", self.settings.prefix);
        let mut kv = self.client.kv_client();
        loop {
            let seen = self
                .call("read", kv.get(members.clone(), None))
                .await?
                .kvs()
                .first()
                .map_or(0, etcd_client::KeyValue::mod_revision);
            let others = self.records().await?;
            let live: Vec<NodeRecord> = others.iter().map(|(r, _)| r.clone()).collect();
            let me = {
                let mut me = self.me.lock();
                // Its pools were taken over while it was away: it is that node's standby now,
                // and what it held lives on there.
                if me.role == Role::Active
                    && let Some(by) = node::replaced_by(&me, &live)
                {
                    warn!(by = %by.id, "this node's pools were taken over while it was away; it joins as the standby of that node, and leaves the sessions to it");
                    me.role = Role::Standby;
                    me.took_over = None;
                    self.demoted
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                me.clone()
            };
            node::may_join(&me, &live)?;
            // This node's earlier registration (a restart before its lease lapsed) goes with
            // its lease.
            for (r, old) in &others {
                if r.id == me.id && *old != 0 && *old != lease {
                    let mut leases = self.client.lease_client();
                    let _ = self.call("revoke", leases.revoke(*old)).await;
                }
            }
            let value = serde_json::to_vec(&me).unwrap_or_default();
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    members.clone(),
                    CompareOp::Equal,
                    seen,
                )])
                .and_then([
                    TxnOp::put(
                        self.node_key(),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(members.clone(), me.id.clone(), None),
                    // Not leased: it outlives the node, so the others know whose copy of
                    // sessions may be left when it is gone.
                    TxnOp::put(
                        self.key("owners", &me.id),
                        serde_json::to_vec(&me.pools).unwrap_or_default(),
                        None,
                    ),
                ]);
            if self.call("register", kv.txn(txn)).await?.succeeded() {
                info!(
                    node = %me.id,
                    role = me.role.as_str(),
                    lease = format_args!("{lease:x}"),
                    pools = ?me.pools,
                    nodes = others.iter().filter(|(r, _)| r.id != me.id).count() + 1,
                    "joined the cluster"
                );
                return Ok(());
            }
            // Another node joined in between: read again and check against it too.
        }
    }

    /// Keeps the lease alive (a keep-alive every third of the TTL, each given at most that
    /// long, retried at once on another connection when it fails); when etcd cannot be reached
    /// for a whole TTL the lease is taken as lost and the node joins again, checked again, once
    /// etcd answers. Publishes the live session count when it changes.
    async fn keep_alive(self: Arc<Self>, stop: CancellationToken) {
        let every = self.settings.lease_ttl / 3;
        let mut published = None;
        let mut last_ok = Instant::now();
        let mut stream = None;
        let mut failed = false;
        loop {
            if pause(&stop, if failed { RETRY_PAUSE } else { every }).await {
                return;
            }
            failed = false;
            let Some(lease) = self.standing.borrow().lease else {
                let was_demoted = self.demoted();
                match self.register().await {
                    Ok(lease) => {
                        info!(lease = format_args!("{lease:x}"), "back in the cluster");
                        let displaced = self.check_displaced(was_demoted).await;
                        self.notices(if displaced {
                            Notices::Drop
                        } else {
                            Notices::Release
                        });
                        self.set_standing(Some(lease), None);
                        last_ok = Instant::now();
                        published = None;
                        stream = None;
                    }
                    Err(e) => {
                        let why = crate::anyhow_like(&e);
                        if matches!(e, ClusterError::Refused(_)) {
                            error!(error = %why, "cannot join the cluster again");
                        } else {
                            warn!(error = %why, "cannot join the cluster again; retrying");
                        }
                        self.set_standing(None, Some(why));
                    }
                }
                continue;
            };
            match self.renew(lease, &mut stream).await {
                Ok(()) => {
                    last_ok = Instant::now();
                    self.notices(Notices::Release);
                    let count = self.sessions.get().map(|f| f());
                    if let Some(n) = count
                        && count != published
                        && self.publish(lease, n).await.is_ok()
                    {
                        published = count;
                    }
                }
                Err(e) => {
                    stream = None;
                    failed = true;
                    self.notices(Notices::Hold);
                    let why = crate::anyhow_like(&e);
                    if matches!(e, ClusterError::LeaseExpired(_))
                        || last_ok.elapsed() >= self.settings.lease_ttl
                    {
                        error!(error = %why, "lost the cluster lease; this node is out of the cluster until it joins again");
                        self.set_standing(None, Some(why));
                    } else {
                        warn!(error = %why, "etcd keep-alive failed; retrying");
                    }
                }
            }
        }
    }

    /// One keep-alive round on `stream` (opened if needed).
    async fn renew(
        &self,
        lease: i64,
        stream: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<(), ClusterError> {
        let within = self.settings.timeout.min(self.settings.lease_ttl / 3);
        if stream.is_none() {
            let mut leases = self.client.lease_client();
            *stream = Some(
                self.call_within("keepalive", within, leases.keep_alive(lease))
                    .await?,
            );
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            return Ok(());
        };
        self.call_within("keepalive", within, keeper.keep_alive())
            .await?;
        match self
            .call_within("keepalive", within, answers.message())
            .await?
        {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(ClusterError::LeaseExpired(lease)),
        }
    }

    async fn publish(&self, lease: i64, sessions: u64) -> Result<(), ClusterError> {
        let value = {
            let mut me = self.me.lock();
            me.sessions = sessions;
            serde_json::to_vec(&*me).unwrap_or_default()
        };
        let mut kv = self.client.kv_client();
        // Only while the registration is this lease's: a lapsed one is not written back.
        let txn = Txn::new()
            .when([Compare::lease(self.node_key(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                self.node_key(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        self.call("update", kv.txn(txn)).await.map(|_| ())
    }

    /// The registered nodes, with the time left on their leases, sorted by id.
    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let mut out = Vec::new();
        for (record, lease) in self.records().await? {
            let mut leases = self.client.lease_client();
            let lease_ttl = match self.call("read", leases.time_to_live(lease, None)).await {
                Ok(r) => r.ttl(),
                Err(_) => -1,
            };
            out.push(Member { record, lease_ttl });
        }
        out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        Ok(out)
    }

    /// Leaves the cluster (a graceful stop): the lease is revoked, so the others see this node
    /// go at once rather than when its lease would lapse.
    ///
    /// With `coming_back` (its data plane stays: `on_exit = "keep"`) and no standby for its
    /// pools, it is marked away for `away_grace`: its sessions live on in the kernel and the
    /// cluster does not end them unless it stays away longer.
    pub async fn leave(&self, coming_back: bool) {
        let lease = self.standing.borrow().lease;
        if let Some(lease) = lease {
            let mut leases = self.client.lease_client();
            let me = self.me.lock().clone();
            let standby = self.view.read().iter().any(|n| {
                n.id != me.id && n.role == Role::Standby && node::overlap_any(&n.pools, &me.pools)
            });
            if coming_back && me.role == Role::Active && !standby {
                let ttl = i64::try_from(self.settings.away_grace.as_secs()).unwrap_or(i64::MAX);
                if let Ok(grant) = self.call("grant", leases.grant(ttl, None)).await {
                    let mut kv = self.client.kv_client();
                    let _ = self
                        .call(
                            "update",
                            kv.put(
                                self.key("away", &me.id),
                                "stopped",
                                Some(PutOptions::new().with_lease(grant.id())),
                            ),
                        )
                        .await;
                }
            }
            match self.call("revoke", leases.revoke(lease)).await {
                Ok(_) => info!("left the cluster"),
                Err(e) => {
                    warn!(error = %crate::anyhow_like(&e), "cannot leave the cluster; the lease lapses on its own")
                }
            }
            self.set_standing(None, Some("left the cluster".into()));
        }
    }
}

/// How soon a failed keep-alive is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Sleeps `d`, or less if `stop` is cancelled; true when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

async fn connect(s: &Settings) -> Result<Client, ClusterError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(s.timeout)
        .with_timeout(s.timeout)
        .with_keep_alive(s.lease_ttl / 3, s.timeout)
        // A member cut off from the others' majority refuses instead of answering stale.
        .with_require_leader(true);
    if let Some(tls) = &s.tls {
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(t);
    }
    let connected = tokio::time::timeout(s.timeout, Client::connect(&s.etcd, Some(options)))
        .await
        .map_err(|_| ClusterError::Timeout {
            op: "connect",
            timeout: s.timeout,
        })?;
    connected.map_err(|source| ClusterError::Etcd {
        op: "connect",
        source,
    })
}
