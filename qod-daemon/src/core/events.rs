//! Status-change events: announced in the order they were decided, kept in a revisioned log.
//!
//! The core decides every change under its lock and queues the change's event here before it
//! lets go, so the queue's order is the order of decisions, and a session's AVAILABLE is always
//! ahead of its UNAVAILABLE. Each event takes the next *revision* of this node's log when it is
//! queued. With a store, the event's log record is written in the same commit as its change,
//! and the event is *held* until that commit is durable: nothing behind it goes out until it is
//! released (committed) or withdrawn (the commit failed, so the change never happened; later
//! events of that session go too). An announced event is therefore always in the stored log,
//! and revisions carry on across restarts without reuse.
//!
//! Announcing appends to the in-memory log (the latest `retention` events, reloaded from the
//! store at start) and moves the head revision; watchers read the log after the revision they
//! last saw at their own pace (the etcd model: a slow watcher costs the daemon nothing and loses
//! nothing, and one that falls further behind than the log is told to resync). Publishing is a
//! queue push and a notifier enqueue, never I/O, so the locks here are only ever held for
//! moments.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, RwLock},
};

use prost::Message as _;
use qod_common::DeviceKey;
use qod_proto::v1 as pb;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    core::SessionView,
    model::{Caller, DeviceId, SessionId},
    notify::{Notification, Notifier},
    store::Op,
};

/// A CAMARA `qos-status-changed` event, as decided.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: Uuid,
    /// CAMARA's event time: a scheduled end, or the moment of the decision.
    pub time: OffsetDateTime,
    /// When qodd observed (decided) the change.
    pub observed: OffsetDateTime,
    /// Its place in this node's log (set when it is queued).
    pub revision: u64,
    pub session: SessionView,
}

/// An event decided but not yet announced.
pub struct Decided {
    pub event: Event,
    /// Its notification to the session's sink, if it has one.
    pub note: Option<Notification>,
}

/// Where a queued event stands: its revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place(pub u64);

/// An event as the log keeps it: what a watcher filters on, and its watch message, encoded
/// (about 0.4 KiB; decoded only for a watcher that wants it).
#[derive(Debug)]
pub struct Logged {
    pub revision: u64,
    pub session: SessionId,
    owner: Box<str>,
    subject: Option<DeviceId>,
    pub device: DeviceKey,
    message: Box<[u8]>,
}

/// Schema of the log records this qodd writes.
const RECORD_SCHEMA: u32 = 1;

/// A log record as stored (protobuf, so it is compact and fields can be added).
#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(uint32, tag = "1")]
    schema: u32,
    #[prost(string, tag = "2")]
    session: String,
    #[prost(string, tag = "3")]
    owner: String,
    /// The session's token subject (a device), JSON.
    #[prost(string, optional, tag = "4")]
    subject: Option<String>,
    #[prost(uint32, tag = "5")]
    family: u32,
    #[prost(uint32, repeated, tag = "6")]
    addr: Vec<u32>,
    /// The `pb::SessionEvent`.
    #[prost(bytes = "vec", tag = "7")]
    message: Vec<u8>,
}

impl Logged {
    fn new(event: &Event) -> Self {
        let s = &event.session.session;
        Self {
            revision: event.revision,
            session: s.id,
            owner: (*s.request.owner).into(),
            subject: s.request.subject.clone(),
            device: s.flow.device,
            message: crate::api::convert::event(event).encode_to_vec().into(),
        }
    }

    /// Whether `caller` may see this event (as it may read the session).
    pub fn visible_to(&self, caller: &Caller) -> bool {
        caller.may_see(&self.owner, self.subject.as_ref())
    }

    /// The watch message, encoded (what a Watch stream sends as it is).
    pub fn encoded(&self) -> &[u8] {
        &self.message
    }

    /// The watch message.
    #[cfg(test)]
    pub fn message(&self) -> pb::SessionEvent {
        // Encoded by this qodd, in memory or checked when loaded: it decodes.
        pb::SessionEvent::decode(&self.message[..]).unwrap_or_default()
    }

