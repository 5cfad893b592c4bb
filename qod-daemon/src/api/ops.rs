//! The CAMARA operations, once for both edges. gRPC (`api`) and REST (`api::rest`) each decode
//! their wire form into the same CAMARA messages (the `qod.v1` types, which transcribe CAMARA's
//! schemas field for field), authenticate the same way (`auth::Authenticator::admit`) and call
//! these; every rule lives here, in `convert` or in the core, never in an edge.

use std::sync::Arc;

use qod_proto::v1 as pb;

use crate::{
    cluster::{
        Cluster,
        node::NodeRecord,
        pending::{Install, Installer},
    },
    core::Core,
    error::{CamaraCode, CamaraError},
    model::{Caller, Holder, ProfileName, SessionId, SessionRequest},
    notify::SinkRules,
};

use super::convert;

/// Runs `f` on the blocking pool (it may wait on the kernel, `tc` or the store), with the call's
/// span, so the core's lines (audit included) carry it.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CamaraError> + Send + 'static,
) -> Result<T, CamaraError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(worker_failed)?
}

fn worker_failed(e: tokio::task::JoinError) -> CamaraError {
    CamaraError::new(
        CamaraCode::Internal,
        format!("the request's worker failed: {e}"),
    )
}

/// A session read as GetSession answers it, with each direction's delivery when `delivery`.
fn session_info(core: &Core, view: crate::core::SessionView, delivery: bool) -> pb::SessionInfo {
    if delivery {
        let (view, d) = core.delivery(view);
        convert::session_info_with_delivery(&view, d.as_ref())
    } else {
        convert::session_info(&view)
    }
}

/// Writes (create, delete, extend) on the blocking pool at once. A write may wait there for the
/// kernel (adding a class to a large HTB tree takes milliseconds, one at a time) or the disk; the
/// rest wait here, as futures, so a flood of writes cannot take every one of the pool's threads
/// (tokio's default: 512) and leave reads queued behind them.
const WRITES_AT_ONCE: usize = 256;

