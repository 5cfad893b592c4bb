//! Per-client quotas held cluster-wide. A client's live sessions may sit on any node, so each
//! node's own count is not enough. Each node publishes, per client, what the client holds there:
//! `<prefix>quota/<client>/<node>` = its live sessions and the distinct sinks they notify (the
//! client and the sinks as pseudonyms, [`super::seal::Sealer::pseudonym`]), counting the places
//! it has granted whose sessions are not in its ledger yet, and the creates it handed over
//! that wait in etcd.
//!
//! An admission reads the client's entries of every node in one snapshot, decides with the
//! same rule as a single node (`fits`), and writes this node's entry only if no entry of the
//! client changed since the read (a compare on the whole prefix's revisions): creates racing
//! through different nodes cannot both take the last place. One task per node runs the
//! admissions, the waiting ones of a client together (one read, one write for all of them); the
//! same task publishes the entries that changed (a session ended, a create failed), so they are
//! never written twice at once. Between a change and its publication the entry only overstates.
//!
//! Far from its limit a client need not wait for etcd at all: an admission also takes places
//! ahead for the client at this node (an eighth of what the client has left, at most
//! [`AHEAD`], none when fewer than [`AHEAD_FROM`] are left),
//! counted in the entry like any other; later creates here use them without a round trip, until
//! they run out, a new sink needs a decision, or [`AHEAD_IDLE`] passes without a create of the
//! client here (then they are given back). Near the limit nothing is taken ahead and every
//! create is decided against the others' entries.
//!
//! Entries outlive leases (a node stopped with `on_exit = "keep"` holds its sessions still):
//! a node republishes all of its own at start, after a takeover and after giving sessions up;
//! the node that takes a lost node over or ends its sessions removes that node's entries.

use std::collections::{BTreeSet, HashMap};

use etcd_client::{Compare, CompareOp, GetOptions, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{Cluster, ClusterError, RETRY_PAUSE};
use crate::{
    error::{CamaraCode, CamaraError},
    model::{Holder, SessionId},
};

/// A client's limits: live sessions, and distinct sinks they notify.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    pub active: u32,
    pub sinks: u32,
}

/// What a client holds on one node: live sessions, and the sink origins they notify.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub active: u32,
    pub sinks: Vec<String>,
}

/// Where a node reads its clients' usage (its ledger).
pub struct Ledger {
    pub usage: Box<dyn Fn(&str) -> Usage + Send + Sync>,
    pub clients: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Whether a session is in the ledger.
    pub holds: Box<dyn Fn(SessionId) -> bool + Send + Sync>,
}

/// A node's published entry for one client (the sinks as pseudonyms).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    active: u32,
    sinks: BTreeSet<String>,
}

/// Attempts at the compare-and-swap before a create is refused as contended.
const ATTEMPTS: usize = 16;

/// Admissions decided in one go at most.
const BATCH: usize = 512;

/// Places taken ahead for a client at one node, at most.
const AHEAD: u32 = 128;

/// No place is taken ahead for a client with fewer left than this: near its limit every create
/// is decided exactly.
const AHEAD_FROM: u32 = 64;

/// Places taken ahead and not used for this long are given back.
const AHEAD_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// A place granted here whose session is not in the ledger yet (or a create handed over that
/// waits in etcd).
struct Granted {
    id: SessionId,
    /// The sink as asked (a URL).
    sink: Option<String>,
    /// When its create was handed over through etcd.
    handed: Option<std::time::Instant>,
}

/// One create's request for a place.
pub(super) struct Ask {
    holder: Holder,
    id: SessionId,
    limits: ClientLimits,
    reply: oneshot::Sender<Result<(), CamaraError>>,
}

pub(super) enum Msg {
    Ask(Ask),
    /// The client's usage here changed: publish it.
    Changed(String),
    /// Publish every entry of this node again, and remove the ones of clients it no longer
    /// serves.
    Resync,
    /// Remove every entry of a lost node.
    DropNode(String),
    /// Answered once every change sent before it is published.
    Flush(oneshot::Sender<()>),
}

