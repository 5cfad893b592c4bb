//! Creates handed over through etcd: CAMARA's asynchronous model for an owner that is slow or
//! cannot be reached. The node that took the call passes a create on to the node that serves
//! the device, with the session's id; when no answer comes within `install_wait`, it writes
//! the validated request to `<prefix>requested/<id>` (sealed: device, sink and its credential
//! are not in clear), keeps the client's place in its quota with it, and answers REQUESTED.
//!
//! Every active node reads those records each second and installs the ones for devices it
//! serves: it marks the record claimed (compare-and-swap), installs the session under the same
//! id (AVAILABLE, its event and notification as for any create; a create passed on that
//! arrived after all is found installed) and removes the record. One it cannot install is
//! marked refused, its requester told UNAVAILABLE / NETWORK_TERMINATED (the event id derived
//! from the session, as for a lost node's sessions), its place given back and the record
//! removed. A node that dies midway leaves the record to itself back, or to its standby, which
//! find the session installed (restored, taken over) or install it. The sessions handed to a
//! node lost without a standby are ended by the node that ends its sessions.
//!
//! While handed over, a session is REQUESTED for GetSession through any node; a delete
//! withdraws it (no event: it never was AVAILABLE) unless the node installing it has claimed
//! it (then UNAVAILABLE: try again).

use etcd_client::{Compare, CompareOp, GetOptions, TxnOp};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{Cluster, ClusterError};
use crate::{
    error::{CamaraCode, CamaraError},
    model::{Caller, SessionId, SessionRequest},
    store::StoredSession,
};

/// A create handed over through etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handed {
    pub id: SessionId,
    pub request: SessionRequest,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// The node that served the device when it was handed over.
    pub to: String,
    /// The node that handed it over (it counts the create in the client's quota meanwhile).
    #[serde(default)]
    pub from: String,
    /// The node installing it (set before it tries).
    #[serde(default)]
    pub claimed_by: Option<String>,
    /// Why it could not be installed (set before the requester is told).
    #[serde(default)]
    pub refused: Option<String>,
}

impl Handed {
    /// Whether `caller` may see and delete it (the rule of a node's own sessions).
    pub fn visible_to(&self, caller: &Caller) -> bool {
        caller.operator
            || (*caller.client == *self.request.owner
                && caller
                    .subject
                    .as_ref()
                    .is_none_or(|s| *s == self.request.device))
    }

    /// As a stored session that ended NETWORK_TERMINATED, for telling its requester.
    fn ended(&self) -> StoredSession {
        StoredSession {
            id: self.id,
            request: self.request.clone(),
            started_at: self.requested_at,
            duration: self.request.duration,
            ended: Some(crate::store::Ended {
                info: crate::model::StatusInfo::NetworkTerminated,
                at: OffsetDateTime::now_utc(),
            }),
            slot: None,
        }
    }
}

/// What became of a handed-over create at the node that serves its device.
pub enum Install {
    /// Installed here (now, or already).
    Done,
    /// It cannot be installed.
    Refused(CamaraError),
}

/// How a node installs the creates handed over to it (`api::Operations`).
pub struct Installer {
    /// Whether this node serves the request's device.
    pub serves: Box<dyn Fn(&SessionRequest) -> bool + Send + Sync>,
    pub install: Box<
        dyn Fn(SessionId, SessionRequest) -> futures::future::BoxFuture<'static, Install>
            + Send
            + Sync,
    >,
}

fn unavailable(e: &ClusterError) -> CamaraError {
    CamaraError::new(
        CamaraCode::Unavailable,
        format!(
            "the cluster cannot be reached: {}; try again",
            crate::anyhow_like(e)
        ),
    )
}

impl Cluster {
    pub(super) fn handed_key(&self, id: SessionId) -> String {
        format!("{}requested/{id}", self.settings.prefix)
    }

