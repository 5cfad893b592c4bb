//! The gRPC services. Each handler converts its request once (`convert`), calls the [`Core`], and
//! converts the answer back; errors become statuses through `From<CamaraError>`.

pub mod convert;
pub mod correlator;
pub mod node;
pub mod ops;
pub mod rest;
pub mod watch;

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use qod_proto::v1::{
    self as pb, qos_profiles_server::QosProfiles, quality_on_demand_server::QualityOnDemand,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    auth::{authorize, scope},
    core::Core,
    error::{CamaraCode, CamaraError},
    model::SessionId,
};

pub use ops::Operations;

/// [`ops::blocking`] for the node service, whose errors are statuses already.
pub(crate) async fn off_async<T: Send + 'static, E: Into<Status> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Status::internal(format!("the request's worker failed: {e}")))?
        .map_err(Into::into)
}

/// `qod.v1.QualityOnDemand`.
pub struct SessionService {
    ops: Operations,
    /// Ends watch streams when the daemon shuts down, so the server can drain.
    shutdown: CancellationToken,
    /// Watch streams open per client.
    watches: Arc<Watches>,
    /// The event log's head, as watch streams are woken by it.
    paced: watch::Paced,
}

/// Watch streams open per API client, at most `max` each: a stream costs a task and a place on
/// the event fan-out, and one client must not take them all.
#[derive(Debug)]
struct Watches {
    max: u32,
    open: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// One open Watch stream; closing it (dropping the stream) frees its place.
struct WatchSlot {
    watches: Arc<Watches>,
    client: String,
}

impl Watches {
    fn open(self: &Arc<Self>, client: &str) -> Result<WatchSlot, CamaraError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(client.to_owned()).or_default();
        if *n >= self.max {
            return Err(CamaraError::new(
                CamaraCode::QuotaExceeded,
                format!(
                    "this API client already has its maximum of {} watch streams open; close one, or watch several sessions on one stream",
                    self.max
                ),
            ));
        }
        *n += 1;
        Ok(WatchSlot {
            watches: self.clone(),
            client: client.to_owned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

impl SessionService {
    /// Needs a tokio runtime (it starts the watch streams' pacer).
    pub fn new(ops: Operations, shutdown: CancellationToken, max_watches_per_client: u32) -> Self {
        Self {
            paced: watch::Paced::start(ops.core().events()),
            ops,
            shutdown,
            watches: Arc::new(Watches {
                max: max_watches_per_client,
                open: std::sync::Mutex::default(),
            }),
        }
    }

    fn core(&self) -> &Core {
        self.ops.core()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl QualityOnDemand for SessionService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let caller = authorize(&request, scope::SESSIONS_CREATE)?;
        let info = self.ops.create(&caller, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let caller = authorize(&request, scope::SESSIONS_READ)?;
        let id = request.into_inner().session_id;
        Ok(Response::new(self.ops.get(&caller, &id, true).await?))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = authorize(&request, scope::SESSIONS_DELETE)?;
        let id = request.into_inner().session_id;
        self.ops.delete(&caller, &id).await?;
        Ok(Response::new(pb::DeleteSessionResponse {}))
    }

    async fn extend_qos_session_duration(
        &self,
        request: Request<pb::ExtendQosSessionDurationRequest>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let caller = authorize(&request, scope::SESSIONS_UPDATE)?;
        let req = request.into_inner();
        let info = self
            .ops
            .extend(
                &caller,
                &req.session_id,
                req.requested_additional_duration.into(),
            )
            .await?;
        Ok(Response::new(info))
    }

    async fn retrieve_sessions_by_device(
        &self,
        request: Request<pb::RetrieveSessionsByDeviceRequest>,
    ) -> Result<Response<pb::RetrieveSessionsByDeviceResponse>, Status> {
        let caller = authorize(&request, scope::SESSIONS_RETRIEVE_BY_DEVICE)?;
        let sessions = self
            .ops
            .retrieve(&caller, request.into_inner().device.as_ref())
            .await?;
        Ok(Response::new(pb::RetrieveSessionsByDeviceResponse {
            sessions,
        }))
    }

    type WatchSessionEventsStream = EventStream;

    /// Served on the wire by [`watch::Route`], which sends the log's encoded events as they
    /// are; this decodes them, for a caller of the service itself.
    async fn watch_session_events(
        &self,
        request: Request<pb::WatchSessionEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let events = self.open_watch(request)?.into_inner();
        Ok(Response::new(Box::pin(
            events.map(|m| m.and_then(|m| m.decode())),
        )))
    }
}

impl SessionService {
    /// A Watch stream: the caller's events after the revision asked for, until the caller's
    /// token or the daemon ends.
    fn open_watch(
        &self,
        request: Request<pb::WatchSessionEventsRequest>,
    ) -> Result<Response<watch::Outgoings>, Status> {
        let caller = authorize(&request, scope::SESSIONS_READ)?;
        // The stream ends when the token does; the client reconnects with a fresh one.
        let token_left = crate::auth::time_left(&request);
        let req = request.into_inner();
        let session: Option<SessionId> = req.session_id.as_deref().map(str::parse).transpose()?;
        // Watching another client's session is refused as reading it would be; one that does
        // not exist (yet, or any more) may be watched.
        if let Some(id) = session
            && let Err(e) = self.core().check_access(id, &caller)
            && e.code == CamaraCode::PermissionDenied
        {
            return Err(e.into());
        }
        let device = match (req.device.as_ref(), &caller.subject) {
            (None, None) => None,
            (given, _) => Some(self.core().policy().resolve_all(&convert::caller_device(
                given,
                &caller,
                convert::any_family,
            )?)?),
        };
        let slot = self.watches.open(&caller.client)?;
        let filter = watch::Filter {
            caller,
            session,
            devices: device,
        };
        let events = watch::stream(
            self.core().events().clone(),
            &self.paced,
            filter,
            req.after_revision,
            slot,
        )
        .map(Ok);
        let shutdown = self.shutdown.clone().cancelled_owned();
        let end = async move {
            match token_left {
                Some(left) => tokio::select! {
                    () = shutdown => {}
                    () = tokio::time::sleep(left) => {}
                },
                None => shutdown.await,
            }
        };
        Ok(Response::new(Box::pin(events.take_until(end))))
    }
}

/// `qod.v1.QosProfiles`.
pub struct ProfileService {
    ops: Operations,
}

impl ProfileService {
    pub fn new(ops: Operations) -> Self {
        Self { ops }
    }
}

#[tonic::async_trait]
impl QosProfiles for ProfileService {
    async fn retrieve_qos_profiles(
        &self,
        request: Request<pb::RetrieveQosProfilesRequest>,
    ) -> Result<Response<pb::RetrieveQosProfilesResponse>, Status> {
        let caller = authorize(&request, scope::PROFILES_READ)?;
        let profiles = self.ops.retrieve_profiles(&caller, request.get_ref())?;
        Ok(Response::new(pb::RetrieveQosProfilesResponse { profiles }))
    }

    async fn get_qos_profile(
        &self,
        request: Request<pb::GetQosProfileRequest>,
    ) -> Result<Response<pb::QosProfile>, Status> {
        let caller = authorize(&request, scope::PROFILES_READ)?;
        Ok(Response::new(
            self.ops.get_profile(&caller, &request.get_ref().name)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use clap::Parser as _;
    use futures::StreamExt as _;

    use super::*;
    use crate::{
        config::{Cli, Config},
        core::Limits,
        dataplane::FakeDataPlane,
        model::{ApplicationServer, DeviceId, ProfileName, SessionRequest},
        notify::SinkRules,
    };

    fn service(retention: usize) -> (Arc<Core>, SessionService) {
        let policy = Config::from_parts(None, &Cli::parse_from(["qodd", "--insecure", "-i", "lo"]))
            .expect("defaults")
            .policy;
        let limits = Limits {
            max_sessions: 64,
            retention: Duration::from_secs(360),
            interfaces: Vec::new(),
            event_log_retention: retention,
            max_active_per_client: u32::MAX,
            max_sinks_per_client: u32::MAX,
            policer_burst: crate::config::Config::built_in().policer_burst,
        };
        let core = Arc::new(
            Core::new(Box::new(FakeDataPlane::default()), policy, limits, None).expect("core"),
        );
        let service = SessionService::new(
            Operations::new(core.clone(), SinkRules::default()),
            CancellationToken::new(),
            64,
        );
        (core, service)
    }

    async fn watch(service: &SessionService, after: Option<u64>) -> EventStream {
        let mut r = Request::new(pb::WatchSessionEventsRequest {
            after_revision: after,
            ..Default::default()
        });
        r.extensions_mut()
            .insert(crate::auth::Principal::insecure());
        service
            .watch_session_events(r)
            .await
            .expect("watch")
            .into_inner()
    }

    fn create(core: &Core, i: u8) -> SessionId {
        let ip = Ipv4Addr::new(10, 0, 0, i);
        core.create(SessionRequest {
            device: DeviceId::Ipv4 {
                public: ip,
                private: Some(ip),
                public_port: None,
            },
            server: ApplicationServer {
                ipv4: Some("192.0.2.1/32".parse().expect("net")),
                ipv6: None,
                given: (None, None),
            },
            device_ports: None,
            server_ports: None,
            profile: ProfileName::parse("qosProfile", "QOS_E").expect("name"),
            sink: None,
            sink_credential: None,
            duration: 60,
            device_given: None,
            owner: crate::auth::INSECURE_CLIENT.into(),
            subject: None,
        })
        .expect("create")
        .session
        .id
    }

    async fn next(stream: &mut EventStream) -> pb::SessionEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message within 5 s")
            .expect("open")
            .expect("event")
    }

    fn changed(ev: &pb::SessionEvent) -> &pb::QosStatusChanged {
        match &ev.kind {
            Some(pb::session_event::Kind::QosStatusChanged(c)) => c,
            other => panic!("not a status change: {other:?}"),
        }
    }

    /// A live watcher is told its revision first; one that did not read while many events were
    /// announced still gets every one of them, in order; one that resumes after a revision
    /// gets exactly what followed it.
    #[tokio::test]
    async fn a_slow_or_resuming_watcher_gets_every_event_in_order() {
        let (core, service) = service(1000);
        let mut live = watch(&service, None).await;
        let first = next(&mut live).await;
        assert!(
            matches!(first.kind, Some(pb::session_event::Kind::Bookmark(_))),
            "{first:?}"
        );
        assert_eq!(first.revision, 0);
        let ids: Vec<SessionId> = (1..=50u8).map(|i| create(&core, i)).collect();
        let mut revisions = Vec::new();
        for id in &ids {
            let ev = next(&mut live).await;
            assert_eq!(changed(&ev).session_id, id.to_string());
            assert!(ev.observed_time.is_some());
            revisions.push(ev.revision);
        }
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
        let mut resumed = watch(&service, Some(revisions[29])).await;
        for id in &ids[30..] {
            assert_eq!(
                changed(&next(&mut resumed).await).session_id,
                id.to_string()
            );
        }
        // Then it is live.
        let later = create(&core, 51);
        assert_eq!(
            changed(&next(&mut resumed).await).session_id,
            later.to_string()
        );
    }

    /// Streams are woken at most every `watch::PACE`: a change that comes while the pacer
    /// waits out its pause still wakes them when the pause ends (none is lost, however the
    /// changes fall against the pauses).
    #[tokio::test]
    async fn a_change_during_the_pacers_pause_still_reaches_the_watcher() {
        let (core, service) = service(1000);
        let mut live = watch(&service, None).await;
        next(&mut live).await;
        for i in 1..=20u8 {
            // The stream waits for the pacer first, then the change comes: right after the
            // last one, so the pacer is in its pause.
            let waiting = tokio::spawn(async move {
                let ev = next(&mut live).await;
                (ev, live)
            });
            tokio::time::sleep(Duration::from_millis(1)).await;
            let id = create(&core, i);
            let (ev, stream) = waiting.await.expect("the waiting stream");
            live = stream;
            assert_eq!(changed(&ev).session_id, id.to_string());
            if i % 2 == 0 {
                // Past the pause: the next change is the first of a quiet spell.
                tokio::time::sleep(watch::PACE * 2).await;
            }
        }
    }

    /// A watcher resuming from further back than the log keeps is told to resync, with the
    /// oldest revision kept and the current one, then gets what follows.
    #[tokio::test]
    async fn a_watcher_behind_the_log_is_told_to_resync() {
        let (core, service) = service(4);
        for i in 1..=10u8 {
            create(&core, i);
        }
        let mut stream = watch(&service, Some(2)).await;
        let resync = next(&mut stream).await;
        match resync.kind {
            Some(pb::session_event::Kind::ResyncNeeded(r)) => assert_eq!(r.oldest_revision, 7),
            other => panic!("{other:?}"),
        }
        assert_eq!(resync.revision, 10);
        let id = create(&core, 11);
        let ev = next(&mut stream).await;
        assert_eq!(
            (changed(&ev).session_id.clone(), ev.revision),
            (id.to_string(), 11)
        );
        // A revision from beyond this log (another store's) is refused the same way.
        let mut stream = watch(&service, Some(99)).await;
        assert!(matches!(
            next(&mut stream).await.kind,
            Some(pb::session_event::Kind::ResyncNeeded(_))
        ));
    }
}