/// The session and profile operations of one node.
#[derive(Clone)]
pub struct Operations {
    core: Arc<Core>,
    sinks: Arc<SinkRules>,
    writes: Arc<tokio::sync::Semaphore>,
    /// Cluster mode: calls for devices other nodes serve are passed on to them.
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode: the sessions deleted here lately (a create handed over through etcd that
    /// was installed from the call passed on and then deleted is not installed again).
    deleted: Arc<parking_lot::Mutex<Deleted>>,
}

/// The last [`DELETED_KEPT`] sessions deleted here.
#[derive(Default)]
struct Deleted {
    order: std::collections::VecDeque<SessionId>,
    ids: std::collections::HashSet<SessionId>,
}

const DELETED_KEPT: usize = 65_536;

impl Deleted {
    fn contains(&self, id: &SessionId) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: SessionId) {
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > DELETED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

impl Operations {
    pub fn new(core: Arc<Core>, sinks: SinkRules) -> Self {
        Self {
            core,
            sinks: Arc::new(sinks),
            writes: Arc::new(tokio::sync::Semaphore::new(WRITES_AT_ONCE)),
            cluster: None,
            deleted: Arc::default(),
        }
    }

    /// As a node of `cluster`.
    #[must_use]
    pub fn in_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// In a cluster, the other node that serves the device of a call (given, or the token's),
    /// unless the call was passed on to this node already (then it is served here, or refused
    /// here). `None`: this node serves it.
    fn served_elsewhere(
        &self,
        caller: &Caller,
        device: Option<&pb::Device>,
    ) -> Result<Option<(Arc<Cluster>, NodeRecord)>, CamaraError> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        if caller.relayed {
            return Ok(None);
        }
        let device = convert::caller_device(device, caller, convert::any_family)?;
        let policy = self.core.policy();
        Ok(policy
            .addresses(&device)
            .into_iter()
            .find_map(|a| cluster.serving(a))
            .filter(|n| n.id != cluster.settings().node_id)
            .map(|n| (cluster.clone(), n)))
    }

    /// In a cluster, waits (bounded) until this node's writes so far are in the cluster's copy
    /// of its sessions, which a standby takes over from: an acknowledged session is there.
    /// The write is durable here already; a copy that lags is logged and follows.
    async fn replicated(&self) {
        if let Some(c) = &self.cluster
            && !c.replicated().await
        {
            tracing::warn!(
                "the cluster's copy of this node's sessions lags (etcd is slow or away); it follows when etcd answers"
            );
        }
    }

    /// As [`Operations::replicated`], for a delete: then also until the client's quota entry
    /// is published lower (the place is free, cluster-wide, once the delete is answered).
    async fn replicated_and_freed(&self) {
        self.replicated().await;
        if let Some(c) = &self.cluster
            && !c.quotas_published().await
        {
            tracing::warn!(
                "this node's client quota entries lag (etcd is slow or away); they follow when etcd answers"
            );
        }
    }

    /// A write may go ahead: always on a single node; in a cluster while this node is in it.
    fn writable(&self) -> Result<(), CamaraError> {
        self.cluster.as_ref().map_or(Ok(()), |c| c.writable())
    }

    /// `local`, or when it does not know the session and this is a cluster node, whichever
    /// other active node does (each is asked with `call`; ids are unique, so at most one
    /// has it). A node that cannot be reached may hold it: then UNAVAILABLE, not NOT_FOUND.
    async fn anywhere<R, T, F, Fut>(
        &self,
        caller: &Caller,
        local: Result<T, CamaraError>,
        req: R,
        call: F,
    ) -> Result<T, CamaraError>
    where
        R: Clone,
        F: Fn(crate::cluster::peer::PeerApi, tonic::Request<R>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let cluster = match (&self.cluster, &local) {
            (Some(c), Err(e)) if e.code == CamaraCode::NotFound && !caller.relayed => c,
            _ => return local,
        };
        let peers = cluster.other_actives();
        let answers = futures::future::join_all(
            peers
                .iter()
                .map(|n| cluster.peers().relay(n, caller, req.clone(), &call)),
        )
        .await;
        let mut unreachable = None;
        for a in answers {
            match a {
                Ok(v) => return Ok(v),
                Err(e) if e.code == CamaraCode::NotFound => {}
                Err(e) if e.code == CamaraCode::Unavailable => unreachable = Some(e),
                Err(e) => return Err(e),
            }
        }
        unreachable.map_or(local, Err)
    }

    /// Runs write `f` on the blocking pool once one of [`WRITES_AT_ONCE`] is free.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, CamaraError> + Send + 'static,
    ) -> Result<T, CamaraError> {
        // The semaphore is never closed.
        let _turn =
            self.writes.acquire().await.map_err(|_| {
                CamaraError::new(CamaraCode::Unavailable, "the node is shutting down")
            })?;
        blocking(f).await
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// CAMARA `createSession`.
    pub async fn create(
        &self,
        caller: &Caller,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::SessionInfo, CamaraError> {
        self.writable()?;
        if let Some((cluster, node)) = self.served_elsewhere(caller, req.device.as_ref())? {
            return self.create_elsewhere(&cluster, &node, caller, req).await;
        }
        let req = convert::session_request(req, caller, &self.sinks)?;
        // A create passed on by another node comes with the id that node gave it.
        let id = caller.assigned.unwrap_or_else(SessionId::random);
        let ops = self.clone();
        let view = settled(async move { ops.create_here(req, id).await }).await?;
        tracing::Span::current().record("session", view.session.id.to_string());
        self.replicated().await;
        Ok(convert::session_info(&view))
    }

    /// Creates `req` here as session `id`. In a cluster the client's quotas are counted across
    /// the nodes: its place is taken first, and given back if the session is not created
    /// after all (run to its end by [`settled`], even when the call is dropped meanwhile).
    async fn create_here(
        &self,
        req: SessionRequest,
        id: SessionId,
    ) -> Result<crate::core::SessionView, CamaraError> {
        let holder = Holder::of(&req);
        if let Some(c) = &self.cluster {
            self.core.precheck(&req, true)?;
            c.hold_place(&holder, id, self.core.client_limits()).await?;
        }
        let core = self.core.clone();
        let created = self.write(move || core.create_as(req, id)).await;
        if let Some(c) = &self.cluster {
            c.placed(&holder, id, created.is_ok());
        }
        created
    }

    /// A create for a device `node` serves: passed on to it with the session's id; if `node`
    /// has not answered within the cluster's `install_wait` (slow, or not reached), handed
    /// over to it through etcd and answered REQUESTED (`cluster::pending`). Checked here
    /// first: the request's form, and the client's quota across the cluster.
    async fn create_elsewhere(
        &self,
        cluster: &Arc<Cluster>,
        node: &NodeRecord,
        caller: &Caller,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::SessionInfo, CamaraError> {
        let request = convert::session_request(req.clone(), caller, &self.sinks)?;
        let id = SessionId::random();
        let within = cluster.settings().install_wait;
        let unreached = match cluster
            .peers()
            .relay_create(node, caller, req, id, within, |mut api, r| async move {
                api.create_session(r).await
            })
            .await
        {
            Ok(answer) => return answer,
            Err(e) => e,
        };
        tracing::warn!(node = %node.id, session = %id, error = %unreached.message, "the node that serves the device has not answered; the create is handed over to it through etcd");
        // The profile as this node knows it (the node that serves the device checks it again).
        self.core.precheck(&request, false)?;
        let (cluster, to, limits) = (cluster.clone(), node.id.clone(), self.core.client_limits());
        settled(async move {
            let holder = Holder::of(&request);
            cluster.hold_place(&holder, id, limits).await?;
            match cluster.hand_over(id, &request, &to).await {
                Ok(()) => {}
                Err(e) if e.code == CamaraCode::Conflict => {
                    cluster.placed(&holder, id, false);
                    return Err(e);
                }
                // Not known whether it was written: read back (written: REQUESTED); unknown
                // still, its place stays until it is seen not waiting in etcd.
                Err(e) => match cluster.handed(id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        cluster.placed(&holder, id, false);
                        return Err(e);
                    }
                    Err(_) => {
                        cluster.place_handed(&holder, id);
                        return Err(e);
                    }
                },
            }
            cluster.place_handed(&holder, id);
            Ok(convert::requested_info(id, &request))
        })
        .await
    }

    /// Installs create `req`, handed over to this node through etcd as session `id` (its place
    /// in the client's quota was taken when it was handed over).
    async fn install_handed(&self, id: SessionId, req: SessionRequest) -> Install {
        let client = req.owner.clone();
        // Installed here already (from the create passed on, which arrived after all), or that
        // session deleted since: settled. An id held for another client is not this create's.
        let core = self.core.clone();
        let owner = blocking(move || Ok(core.owner_of(id))).await.ok().flatten();
        match owner {
            Some(o) if *o == *client => return Install::Done,
            Some(_) => {
                return Install::Refused(CamaraError::new(
                    CamaraCode::Conflict,
                    format!("session id {id} is in use"),
                ));
            }
            None if self.deleted.lock().contains(&id) => return Install::Done,
            None => {}
        }
        let core = self.core.clone();
        let created = self.write(move || core.create_as(req, id)).await;
        let core = self.core.clone();
        match created {
            Ok(_) => {
                // Counted here now (and no longer at the node that handed it over once that
                // finds it gone from etcd).
                if let Some(c) = &self.cluster {
                    c.usage_changed(&client);
                }
                self.replicated().await;
                Install::Done
            }
            // The create passed on arrived after all, and is installed.
            Err(_)
                if blocking(move || Ok(core.owner_of(id)))
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|o| *o == *client) =>
            {
                Install::Done
            }
            Err(e) => Install::Refused(e),
        }
    }

    /// How this node installs the creates handed over to it (cluster mode).
    pub fn installer(&self) -> Installer {
        let (serves, install) = (self.clone(), self.clone());
        Installer {
            serves: Box::new(move |req| serves.serves(&req.device)),
            install: Box::new(move |id, req| {
                let ops = install.clone();
                Box::pin(async move { ops.install_handed(id, req).await })
            }),
        }
    }

    /// Whether this node serves `device` (cluster mode: by the routing view).
    fn serves(&self, device: &crate::model::DeviceId) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        let me = &cluster.settings().node_id;
        self.core
            .policy()
            .addresses(device)
            .into_iter()
            .any(|a| cluster.serving(a).is_some_and(|n| n.id == *me))
    }