    /// Hands create `request` (its place in the client's quota held already) over to the node
    /// `to` through etcd, as session `id`.
    pub async fn hand_over(
        &self,
        id: SessionId,
        request: &SessionRequest,
        to: &str,
    ) -> Result<(), CamaraError> {
        let record = Handed {
            id,
            request: request.clone(),
            requested_at: OffsetDateTime::now_utc(),
            to: to.to_owned(),
            from: self.settings.node_id.clone(),
            claimed_by: None,
            refused: None,
        };
        let key = self.handed_key(id);
        let sealed = self
            .seal_handed(&key, &record)
            .map_err(|e| unavailable(&e))?;
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, sealed, None)]);
        let mut kv = self.client.kv_client();
        let done = self
            .call("hand_over", kv.txn(txn))
            .await
            .map_err(|e| unavailable(&e))?;
        if !done.succeeded() {
            return Err(CamaraError::new(
                CamaraCode::Conflict,
                format!("a session with id {id} was handed over already"),
            ));
        }
        info!(session = %id, to, "create handed over through etcd (answered REQUESTED)");
        Ok(())
    }

    fn seal_handed(&self, key: &str, record: &Handed) -> Result<Vec<u8>, ClusterError> {
        let plain = serde_json::to_vec(record).map_err(|_| ClusterError::Seal(key.to_owned()))?;
        self.sealer
            .seal(key, &plain)
            .map_err(|_| ClusterError::Seal(key.to_owned()))
    }

    fn open_handed(&self, key: &str, sealed: &[u8]) -> Option<Handed> {
        let record = self
            .sealer
            .open(key, sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice::<Handed>(&plain).ok());
        if record.is_none() {
            warn!(
                key,
                "a handed-over create cannot be read (not sealed with this cluster's key?)"
            );
        }
        record
    }

    /// The create handed over as session `id`, if it waits still, and its etcd revision.
    async fn handed_at(&self, id: SessionId) -> Result<Option<(Handed, i64)>, CamaraError> {
        let key = self.handed_key(id);
        let mut kv = self.client.kv_client();
        let got = self
            .call("read", kv.get(key.clone(), None))
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(got
            .kvs()
            .first()
            .and_then(|kv| Some((self.open_handed(&key, kv.value())?, kv.mod_revision()))))
    }

    /// The create handed over as session `id`, if it waits still.
    pub async fn handed(&self, id: SessionId) -> Result<Option<Handed>, CamaraError> {
        Ok(self.handed_at(id).await?.map(|(h, _)| h))
    }

    /// Withdraws the create handed over as session `id` for `caller`: `false` when there is
    /// none (or not `caller`'s); UNAVAILABLE while the node installing it has it.
    pub async fn withdraw(&self, id: SessionId, caller: &Caller) -> Result<bool, CamaraError> {
        let Some((h, revision)) = self.handed_at(id).await? else {
            return Ok(false);
        };
        if !h.visible_to(caller) {
            return Ok(false);
        }
        if let Some(by) = h.claimed_by.as_ref().or(h.refused.as_ref()) {
            return Err(CamaraError::new(
                CamaraCode::Unavailable,
                format!("the session is being installed or ended ({by}); try again"),
            ));
        }
        let key = self.handed_key(id);
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(vec![TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        let done = self
            .call("withdraw", kv.txn(txn))
            .await
            .map_err(|e| unavailable(&e))?;
        if !done.succeeded() {
            return Err(CamaraError::new(
                CamaraCode::Unavailable,
                "the session is being installed; try again",
            ));
        }
        info!(session = %id, "a handed-over create withdrawn before it was installed");
        Ok(true)
    }

    /// Where this node installs the creates handed over to it.
    pub fn install_with(&self, f: Installer) {
        let _ = self.install.set(f);
    }

    /// Every create waiting in etcd, with its revision, oldest first (of two that conflict, the
    /// one requested first is installed).
    async fn all_handed(&self) -> Result<Vec<(String, Handed, i64)>, ClusterError> {
        let prefix = format!("{}requested/", self.settings.prefix);
        let mut kv = self.client.kv_client();
        let got = self
            .call(
                "read",
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut all: Vec<_> = got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let h = self.open_handed(&key, kv.value())?;
                Some((key, h, kv.mod_revision()))
            })
            .collect();
        all.sort_by_key(|(_, h, _)| (h.requested_at, h.id));
        Ok(all)
    }

    /// Installs the creates handed over for devices this node serves (see the module).
    pub(super) async fn install_handed(&self) -> Result<(), ClusterError> {
        let Some(installer) = self.install.get() else {
            return Ok(());
        };
        let me = self.settings.node_id.clone();
        for (key, mut h, mut revision) in self.all_handed().await? {
            if !(installer.serves)(&h.request) {
                continue;
            }
            if h.refused.is_some() {
                // Refused by a node that stopped before telling: told now (the same event id).
                self.refuse(&key, &h).await?;
                continue;
            }
            // Claimed before it is tried, so a delete cannot withdraw it meanwhile.
            if h.claimed_by.as_deref() != Some(me.as_str()) {
                h.claimed_by = Some(me.clone());
                match self.update_handed(&key, &h, revision).await? {
                    Some(r) => revision = r,
                    None => continue,
                }
            }
            match (installer.install)(h.id, h.request.clone()).await {
                Install::Done => {
                    let mut kv = self.client.kv_client();
                    self.call("update", kv.delete(key, None)).await?;
                    info!(session = %h.id, "a handed-over create installed");
                }
                Install::Refused(e) => {
                    warn!(session = %h.id, reason = %e.message, "a handed-over create cannot be installed: UNAVAILABLE / NETWORK_TERMINATED");
                    h.refused = Some(e.message);
                    if self.update_handed(&key, &h, revision).await?.is_some() {
                        self.refuse(&key, &h).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `h` at `key` if it is still at `revision`: its new revision, or `None`.
    async fn update_handed(
        &self,
        key: &str,
        h: &Handed,
        revision: i64,
    ) -> Result<Option<i64>, ClusterError> {
        let sealed = self.seal_handed(key, h)?;
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::mod_revision(
                key.to_owned(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(vec![TxnOp::put(key.to_owned(), sealed, None)]);
        let mut kv = self.client.kv_client();
        let done = self.call("update", kv.txn(txn)).await?;
        Ok(done
            .succeeded()
            .then(|| done.header().map_or(revision + 1, |h| h.revision())))
    }

    /// Tells `h`'s requester it ended (durably queued here first) and removes the record (its
    /// place in the client's quota goes with it, `quota`).
    async fn refuse(&self, key: &str, h: &Handed) -> Result<(), ClusterError> {
        if let Some(tell) = self.end.get() {
            tell(vec![h.ended()]);
        }
        let mut kv = self.client.kv_client();
        self.call("update", kv.delete(key.to_owned(), None)).await?;
        Ok(())
    }

    /// The creates handed over from this node that wait in etcd, each with its client and sink
    /// (a restarted node counts them again).
    pub(super) async fn handed_from_here(
        &self,
    ) -> Result<Vec<(crate::model::Holder, SessionId)>, ClusterError> {
        let me = &self.settings.node_id;
        Ok(self
            .all_handed()
            .await?
            .into_iter()
            .filter(|(_, h, _)| h.from == *me)
            .map(|(_, h, _)| (crate::model::Holder::of(&h.request), h.id))
            .collect())
    }

    /// The creates handed over from this node that no longer wait in etcd give their places in
    /// the clients' quotas back.
    pub(super) async fn track_handed(&self) -> Result<(), ClusterError> {
        if !self.has_handed() {
            return Ok(());
        }
        let read = std::time::Instant::now();
        let waiting = self
            .all_handed()
            .await?
            .into_iter()
            .map(|(_, h, _)| h.id)
            .collect();
        self.handed_waiting(read, &waiting);
        Ok(())
    }

    /// Ends the creates handed over to `gone`, a node lost without a standby (told UNAVAILABLE
    /// / NETWORK_TERMINATED, as its sessions are); how many.
    pub(super) async fn end_handed_to(&self, gone: &str) -> Result<usize, ClusterError> {
        let mut ended = 0;
        for (key, h, _) in self.all_handed().await? {
            if h.to == gone {
                self.refuse(&key, &h).await?;
                ended += 1;
            }
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(client: &str, subject: Option<&str>) -> Caller {
        Caller {
            client: client.into(),
            subject: subject.map(|s| crate::model::DeviceId::Ipv4 {
                public: s.parse().expect("address"),
                private: Some(s.parse().expect("address")),
                public_port: None,
            }),
            operator: false,
            credential: None,
            relayed: false,
            assigned: None,
        }
    }

    #[test]
    fn a_handed_over_create_is_its_clients_and_its_devices_only() {
        let mut request = crate::model::testing::request([10, 0, 1, 2], 60);
        request.owner = "c1".into();
        let h = Handed {
            id: SessionId::random(),
            request,
            requested_at: OffsetDateTime::now_utc(),
            to: "b".into(),
            from: "a".into(),
            claimed_by: None,
            refused: None,
        };
        assert!(h.visible_to(&caller("c1", None)));
        assert!(h.visible_to(&caller("c1", Some("10.0.1.2"))));
        assert!(
            !h.visible_to(&caller("c1", Some("10.0.1.3"))),
            "another device"
        );
        assert!(!h.visible_to(&caller("c2", None)), "another client");
        let ended = h.ended();
        assert_eq!(ended.id, h.id);
        assert!(
            ended
                .ended
                .is_some_and(|e| e.info == crate::model::StatusInfo::NetworkTerminated)
        );
    }
}
