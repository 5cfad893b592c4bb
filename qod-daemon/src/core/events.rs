//! Status-change events, announced in the order they were decided.
//!
//! The core decides every change under its lock and queues the change's event here before it
//! lets go, so the queue's order is the order of decisions, and a session's AVAILABLE is always
//! ahead of its UNAVAILABLE. An event whose change is not yet durable (a create waiting for its
//! commit) is *held*: nothing behind it goes out until it is released (committed) or withdrawn
//! (the commit failed, so the change never happened; later events of that session go too).
//! Each event gets the next sequence number of this node's run. Publishing is a broadcast send
//! and a queue push, never I/O, so the queue's lock is only ever held for moments.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use time::OffsetDateTime;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{
    core::SessionView,
    model::SessionId,
    notify::{Notification, Notifier},
};

/// A CAMARA `qos-status-changed` event.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: Uuid,
    pub time: OffsetDateTime,
    /// Order of announcement on this node since it started (1, 2, …): a watcher sees a
    /// session's events in increasing order.
    pub sequence: u64,
    pub session: SessionView,
}

/// An event decided but not yet announced.
pub struct Decided {
    pub event: Event,
    /// Its notification to the session's sink, if it has one.
    pub note: Option<Notification>,
}

/// Where a queued event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place(u64);

struct Queued {
    sequence: u64,
    held: bool,
    event: Arc<Event>,
    note: Option<Notification>,
}

#[derive(Default)]
struct Queue {
    last: u64,
    entries: VecDeque<Queued>,
    /// Sessions whose held event was withdrawn: their later events are dropped too.
    withdrawn: HashSet<SessionId>,
}

pub struct Announcer {
    queue: Mutex<Queue>,
    watchers: broadcast::Sender<Arc<Event>>,
    notifier: Option<Notifier>,
}

impl Announcer {
    pub fn new(buffer: usize, notifier: Option<Notifier>) -> Self {
        Self {
            queue: Mutex::default(),
            watchers: broadcast::channel(buffer.max(1)).0,
            notifier,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.watchers.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `decided` (call it under the lock that decided the change); `held` keeps it, and
    /// everything behind it, until [`Announcer::release`] or [`Announcer::withdraw`].
    pub fn queue(&self, decided: Decided, held: bool) -> Place {
        let mut q = self.lock();
        q.last += 1;
        let sequence = q.last;
        let mut event = decided.event;
        event.sequence = sequence;
        q.entries.push_back(Queued {
            sequence,
            held,
            event: Arc::new(event),
            note: decided.note,
        });
        self.pump(&mut q);
        Place(sequence)
    }

    /// The change behind a held event is durable: announce it (and what waited behind it).
    pub fn release(&self, place: Place) {
        let mut q = self.lock();
        if let Some(e) = q.entries.iter_mut().find(|e| e.sequence == place.0) {
            e.held = false;
        }
        self.pump(&mut q);
    }

    /// The change behind a held event did not happen: drop it and the session's later events.
    pub fn withdraw(&self, place: Place) {
        let mut q = self.lock();
        if let Some(i) = q.entries.iter().position(|e| e.sequence == place.0)
            && let Some(e) = q.entries.remove(i)
        {
            let session = e.event.session.session.id;
            q.withdrawn.insert(session);
        }
        self.pump(&mut q);
    }

    /// Announces every event at the head that is not held.
    fn pump(&self, q: &mut Queue) {
        while q.entries.front().is_some_and(|e| !e.held) {
            let Some(e) = q.entries.pop_front() else {
                break;
            };
            if q.withdrawn.contains(&e.event.session.session.id) {
                continue;
            }
            if let (Some(notifier), Some(note)) = (&self.notifier, e.note) {
                notifier.enqueue(note);
            }
            // No receiver is not an error: nobody is watching.
            let _ = self.watchers.send(e.event);
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
