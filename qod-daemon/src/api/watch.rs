//! A Watch stream: a reader of the node's event log from a revision (see `core::events`).
//!
//! Each stream reads the log after the revision it last sent, in batches, at the pace its client
//! takes them (HTTP/2 flow control pushes back, and the daemon holds nothing for it beyond the
//! log it keeps anyway). It never skips an event the log still has; when the log no longer
//! holds what comes next, it says `resync_needed` and goes on from the head. A stream whose
//! filter skipped events sends a bookmark after a quiet stretch, so its client's resume point
//! does not fall behind the log's compaction.
//!
//! Events go out as the log holds them, encoded once when they were decided: a thousand streams
//! sending one event copy its bytes a thousand times and encode it none. [`Route`] serves the
//! method with a codec that writes those bytes ([`Outgoing`]); tonic's generated handler, which
//! would decode each one only for its codec to encode it again, is not on the path.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use futures::Stream;
use prost::Message as _;
use qod_common::DeviceKey;
use qod_proto::v1 as pb;
use tokio::{sync::watch, time::Instant};
use tonic::{
    Status,
    codec::{DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, StdError, http},
    server::NamedService,
};

use crate::{
    core::events::{Announcer, Logged, Read},
    model::{Caller, SessionId},
};

/// Events one read takes from the log.
const BATCH: usize = 256;
/// How long after skipping an event a stream that sent nothing since tells its position.
pub const BOOKMARK_AFTER: Duration = Duration::from_secs(5);

/// Which events a stream sends.
pub struct Filter {
    pub caller: Caller,
    pub session: Option<SessionId>,
    /// The devices' keys (every key a device has).
    pub devices: Option<Vec<DeviceKey>>,
}

impl Filter {
    fn wants(&self, e: &Logged) -> bool {
        e.visible_to(&self.caller)
            && self.session.is_none_or(|id| id == e.session)
            && self
                .devices
                .as_ref()
                .is_none_or(|keys| keys.contains(&e.device))
    }
}

struct Reader<S> {
    log: Arc<Announcer>,
    changes: watch::Receiver<u64>,
    filter: Filter,
    /// The last revision read.
    after: u64,
    /// The last revision the client was told of (an event or a bookmark).
    told: u64,
    /// When a bookmark is due (events were skipped since the last message).
    bookmark_due: Option<Instant>,
    out: VecDeque<Outgoing>,
    /// Held for as long as the stream lives (its place in the client's quota).
    _slot: S,
}

/// One message of a Watch stream, encoded: an event as the log keeps it, or a position (a
/// bookmark or a resync notice) made for this stream.
pub enum Outgoing {
    Event(Arc<Logged>),
    Position(Box<[u8]>),
}

impl Outgoing {
    fn position(revision: u64, kind: pb::session_event::Kind) -> Self {
        Self::Position(
            pb::SessionEvent {
                revision,
                kind: Some(kind),
                ..Default::default()
            }
            .encode_to_vec()
            .into(),
        )
    }

    pub fn encoded(&self) -> &[u8] {
        match self {
            Self::Event(e) => e.encoded(),
            Self::Position(m) => m,
        }
    }

    /// The message, decoded (for a caller that is not the wire).
    pub fn decode(&self) -> Result<pb::SessionEvent, Status> {
        pb::SessionEvent::decode(self.encoded())
            .map_err(|e| Status::internal(format!("a logged event does not decode: {e}")))
    }
}

impl<S> Reader<S> {
    fn send(&mut self, revision: u64, message: Outgoing) {
        self.told = revision;
        self.bookmark_due = None;
        self.out.push_back(message);
    }

    /// Reads what the log has after `after`; false when it has nothing yet.
    fn read(&mut self) -> bool {
        match self.log.read_after(self.after, BATCH) {
            Read::Resync { head, oldest } => {
                self.after = head;
                self.send(
                    head,
                    Outgoing::position(
                        head,
                        pb::session_event::Kind::ResyncNeeded(pb::ResyncNeeded {
                            oldest_revision: oldest,
                        }),
                    ),
                );
                true
            }
            Read::Events(events) => {
                let Some(last) = events.last().map(|e| e.revision) else {
                    return false;
                };
                for e in events {
                    if self.filter.wants(&e) {
                        self.send(e.revision, Outgoing::Event(e));
                    }
                }
                self.after = last;
                if self.told < self.after && self.bookmark_due.is_none() {
                    self.bookmark_due = Some(Instant::now() + BOOKMARK_AFTER);
                }
                true
            }
        }
    }
}