    /// `answer` when a node answered for the session; where none did, what `handed` makes of
    /// the create waiting in etcd under its id, if it is `caller`'s.
    async fn or_handed<T>(
        &self,
        caller: &Caller,
        session_id: &str,
        answer: Result<T, CamaraError>,
        handed: impl FnOnce(crate::cluster::pending::Handed) -> Result<T, CamaraError>,
    ) -> Result<T, CamaraError> {
        match answer {
            Err(e) if unplaced(&e) => match self.handed(caller, session_id).await? {
                Some(h) => handed(h),
                None => Err(e),
            },
            answer => answer,
        }
    }

    /// In a cluster, the create handed over as session `session_id` that waits still, if it is
    /// `caller`'s (asked where no node holds the session).
    async fn handed(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Option<crate::cluster::pending::Handed>, CamaraError> {
        let Some(cluster) = self.cluster.as_ref().filter(|_| !caller.relayed) else {
            return Ok(None);
        };
        let id = session(session_id)?;
        Ok(cluster.handed(id).await?.filter(|h| h.visible_to(caller)))
    }

    /// CAMARA `getSession`, with each direction's delivery read from the kernel when
    /// `delivery` (gRPC's counters; CAMARA's `SessionInfo` has no place for them).
    pub async fn get(
        &self,
        caller: &Caller,
        session_id: &str,
        delivery: bool,
    ) -> Result<pb::SessionInfo, CamaraError> {
        let id = session(session_id)?;
        let (core, who) = (self.core.clone(), caller.clone());
        // Most reads need neither the core's lock nor the kernel's classes: answered here, on
        // the async worker (a map look-up and one counters read), with no hop to the blocking
        // pool; the rest go there.
        let local = match core.read_now(id, &who) {
            Some(Ok(view)) if !delivery || view.session.reservation.is_none() => {
                Ok(session_info(&core, view, delivery))
            }
            // Its classes are read from the kernel (rtnetlink): off the async workers.
            Some(Ok(view)) => blocking(move || Ok(session_info(&core, view, true))).await,
            Some(Err(e)) => Err(e),
            // Changing under each lock-free read: read under the core's lock.
            None => {
                blocking(move || Ok(session_info(&core, core.read_locked(id, &who)?, delivery)))
                    .await
            }
        };
        self.got(caller, session_id, local).await
    }

    /// A GetSession read here, or (not found here) looked for on the other nodes and among
    /// the creates still waiting in the cluster.
    async fn got(
        &self,
        caller: &Caller,
        session_id: &str,
        local: Result<pb::SessionInfo, CamaraError>,
    ) -> Result<pb::SessionInfo, CamaraError> {
        // Another node's session comes without the delivery counters (gRPC metadata that is
        // not passed on).
        let req = pb::GetSessionRequest {
            session_id: session_id.to_owned(),
        };
        let found = self
            .anywhere(caller, local, req, |mut api, r| async move {
                api.get_session(r).await
            })
            .await;
        self.or_handed(caller, session_id, found, |h| {
            Ok(convert::requested_info(h.id, &h.request))
        })
        .await
    }

    /// CAMARA `deleteSession`.
    pub async fn delete(&self, caller: &Caller, session_id: &str) -> Result<(), CamaraError> {
        let id = session(session_id)?;
        self.writable()?;
        let (core, who) = (self.core.clone(), caller.clone());
        let local = self.write(move || core.delete(id, &who)).await;
        if local.is_ok() && self.cluster.is_some() {
            // A create of this id still waiting in etcd (handed over while the call passed on
            // was slow) is not installed after the delete: remembered here, and its record
            // goes with the session's copy (`Cluster::write_copy`).
            self.deleted.lock().insert(id);
            self.replicated_and_freed().await;
        }
        let req = pb::DeleteSessionRequest {
            session_id: session_id.to_owned(),
        };
        let deleted = self
            .anywhere(caller, local, req, |mut api, r| async move {
                api.delete_session(r).await.map(|r| r.map(|_| ()))
            })
            .await;
        match (deleted, &self.cluster) {
            (Err(e), Some(c)) if unplaced(&e) && !caller.relayed => {
                if c.withdraw(id, caller).await? {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            (deleted, _) => deleted,
        }
    }

    /// CAMARA `extendQosSessionDuration`.
    pub async fn extend(
        &self,
        caller: &Caller,
        session_id: &str,
        requested_additional_duration: i64,
    ) -> Result<pb::SessionInfo, CamaraError> {
        let id = session(session_id)?;
        let n = requested_additional_duration;
        let add = u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            CamaraError::invalid(
                "requestedAdditionalDuration",
                format!("{n} must be 1 to 4294967295 seconds"),
            )
        })?;
        self.writable()?;
        let (core, who) = (self.core.clone(), caller.clone());
        let local = self
            .write(move || core.extend(id, add, &who))
            .await
            .map(|view| convert::session_info(&view));
        if local.is_ok() {
            self.replicated().await;
        }
        let req = pb::ExtendQosSessionDurationRequest {
            session_id: session_id.to_owned(),
            requested_additional_duration: i32::try_from(n).unwrap_or(i32::MAX),
        };
        let extended = self
            .anywhere(caller, local, req, |mut api, r| async move {
                api.extend_qos_session_duration(r).await
            })
            .await;
        self.or_handed(caller, session_id, extended, |_| {
            Err(CamaraError::new(
                CamaraCode::SessionExtensionNotAllowed,
                "the session is REQUESTED (not yet installed by the node that serves its device); only an AVAILABLE session can be extended",
            ))
        })
        .await
    }

    /// CAMARA `retrieveSessionsByDevice`.
    pub async fn retrieve(
        &self,
        caller: &Caller,
        device: Option<&pb::Device>,
    ) -> Result<Vec<pb::SessionInfo>, CamaraError> {
        if let Some((cluster, node)) = self.served_elsewhere(caller, device)? {
            let req = pb::RetrieveSessionsByDeviceRequest {
                device: device.cloned(),
            };
            return cluster
                .peers()
                .relay(&node, caller, req, |mut api, r| async move {
                    api.retrieve_sessions_by_device(r).await
                })
                .await
                .map(|r| r.sessions);
        }
        let device = convert::caller_device(device, caller, convert::any_family)?;
        Ok(self
            .core
            .retrieve(&device, caller)?
            .iter()
            .map(convert::session_info)
            .collect())
    }

    /// CAMARA `retrieveQoSProfiles`.
    pub fn retrieve_profiles(
        &self,
        caller: &Caller,
        req: &pb::RetrieveQosProfilesRequest,
    ) -> Result<Vec<pb::QosProfile>, CamaraError> {
        let policy = self.core.policy();
        // Every profile of this node applies to every device it serves: the device (the filter
        // of a two-legged token, or a three-legged token's subject) only has to be served here.
        if req.device.is_some() || caller.subject.is_some() {
            policy.resolve_all(&convert::caller_device(
                req.device.as_ref(),
                caller,
                convert::any_family,
            )?)?;
        }
        let name = req
            .name
            .as_deref()
            .map(|n| ProfileName::parse("name", n))
            .transpose()?;
        let status = pb::QosProfileStatus::try_from(req.status).map_err(|_| {
            CamaraError::invalid("status", format!("{} is not a profile status", req.status))
        })?;
        Ok(policy
            .profiles
            .iter()
            .filter(|p| name.as_ref().is_none_or(|n| *n == p.name))
            .filter(|p| {
                status == pb::QosProfileStatus::Unspecified
                    || convert::profile_status(p.status) == status
            })
            .map(convert::qos_profile)
            .collect())
    }

    /// CAMARA `getQosProfile`.
    pub fn get_profile(&self, caller: &Caller, name: &str) -> Result<pb::QosProfile, CamaraError> {
        let name = ProfileName::parse("name", name)?;
        let policy = self.core.policy();
        let not_found = || {
            CamaraError::field(
                CamaraCode::NotFound,
                "name",
                format!("no QoS profile named {name} is available"),
            )
        };
        // CAMARA: with a three-legged token, a profile only if it is available to the token's
        // device, which it is when this node serves that device (as the list does).
        if let Some(subject) = &caller.subject
            && policy.resolve_all(subject).is_err()
        {
            return Err(not_found());
        }
        let profile = policy.profiles.get(&name).ok_or_else(not_found)?;
        Ok(convert::qos_profile(profile))
    }
}

/// Runs `f` to its end even if the caller stops waiting (a call dropped by its client or
/// by a deadline): what it took (a place in a client's quota) is settled either way.
async fn settled<T: Send + 'static>(
    f: impl Future<Output = Result<T, CamaraError>> + Send + 'static,
) -> Result<T, CamaraError> {
    use tracing::Instrument as _;
    tokio::spawn(f.instrument(tracing::Span::current()))
        .await
        .map_err(worker_failed)?
}

/// No node answered for the session: none holds it (NOT_FOUND), or one that may hold it cannot
/// be reached (UNAVAILABLE). It may still wait in etcd, handed over.
fn unplaced(e: &CamaraError) -> bool {
    matches!(e.code, CamaraCode::NotFound | CamaraCode::Unavailable)
}

fn session(id: &str) -> Result<SessionId, CamaraError> {
    let id: SessionId = id.parse()?;
    tracing::Span::current().record("session", id.to_string());
    Ok(id)
}