/// What this node keeps of one client beside its ledger.
#[derive(Default)]
struct Account {
    /// Places granted whose sessions are not in the ledger yet.
    granted: Vec<Granted>,
    /// Places taken ahead, not granted yet.
    ahead: u32,
    /// The sinks (pseudonyms) of the entry last written.
    sinks: BTreeSet<String>,
    /// The last grant here.
    last: Option<std::time::Instant>,
    /// What the client had left, cluster-wide, after the last admission here.
    left: u32,
    /// The live sessions of the entry last written: what the cluster counts for the client
    /// here. A place is kept ahead only while that still counts it.
    published: u32,
}

/// This node's side of the quotas.
#[derive(Default)]
pub(super) struct Book {
    tx: std::sync::OnceLock<mpsc::UnboundedSender<Msg>>,
    accounts: parking_lot::Mutex<HashMap<String, Account>>,
    ledger: std::sync::OnceLock<Ledger>,
    /// Changes sent and not yet published.
    unpublished: std::sync::atomic::AtomicUsize,
}

/// The per-client rule, for a node's ledger and for the cluster alike: a client whose live
/// sessions (`active` of them) notify `sinks` distinct sinks may have one more, notifying
/// `new_sink` (`Some(known)`: whether among those) — within `limits`. `scope` ends the counts'
/// name in the messages ("" on a node, " across the cluster").
pub fn client_fits(
    active: u32,
    sinks: usize,
    new_sink: Option<bool>,
    limits: ClientLimits,
    scope: &str,
) -> Result<(), CamaraError> {
    if active >= limits.active {
        return Err(CamaraError::new(
            CamaraCode::QuotaExceeded,
            format!(
                "this API client already holds its maximum of {} active sessions{scope}",
                limits.active
            ),
        ));
    }
    if new_sink == Some(false) && sinks >= limits.sinks as usize {
        return Err(CamaraError::field(
            CamaraCode::QuotaExceeded,
            "sink",
            format!(
                "this API client's active sessions{scope} already notify {} distinct sinks (scheme, host and port), its maximum; reuse one of them",
                limits.sinks
            ),
        ));
    }
    Ok(())
}

/// Whether `held` plus one more session notifying `sink` (a pseudonym) fits `limits`, with the
/// cluster's counts.
fn fits(held: &Entry, sink: Option<&str>, limits: ClientLimits) -> Result<(), CamaraError> {
    client_fits(
        held.active,
        held.sinks.len(),
        sink.map(|s| held.sinks.contains(s)),
        limits,
        " across the cluster",
    )
}

/// How many places to take ahead for a client holding `held` of `limit` (see the module): an
/// eighth of what is left, at most [`AHEAD`], none below [`AHEAD_FROM`] left. Places taken
/// ahead at one node and not used there refuse creates at others until they are given back
/// (after [`AHEAD_IDLE`]), which the eighth bounds.
fn ahead(limit: u32, held: u32) -> u32 {
    let left = limit.saturating_sub(held);
    if left < AHEAD_FROM {
        0
    } else {
        AHEAD.min(left / 8)
    }
}

/// Adds one session notifying `sink` to `held`.
fn add(held: &mut Entry, sink: Option<&str>) {
    held.active += 1;
    if let Some(s) = sink {
        held.sinks.insert(s.to_owned());
    }
}

fn unavailable(what: impl std::fmt::Display) -> CamaraError {
    CamaraError::new(
        CamaraCode::Unavailable,
        format!("the cluster cannot count this client's sessions: {what}; try again"),
    )
}

impl Cluster {
    /// Where this node reads its clients' usage.
    pub fn ledger_with(&self, ledger: Ledger) {
        let _ = self.quotas.ledger.set(ledger);
    }

    fn quota_prefix(&self, client: &str) -> String {
        format!(
            "{}quota/{}/",
            self.settings.prefix,
            self.sealer.pseudonym(client)
        )
    }

