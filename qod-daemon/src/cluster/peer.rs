//! Calls passed on to the node that serves them: over gRPC to the node's advertised API
//! address, with the caller's own access token (which that node verifies itself: every node of a
//! cluster trusts the same identity provider) and marked as relayed, so the receiving node
//! serves it and never passes it on again.

use std::{collections::HashMap, time::Duration};

use qod_proto::{
    client::{self, QodChannel},
    v1::quality_on_demand_client::QualityOnDemandClient,
};
use tonic::metadata::MetadataValue;

use super::node::NodeRecord;
use crate::{
    auth::{ASSIGNED_ID, RELAYED_BY},
    error::{CamaraCode, CamaraError},
    model::{Caller, SessionId},
};

/// The gRPC client of another node's session API.
pub type PeerApi = QualityOnDemandClient<QodChannel>;

/// Channels to the other nodes, opened on first use and kept.
pub struct Peers {
    me: String,
    options: client::Options,
    timeout: Duration,
    channels: parking_lot::Mutex<HashMap<String, (String, QodChannel)>>,
}

impl Peers {
    /// Peers verified against `ca` (PEM; `None`: plain HTTP/2, insecure labs only), each call
    /// given `timeout`.
    pub fn new(me: String, ca: Option<Vec<u8>>, timeout: Duration) -> Self {
        Self {
            me,
            options: client::Options {
                token: None,
                ca_pem: ca,
                identity: None,
                server_name: None,
            },
            timeout,
            channels: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn unreachable(node: &NodeRecord, why: impl std::fmt::Display) -> CamaraError {
        CamaraError::new(
            CamaraCode::Unavailable,
            format!("cluster node {} cannot be reached: {why}", node.id),
        )
    }

    async fn channel(&self, node: &NodeRecord) -> Result<QodChannel, CamaraError> {
        let addr = node
            .advertise
            .first()
            .ok_or_else(|| Self::unreachable(node, "it advertises no API address"))?;
        if let Some((at, ch)) = self.channels.lock().get(&node.id)
            && at == addr
        {
            return Ok(ch.clone());
        }
        let ch = tokio::time::timeout(self.timeout, client::connect(addr, &self.options))
            .await
            .map_err(|_| {
                Self::unreachable(
                    node,
                    format_args!("no connection within {:?}", self.timeout),
                )
            })?
            .map_err(|e| Self::unreachable(node, e))?;
        self.channels
            .lock()
            .insert(node.id.clone(), (addr.clone(), ch.clone()));
        Ok(ch)
    }

    /// Passes `req` on to `node` as `caller` with `call`, and answers what `node` answered.
    pub async fn relay<R, T, F, Fut>(
        &self,
        node: &NodeRecord,
        caller: &Caller,
        req: R,
        call: F,
    ) -> Result<T, CamaraError>
    where
        F: FnOnce(PeerApi, tonic::Request<R>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.pass_on(node, caller, req, None, call).await?
    }

    /// Passes create `req` on to `node` as `caller`, the session's id `assigned`: `Ok` with
    /// `node`'s answer, or `Err` when `node` cannot be reached or has not answered `within`.
    /// `node` is given no deadline: a create it has begun, it finishes (and the same id handed
    /// over to it later is then found installed).
    pub async fn relay_create<R, T, F, Fut>(
        &self,
        node: &NodeRecord,
        caller: &Caller,
        req: R,
        assigned: SessionId,
        within: Duration,
        call: F,
    ) -> Result<Result<T, CamaraError>, CamaraError>
    where
        F: FnOnce(PeerApi, tonic::Request<R>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        tokio::time::timeout(
            within,
            self.pass_on(node, caller, req, Some(assigned), call),
        )
        .await
        .map_err(|_| Self::unreachable(node, format_args!("no answer within {within:?}")))?
    }

    /// `Err`: `node` was not reached; `Ok`: its answer.
    async fn pass_on<R, T, F, Fut>(
        &self,
        node: &NodeRecord,
        caller: &Caller,
        req: R,
        assigned: Option<SessionId>,
        call: F,
    ) -> Result<Result<T, CamaraError>, CamaraError>
    where
        F: FnOnce(PeerApi, tonic::Request<R>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let api = QualityOnDemandClient::new(self.channel(node).await?);
        let mut request = tonic::Request::new(req);
        if assigned.is_none() {
            request.set_timeout(self.timeout);
        }
        let meta = request.metadata_mut();
        if let Some(id) = assigned
            && let Ok(id) = MetadataValue::try_from(id.to_string())
        {
            meta.insert(ASSIGNED_ID, id);
        }
        if let Some(c) = &caller.credential {
            let bearer = MetadataValue::try_from(format!("Bearer {}", c.0)).map_err(|_| {
                CamaraError::new(CamaraCode::Internal, "the access token cannot be passed on")
            })?;
            meta.insert("authorization", bearer);
        }
        if let Ok(me) = MetadataValue::try_from(self.me.as_str()) {
            meta.insert(RELAYED_BY, me);
        }
        match call(api, request).await {
            Ok(r) => Ok(Ok(r.into_inner())),
            Err(status) => {
                let e = CamaraError::from_status(&status);
                // A transport failure carries no CAMARA reason: say which node it was.
                if e.code == CamaraCode::Unavailable
                    && tonic_types::StatusExt::get_details_error_info(&status).is_none()
                {
                    self.channels.lock().remove(&node.id);
                    return Err(Self::unreachable(node, status.message()));
                }
                Ok(Err(e))
            }
        }
    }
}