    /// The status it announces.
    #[cfg(test)]
    pub fn status(&self) -> (crate::model::QosStatus, pb::StatusInfo) {
        use crate::model::QosStatus;
        match self.message().kind {
            Some(pb::session_event::Kind::QosStatusChanged(c)) => (
                if c.qos_status() == pb::QosStatus::Available {
                    QosStatus::Available
                } else {
                    QosStatus::Unavailable
                },
                c.status_info(),
            ),
            _ => (QosStatus::Unavailable, pb::StatusInfo::Unspecified),
        }
    }

    fn record(&self) -> Vec<u8> {
        Record {
            schema: RECORD_SCHEMA,
            session: self.session.to_string(),
            owner: self.owner.to_string(),
            subject: self
                .subject
                .as_ref()
                .and_then(|d| serde_json::to_string(d).ok()),
            family: self.device.family,
            addr: self.device.addr.to_vec(),
            message: self.message.to_vec(),
        }
        .encode_to_vec()
    }

    /// A stored record, checked.
    pub fn from_record(revision: u64, bytes: &[u8]) -> Result<Self, String> {
        let r = Record::decode(bytes).map_err(|e| format!("not a log record: {e}"))?;
        if r.schema != RECORD_SCHEMA {
            return Err(format!(
                "log record schema {} is not one this qodd reads ({RECORD_SCHEMA})",
                r.schema
            ));
        }
        let session = r.session.parse().map_err(|_| "bad session id".to_owned())?;
        let subject = r
            .subject
            .map(|s| serde_json::from_str(&s).map_err(|e| format!("bad subject: {e}")))
            .transpose()?;
        let addr: [u32; 4] = r
            .addr
            .try_into()
            .map_err(|_| "bad device address".to_owned())?;
        let message = pb::SessionEvent::decode(&r.message[..])
            .map_err(|e| format!("bad watch message: {e}"))?;
        if message.revision != revision {
            return Err(format!(
                "record of revision {} kept under {revision}",
                message.revision
            ));
        }
        Ok(Self {
            revision,
            session,
            owner: r.owner.into(),
            subject,
            device: DeviceKey {
                family: r.family,
                addr,
            },
            message: r.message.into(),
        })
    }
}

struct Queued {
    revision: u64,
    session: SessionId,
    held: bool,
    /// `None` while the revision is reserved and its event not yet filled in.
    filled: Option<Filled>,
}

struct Filled {
    event: Arc<Logged>,
    time: OffsetDateTime,
    note: Option<Notification>,
}

impl Queued {
    fn ready(&self) -> bool {
        !self.held && self.filled.is_some()
    }
}

#[derive(Default)]
struct Queue {
    /// The last revision handed out.
    last: u64,
    entries: VecDeque<Queued>,
    /// Sessions whose held event was withdrawn: their later events are dropped too.
    withdrawn: HashSet<SessionId>,
}

struct Log {
    entries: VecDeque<Arc<Logged>>,
    /// The newest revision announced: moved with the entries, under the same lock, so a reader
    /// never holds an entry beyond the head it reads.
    head: u64,
    retention: usize,
    /// Every revision up to this one is no longer held (dropped for retention, or older than
    /// what the store kept).
    compacted: u64,
}

/// What a watcher reads after its revision.
#[derive(Debug)]
pub enum Read {
    /// The next events (empty: none yet).
    Events(Vec<Arc<Logged>>),
    /// Not all events after the revision are in the log any more, or the revision is not of this
    /// log (newer than its head): the watcher must re-read state and go on after `head`.
    Resync { head: u64, oldest: u64 },
}

pub struct Announcer {
    queue: Mutex<Queue>,
    log: RwLock<Log>,
    /// The last announced revision.
    head: watch::Sender<u64>,
    notifier: Option<Notifier>,
}

impl Announcer {
    /// An announcer whose log keeps the latest `retention` events.
    pub fn new(retention: usize, notifier: Option<Notifier>) -> Self {
        Self {
            queue: Mutex::default(),
            log: RwLock::new(Log {
                entries: VecDeque::new(),
                head: 0,
                retention: retention.max(1),
                compacted: 0,
            }),
            head: watch::channel(0).0,
            notifier,
        }
    }

