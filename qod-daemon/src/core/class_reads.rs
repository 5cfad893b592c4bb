//! Reads of the sessions' HTB classes for GetSession, with a bound on the wait.
//!
//! A class's statistics come from the kernel over rtnetlink, and the kernel answers under its
//! `rtnl_lock`. Whoever holds that lock (a link going down resets every class of its tree, a
//! large tree growing by one class, qodd parking thousands of classes after a link loss) holds
//! every reader up with it: milliseconds. So the reads run on a thread of their own. A reader
//! whose read the kernel has held for [`CLASS_READ_WAIT`] takes the class's last reading instead
//! (its age reported beside it), and the read, once answered, is kept for the next reader. A
//! reader that finds the thread merely behind (a busy machine), or has no last reading to give,
//! waits for the answer as before.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use tokio::time::Instant;

use tracing::warn;

use crate::{
    dataplane::{Classes, TcStats},
    model::SessionId,
};

/// Longest a GetSession waits for the kernel to report one of the session's classes before it
/// answers with that class's last reading.
pub const CLASS_READ_WAIT: Duration = Duration::from_millis(1);

/// Reads waiting for the reading thread at most; a reader that finds it full takes the last
/// reading at once.
const QUEUED_AT_MOST: usize = 256;

/// Longest a reader waits for its answer in any case (the thread's own netlink exchanges have a
/// deadline of their own).
const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// One class of one session: the session and the direction (0 up, 1 down).
type Key = (SessionId, usize);

/// A class's statistics and when the kernel gave them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassReading {
    pub stats: TcStats,
    pub at: Instant,
    /// Read for this reader (else: its class's last reading).
    pub now: bool,
}

struct Job {
    key: Key,
    interface: String,
    index: u16,
    answer: SyncSender<Option<ClassReading>>,
}

/// The reading thread and the last reading of each live session's classes.
pub struct ClassReads {
    jobs: SyncSender<Job>,
    last: Arc<parking_lot::Mutex<HashMap<Key, ClassReading>>>,
    /// When the thread's current read went to the kernel (µs after `epoch`; 0: none).
    reading_since: Arc<AtomicU64>,
    epoch: std::time::Instant,
    wait: Duration,
}

impl ClassReads {
    /// Starts the reading thread over `classes`; it ends when this value is dropped.
    pub fn new(classes: Arc<dyn Classes>) -> Self {
        Self::with_wait(classes, CLASS_READ_WAIT)
    }

    fn with_wait(classes: Arc<dyn Classes>, wait: Duration) -> Self {
        let (jobs, queued) = sync_channel(QUEUED_AT_MOST);
        let last = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        let reading_since = Arc::new(AtomicU64::new(0));
        let epoch = std::time::Instant::now();
        let thread = Reader {
            last: Arc::clone(&last),
            reading_since: Arc::clone(&reading_since),
            epoch,
        };
        // If the thread cannot start, every read finds the queue gone and answers from the
        // last readings (none): GetSession then reports no class, as when a read fails.
        if let Err(e) = std::thread::Builder::new()
            .name("qodd-class-reads".into())
            .spawn(move || thread.read_all(classes.as_ref(), &queued))
        {
            warn!(error = %e, "cannot start the thread that reads session classes");
        }
        Self {
            jobs,
            last,
            reading_since,
            epoch,
            wait,
        }
    }

    /// The kernel has held the thread's current read for `wait` or longer.
    fn kernel_holds(&self) -> bool {
        let since = self.reading_since.load(Ordering::Acquire);
        since != 0 && micros(self.epoch).saturating_sub(since) >= self.wait.as_micros() as u64
    }

