//! Per-client quotas held cluster-wide. A client's live sessions may sit on any node, so each
//! node's own count is not enough: every live session has a place under its client in etcd,
//! `<prefix>clients/<client>/<session>` (the client a pseudonym, the value the pseudonym of the
//! sink it notifies, or empty), and a new place is taken by a compare-and-swap on
//! `<prefix>clientrev/<client>`, which every admission of the client bumps: a node reads the
//! client's places and the revision in one snapshot, decides, and writes only if no other
//! admission of the client came in between. Two creates racing on two nodes cannot both take the
//! last place.
//!
//! A place is taken under the node's lease, before the session is installed: a node that dies
//! before the session is in the cluster's copy leaves no place behind. The copy's writer then
//! keeps it without a lease (in the same transaction as the copy), and removes it in the one that
//! removes the copy when the session ends; a node that ends a lost node's sessions removes
//! theirs; a standby that takes sessions over keeps them. A release that fails (etcd away) is
//! retried until etcd answers.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tracing::warn;

use super::{Cluster, RETRY_PAUSE};
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

/// Attempts at the compare-and-swap before a create is refused as contended.
const ATTEMPTS: usize = 16;

/// What a client holds across the cluster, as read from etcd.
#[derive(Debug, Default)]
struct Places {
    /// The client's live sessions (places), this one excluded.
    active: usize,
    /// The distinct sinks (pseudonyms) they notify.
    sinks: std::collections::BTreeSet<String>,
}

/// Whether one more session notifying `sink` (a pseudonym) fits `limits` beside `held`: the
/// same rule as a single node's (`core`), with the cluster's counts.
fn fits(held: &Places, sink: Option<&str>, limits: ClientLimits) -> Result<(), CamaraError> {
    if held.active >= limits.active as usize {
        return Err(CamaraError::new(
            CamaraCode::QuotaExceeded,
            format!(
                "this API client already holds its maximum of {} active sessions across the cluster",
                limits.active
            ),
        ));
    }
    if let Some(sink) = sink
        && held.sinks.len() >= limits.sinks as usize
        && !held.sinks.contains(sink)
    {
        return Err(CamaraError::field(
            CamaraCode::QuotaExceeded,
            "sink",
            format!(
                "this API client's active sessions across the cluster already notify {} distinct sinks (scheme, host and port), its maximum; reuse one of them",
                limits.sinks
            ),
        ));
    }
    Ok(())
}

impl Cluster {
    /// `<prefix>clients/<client>/`, for `holder`'s client.
    fn places_of(&self, holder: &Holder) -> String {
        format!(
            "{}clients/{}/",
            self.settings.prefix,
            self.sealer.pseudonym(&holder.client)
        )
    }

    /// The etcd key of session `id`'s place, and its value (the sink's pseudonym).
    pub(super) fn place(&self, holder: &Holder, id: SessionId) -> (String, String) {
        let sink = holder
            .sink
            .as_deref()
            .map(|s| self.sealer.pseudonym(&crate::notify::sink_origin(s)))
            .unwrap_or_default();
        (format!("{}{id}", self.places_of(holder)), sink)
    }

    /// Takes a place for session `id` of `holder`'s client, within `limits` counted across the
    /// cluster: QUOTA_EXCEEDED when the client holds its maximum, UNAVAILABLE when etcd cannot
    /// be reached or this node is out of the cluster. A place `id` holds already is taken
    /// again (under this node's lease), not counted twice.
    pub async fn hold_place(
        &self,
        holder: &Holder,
        id: SessionId,
        limits: ClientLimits,
    ) -> Result<(), CamaraError> {
        let unavailable = |what: String| {
            CamaraError::new(
                CamaraCode::Unavailable,
                format!("the cluster cannot count this client's sessions: {what}; try again"),
            )
        };
        let Some(lease) = self.standing.borrow().lease else {
            return Err(self
                .writable()
                .err()
                .unwrap_or_else(|| unavailable("this node is out of the cluster".into())));
        };
        let prefix = self.places_of(holder);
        let revision_key = format!(
            "{}clientrev/{}",
            self.settings.prefix,
            self.sealer.pseudonym(&holder.client)
        );
        let (key, sink) = self.place(holder, id);
        let mut kv = self.client.kv_client();
        for _ in 0..ATTEMPTS {
            let read = Txn::new().and_then(vec![
                TxnOp::get(revision_key.clone(), None),
                TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            ]);
            let read = self
                .call("quota", kv.txn(read))
                .await
                .map_err(|e| unavailable(crate::anyhow_like(&e)))?;
            let (mut revision, mut held) = (0, Places::default());
            for (i, r) in read.op_responses().into_iter().enumerate() {
                let TxnOpResponse::Get(r) = r else { continue };
                for kv in r.kvs() {
                    if i == 0 {
                        revision = kv.mod_revision();
                    } else if kv.key() != key.as_bytes() {
                        // Its own place (taken when the create was handed over) is not
                        // counted again.
                        held.active += 1;
                        if !kv.value().is_empty() {
                            held.sinks
                                .insert(String::from_utf8_lossy(kv.value()).into_owned());
                        }
                    }
                }
            }
            fits(&held, (!sink.is_empty()).then_some(sink.as_str()), limits)?;
            let unchanged = if revision == 0 {
                Compare::version(revision_key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(revision_key.clone(), CompareOp::Equal, revision)
            };
            let take = Txn::new().when(vec![unchanged]).and_then(vec![
                TxnOp::put(revision_key.clone(), id.to_string(), None),
                TxnOp::put(
                    key.clone(),
                    sink.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ]);
            let taken = self
                .call("quota", kv.txn(take))
                .await
                .map_err(|e| unavailable(crate::anyhow_like(&e)))?;
            if taken.succeeded() {
                return Ok(());
            }
        }
        Err(unavailable(format!(
            "{ATTEMPTS} concurrent admissions of the same client in a row"
        )))
    }

    /// Gives back the place taken for session `id`, which was not created after all. Retried in
    /// the background while etcd is away (the place, under this node's lease, would otherwise
    /// count for as long as the node lives).
    pub fn free_place(self: &std::sync::Arc<Self>, holder: &Holder, id: SessionId) {
        let (key, _) = self.place(holder, id);
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut kv = cluster.client.kv_client();
            while let Err(e) = cluster.call("quota", kv.delete(key.clone(), None)).await {
                warn!(session = %id, error = %crate::anyhow_like(&e), "cannot give back a client's place in the cluster; retrying");
                tokio::time::sleep(RETRY_PAUSE * 5).await;
                if cluster.standing.borrow().lease.is_none() {
                    // Its lease lapsed, and the place with it.
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places(active: usize, sinks: &[&str]) -> Places {
        Places {
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
        assert!(fits(&places(2, &["s1"]), Some("s1"), LIMITS).is_ok());
        assert!(fits(&places(2, &["s1"]), None, LIMITS).is_ok());
        let full = fits(&places(3, &["s1"]), None, LIMITS).expect_err("full");
        assert_eq!(full.code, CamaraCode::QuotaExceeded);
        assert!(
            full.message
                .contains("maximum of 3 active sessions across the cluster")
        );
        // A third distinct sink is refused; one of the two it notifies is fine.
        let sinks = fits(&places(2, &["s1", "s2"]), Some("s3"), LIMITS).expect_err("sinks");
        assert_eq!(sinks.code, CamaraCode::QuotaExceeded);
        assert!(fits(&places(2, &["s1", "s2"]), Some("s2"), LIMITS).is_ok());
    }
}