    fn sink_name(&self, sink: &str) -> String {
        self.sealer.pseudonym(&crate::notify::sink_origin(sink))
    }

    /// What `client` holds here, as published: its sessions in the ledger, the places granted
    /// beside them and those taken ahead.
    fn here(&self, client: &str) -> Entry {
        let mut e = Entry::default();
        let ledger = self.quotas.ledger.get();
        // Places granted whose sessions are not in the ledger yet, looked at before the ledger
        // is read: one whose session enters meanwhile is counted twice (over), never not at all.
        if let Some(a) = self.quotas.accounts.lock().get(client) {
            for g in &a.granted {
                if !ledger.is_some_and(|l| (l.holds)(g.id)) {
                    add(
                        &mut e,
                        g.sink.as_deref().map(|s| self.sink_name(s)).as_deref(),
                    );
                }
            }
            e.active += a.ahead;
        }
        if let Some(l) = ledger {
            let u = (l.usage)(client);
            e.active += u.active;
            e.sinks
                .extend(u.sinks.iter().map(|s| self.sealer.pseudonym(s)));
        }
        e
    }

    /// Grants a place taken ahead for `holder`'s client, if there is one and its sink is
    /// already counted.
    fn grant_ahead(&self, holder: &Holder, id: SessionId, sink: Option<&str>) -> bool {
        let mut accounts = self.quotas.accounts.lock();
        let Some(a) = accounts.get_mut(&holder.client) else {
            return false;
        };
        if a.ahead == 0 || sink.is_some_and(|s| !a.sinks.contains(s)) {
            return false;
        }
        a.ahead -= 1;
        a.granted.push(Granted {
            id,
            sink: holder.sink.clone(),
            handed: None,
        });
        a.last = Some(std::time::Instant::now());
        true
    }

    fn send(&self, m: Msg) {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(tx) = self.quotas.tx.get() else {
            return;
        };
        // Counted before it is sent, so the task cannot count it out first.
        let changed = matches!(m, Msg::Changed(_));
        if changed {
            self.quotas.unpublished.fetch_add(1, SeqCst);
        }
        if tx.send(m).is_err() && changed {
            self.quotas.unpublished.fetch_sub(1, SeqCst);
        }
    }