    /// Direction `direction` of session `id`'s class `index` on `interface`, read now if the
    /// kernel answers within the wait, else its last reading (none if it was never read).
    pub fn read(
        &self,
        id: SessionId,
        direction: usize,
        interface: &str,
        index: u16,
    ) -> Option<ClassReading> {
        let key = (id, direction);
        let (answer, answered) = sync_channel(1);
        let job = Job {
            key,
            interface: interface.to_owned(),
            index,
            answer,
        };
        let last = || self.last.lock().get(&key).copied();
        match self.jobs.try_send(job) {
            Ok(()) => {
                let started = std::time::Instant::now();
                loop {
                    match answered.recv_timeout(self.wait) {
                        Ok(reading) => return reading.map(|r| ClassReading { now: true, ..r }),
                        Err(RecvTimeoutError::Disconnected) => break,
                        Err(RecvTimeoutError::Timeout) => {
                            if started.elapsed() >= LONGEST_WAIT {
                                break;
                            }
                            if self.kernel_holds()
                                && let Some(r) = last()
                            {
                                return Some(r);
                            }
                        }
                    }
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {}
        }
        last()
    }

    /// Forgets session `id`'s readings (it ended).
    pub fn forget(&self, id: SessionId) {
        let mut last = self.last.lock();
        last.remove(&(id, 0));
        last.remove(&(id, 1));
    }
}

/// Microseconds since `epoch`, at least 1 (0 means "no read under way").
fn micros(epoch: std::time::Instant) -> u64 {
    (epoch.elapsed().as_micros() as u64).max(1)
}

/// The reading thread's side of [`ClassReads`].
struct Reader {
    last: Arc<parking_lot::Mutex<HashMap<Key, ClassReading>>>,
    reading_since: Arc<AtomicU64>,
    epoch: std::time::Instant,
}

impl Reader {
    /// Each job read, kept as its class's last reading, and answered (the reader may have gone
    /// on without it).
    fn read_all(&self, classes: &dyn Classes, jobs: &Receiver<Job>) {
        for job in jobs {
            self.reading_since
                .store(micros(self.epoch), Ordering::Release);
            let read = classes.class_stats(&job.interface, job.index);
            self.reading_since.store(0, Ordering::Release);
            let reading = match read {
                Ok(stats) => {
                    let reading = ClassReading {
                        stats,
                        at: Instant::now(),
                        now: false,
                    };
                    self.last.lock().insert(job.key, reading);
                    Some(reading)
                }
                Err(e) => {
                    warn!(session = %job.key.0, error = %crate::anyhow_like(&e), "cannot read a session class");
                    None
                }
            };
            let _ = job.answer.try_send(reading);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{DataPlaneError, scheduler::ClassSpec};
    use std::sync::Barrier;

    /// Classes whose statistics read holds until the test lets it go (the kernel's lock held by
    /// someone else), and counts bytes up by one each read.
    struct Held {
        go: Barrier,
        bytes: parking_lot::Mutex<u64>,
        hold: std::sync::atomic::AtomicBool,
    }

    impl Classes for Held {
        fn set_class(&self, _: &str, _: u16, _: ClassSpec) -> Result<TcStats, DataPlaneError> {
            Ok(TcStats::default())
        }
        fn park_class(&self, _: &str, _: u16) -> Result<(), DataPlaneError> {
            Ok(())
        }
        fn class_stats(&self, _: &str, _: u16) -> Result<TcStats, DataPlaneError> {
            if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
                self.go.wait();
            }
            let mut b = self.bytes.lock();
            *b += 1;
            Ok(TcStats {
                bytes: *b,
                ..TcStats::default()
            })
        }
    }

    #[test]
    fn a_read_the_kernel_holds_up_answers_with_the_last_reading_and_is_kept_for_the_next() {
        let held = Arc::new(Held {
            go: Barrier::new(2),
            bytes: parking_lot::Mutex::new(0),
            hold: std::sync::atomic::AtomicBool::new(false),
        });
        let reads = ClassReads::with_wait(held.clone(), Duration::from_millis(50));
        let id = SessionId::random();
        // Answered at once: read now.
        let first = reads.read(id, 0, "edge", 7).expect("a reading");
        assert_eq!((first.stats.bytes, first.now), (1, true));
        // The kernel holds the read up: the reader is answered with the last reading...
        held.hold.store(true, std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        let second = reads.read(id, 0, "edge", 7).expect("the last reading");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            second,
            ClassReading {
                now: false,
                ..first
            },
            "the last reading, with its own time"
        );
        // A session never read has no last reading to give: its reader waits for the kernel.
        let reads = Arc::new(reads);
        let other = SessionId::random();
        let first_read = std::thread::spawn({
            let reads = Arc::clone(&reads);
            move || reads.read(other, 1, "edge", 8)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!first_read.is_finished(), "answered without a reading");
        // ...and the read, once the kernel answers, is the next reader's last reading.
        held.hold.store(false, std::sync::atomic::Ordering::SeqCst);
        held.go.wait();
        let r = first_read
            .join()
            .expect("reader")
            .expect("read once the kernel answers");
        assert_eq!((r.stats.bytes, r.now), (3, true));
        let deadline = Instant::now() + Duration::from_secs(5);
        while reads.last.lock().get(&(id, 0)).map(|r| r.stats.bytes) != Some(2) {
            assert!(Instant::now() < deadline, "the held read was not kept");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The other direction was never read; a session's readings go when it ends.
        assert_eq!(reads.last.lock().get(&(id, 1)), None);
        reads.forget(id);
        reads.forget(other);
        assert!(reads.last.lock().is_empty());
    }
}