/// How often, at most, watch streams are woken to read the log: a stream that is woken reads
/// whatever came in the meantime, so at a thousand changes a second each stream reads a few
/// events a time instead of being woken for each (its messages go out in one write). An idle
/// log's first change wakes them at once.
pub const PACE: Duration = Duration::from_millis(5);

/// The log's head, announced to watch streams at most once every [`PACE`].
#[derive(Clone)]
pub struct Paced(Arc<watch::Sender<u64>>);

impl Paced {
    /// Starts following `log` (on the current tokio runtime).
    pub fn start(log: &Announcer) -> Self {
        let mut raw = log.changes();
        let paced = Arc::new(watch::channel(*raw.borrow()).0);
        let sender = paced.clone();
        tokio::spawn(async move {
            while raw.changed().await.is_ok() {
                let head = *raw.borrow_and_update();
                sender.send_replace(head);
                tokio::time::sleep(PACE).await;
            }
        });
        Self(paced)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The stream of `filter`'s events after revision `after` (`None`: from now, after a bookmark
/// naming the current revision). `slot` is held until the stream is dropped.
pub fn stream<S: Send + 'static>(
    log: Arc<Announcer>,
    paced: &Paced,
    filter: Filter,
    after: Option<u64>,
    slot: S,
) -> impl Stream<Item = Outgoing> + Send + use<S> {
    // Subscribed before the head is read, so nothing announced in between is missed.
    let changes = paced.subscribe();
    let head = log.head();
    let mut reader = Reader {
        log,
        changes,
        filter,
        after: after.unwrap_or(head),
        told: 0,
        bookmark_due: None,
        out: VecDeque::new(),
        _slot: slot,
    };
    if after.is_none() {
        reader.send(
            head,
            Outgoing::position(head, pb::session_event::Kind::Bookmark(pb::Bookmark {})),
        );
    }
    futures::stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(m) = r.out.pop_front() {
                return Some((m, r));
            }
            if r.read() {
                continue;
            }
            let due = r.bookmark_due;
            tokio::select! {
                changed = r.changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                    let at = r.after;
                    r.send(at, Outgoing::position(at, pb::session_event::Kind::Bookmark(pb::Bookmark {})));
                }
            }
        }
    })
}

/// The gRPC path of the method [`Route`] serves.
const PATH: &str = "/qod.v1.QualityOnDemand/WatchSessionEvents";

/// The sessions service with its Watch method served from the log's encoded events: every other
/// method goes to `inner` (the generated server). The Watch method does not see the generated
/// server's settings: it takes the same decoding limit (`max_decoding`), and like it compresses
/// nothing. Compression or an encoding limit set on the generated server must be set here too.
#[derive(Clone)]
pub struct Route<S> {
    inner: S,
    sessions: Arc<super::SessionService>,
    max_decoding: usize,
}

impl<S> Route<S> {
    pub fn new(inner: S, sessions: Arc<super::SessionService>, max_decoding: usize) -> Self {
        Self {
            inner,
            sessions,
            max_decoding,
        }
    }
}

impl<S: NamedService> NamedService for Route<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Route<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PATH {
            return Box::pin(self.inner.call(req));
        }
        let method = Method(self.sessions.clone());
        let max = self.max_decoding;
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(Codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

struct Method(Arc<super::SessionService>);

/// A Watch stream's messages.
pub type Outgoings = std::pin::Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

impl tonic::server::ServerStreamingService<pb::WatchSessionEventsRequest> for Method {
    type Response = Outgoing;
    type ResponseStream = Outgoings;
    type Future = BoxFuture<tonic::Response<Outgoings>, Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchSessionEventsRequest>) -> Self::Future {
        let sessions = self.0.clone();
        Box::pin(async move { sessions.open_watch(request) })
    }
}

/// Decodes the request as prost does; writes each outgoing message's bytes as they are.
struct Codec;

impl tonic::codec::Codec for Codec {
    type Encode = Outgoing;
    type Decode = pb::WatchSessionEventsRequest;
    type Encoder = Codec;
    type Decoder = Codec;

    fn encoder(&mut self) -> Codec {
        Codec
    }

    fn decoder(&mut self) -> Codec {
        Codec
    }
}

impl Encoder for Codec {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, item.encoded());
        Ok(())
    }
}

impl Decoder for Codec {
    type Item = pb::WatchSessionEventsRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::WatchSessionEventsRequest::decode(src)
            .map(Some)
            .map_err(|e| {
                crate::error::CamaraError::invalid(
                    "request",
                    format!("the request message is not valid protobuf ({e})"),
                )
                .into()
            })
    }
}