    /// Takes a place for session `id` of `holder`'s client, within `limits` counted across the
    /// cluster: QUOTA_EXCEEDED when the client holds its maximum, UNAVAILABLE when etcd cannot
    /// be reached or this node is out of the cluster. [`Cluster::placed`] must follow.
    pub async fn hold_place(
        &self,
        holder: &Holder,
        id: SessionId,
        limits: ClientLimits,
    ) -> Result<(), CamaraError> {
        self.writable()?;
        let sink = holder.sink.as_deref().map(|s| self.sink_name(s));
        if self.grant_ahead(holder, id, sink.as_deref()) {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let tx = self
            .quotas
            .tx
            .get()
            .ok_or_else(|| unavailable("not started"))?;
        tx.send(Msg::Ask(Ask {
            holder: holder.clone(),
            id,
            limits,
            reply,
        }))
        .map_err(|_| unavailable("the node is stopping"))?;
        tokio::time::timeout(self.settings.timeout * 2, answer)
            .await
            .map_err(|_| unavailable("etcd did not answer in time"))?
            .map_err(|_| unavailable("the node is stopping"))?
    }

    /// The create that took a place for session `id` is done: in the ledger now (`created`:
    /// the entry stays as published), or failed (then its place is free again, as an ended
    /// session's is: [`Cluster::session_ended`]).
    pub fn placed(&self, holder: &Holder, id: SessionId, created: bool) {
        if let Some(a) = self.quotas.accounts.lock().get_mut(&holder.client) {
            a.granted.retain(|g| g.id != id);
        }
        if !created {
            self.session_ended(&holder.client);
        }
    }

    /// The create that took a place for session `id` was handed over: its place stays here
    /// until it is no longer waiting in etcd.
    pub fn place_handed(&self, holder: &Holder, id: SessionId) {
        if let Some(a) = self.quotas.accounts.lock().get_mut(&holder.client)
            && let Some(g) = a.granted.iter_mut().find(|g| g.id == id)
        {
            g.handed = Some(std::time::Instant::now());
        }
    }

    /// The creates handed over from here before `read` that wait in etcd are `waiting` (read
    /// from `read` on); the places of the others go.
    pub(super) fn handed_waiting(
        &self,
        read: std::time::Instant,
        waiting: &std::collections::HashSet<SessionId>,
    ) {
        let mut changed = Vec::new();
        for (client, a) in self.quotas.accounts.lock().iter_mut() {
            let before = a.granted.len();
            a.granted
                .retain(|g| g.handed.is_none_or(|at| at >= read) || waiting.contains(&g.id));
            if a.granted.len() != before {
                changed.push(client.clone());
            }
        }
        for c in changed {
            self.send(Msg::Changed(c));
        }
    }

    /// Whether a create handed over from here may still wait in etcd.
    pub(super) fn has_handed(&self) -> bool {
        self.quotas
            .accounts
            .lock()
            .values()
            .any(|a| a.granted.iter().any(|g| g.handed.is_some()))
    }

    /// `client`'s usage here changed (a session of it began or ended).
    pub fn usage_changed(&self, client: &str) {
        self.send(Msg::Changed(client.to_owned()));
    }

    /// A live session of `client` ended here. Far from the client's limit its place is kept
    /// here as a place ahead (the entry stays as it is: nothing to write); near it, the entry is
    /// published lower, so the place is free at every node.
    pub(super) fn session_ended(&self, client: &str) {
        // (Also a place whose create failed.) Kept only while the entry last written still
        // counts it: what is held here (the ended session no longer in it) stays below what
        // was published, so a place kept can never add to what the cluster counts.
        let held = self.here(client).active;
        {
            let mut accounts = self.quotas.accounts.lock();
            if let Some(a) = accounts.get_mut(client)
                && a.left >= 2 * AHEAD_FROM
                && a.ahead < AHEAD
                && held < a.published
            {
                a.ahead += 1;
                return;
            }
        }
        self.usage_changed(client);
    }

    /// Waits (bounded by the etcd timeout) until the usage changes sent so far are published:
    /// a session deleted and acknowledged frees its client's place at once, cluster-wide.
    pub async fn quotas_published(&self) -> bool {
        if self
            .quotas
            .unpublished
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Flush(tx));
        matches!(
            tokio::time::timeout(self.settings.timeout, rx).await,
            Ok(Ok(()))
        )
    }

    /// Publish every entry of this node again.
    pub fn resync_quotas(&self) {
        self.send(Msg::Resync);
    }

    /// Remove the entries of node `gone` (taken over, or ended).
    pub(super) fn drop_quotas_of(&self, gone: &str) {
        self.send(Msg::DropNode(gone.to_owned()));
    }

