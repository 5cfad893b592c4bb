//! A Watch stream: a reader of the node's event log from a revision (see `core::events`).
//!
//! Each stream reads the log after the revision it last sent, in batches, at the pace its client
//! takes them (HTTP/2 flow control pushes back, and the daemon holds nothing for it beyond the
//! log it keeps anyway). It never skips an event the log still has; when the log no longer
//! holds what comes next, it says `resync_needed` and goes on from the head. A stream whose
//! filter skipped events sends a bookmark after a quiet stretch, so its client's resume point
//! does not fall behind the log's compaction.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use futures::Stream;
use qod_common::DeviceKey;
use qod_proto::v1 as pb;
use tokio::{sync::watch, time::Instant};

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
    out: VecDeque<pb::SessionEvent>,
    /// Held for as long as the stream lives (its place in the client's quota).
    _slot: S,
}

fn position(revision: u64, kind: pb::session_event::Kind) -> pb::SessionEvent {
    pb::SessionEvent {
        revision,
        kind: Some(kind),
        ..Default::default()
    }
}

impl<S> Reader<S> {
    fn send(&mut self, message: pb::SessionEvent) {
        self.told = message.revision;
        self.bookmark_due = None;
        self.out.push_back(message);
    }

    /// Reads what the log has after `after`; false when it has nothing yet.
    fn read(&mut self) -> bool {
        match self.log.read_after(self.after, BATCH) {
            Read::Resync { head, oldest } => {
                self.after = head;
                self.send(position(
                    head,
                    pb::session_event::Kind::ResyncNeeded(pb::ResyncNeeded {
                        oldest_revision: oldest,
                    }),
                ));
                true
            }
            Read::Events(events) => {
                let Some(last) = events.last().map(|e| e.revision) else {
                    return false;
                };
                for e in &events {
                    if self.filter.wants(e) {
                        self.send(e.message());
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

/// The stream of `filter`'s events after revision `after` (`None`: from now, after a bookmark
/// naming the current revision). `slot` is held until the stream is dropped.
pub fn stream<S: Send + 'static>(
    log: Arc<Announcer>,
    filter: Filter,
    after: Option<u64>,
    slot: S,
) -> impl Stream<Item = pb::SessionEvent> + Send {
    // Subscribed before the head is read, so nothing announced in between is missed.
    let changes = log.changes();
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
        reader.send(position(
            head,
            pb::session_event::Kind::Bookmark(pb::Bookmark {}),
        ));
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
                    r.send(position(at, pb::session_event::Kind::Bookmark(pb::Bookmark {})));
                }
            }
        }
    })
}