    /// Takes up the stored log (in revision order) at start, before anything is queued.
    pub fn restore(&self, stored: Vec<Logged>) {
        let mut log = self.log.write().unwrap_or_else(|p| p.into_inner());
        let Some(last) = stored.last().map(|e| e.revision) else {
            return;
        };
        let skip = stored.len().saturating_sub(log.retention);
        log.entries = stored.into_iter().skip(skip).map(Arc::new).collect();
        log.compacted = log.entries.front().map_or(last, |e| e.revision - 1);
        log.head = last;
        self.lock().last = last;
        self.head.send_replace(last);
    }

    /// Whatever watchers read from: the head revision, changed on every announcement.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn head(&self) -> u64 {
        self.log.read().unwrap_or_else(|p| p.into_inner()).head
    }

    /// Up to `max` events after revision `after`.
    pub fn read_after(&self, after: u64, max: usize) -> Read {
        let log = self.log.read().unwrap_or_else(|p| p.into_inner());
        let head = log.head;
        if after < log.compacted || after > head {
            return Read::Resync {
                head,
                oldest: log.entries.front().map_or(0, |e| e.revision),
            };
        }
        let from = log.entries.partition_point(|e| e.revision <= after);
        Read::Events(log.entries.range(from..).take(max).cloned().collect())
    }

    /// A cursor at the head (tests).
    #[cfg(test)]
    pub fn cursor(self: &Arc<Self>) -> Cursor {
        Cursor {
            announcer: self.clone(),
            after: self.head(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next revision for an event of `session` that is yet to be built (call it
    /// under the lock that decided the change, so revision order is decision order), for
    /// [`Announcer::fill`], under that lock or once it is released. `held` keeps it, and
    /// everything behind it, until [`Announcer::release`] or [`Announcer::withdraw`]; nothing
    /// behind it is announced before it is filled.
    pub fn reserve(&self, session: SessionId, held: bool) -> Place {
        let mut q = self.lock();
        q.last += 1;
        let revision = q.last;
        q.entries.push_back(Queued {
            revision,
            session,
            held,
            filled: None,
        });
        Place(revision)
    }

    /// Fills in the event of a reserved revision (encoded here, outside every lock but the
    /// queue's short hold) and returns its log record for the commit of its change.
    pub fn fill(&self, place: Place, decided: Decided) -> Op {
        let mut event = decided.event;
        event.revision = place.0;
        let logged = Arc::new(Logged::new(&event));
        let record = Op::PutEvent {
            revision: place.0,
            record: logged.record(),
        };
        let mut q = self.lock();
        if let Ok(i) = q.entries.binary_search_by_key(&place.0, |e| e.revision) {
            q.entries[i].filled = Some(Filled {
                event: logged,
                time: event.time,
                note: decided.note,
            });
        }
        self.pump(&mut q);
        record
    }

    /// The change behind a held event is durable: announce it (and what waited behind it).
    pub fn release(&self, place: Place) {
        let mut q = self.lock();
        // Entries are in revision order.
        if let Ok(i) = q.entries.binary_search_by_key(&place.0, |e| e.revision) {
            q.entries[i].held = false;
        }
        self.pump(&mut q);
    }

    /// The change behind a held event did not happen: drop it and the session's later events.
    pub fn withdraw(&self, place: Place) {
        let mut q = self.lock();
        if let Ok(i) = q.entries.binary_search_by_key(&place.0, |e| e.revision)
            && let Some(e) = q.entries.remove(i)
        {
            q.withdrawn.insert(e.session);
        }
        self.pump(&mut q);
    }

    /// Announces every event at the head that is not held.
    fn pump(&self, q: &mut Queue) {
        if !q.entries.front().is_some_and(Queued::ready) {
            // Nothing to announce: leave the log to its readers.
            if q.entries.is_empty() {
                q.withdrawn.clear();
            }
            return;
        }
        let mut announced = None;
        // One hold of the log for the whole run of announcements (a storm releases thousands).
        let mut log = self.log.write().unwrap_or_else(|p| p.into_inner());
        while q.entries.front().is_some_and(Queued::ready) {
            let Some(Queued {
                revision,
                session,
                filled: Some(e),
                ..
            }) = q.entries.pop_front()
            else {
                break;
            };
            if q.withdrawn.contains(&session) {
                continue;
            }
            if let (Some(notifier), Some(note)) = (&self.notifier, e.note) {
                notifier.enqueue(note);
            }
            crate::metrics::METRICS.event_lateness.observe(
                (OffsetDateTime::now_utc() - e.time)
                    .as_seconds_f64()
                    .max(0.0),
            );
            log.entries.push_back(e.event);
            log.head = revision;
            while log.entries.len() > log.retention {
                if let Some(old) = log.entries.pop_front() {
                    log.compacted = old.revision;
                }
            }
            announced = Some(revision);
        }
        drop(log);
        if let Some(revision) = announced {
            self.head.send_replace(revision);
        }
        // Withdrawn sessions matter only while events of theirs can still be queued behind.
        if q.entries.is_empty() {
            q.withdrawn.clear();
        }
    }
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer").finish_non_exhaustive()
    }
}

/// Reads the log in order from a revision, without waiting (tests).
#[cfg(test)]
pub struct Cursor {
    announcer: Arc<Announcer>,
    after: u64,
}

#[cfg(test)]
impl Cursor {
    /// The next announced event, if there is one.
    pub fn try_next(&mut self) -> Option<Arc<Logged>> {
        match self.announcer.read_after(self.after, 1) {
            Read::Events(mut v) => {
                let e = v.pop()?;
                self.after = e.revision;
                Some(e)
            }
            Read::Resync { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(revision: u64) -> Logged {
        Logged {
            revision,
            session: SessionId::random(),
            owner: "c".into(),
            subject: None,
            device: DeviceKey::default(),
            message: pb::SessionEvent {
                revision,
                ..Default::default()
            }
            .encode_to_vec()
            .into(),
        }
    }

    fn revisions(read: Read) -> Vec<u64> {
        match read {
            Read::Events(v) => v.iter().map(|e| e.revision).collect(),
            Read::Resync { .. } => panic!("resync"),
        }
    }

    #[test]
    fn a_reader_resumes_after_its_revision_until_the_log_is_compacted_past_it() {
        let a = Announcer::new(3, None);
        // A stored log of 5 with a gap (a withdrawn revision), of which 3 are kept.
        a.restore([1, 2, 4, 5, 6].into_iter().map(logged).collect());
        assert_eq!(a.head(), 6);
        assert_eq!(revisions(a.read_after(3, 10)), [4, 5, 6]);
        assert_eq!(revisions(a.read_after(4, 1)), [5]);
        assert_eq!(revisions(a.read_after(6, 10)), Vec::<u64>::new());
        // Revision 2 is compacted: a reader after 1 would miss it.
        assert!(matches!(
            a.read_after(1, 10),
            Read::Resync { head: 6, oldest: 4 }
        ));
        // A revision this log never had (another store's) is not silently accepted.
        assert!(matches!(a.read_after(7, 10), Read::Resync { head: 6, .. }));
    }

    /// The stored log keeps the latest `retention` events: each commit drops what fell out.
    #[test]
    fn the_stored_log_is_compacted_to_its_retention() {
        let dir = tempfile::tempdir().expect("dir");
        let store = crate::store::Store::open_with(dir.path(), 3).expect("store");
        for revision in 1..=5 {
            let record = logged(revision).record();
            store
                .submit(vec![Op::PutEvent { revision, record }])
                .wait()
                .expect("commit");
        }
        let kept: Vec<u64> = store
            .load_events()
            .expect("load")
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(kept, [3, 4, 5]);
    }

    #[test]
    fn a_record_comes_back_as_it_was_written_and_a_foreign_one_is_refused() {
        let e = logged(9);
        let back = Logged::from_record(9, &e.record()).expect("decodes");
        assert_eq!((back.revision, back.session), (9, e.session));
        assert!(Logged::from_record(10, &e.record()).is_err());
        assert!(Logged::from_record(9, b"\xff\xff").is_err());
    }
}