    /// Runs this node's admissions and publications until `stop` (see the module).
    pub(super) fn run_quotas(
        self: &std::sync::Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        if self.quotas.tx.set(tx).is_err() {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut idle = tokio::time::interval(AHEAD_IDLE / 2);
            loop {
                let first = tokio::select! {
                    () = stop.cancelled() => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                    _ = idle.tick() => {
                        for c in cluster.give_back_idle() {
                            cluster.usage_changed(&c);
                        }
                        continue;
                    }
                };
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                cluster.serve_batch(batch, &stop).await;
            }
        });
    }

    async fn serve_batch(&self, batch: Vec<Msg>, stop: &tokio_util::sync::CancellationToken) {
        // Admissions by client, in the order asked; publications once per client.
        let mut asks: Vec<(String, Vec<Ask>)> = Vec::new();
        let mut changed = BTreeSet::new();
        let (mut resync, mut dropped, mut flushed) = (false, Vec::new(), Vec::new());
        let mut changes = 0;
        for m in batch {
            match m {
                Msg::Ask(ask) => match asks.iter_mut().find(|(c, _)| *c == ask.holder.client) {
                    Some((_, a)) => a.push(ask),
                    None => asks.push((ask.holder.client.clone(), vec![ask])),
                },
                Msg::Changed(c) => {
                    changed.insert(c);
                    changes += 1;
                }
                Msg::Resync => resync = true,
                Msg::DropNode(n) => dropped.push(n),
                Msg::Flush(f) => flushed.push(f),
            }
        }
        for (client, asks) in asks {
            self.admit(&client, asks).await;
        }
        // Publications are retried until etcd answers: an entry left too high only refuses
        // creates the client could have had.
        loop {
            // This node's entries first, then a lost node's go: the sessions taken over are
            // counted twice for a moment, never not at all.
            let mut failed = None;
            if resync && let Err(e) = self.resync().await {
                failed = Some(e);
            }
            for c in &changed {
                if let Err(e) = self.publish_entry(c).await {
                    failed = Some(e);
                }
            }
            for n in &dropped {
                if let Err(e) = self.remove_entries(Some(n)).await {
                    failed = Some(e);
                }
            }
            let Some(e) = failed else {
                self.quotas
                    .unpublished
                    .fetch_sub(changes, std::sync::atomic::Ordering::SeqCst);
                for f in flushed {
                    let _ = f.send(());
                }
                return;
            };
            warn!(error = %crate::anyhow_like(&e), "cannot publish this node's client quotas; retrying");
            if super::pause(stop, RETRY_PAUSE * 10).await {
                return;
            }
        }
    }

    /// Gives back the places taken ahead for clients that created nothing here for
    /// [`AHEAD_IDLE`], and forgets clients with nothing kept: the clients whose entries are to
    /// be published lower.
    fn give_back_idle(&self) -> Vec<String> {
        let mut accounts = self.quotas.accounts.lock();
        let mut lower = Vec::new();
        for (c, a) in accounts.iter_mut() {
            if a.ahead > 0 && a.last.is_none_or(|t| t.elapsed() >= AHEAD_IDLE) {
                a.ahead = 0;
                lower.push(c.clone());
            }
        }
        accounts.retain(|_, a| a.ahead > 0 || !a.granted.is_empty());
        lower
    }

    /// Decides the waiting admissions of `client` together.
    async fn admit(&self, client: &str, asks: Vec<Ask>) {
        // Places taken ahead meanwhile serve what they can.
        let asks: Vec<Ask> = asks
            .into_iter()
            .filter_map(|a| {
                let sink = a.holder.sink.as_deref().map(|s| self.sink_name(s));
                if self.grant_ahead(&a.holder, a.id, sink.as_deref()) {
                    let _ = a.reply.send(Ok(()));
                    None
                } else {
                    Some(a)
                }
            })
            .collect();
        if asks.is_empty() {
            return;
        }
        // The places still taken ahead (their asks bring sinks not yet counted) are used first:
        // out of the account while this runs, counted by hand, given back if nothing is written.
        let spare = self
            .quotas
            .accounts
            .lock()
            .get_mut(client)
            .map_or(0, |a| std::mem::take(&mut a.ahead));
        let give_back = |n: u32| {
            if n > 0 {
                self.quotas
                    .accounts
                    .lock()
                    .entry(client.to_owned())
                    .or_default()
                    .ahead += n;
            }
        };
        let prefix = self.quota_prefix(client);
        let mine = format!("{prefix}{}", self.settings.node_id);
        let mut kv = self.client.kv_client();
        for _ in 0..ATTEMPTS {
            let read = match self
                .call(
                    "quota",
                    kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    give_back(spare);
                    for a in asks {
                        let _ = a.reply.send(Err(unavailable(crate::anyhow_like(&e))));
                    }
                    return;
                }
            };
            let at = read.header().map_or(0, |h| h.revision());
            // The others' entries as read; this node's own from its ledger.
            let mut held = self.here(client);
            for e in read.kvs() {
                if e.key() == mine.as_bytes() {
                    continue;
                }
                match serde_json::from_slice::<Entry>(e.value()) {
                    Ok(other) => {
                        held.active += other.active;
                        held.sinks.extend(other.sinks);
                    }
                    Err(_) => warn!(
                        key = %String::from_utf8_lossy(e.key()),
                        "a quota entry cannot be read; not counted"
                    ),
                }
            }
            let mut own = self.here(client);
            held.active += spare;
            own.active += spare;
            let mut left = spare;
            let mut verdicts = Vec::with_capacity(asks.len());
            for a in &asks {
                let sink = a.holder.sink.as_deref().map(|s| self.sink_name(s));
                let v = if left > 0 {
                    // A place is there; only the sink is to decide.
                    let sinks_only = Entry {
                        active: 0,
                        sinks: held.sinks.clone(),
                    };
                    fits(&sinks_only, sink.as_deref(), a.limits).inspect(|()| left -= 1)
                } else {
                    fits(&held, sink.as_deref(), a.limits).inspect(|()| {
                        held.active += 1;
                        own.active += 1;
                    })
                };
                if v.is_ok()
                    && let Some(s) = &sink
                {
                    held.sinks.insert(s.clone());
                    own.sinks.insert(s.clone());
                }
                verdicts.push(v);
            }
            let limit = asks.last().map_or(0, |a| a.limits.active);
            let ahead = ahead(limit, held.active);
            own.active += ahead;
            held.active += ahead;
            let Ok(value) = serde_json::to_vec(&own) else {
                give_back(spare);
                return;
            };
            let txn = etcd_client::Txn::new()
                .when(vec![
                    Compare::mod_revision(prefix.clone(), CompareOp::Less, at + 1).with_prefix(),
                ])
                .and_then(vec![TxnOp::put(mine.clone(), value, None)]);
            match self.call("quota", kv.txn(txn)).await {
                Ok(r) if r.succeeded() => {
                    let mut accounts = self.quotas.accounts.lock();
                    let account = accounts.entry(client.to_owned()).or_default();
                    account.ahead += left + ahead;
                    account.left = limit.saturating_sub(held.active);
                    account.published = own.active;
                    account.sinks = own.sinks;
                    account.last = Some(std::time::Instant::now());
                    for (a, v) in asks.into_iter().zip(verdicts) {
                        let granted = v.is_ok();
                        if a.reply.send(v).is_err() && granted {
                            // Nobody waits for it any more (the call was dropped): kept ahead.
                            account.ahead += 1;
                        } else if granted {
                            account.granted.push(Granted {
                                id: a.id,
                                sink: a.holder.sink,
                                handed: None,
                            });
                        }
                    }
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    give_back(spare);
                    for a in asks {
                        let _ = a.reply.send(Err(unavailable(crate::anyhow_like(&e))));
                    }
                    return;
                }
            }
        }
        give_back(spare);
        for a in asks {
            let _ = a.reply.send(Err(unavailable(format!(
                "{ATTEMPTS} concurrent admissions of the same client in a row"
            ))));
        }
    }

    /// Writes this node's entry for `client` (removes it when it holds nothing here).
    async fn publish_entry(&self, client: &str) -> Result<(), ClusterError> {
        let key = format!("{}{}", self.quota_prefix(client), self.settings.node_id);
        if self.quotas.ledger.get().is_none() {
            // Not before the ledger is restored: an entry written now would say too little.
            return Ok(());
        }
        let entry = self.here(client);
        if let Some(a) = self.quotas.accounts.lock().get_mut(client) {
            a.sinks.clone_from(&entry.sinks);
            a.published = entry.active;
        }
        let mut kv = self.client.kv_client();
        if entry == Entry::default() {
            self.call("quota", kv.delete(key, None)).await?;
        } else {
            let value = serde_json::to_vec(&entry).unwrap_or_default();
            self.call("quota", kv.put(key, value, None)).await?;
        }
        Ok(())
    }

    /// Every entry of `node` (`None`: none but those of clients this node serves now).
    async fn remove_entries(&self, node: Option<&str>) -> Result<(), ClusterError> {
        let me = &self.settings.node_id;
        let node = node.unwrap_or(me);
        let keep: BTreeSet<String> = if node == me {
            let kept: Vec<String> = self.quotas.accounts.lock().keys().cloned().collect();
            self.quotas
                .ledger
                .get()
                .map(|l| (l.clients)())
                .unwrap_or_default()
                .iter()
                .chain(&kept)
                .map(|c| format!("{}{me}", self.quota_prefix(c)))
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut kv = self.client.kv_client();
        let all = self
            .call(
                "quota",
                kv.get(
                    format!("{}quota/", self.settings.prefix),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await?;
        let suffix = format!("/{node}");
        for e in all.kvs() {
            let key = String::from_utf8_lossy(e.key()).into_owned();
            if key.ends_with(&suffix) && !keep.contains(&key) {
                self.call("quota", kv.delete(key, None)).await?;
            }
        }
        Ok(())
    }

    /// Publishes every entry of this node again, and removes those of clients it holds nothing
    /// of now.
    async fn resync(&self) -> Result<(), ClusterError> {
        if self.quotas.ledger.get().is_none() {
            return Ok(());
        }
        // The creates this node handed over that wait in etcd count here (again, after a
        // restart) until they are installed.
        let handed = self.handed_from_here().await?;
        {
            let long_ago = std::time::Instant::now()
                .checked_sub(AHEAD_IDLE)
                .unwrap_or_else(std::time::Instant::now);
            let mut accounts = self.quotas.accounts.lock();
            for (holder, id) in handed {
                let a = accounts.entry(holder.client).or_default();
                if !a.granted.iter().any(|g| g.id == id) {
                    a.granted.push(Granted {
                        id,
                        sink: holder.sink,
                        handed: Some(long_ago),
                    });
                }
            }
        }
        self.remove_entries(None).await?;
        let clients = self
            .quotas
            .ledger
            .get()
            .map(|l| (l.clients)())
            .unwrap_or_default();
        let kept: Vec<String> = self.quotas.accounts.lock().keys().cloned().collect();
        for c in clients.iter().chain(&kept) {
            self.publish_entry(c).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(active: u32, sinks: &[&str]) -> Entry {
        Entry {
            active,
            sinks: sinks.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    const LIMITS: ClientLimits = ClientLimits {
        active: 3,
        sinks: 2,
    };

    #[test]
    fn a_client_gets_its_places_up_to_the_limits_and_no_more() {
        assert!(fits(&held(2, &["s1"]), Some("s1"), LIMITS).is_ok());
        assert!(fits(&held(2, &["s1"]), None, LIMITS).is_ok());
        let full = fits(&held(3, &["s1"]), None, LIMITS).expect_err("full");
        assert_eq!(full.code, CamaraCode::QuotaExceeded);
        assert!(
            full.message
                .contains("maximum of 3 active sessions across the cluster")
        );
        // A third distinct sink is refused; one of the two it notifies is fine.
        let sinks = fits(&held(2, &["s1", "s2"]), Some("s3"), LIMITS).expect_err("sinks");
        assert_eq!(sinks.code, CamaraCode::QuotaExceeded);
        assert_eq!(sinks.field.as_deref(), Some("sink"));
        assert!(fits(&held(2, &["s1", "s2"]), Some("s2"), LIMITS).is_ok());
        // Places ahead: far from the limit only, and never past it.
        assert_eq!(ahead(10_000, 0), 128);
        assert_eq!(ahead(10_000, 9_500), 62);
        assert_eq!(ahead(10_000, 9_937), 0);
        assert_eq!(ahead(10, 0), 0, "small quotas are exact");
        assert_eq!(ahead(100, 200), 0);
        // Granting adds to what is held.
        let mut h = held(1, &["s1"]);
        add(&mut h, Some("s2"));
        assert_eq!(h, held(2, &["s1", "s2"]));
    }
}
