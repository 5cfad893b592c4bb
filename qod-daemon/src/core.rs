//! The session core: one owner for the session store, the data plane, the expiry schedule and the
//! event stream, so that every change to maps and store happens in one place, in one order.
//!
//! Invariant: after every call, successful or not, a session is AVAILABLE in the store exactly
//! when its rule is in the data plane. A data plane failure leaves the store as it was.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use parking_lot::{Mutex, MutexGuard};
use qod_common::{
    DeviceKey, FlowCounters, FlowRule, MAX_PORT_RANGES, MAX_SESSIONS_PER_DEVICE, OWN_POLICE_DOWN,
    OWN_POLICE_UP, OWN_PRIORITY_DOWN, OWN_PRIORITY_UP, Policer, PortRange, ProfileTreatment,
};
use time::OffsetDateTime;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::{
    audit,
    core::events::{Announcer, Decided, Logged, Place},
    core::profiles::ProfileTable,
    dataplane::{
        Classes, CountersReader, DataPlane, DataPlaneError, DeviceLister, KernelEntries,
        ManagedInterface, Side, TcStats, monotonic_ns,
        scheduler::{
            BEST_EFFORT_CLASS, BurstRule, ClassSpec, LOW_LATENCY_CLASS, MAX_SESSION_CLASSES,
            session_class,
        },
    },
    error::{CamaraCode, CamaraError},
    model::{
        AppFlow, Caller, DeviceId, Holder, QosStatus, SessionId, SessionRequest, StatusInfo,
        network_words, secs, time_left,
    },
    notify::{Notification, Notifier},
    policy::Policy,
    profile::{Band, ProfileStatus, QosProfile},
    store::{Ended, Op, Store, StorePlace, StoredSession, Ticket},
};

/// Sizes and topology the core works within.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_sessions: u32,
    /// How long UNAVAILABLE sessions stay readable.
    pub retention: Duration,
    pub interfaces: Vec<ManagedInterface>,
    /// Events the log keeps for watchers to resume from.
    pub event_log_retention: usize,
    /// AVAILABLE sessions one API client may hold at once.
    pub max_active_per_client: u32,
    /// Distinct sinks (by origin) one API client's AVAILABLE sessions may notify.
    pub max_sinks_per_client: u32,
    /// Maximum-rate policers' bucket depth, as time at the rate.
    pub policer_burst: Duration,
}

/// The capacity pools admission control keeps per scheduled interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    Guaranteed,
    LowLatency,
}

impl ReservedClass {
    /// A class on `interface` whose index, spec and baseline are still to be filled in.
    fn on(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            index: 0,
            spec: ClassSpec::parked(0),
            pool: None,
            baseline: TcStats::default(),
        }
    }
}

impl Pool {
    fn name(self) -> &'static str {
        match self {
            Self::Guaranteed => "guaranteed",
            Self::LowLatency => "low-latency",
        }
    }
}

/// One HTB class of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedClass {
    pub interface: String,
    /// Its per-session class index on `interface` (each interface numbers its own).
    pub index: u16,
    pub spec: ClassSpec,
    /// The pool and bit/s it holds, if admission-controlled.
    pub pool: Option<(Pool, u64)>,
    /// What the class had counted when the session took it: a reused class keeps the totals
    /// of the sessions before, so the holder's figures are counted from here.
    pub baseline: TcStats,
}

/// A session's own classes, at most one per scheduled interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub classes: Vec<ReservedClass>,
}

/// Smallest policer burst.
/// At least two of the largest GSO packets: tc sees a GSO packet whole, so a smaller burst would
/// drop every one of them when offloads are on.
const MIN_BURST_BYTES: u64 = 2 * 65_536;

/// The policer of a `rate_bps` maximum: its bucket holds `burst` at the rate, at least
/// [`MIN_BURST_BYTES`].
fn policer(rate_bps: u64, burst: Duration) -> Policer {
    let bytes =
        u64::try_from(u128::from(rate_bps / 8) * burst.as_millis() / 1000).unwrap_or(u64::MAX);
    Policer::new(rate_bps, bytes.max(MIN_BURST_BYTES))
}

/// The target minimum and maximum rate of the direction that leaves through a `side` interface:
/// downstream towards the device, upstream towards the server.
fn direction_rates(
    profile: &QosProfile,
    side: Side,
) -> (Option<crate::profile::Rate>, Option<crate::profile::Rate>) {
    match side {
        Side::Device => (
            profile.target_min_downstream_rate,
            profile.max_downstream_rate,
        ),
        _ => (profile.target_min_upstream_rate, profile.max_upstream_rate),
    }
}

/// What `profile` says of bursts in the direction that leaves through a `side` interface:
/// downstream towards the device, upstream towards the server.
fn burst_rule(profile: &QosProfile, side: Side) -> BurstRule {
    let burst_rate = match side {
        Side::Device => profile.max_downstream_burst_rate,
        _ => profile.max_upstream_burst_rate,
    };
    BurstRule {
        burst_rate_bps: burst_rate.map(|r| r.bits_per_second()).filter(|b| *b > 0),
        delay_budget: profile.packet_delay_budget.map(|d| d.as_duration()),
    }
}

/// A session as stored.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: SessionId,
    pub request: SessionRequest,
    pub flow: AppFlow,
    pub started_at: OffsetDateTime,
    /// Granted overall duration in seconds, extensions included.
    pub duration: u32,
    pub state: SessionState,
    /// Its guaranteed-rate classes, while AVAILABLE.
    pub reservation: Option<Reservation>,
    /// When the expiry task next acts on this session (expire, or purge once UNAVAILABLE).
    deadline: Instant,
}

#[derive(Clone, Debug)]
pub enum SessionState {
    Available {
        /// Counters slot in the data plane.
        slot: u32,
        expires_at: OffsetDateTime,
    },
    Unavailable {
        info: StatusInfo,
        ended_at: OffsetDateTime,
        /// Counters as they stood when the rule left the data plane (boxed: the ledger keeps
        /// a million sessions, most of them AVAILABLE).
        counters: Box<FlowCounters>,
    },
}

impl Session {
    pub fn qos_status(&self) -> QosStatus {
        match self.state {
            SessionState::Available { .. } => QosStatus::Available,
            SessionState::Unavailable { .. } => QosStatus::Unavailable,
        }
    }
}

/// A session with its current counters: what the API renders.
#[derive(Clone, Debug)]
pub struct SessionView {
    pub session: Session,
    pub counters: FlowCounters,
}

impl SessionView {
    /// CAMARA `duration`: granted while AVAILABLE, effective (start to end) once UNAVAILABLE.
    pub fn duration(&self) -> u32 {
        match self.session.state {
            SessionState::Available { .. } => self.session.duration,
            SessionState::Unavailable { ended_at, .. } => {
                let secs = (ended_at - self.session.started_at).whole_seconds();
                u32::try_from(secs).unwrap_or(0).max(1)
            }
        }
    }
}

pub mod events;
mod profiles;
pub use events::Event;
pub use profiles::ProfileTableError;

/// Lock-free reads of one session before [`Core::read`] takes the lock instead.
const READ_ATTEMPTS: usize = 3;

/// Stored sessions decoded ahead of the restore at a time.
const RESTORE_CHUNK: usize = 1024;

/// Orphaned kernel entries left to look for after a continuing restore.
struct Reconcile {
    /// The devices the kernel held entries for, listed during the restore.
    devices: Vec<DeviceKey>,
    /// Counter slots held back until the orphans are gone: those an entry counted into that no
    /// restored session holds, and the kept slots no restored session claimed.
    held: Vec<u32>,
}

/// A restore under way (see [`Core::restore_from`]).
struct Restoring {
    wall: OffsetDateTime,
    retention: time::Duration,
    /// Slots reserved for stored sessions (continuing), and those a restored session took.
    kept: HashSet<u32>,
    assigned: HashSet<u32>,
    restored: usize,
    moved: Vec<Op>,
    /// Continuing: the kernel's entries as listed beside the restore.
    listed: Option<Result<KernelEntries, DataPlaneError>>,
}

/// Hands out counter slots; a slot is in use exactly while its session is AVAILABLE.
#[derive(Debug)]
struct Slots {
    free: Vec<u32>,
    next: u32,
    capacity: u32,
    /// Slots from here up were never handed out since the counter maps were made empty (a
    /// data plane built afresh at start): their counters are zero already. `u32::MAX` when
    /// that is not known (pinned maps carried on).
    zeroed_from: u32,
}

impl Slots {
    /// A free slot, and whether its counters are known to be zero (so they need no reset).
    fn take(&mut self) -> Option<(u32, bool)> {
        if let Some(slot) = self.free.pop() {
            return Some((slot, false));
        }
        (self.next < self.capacity).then(|| {
            self.next += 1;
            let slot = self.next - 1;
            (slot, slot >= self.zeroed_from)
        })
    }

    fn give_back(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// Slots in use: one per AVAILABLE session (and per create being installed).
    fn used(&self) -> u64 {
        u64::from(self.next).saturating_sub(self.free.len() as u64)
    }

    /// Whether every slot is in use (the next [`Slots::take`] would fail).
    fn take_none_left(&self) -> bool {
        self.free.is_empty() && self.next >= self.capacity
    }

    /// Takes every slot of `wanted` that is free (repeats allowed) out of use, and returns them:
    /// they are handed out again only once given back.
    fn hold(&mut self, wanted: &[u32]) -> Vec<u32> {
        let mut marked = vec![false; self.capacity as usize];
        for &s in wanted {
            if let Some(m) = marked.get_mut(s as usize) {
                *m = true;
            }
        }
        let mut held = Vec::new();
        self.free.retain(|&s| {
            let hold = marked[s as usize];
            if hold {
                held.push(s);
                marked[s as usize] = false;
            }
            !hold
        });
        // Free slots from `next` up: those wanted are held, the others below them free.
        if let Some(top) = (self.next..self.capacity)
            .rev()
            .find(|&s| marked[s as usize])
        {
            for s in (self.next..=top).rev() {
                if marked[s as usize] {
                    held.push(s);
                } else {
                    self.free.push(s);
                }
            }
            self.next = top + 1;
        }
        held
    }

    /// Marks `taken` as in use (restoring over pinned maps); every other slot below the highest
    /// is free.
    fn reserve(&mut self, taken: &HashSet<u32>) {
        let Some(max) = taken.iter().max() else {
            return;
        };
        self.next = self.next.max(max + 1);
        self.free = (0..self.next)
            .rev()
            .filter(|s| !taken.contains(s))
            .collect();
    }
}

/// The per-session class indexes of one scheduled interface. Classes are made once and parked
/// when their session ends (see `dataplane::scheduler`), and a parked class is handed out before
/// any other free index, so the next session changes a class instead of adding one.
#[derive(Debug, Default)]
struct ClassPool {
    /// Classes in the kernel that no session holds, parked by this qodd or adopted at start.
    parked: BTreeSet<u16>,
    /// Free indexes below `next` with no class known to be there.
    unmade: BTreeSet<u16>,
    /// Every index from here on is free and unmade.
    next: u32,
}

impl ClassPool {
    /// A free index, and whether its class is parked in the kernel.
    fn take(&mut self) -> Option<(u16, bool)> {
        if let Some(i) = self.parked.pop_first() {
            return Some((i, true));
        }
        if let Some(i) = self.unmade.pop_first() {
            return Some((i, false));
        }
        let i = u16::try_from(self.next)
            .ok()
            .filter(|i| *i < MAX_SESSION_CLASSES)?;
        self.next += 1;
        Some((i, false))
    }

    /// Gives `index` back: `parked` if its class is in the kernel and parked.
    fn give_back(&mut self, index: u16, parked: bool) {
        if parked {
            self.parked.insert(index);
        } else {
            self.unmade.insert(index);
        }
    }

    /// Takes in the `parked` classes of an adopted tree (no session holds them; those that do
    /// were taken from this pool, so they lie below `next`): every other index up to the
    /// highest of them is free and unmade.
    fn adopt(&mut self, parked: &[u16]) {
        let top = parked.iter().map(|i| u32::from(*i) + 1).max().unwrap_or(0);
        for i in self.next..top {
            if let Ok(i) = u16::try_from(i) {
                self.unmade.insert(i);
            }
        }
        self.next = self.next.max(top);
        for i in parked {
            self.unmade.remove(i);
            self.parked.insert(*i);
        }
    }
}

/// How a session comes to be installed.
#[derive(Clone, Copy, Debug)]
enum Admission {
    /// Asked for now: profile rules checked, persisted before it is acknowledged, announced.
    New,
    /// Read back from the store at start; `slot` when it keeps its place in the pinned maps.
    Restored { slot: Option<u32> },
}

/// The ledger's sessions by id, mirrored for readers: every change made here (under the core's
/// lock) is published to [`Reads`], where GetSession finds it without that lock.
struct Sessions {
    map: FastMap<SessionId, Arc<Session>>,
    reads: Reads,
}

/// The sessions as readers see them: each entry the ledger's own `Arc`, swapped whole on every
/// change (a reader holds a consistent session, never half of a change).
type Reads = Arc<dashmap::DashMap<SessionId, Arc<Session>, foldhash::fast::RandomState>>;

/// The ledger's large maps: foldhash, seeded at random per map (keys are session ids and
/// device addresses, which clients choose), about three times as fast as std's SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl Sessions {
    fn get(&self, id: &SessionId) -> Option<&Session> {
        self.map.get(id).map(|s| &**s)
    }

    fn insert(&mut self, session: Session) {
        let (id, session) = (session.id, Arc::new(session));
        self.reads.insert(id, session.clone());
        self.map.insert(id, session);
    }

    fn remove(&mut self, id: &SessionId) -> Option<Arc<Session>> {
        self.reads.remove(id);
        self.map.remove(id)
    }

    fn contains_key(&self, id: &SessionId) -> bool {
        self.map.contains_key(id)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn keys(&self) -> impl Iterator<Item = &SessionId> {
        self.map.keys()
    }

    fn values(&self) -> impl Iterator<Item = &Session> {
        self.map.values().map(|s| &**s)
    }
}

struct Inner {
    dp: Box<dyn DataPlane>,
    sessions: Sessions,
    /// Every stored session (AVAILABLE or retained UNAVAILABLE) by device.
    /// (Almost always one: inline, no allocation of its own.)
    by_device: FastMap<DeviceKey, smallvec::SmallVec<[SessionId; 1]>>,
    deadlines: BTreeSet<(Instant, SessionId)>,
    slots: Slots,
    /// Per-session class indexes by scheduled interface.
    classes: HashMap<String, ClassPool>,
    /// Bit/s reserved per scheduled interface and pool.
    reserved: HashMap<(String, Pool), u64>,
    /// Managed interfaces that are down or gone: no session can be enforced meanwhile.
    links_down: HashSet<String>,
    /// What each API client's AVAILABLE sessions hold.
    active_by_owner: HashMap<Arc<str>, OwnerUse>,
    /// Which entry of the classifier's profile table each profile holds.
    profiles: ProfileTable,
}

/// The delivered bytes per direction (up, down) at one reading, and the rates measured then.
#[derive(Clone, Copy, Debug)]
struct Meter {
    at: Instant,
    bytes: [u64; 2],
    achieved: [Option<u64>; 2],
    interval: Duration,
}

/// Shortest interval an achieved rate is measured over: readings closer together repeat the
/// previous rate.
pub const METER_INTERVAL: Duration = Duration::from_secs(1);

/// One direction of a live session as GetSession reports it: what its own scheduler class (where
/// the direction has one) delivered, dropped and queues, and the achieved rate beside the granted
/// one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionReport {
    pub class: Option<crate::dataplane::TcStats>,
    /// Bit/s delivered (after the class's queue, or let through by the classifier where the
    /// direction has no class of its own) over `interval`.
    pub achieved_bps: Option<u64>,
    pub interval: Option<Duration>,
    /// The profile's target minimum and maximum for the direction.
    pub granted_min_bps: Option<u64>,
    pub granted_max_bps: Option<u64>,
}

/// Both directions of a live session (see [`DirectionReport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    pub up: DirectionReport,
    pub down: DirectionReport,
}

/// An API client's AVAILABLE sessions: how many, and how many per sink origin (each origin is
/// one delivery worker, so their number is bounded per client).
#[derive(Debug, Default)]
struct OwnerUse {
    active: u32,
    sinks: HashMap<String, u32>,
}

impl Inner {
    /// Makes `req` hold the one copy of its client's and its profile's names that every live
    /// session shares (a million sessions, a handful of clients and profiles).
    fn share_names(&self, req: &mut SessionRequest, policy: &Policy) {
        if let Some((shared, _)) = self.active_by_owner.get_key_value(&*req.owner) {
            req.owner = shared.clone();
        }
        if let Some(shared) = policy.profiles.name(&req.profile) {
            req.profile = shared.clone();
        }
    }

    fn count_active(&mut self, req: &SessionRequest, up: bool) {
        let origin = req.sink.as_deref().map(crate::notify::sink_origin);
        if up {
            let usage = self.active_by_owner.entry(req.owner.clone()).or_default();
            usage.active += 1;
            if let Some(o) = origin {
                *usage.sinks.entry(o).or_default() += 1;
            }
        } else if let Some(usage) = self.active_by_owner.get_mut(&*req.owner) {
            usage.active = usage.active.saturating_sub(1);
            if let Some(o) = origin
                && let Some(n) = usage.sinks.get_mut(&o)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    usage.sinks.remove(&o);
                }
            }
            if usage.active == 0 {
                self.active_by_owner.remove(&*req.owner);
            }
        }
    }

    /// The session `id` if `caller` may touch it: `NOT_FOUND` if there is none,
    /// `PERMISSION_DENIED` if it is another client's (which says nothing more about it).
    fn accessible(&self, id: SessionId, caller: &Caller) -> Result<&Session, CamaraError> {
        let session = self.sessions.get(&id).ok_or_else(|| not_found(id))?;
        may_access(caller, session)?;
        Ok(session)
    }
}

/// `PERMISSION_DENIED` if `session` is another client's (which says nothing more about it).
fn may_access(caller: &Caller, session: &Session) -> Result<(), CamaraError> {
    if caller.may_access(&session.request) {
        Ok(())
    } else {
        Err(CamaraError::new(
            CamaraCode::PermissionDenied,
            "the access token does not allow access to this session",
        ))
    }
}

/// Which sessions [`Core::node_sessions`] lists (`None`: any).
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    pub status: Option<QosStatus>,
    pub profile: Option<String>,
    pub client: Option<String>,
    pub device: Option<qod_common::DeviceKey>,
}

/// The kernel state and who owns each part of it.
#[derive(Clone, Debug)]
pub struct KernelView {
    pub entries: Vec<(qod_common::DeviceKey, Vec<qod_common::FlowRule>)>,
    /// (interface, per-session class index) present in the schedulers.
    pub classes: Vec<(String, u16)>,
    /// Counter slot → the AVAILABLE session holding it, and its device.
    pub slot_owner: HashMap<u32, (SessionId, qod_common::DeviceKey)>,
    /// (interface, class index) → the AVAILABLE session holding it.
    pub class_owner: HashMap<(String, u16), SessionId>,
    /// (interface, class index) of the classes qodd parked for reuse.
    pub parked: HashSet<(String, u16)>,
    /// The profile of each AVAILABLE session (shared with the ledger: no copy of the name).
    pub session_profile: HashMap<SessionId, crate::model::ProfileName>,
    /// The profile table's entries in use, and the profile holding each ([`RETIRED_PROFILE`]
    /// for one whose profile left the policy while rules may still point at it).
    pub profiles: HashMap<u16, (qod_common::ProfileTreatment, String)>,
}

/// What [`Core::verify`] found.
#[derive(Clone, Debug)]
pub struct Drift {
    pub store_sessions: usize,
    pub memory_sessions: usize,
    pub available: usize,
    pub kernel_entries: usize,
    pub drift: Vec<String>,
}

/// What [`Core::node_stats`] reports.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    /// (status, profile) → sessions.
    pub sessions: Vec<((&'static str, String), u64)>,
    pub slots_used: u64,
    pub slots_capacity: u64,
    pub pools: Vec<PoolStats>,
    /// Managed interfaces and whether each is usable.
    pub links: Vec<(String, bool)>,
    /// Per-session scheduler classes held by AVAILABLE sessions, per scheduled interface.
    pub session_classes: Vec<(String, u64)>,
    /// Per-session classes parked for reuse, per scheduled interface.
    pub parked_classes: Vec<(String, u64)>,
    /// What the classifier treated per managed interface and band (empty if unreadable).
    pub bands: Vec<(
        String,
        [qod_common::BandCounters; qod_common::BANDS as usize],
    )>,
    /// What the classifier could not parse, and the fragments it followed, per interface.
    /// Each scheduled interface's queues: what they delivered, dropped and hold.
    pub queues: Vec<(String, crate::dataplane::QueueStats)>,
    pub parse: Vec<(String, qod_common::ParseCounters)>,
}

/// One admission pool of a scheduled interface.
#[derive(Clone, Debug)]
pub struct PoolStats {
    pub interface: String,
    pub pool: &'static str,
    pub reserved_bps: u64,
    pub capacity_bps: u64,
}

/// A session ended in the ledger, its end not yet told (see [`Core::tell_endings`]).
struct Ending {
    session: Session,
    counters: FlowCounters,
    info: StatusInfo,
    ended_at: OffsetDateTime,
    place: events::Place,
}

/// Live sessions a reload brings to the new policy under one hold of the core's lock.
const RELOAD_BATCH: usize = 1024;
/// How long a reload leaves the lock to others between two batches (0.2 s over 1M sessions).
const RELOAD_PAUSE: Duration = Duration::from_micros(200);

/// Most deadlines one hold of the core's lock acts on: an expiry storm of 100k ends keeps a
/// reader waiting for one batch at most, not for the storm.
pub const EXPIRY_BATCH: usize = 64;

/// See the module docs.
pub struct Core {
    /// parking_lot's, for [`MutexGuard::unlock_fair`]: a long job working in batches hands the
    /// lock to a waiting reader between two batches instead of taking it straight back.
    inner: Mutex<Inner>,
    /// Wakes the expiry task when an earlier deadline appears.
    wake: Notify,
    /// Events in the order they were decided, each after what it announces is durable.
    announcer: Arc<Announcer>,
    /// Profiles, pools and directory; swapped whole by [`Core::reload`].
    policy: RwLock<Arc<Policy>>,
    retention: Duration,
    max_active_per_client: u32,
    max_sinks_per_client: u32,
    policer_burst: Duration,
    interfaces: Vec<ManagedInterface>,
    /// Durable copy of every session; `None` in unit tests that do not need one.
    store: Option<Store>,
    /// The schedulers' class operations, used outside the lock (see [`Core::admit`]).
    class_ops: Arc<dyn Classes>,
    /// The sessions as GetSession reads them, and their counters: no reader waits for the
    /// core's lock, whatever a writer holds it for (a reload's batch, a link loss's classes).
    reads: Reads,
    counters: Arc<dyn CountersReader>,
    /// The kernel's entries, listed without the lock (see [`Core::restore_from`]).
    lister: Arc<dyn DeviceLister>,
    /// After a continuing restore, what [`Core::remove_orphans`] has left to do once qodd serves.
    reconcile: parking_lot::Mutex<Option<Reconcile>>,
    /// Each live session's last achieved-rate reading (GetSession).
    meters: parking_lot::Mutex<HashMap<SessionId, Meter>>,
    /// Reloads between their profiles' install and the end of their sweep: the sessions of the
    /// profiles they retired may still be live, so no one else frees those entries.
    reloads_running: std::sync::atomic::AtomicUsize,
}

impl Core {
    pub fn new(
        dp: Box<dyn DataPlane>,
        policy: Policy,
        limits: Limits,
        notifier: Option<Notifier>,
    ) -> Result<Self, ProfileTableError> {
        // The profile entries a previous run left over the pinned maps keep their profiles.
        let profiles = ProfileTable::adopt(
            dp.profiles()?
                .into_iter()
                .map(|(index, t)| (index, t.name_hash)),
        );
        let class_ops = dp.classes();
        let counters = dp.counters_reader();
        let lister = dp.device_lister();
        let reads = Reads::default();
        let core = Self {
            class_ops,
            counters,
            reads: reads.clone(),
            lister,
            reconcile: parking_lot::Mutex::new(None),
            meters: parking_lot::Mutex::new(HashMap::new()),
            reloads_running: std::sync::atomic::AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                dp,
                sessions: Sessions {
                    map: FastMap::default(),
                    reads,
                },
                by_device: FastMap::default(),
                deadlines: BTreeSet::new(),
                slots: Slots {
                    free: Vec::new(),
                    next: 0,
                    capacity: limits.max_sessions,
                    zeroed_from: u32::MAX,
                },
                classes: limits
                    .interfaces
                    .iter()
                    .filter(|i| i.scheduler.is_some())
                    .map(|i| (i.name.clone(), ClassPool::default()))
                    .collect(),
                reserved: HashMap::new(),
                links_down: HashSet::new(),
                active_by_owner: HashMap::new(),
                profiles,
            }),
            wake: Notify::new(),
            announcer: Arc::new(Announcer::new(limits.event_log_retention, notifier)),
            policy: RwLock::new(Arc::new(policy)),
            retention: limits.retention,
            max_active_per_client: limits.max_active_per_client,
            max_sinks_per_client: limits.max_sinks_per_client,
            policer_burst: limits.policer_burst,
            interfaces: limits.interfaces,
            store: None,
        };
        {
            let policy = core.policy();
            core.install_profiles(&mut core.lock(), &policy, true)?;
        }
        Ok(core)
    }

    /// What `profile` does to its sessions' packets where their own classes do not decide:
    /// DSCP, band, the band's priority (or the profile's configured one) and the policed
    /// maxima.
    fn treatment(&self, profile: &QosProfile) -> ProfileTreatment {
        let police = |side: Side, max: Option<crate::profile::Rate>| {
            let Some(m) = max.map(|m| m.bits_per_second()).filter(|m| *m > 0) else {
                return Policer::default();
            };
            // TCP-friendly depth, or the burst rate's allowance where larger.
            let p = policer(m, self.policer_burst);
            match burst_rule(profile, side) {
                rule if rule.burst_rate_bps.is_some() => {
                    p.max_burst(Policer::new(m, rule.allowance(m)))
                }
                _ => p,
            }
        };
        let priority = profile.skb_priority.unwrap_or(match profile.band {
            Band::LowLatency => LOW_LATENCY_CLASS,
            _ => BEST_EFFORT_CLASS,
        });
        ProfileTreatment {
            police_up: police(Side::Server, profile.max_upstream_rate),
            police_down: police(Side::Device, profile.max_downstream_rate),
            priority_up: priority,
            priority_down: priority,
            name_hash: profiles::name_hash(profile.name.as_str()),
            dscp: profile.dscp,
            band: profile.band.code(),
            in_use: 1,
            _pad: [0; 5],
        }
    }

    /// Gives every profile of `policy` its entry of the classifier's profile table and writes
    /// what it does there: from this moment every session of a profile that was already there
    /// follows its new treatment. Profiles no longer in the policy keep their entries until
    /// [`Self::release_retired_profiles`]. On failure the table is as it was (entries written
    /// are put back); `starting`, entries the previous run left are given up when the table
    /// is otherwise too full for the policy.
    fn install_profiles(
        &self,
        inner: &mut Inner,
        policy: &Policy,
        starting: bool,
    ) -> Result<(), ProfileTableError> {
        let names = || policy.profiles.iter().map(|p| &p.name);
        let plan = match inner.profiles.plan(names()) {
            Err(ProfileTableError::Full { .. }) if starting => {
                let gone = inner.profiles.drop_inherited();
                warn!(
                    entries = gone.len(),
                    "the profile table is too full for the configured profiles: the entries the previous run left are taken back (rules of that run pointing at them treat nothing, or as their new profile, until the restore has rewritten or removed them)"
                );
                for index in gone {
                    clear_profile_entry(inner, index);
                }
                inner.profiles.plan(names())?
            }
            planned => planned?,
        };
        let in_force = self.policy();
        let mut written: Vec<(&crate::model::ProfileName, u16)> = Vec::new();
        for (name, index) in plan.entries() {
            let Some(p) = policy.profiles.get(name) else {
                continue;
            };
            if let Err(e) = inner.dp.set_profile(index, &self.treatment(p)) {
                // Back to the policy in force: its profiles' treatments where they were, and
                // the entries that were free, free again.
                for (name, index) in written {
                    match in_force.profiles.get(name) {
                        Some(old) if inner.profiles.index(name) == Some(index) => {
                            let _ = inner.dp.set_profile(index, &self.treatment(old));
                        }
                        _ => clear_profile_entry(inner, index),
                    }
                }
                return Err(e.into());
            }
            written.push((name, index));
        }
        inner.profiles.commit(plan);
        Ok(())
    }

    /// Frees the retired profile entries no live session holds (`with_inherited`: those the
    /// previous run left too), if `still` holds under the lock. A live session of a retired
    /// profile (one whose end was undone, say) keeps its entry until a later release.
    fn release_retired_profiles(&self, with_inherited: bool, still: impl Fn(&Self) -> bool) {
        if self.lock().profiles.retired(with_inherited).is_empty() {
            return;
        }
        // Read without the lock: no session of a retired profile starts meanwhile.
        let live: HashSet<u64> = self
            .reads
            .iter()
            .filter(|s| matches!(s.state, SessionState::Available { .. }))
            .map(|s| s.request.profile.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .map(|name| profiles::name_hash(name.as_str()))
            .collect();
        let mut inner = self.lock();
        if !still(self) {
            return;
        }
        for index in inner.profiles.retired(with_inherited) {
            if inner
                .profiles
                .holder(index)
                .is_some_and(|h| live.contains(&h))
            {
                warn!(
                    index,
                    "a retired profile entry is still held by a live session; kept"
                );
                continue;
            }
            clear_profile_entry(&mut inner, index);
            inner.profiles.release(index);
        }
    }

    /// Keeps every session in `store` from now on.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Takes up the stored event log at start (before any session is restored).
    pub fn restore_log(&self, events: Vec<Logged>) {
        self.announcer.restore(events);
    }

    /// Queues `decided` for announcement, held until its change's commit when there is a
    /// store; returns its place and what that commit must write with the change (its log
    /// record and its notification).
    fn queue_event(&self, decided: Decided) -> (Place, Vec<Op>) {
        let place = self
            .announcer
            .reserve(decided.event.session.session.id, self.store.is_some());
        (place, self.fill_event(place, decided))
    }

    /// Fills `decided` into its reserved `place`; returns what the commit of its change must
    /// write (its log record and its notification).
    fn fill_event(&self, place: Place, decided: Decided) -> Vec<Op> {
        let note = decided.note.clone();
        let mut ops = vec![self.announcer.fill(place, decided)];
        ops.extend(note.map(Op::PutOutbox));
        ops
    }

    /// Writes a change already made in the kernel and in memory, with `event` (queued by
    /// [`Core::queue_event`]) in the same commit, and announces the event once that is durable.
    /// Nothing waits: the store's writer releases the event. If the commit fails the event is
    /// withdrawn (it never reaches watchers or sinks, as the change is not durable).
    fn persist_announcing(&self, s: &Session, event: Decided) {
        let (place, ops) = self.queue_event(event);
        let Some(store) = &self.store else {
            return;
        };
        let announcer = self.announcer.clone();
        let id = s.id;
        store.submit_then(self.session_ops(s, ops), move |r| match r {
            Ok(()) => announcer.release(place),
            Err(e) => {
                error!(session = %id, error = %crate::anyhow_like(&e), "cannot store a session's end; it is not announced");
                announcer.withdraw(place);
            }
        });
    }

    /// Queues `s`'s state (and `extra`, in the same commit).
    fn submit(&self, s: &Session, extra: Vec<Op>) -> Option<Ticket> {
        let store = self.store.as_ref()?;
        Some(store.submit(self.session_ops(s, extra)))
    }

    fn session_ops(&self, s: &Session, extra: Vec<Op>) -> Vec<Op> {
        let ended = match s.state {
            SessionState::Available { .. } => None,
            SessionState::Unavailable { info, ended_at, .. } => Some(Ended { info, at: ended_at }),
        };
        let slot = match s.state {
            SessionState::Available { slot, .. } => Some(slot),
            SessionState::Unavailable { .. } => None,
        };
        let mut ops = vec![Op::PutSession(Box::new(StoredSession {
            id: s.id,
            request: s.request.clone(),
            started_at: s.started_at,
            duration: s.duration,
            ended,
            slot,
        }))];
        ops.extend(extra);
        ops
    }

    /// Queues the removal of a session its client deleted from the store (with `extra`: the
    /// log record and the notification of its end, if any); the ticket tells when it is
    /// durable.
    fn forget(&self, id: SessionId, holder: Option<Holder>, extra: Vec<Op>) -> Option<Ticket> {
        let store = self.store.as_ref()?;
        let mut ops = vec![match holder {
            Some(holder) => Op::DeleteSession(id, holder),
            None => Op::RemoveSession(id),
        }];
        ops.extend(extra);
        Some(store.submit(ops))
    }

    /// As [`Core::forget`] where the session is gone anyway (purges): queued without waiting
    /// (queue order keeps it behind earlier writes; the store's writer logs a failure).
    fn forget_logged(&self, ids: impl IntoIterator<Item = SessionId>) {
        if let Some(store) = &self.store {
            drop(store.submit(ids.into_iter().map(Op::RemoveSession).collect()));
        }
    }

    /// [`Core::restore_from`] of the sessions `stored`.
    #[cfg(test)]
    pub fn restore(&self, stored: Vec<StoredSession>, continuing: bool) {
        let recorded = stored.iter().filter_map(|s| s.slot);
        let mut restoring = self.begin_restore(recorded, continuing);
        restoring.listed = continuing.then(|| self.lister.device_entries());
        for s in stored {
            self.restore_one(&mut restoring, s);
        }
        self.finish_restore(restoring, true);
    }

    /// Brings back the stored sessions at start: live ones are installed again for the time they
    /// have left; ones whose time ran out while qodd was down end now (`DURATION_EXPIRED`, with
    /// their event), ended ones stay readable for the rest of their retention.
    ///
    /// `continuing`: the kernel maps are the pinned ones of the previous run, still enforcing.
    /// Live sessions then keep their slots (their counters carry on), and entries no live session
    /// accounts for (orphans: a session deleted or ended in the store but not yet in the kernel
    /// when qodd stopped) are removed.
    ///
    /// The sessions are read from `store` and installed one at a time (a million stored
    /// sessions are never all decoded at once); returns how many were read.
    pub fn restore_from(
        &self,
        store: &crate::store::Store,
        continuing: bool,
    ) -> Result<usize, crate::store::StoreError> {
        let recorded = if continuing {
            store.slots()?
        } else {
            Vec::new()
        };
        let mut restoring = self.begin_restore(recorded, continuing);
        // The store is read and decoded on a thread of its own, a chunk ahead (a bounded
        // channel: a few chunks are ever decoded at once), while this one installs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<StoredSession>>(4);
        let (n, read, listed) = std::thread::scope(|scope| {
            let read_all = move || {
                let mut chunk = Vec::with_capacity(RESTORE_CHUNK);
                let read = store.each_session(|s| {
                    chunk.push(s);
                    if chunk.len() == RESTORE_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(RESTORE_CHUNK));
                        // (Refused only if this side is gone: then nothing is waiting.)
                        let _ = tx.send(full);
                    }
                });
                if !chunk.is_empty() {
                    let _ = tx.send(chunk);
                }
                read
            };
            let reader = std::thread::Builder::new()
                .name("qodd-restore".into())
                .spawn_scoped(scope, read_all);
            // Continuing, the kernel's entries are listed beside the restore (orphans are
            // among them); the entries it rewrites meanwhile are live sessions' anyway.
            let lister = continuing.then(|| {
                std::thread::Builder::new()
                    .name("qodd-list".into())
                    .spawn_scoped(scope, || self.lister.device_entries())
            });
            let mut n = 0;
            for chunk in rx {
                for s in chunk {
                    n += 1;
                    self.restore_one(&mut restoring, s);
                }
            }
            let read = joined(reader, crate::store::StoreError::Thread);
            let listed = lister.map(|l| joined(l, DataPlaneError::Thread));
            (n, read, listed)
        });
        restoring.listed = listed;
        // What was restored before a read error stands (hooks set); but the sessions not read
        // are unknown, so nothing of the kernel is taken for an orphan and no slot is freed.
        self.finish_restore(restoring, read.is_ok());
        read.map(|()| n)
    }

    /// Waits for the restore's entries to be written (see `DataPlane::begin_bulk`). The
    /// sessions of a device whose entry the kernel refused end NETWORK_TERMINATED, as when an
    /// install is refused at once; returns them.
    fn end_bulk(&self) -> HashSet<SessionId> {
        let mut inner = self.lock();
        let refused = inner.dp.end_bulk();
        let mut ended = HashSet::new();
        if refused.is_empty() {
            return ended;
        }
        let now = Instant::now();
        let mut endings = Vec::new();
        for (key, e) in refused {
            let ids: Vec<SessionId> = inner
                .by_device
                .get(&key)
                .map(|ids| ids.iter().copied().collect())
                .unwrap_or_default();
            for id in ids {
                if let Some(ending) =
                    self.terminate(&mut inner, id, StatusInfo::NetworkTerminated, now)
                {
                    error!(session = %id, error = %crate::anyhow_like(&e), "cannot restore the session's rule; it ends");
                    ended.insert(id);
                    endings.push(ending);
                }
            }
        }
        let place = self.store_place(&endings);
        drop(inner);
        self.tell_endings(endings, place);
        ended
    }

    /// Reserves the counter slots `recorded` for the stored sessions, when `continuing` (the
    /// pinned maps hold their counters); those no live session claims are freed at the end.
    fn begin_restore(
        &self,
        recorded: impl IntoIterator<Item = u32>,
        continuing: bool,
    ) -> Restoring {
        let mut inner = self.lock();
        let capacity = inner.slots.capacity;
        let kept: HashSet<u32> = if continuing {
            recorded
                .into_iter()
                .filter(|slot| *slot < capacity)
                .collect()
        } else {
            HashSet::new()
        };
        inner.slots.reserve(&kept);
        if !continuing {
            // The maps were made at this start: no slot above those handed out has counts.
            inner.slots.zeroed_from = inner.slots.next;
        }
        // After a reboot no classifier is attached yet and no pinned entry is read: the kernel
        // entries are written by the data plane's own thread while this one admits (the hash
        // inserts are about half a rebuilt session's cost).
        if !continuing && let Err(e) = inner.dp.begin_bulk() {
            warn!(error = %crate::anyhow_like(&e), "cannot write the restored entries on a thread of their own; writing them in turn");
        }
        Restoring {
            wall: OffsetDateTime::now_utc(),
            retention: time::Duration::try_from(self.retention).unwrap_or(time::Duration::ZERO),
            kept,
            assigned: HashSet::new(),
            restored: 0,
            moved: Vec::new(),
            listed: None,
        }
    }

    fn restore_one(&self, r: &mut Restoring, s: StoredSession) {
        let end = s.started_at + secs(s.duration);
        let ended = match s.ended {
            Some(e) => Some(e),
            None if end <= r.wall => Some(Ended {
                info: StatusInfo::DurationExpired,
                at: end,
            }),
            None => None,
        };
        if let Some(ended) = ended {
            // Its kept slot is free at once (a live session restored later may need one).
            if let Some(slot) = s
                .slot
                .filter(|slot| r.kept.contains(slot) && r.assigned.insert(*slot))
            {
                self.lock().slots.give_back(slot);
            }
            let announce = s.ended.is_none();
            self.keep_ended(s, ended, r.retention, announce);
            return;
        }
        // Each kept slot goes to one session (a second claimant gets a new one).
        let slot = s
            .slot
            .filter(|slot| r.kept.contains(slot) && r.assigned.insert(*slot));
        match self.admit(
            s.request.clone(),
            s.id,
            s.started_at,
            s.duration,
            Admission::Restored { slot },
        ) {
            Ok(v) => {
                // One audit line for the whole restore (see `finish_restore`): a million
                // lines would cost the start more than the restore itself.
                debug!(session = %s.id, left_ms = time_left(end).as_millis() as u64, "session restored");
                r.restored += 1;
                // A new slot is recorded, so the next restart keeps this one.
                if let SessionState::Available { slot: now, .. } = v.session.state
                    && s.slot != Some(now)
                {
                    r.moved.push(Op::SetSlot(s.id, now));
                }
            }
            Err(e) => {
                error!(session = %s.id, error = %crate::anyhow_like(&e), "cannot restore the session; it ends");
                audit_unrestored(&s, &e);
                // Free at once (admission gives no kept slot back; it stays `assigned`, so the
                // end of the restore does not free it twice).
                if let Some(slot) = slot {
                    self.lock().slots.give_back(slot);
                }
                self.keep_ended(
                    s,
                    Ended {
                        info: StatusInfo::NetworkTerminated,
                        at: r.wall,
                    },
                    r.retention,
                    true,
                );
            }
        }
    }

    /// Ends a restore; `complete` when every stored session was read.
    fn finish_restore(&self, mut r: Restoring, complete: bool) {
        // (Nothing to wait for unless `begin_restore` began bulk writing.)
        let ended = self.end_bulk();
        if !ended.is_empty() {
            r.restored = r.restored.saturating_sub(ended.len());
            // Their slots were given back: no new slot of theirs is recorded (written after
            // their ends, it would bring the slot back for an ended session).
            r.moved
                .retain(|op| !matches!(op, Op::SetSlot(id, _) if ended.contains(id)));
        }
        if complete {
            // Slots reserved for records never claimed (set aside, or a duplicate's).
            let mut unclaimed: Vec<u32> = r.kept.difference(&r.assigned).copied().collect();
            unclaimed.sort_unstable_by(|a, b| b.cmp(a));
            let mut inner = self.lock();
            match r.listed {
                // An orphaned entry may count into an unclaimed slot, or into one no session
                // holds: both stay held until the orphans are gone (`remove_orphans`, once
                // qodd serves), so no new session shares counters or a policer with one.
                Some(Ok(listed)) => {
                    let mut held = inner.slots.hold(&listed.slots);
                    held.extend(unclaimed);
                    *self.reconcile.lock() = Some(Reconcile {
                        devices: listed.devices,
                        held,
                    });
                }
                Some(Err(e)) => {
                    // Kept, not freed: an orphan may still count into one of them.
                    error!(error = %crate::anyhow_like(&e), slots = unclaimed.len(), "cannot list the kernel's entries to look for orphans; the unclaimed counter slots stay reserved");
                }
                None => unclaimed
                    .into_iter()
                    .for_each(|slot| inner.slots.give_back(slot)),
            }
        }
        if let Some(store) = &self.store
            && !r.moved.is_empty()
            && let Err(e) = store.submit(r.moved).wait()
        {
            error!(error = %crate::anyhow_like(&e), "cannot record the restored sessions' counter slots");
        }
        info!(restored = r.restored, "live sessions restored");
        if r.restored > 0 {
            audit::restored(r.restored);
        }
        self.adopt_classes();
        self.wake.notify_one();
    }

    /// Installs sessions another node held (a standby taking over its active): each live one
    /// for what is left of it, written to this node's store, not announced (it did not
    /// start, and did not end). Ended ones, and those already past their end, are left out.
    /// How many were installed.
    pub fn adopt(&self, sessions: Vec<StoredSession>) -> usize {
        let wall = OffsetDateTime::now_utc();
        let mut adopted = 0;
        let mut ops = Vec::new();
        for s in sessions {
            if s.ended.is_some() || s.started_at + secs(s.duration) <= wall {
                continue;
            }
            match self.admit(
                s.request.clone(),
                s.id,
                s.started_at,
                s.duration,
                Admission::Restored { slot: None },
            ) {
                Ok(v) => {
                    audit::record(
                        audit::Action::Restore,
                        &s.request.owner,
                        Some(s.id),
                        Some(&v.session.flow.device),
                        Ok(()),
                    );
                    ops.extend(self.session_ops(&v.session, Vec::new()));
                    adopted += 1;
                }
                Err(e) => {
                    error!(session = %s.id, error = %crate::anyhow_like(&e), "cannot install a session taken over");
                    audit_unrestored(&s, &e);
                }
            }
        }
        if let Some(store) = &self.store
            && !ops.is_empty()
            && let Err(e) = store.submit(ops).wait()
        {
            error!(error = %crate::anyhow_like(&e), "cannot store the sessions taken over");
        }
        self.wake.notify_one();
        adopted
    }

    /// Gives every session up, silently: out of the kernel, memory and store, with no event and
    /// no notification. For a cluster node that finds, back from a partition, that its sessions
    /// live on at another node (taken over) or were ended by the cluster (told there): enforcing
    /// or telling them here as well would do it twice. How many live ones it held.
    pub fn relinquish(&self) -> usize {
        let mut inner = self.lock();
        let ids: Vec<SessionId> = inner.sessions.keys().copied().collect();
        let mut live = 0;
        for id in &ids {
            let Some(session) = inner.sessions.get(id).cloned() else {
                continue;
            };
            if let SessionState::Available { slot, .. } = session.state {
                live += 1;
                inner.count_active(&session.request, false);
                match resync(&mut inner, &session.flow.device, Some(*id), None) {
                    Ok(()) => {
                        inner.slots.give_back(slot);
                        release(
                            &mut inner,
                            self.class_ops.as_ref(),
                            session.reservation.clone(),
                        );
                    }
                    // The kernel ignores it past its expiry; its slot stays reserved until then.
                    Err(e) => {
                        error!(session = %id, error = %crate::anyhow_like(&e), "cannot remove the rule of a session given up")
                    }
                }
            }
            inner.sessions.remove(id);
            self.meters.lock().remove(id);
            unlink(&mut inner, &session.flow.device, *id);
            inner.deadlines.remove(&(session.deadline, *id));
        }
        drop(inner);
        self.forget_logged(ids);
        live
    }

    /// Parks the per-session scheduler classes that no AVAILABLE session holds (those an adopted
    /// tree kept for sessions that ended, or that moved to another index, while qodd was down)
    /// and takes them into the interface's pool, so later sessions reuse them.
    fn adopt_classes(&self) {
        let mut inner = self.lock();
        let held: HashSet<(String, u16)> = inner
            .sessions
            .values()
            .filter(|s| matches!(s.state, SessionState::Available { .. }))
            .flat_map(|s| s.reservation.iter().flat_map(|r| &r.classes))
            .map(|c| (c.interface.clone(), c.index))
            .collect();
        let mut parked = 0usize;
        for i in self.interfaces.iter().filter(|i| i.scheduler.is_some()) {
            let present = match inner.dp.session_classes(&i.name) {
                Ok(p) => p,
                Err(e) => {
                    error!(interface = %i.name, error = %crate::anyhow_like(&e), "cannot list the scheduler's classes to reconcile them");
                    continue;
                }
            };
            let mut adopted = Vec::new();
            for index in present
                .into_iter()
                .filter(|x| !held.contains(&(i.name.clone(), *x)))
            {
                match self.class_ops.park_class(&i.name, index) {
                    Ok(()) => adopted.push(index),
                    Err(e) => {
                        error!(interface = %i.name, index, error = %crate::anyhow_like(&e), "cannot park a scheduler class no session holds");
                    }
                }
            }
            parked += adopted.len();
            if let Some(pool) = inner.classes.get_mut(&i.name) {
                pool.adopt(&adopted);
            }
        }
        if parked > 0 {
            info!(
                parked,
                "parked the scheduler classes no session holds, for reuse"
            );
        }
    }

    /// After a continuing restore (once qodd serves: checking a million entries takes most of
    /// a second), removes the kernel entries no live session accounts for (orphans: a session
    /// deleted or ended in the store but not yet in the kernel when qodd stopped), then frees
    /// the counter slots held back for them. The entries were listed beside the restore; each
    /// is checked again under the lock, a batch at a time, so an entry a create made meanwhile
    /// stays and calls go on between batches. Does nothing after any other start, or after a
    /// restore cut short (the sessions not read are unknown). How many entries it removed.
    pub fn remove_orphans(&self) -> usize {
        let Some(Reconcile { devices, held }) = self.reconcile.lock().take() else {
            return 0;
        };
        let started = Instant::now();
        let (mut removed, mut failed) = (0, 0);
        for batch in devices.chunks(ORPHAN_BATCH) {
            let mut inner = self.lock();
            for key in batch {
                if has_live_session(&inner, key) {
                    continue;
                }
                match inner.dp.remove(key) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        failed += 1;
                        error!(error = %crate::anyhow_like(&e), "cannot remove an orphaned kernel entry");
                    }
                }
            }
        }
        if failed == 0 {
            {
                let mut inner = self.lock();
                held.into_iter()
                    .for_each(|slot| inner.slots.give_back(slot));
            }
            // No rule refers to the entries of profiles that left the configuration while qodd
            // was down any more: their sessions ended at the restore, their entries just went.
            // (A reload still sweeping frees its own retirees when it is done.)
            self.release_retired_profiles(true, |core| {
                core.reloads_running
                    .load(std::sync::atomic::Ordering::SeqCst)
                    == 0
            });
        } else {
            // An entry left may still count into one of them.
            error!(
                failed,
                slots = held.len(),
                "orphaned kernel entries left; the counter slots they may count into stay reserved"
            );
        }
        if removed > 0 {
            warn!(removed, "removed kernel entries no session accounts for");
        }
        info!(
            checked = devices.len(),
            removed,
            took_ms = started.elapsed().as_millis() as u64,
            "kernel entries reconciled with the restored sessions"
        );
        removed
    }

    /// Keeps an ended session readable until its retention runs out (announcing the end if it
    /// happened while qodd was down).
    fn keep_ended(
        &self,
        s: StoredSession,
        ended: Ended,
        retention: time::Duration,
        announce: bool,
    ) {
        let left = (ended.at + retention - OffsetDateTime::now_utc()).whole_milliseconds();
        if left <= 0 {
            self.forget_logged([s.id]);
            return;
        }
        let Ok(key) = self.policy().resolve(&s.request.device, &s.request.server) else {
            self.forget_logged([s.id]);
            return;
        };
        let Ok(flow) = AppFlow::from_request(&s.request, key) else {
            self.forget_logged([s.id]);
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0));
        let session = Session {
            id: s.id,
            request: s.request,
            flow,
            started_at: s.started_at,
            duration: s.duration,
            state: SessionState::Unavailable {
                info: ended.info,
                ended_at: ended.at,
                counters: Box::default(),
            },
            reservation: None,
            deadline,
        };
        let mut inner = self.lock();
        inner
            .by_device
            .entry(session.flow.device)
            .or_default()
            .push(session.id);
        inner.deadlines.insert((deadline, session.id));
        inner.sessions.insert(session.clone());
        if announce {
            let view = SessionView {
                session,
                counters: FlowCounters::default(),
            };
            let event = self.event(view, ended.at);
            info!(session = %event.event.session.session.id, info = ?ended.info, "session ended while qodd was down");
            self.persist_announcing(&event.event.session.session.clone(), event);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The policy in force (a snapshot: a reload does not change it under the caller).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The event log (watchers read it from the revision they last saw).
    pub fn events(&self) -> &Arc<Announcer> {
        &self.announcer
    }

    /// A reader of the events from now on (tests).
    #[cfg(test)]
    pub fn subscribe(&self) -> events::Cursor {
        self.announcer.cursor()
    }

    /// What of `req` can be checked without the sessions: its profile (known, ACTIVE, the
    /// duration within its bounds) and, when `served_here`, that this node serves its device and
    /// its flow is well formed. A cluster node checks this before it takes a place in the
    /// client's quota or hands the create over, so bad input costs the cluster nothing.
    pub fn precheck(&self, req: &SessionRequest, served_here: bool) -> Result<(), CamaraError> {
        let policy = self.policy();
        Self::profile_for(&policy, req)?;
        if served_here {
            let key = policy.resolve(&req.device, &req.server)?;
            AppFlow::from_request(req, key)?;
        }
        Ok(())
    }

    fn profile_for<'p>(
        policy: &'p Policy,
        req: &SessionRequest,
    ) -> Result<&'p QosProfile, CamaraError> {
        let profile = policy.profiles.get(&req.profile).ok_or_else(|| {
            CamaraError::invalid(
                "qosProfile",
                format!("{} is not a QoS profile of this node", req.profile),
            )
        })?;
        if profile.status != ProfileStatus::Active {
            return Err(CamaraError::field(
                CamaraCode::QosProfileNotApplicable,
                "qosProfile",
                format!(
                    "{} is {:?} and cannot be used for new sessions",
                    profile.name, profile.status
                ),
            ));
        }
        let d = u64::from(req.duration);
        let min = profile.min_duration_secs();
        if d < min {
            return Err(CamaraError::field(
                CamaraCode::DurationOutOfRange,
                "duration",
                format!(
                    "{d} s is shorter than {}'s minimum of {min} s",
                    profile.name
                ),
            ));
        }
        if let Some(max) = profile.max_duration_secs()
            && d > max
        {
            return Err(CamaraError::field(
                policy.duration_error,
                "duration",
                format!("{d} s is longer than {}'s maximum of {max} s", profile.name),
            ));
        }
        Ok(profile)
    }

    /// Validates `req` against the profiles and the sessions, installs it, and returns it
    /// AVAILABLE. On any error nothing changed.
    pub fn create(&self, req: SessionRequest) -> Result<SessionView, CamaraError> {
        self.create_as(req, SessionId::random())
    }

    /// [`Core::create`] with the session's id chosen by the caller (a cluster node takes the
    /// session's place in its client's quota first, under that id).
    pub fn create_as(
        &self,
        req: SessionRequest,
        id: SessionId,
    ) -> Result<SessionView, CamaraError> {
        let duration = req.duration;
        let client = req.owner.clone();
        let created = self.admit(req, id, OffsetDateTime::now_utc(), duration, Admission::New);
        match &created {
            Ok(v) => audit::record(
                audit::Action::Create,
                &client,
                Some(v.session.id),
                Some(&v.session.flow.device),
                Ok(()),
            ),
            Err(e) => audit::record(audit::Action::Create, &client, None, None, Err(e)),
        }
        created
    }

    /// Installs a session: a new one (`restoring` false: profile rules checked, persisted before
    /// it is acknowledged, AVAILABLE event) or one read back from the store at start (its
    /// profile need only still exist). It ends at `started_at + duration` by the wall clock,
    /// whenever this runs: a restore that takes seconds does not push its sessions' ends back.
    fn admit(
        &self,
        req: SessionRequest,
        id: SessionId,
        started_at: OffsetDateTime,
        duration: u32,
        how: Admission,
    ) -> Result<SessionView, CamaraError> {
        let (restoring, kept_slot) = match how {
            Admission::New => (false, None),
            Admission::Restored { slot } => (true, slot),
        };
        // The policy is read under the lock: a reload swaps it under the same lock before it
        // sweeps the live sessions, so a session admitted on the old policy is swept and one
        // admitted after the swap is on the new one.
        let mut inner = self.lock();
        let policy = self.policy();
        let profile = if restoring {
            policy.profiles.get(&req.profile).ok_or_else(|| {
                CamaraError::new(
                    CamaraCode::Internal,
                    format!("profile {} no longer exists", req.profile),
                )
            })?
        } else {
            Self::profile_for(&policy, &req)?
        };
        let key = policy.resolve(&req.device, &req.server)?;
        let flow = AppFlow::from_request(&req, key)?;
        let now = started_at;
        // An id is given by the caller only for a create passed on by another cluster node
        // (which may also hand the same create over through etcd): one session per id.
        if inner.sessions.contains_key(&id) {
            return Err(CamaraError::new(
                CamaraCode::Conflict,
                format!("a session with id {id} exists already"),
            ));
        }
        self.admissible(&inner, &req, &flow, restoring)?;
        // A session restored over the pinned maps keeps its slot, so its counters carry on.
        let (slot, zeroed) = match kept_slot {
            Some(slot) => (slot, true),
            None => inner.slots.take().ok_or_else(|| {
                CamaraError::new(
                    CamaraCode::QuotaExceeded,
                    format!(
                        "this node holds its maximum of {} sessions",
                        inner.slots.capacity
                    ),
                )
            })?,
        };
        // A kept slot stays the restore's to give back (it frees every kept slot unclaimed).
        let give_back = |inner: &mut Inner| {
            if kept_slot.is_none() {
                inner.slots.give_back(slot);
            }
        };
        let mut reservation = match self.reserve(&mut inner, profile) {
            Ok(r) => r,
            Err(e) => {
                give_back(&mut inner);
                return Err(e);
            }
        };
        if let Some(r) = reservation.as_mut() {
            // A new session's classes are made outside the lock: adding a class costs the kernel
            // milliseconds in a large tree, and no other call need wait for it. The slot, the
            // class indexes and the capacity stay held meanwhile; what may change (a session
            // that now conflicts, the quotas, a link, the policy) is checked again after.
            let made = if restoring {
                self.make_classes(r)
            } else {
                drop(inner);
                let made = self.make_classes(r);
                inner = self.lock();
                made.and_then(|()| {
                    if Arc::ptr_eq(&policy, &self.policy()) {
                        self.admissible(&inner, &req, &flow, false)
                    } else {
                        Err(CamaraError::new(
                            CamaraCode::Unavailable,
                            "the node's profiles were reloaded during the request; try again",
                        ))
                    }
                })
            };
            if let Err(e) = made {
                give_back(&mut inner);
                release(&mut inner, self.class_ops.as_ref(), reservation);
                return Err(e);
            }
        }
        // What is left of the session, for the kernel's expiry and the ledger's deadline alike:
        // a new one has all of it, on the monotonic clock (a step of the wall clock moves no
        // end); a restored one what its stored end leaves, read now (a restore takes seconds).
        let left = if restoring {
            time_left(now + secs(duration))
        } else {
            secs(duration)
        };
        let deadline = Instant::now() + left;
        // The policy in force gave each of its profiles an entry (same hold of the lock).
        let Some(profile_index) = inner.profiles.index(&profile.name) else {
            give_back(&mut inner);
            release(&mut inner, self.class_ops.as_ref(), reservation);
            return Err(CamaraError::new(
                CamaraCode::Internal,
                format!(
                    "profile {} has no entry in the classifier's table",
                    profile.name
                ),
            ));
        };
        let rule = self.flow_rule(
            &flow,
            profile,
            profile_index,
            slot,
            left,
            reservation.as_ref(),
        );
        // A kept slot's counters carry on; a slot never used since the maps were made is zero.
        let reset = if zeroed {
            Ok(())
        } else {
            inner.dp.reset_counters(slot)
        };
        // Continuing over the pinned maps, the kernel most often holds this very rule already:
        // verified (one read) rather than written again.
        let installed = if kept_slot.is_some() && holds_only(&inner, &flow.device, &rule) {
            Ok(())
        } else {
            reset.and_then(|()| resync(&mut inner, &flow.device, None, Some(rule)))
        };
        if let Err(e) = installed {
            give_back(&mut inner);
            release(&mut inner, self.class_ops.as_ref(), reservation);
            return Err(dataplane_error(&e));
        }
        let session = Session {
            id,
            request: {
                let mut req = req;
                inner.share_names(&mut req, &policy);
                req
            },
            started_at: now,
            duration,
            state: SessionState::Available {
                slot,
                expires_at: now + secs(duration),
            },
            reservation,
            deadline,
            flow,
        };
        let view = SessionView {
            session: session.clone(),
            counters: FlowCounters::default(),
        };
        // Persisted (with its AVAILABLE notification) before it is acknowledged. The write is
        // queued under the lock, so no later change of the session can overtake it, and awaited
        // outside it, so concurrent creates share one commit.
        // Its AVAILABLE event is queued under the lock too, held until the commit: anything
        // that happens to the session meanwhile (an expiry, a link loss) is announced after it.
        let (place, ticket) = if restoring {
            (None, None)
        } else {
            let (place, ops) = self.queue_event(self.event(view.clone(), now));
            (Some(place), self.submit(&session, ops))
        };
        inner
            .by_device
            .entry(session.flow.device)
            .or_default()
            .push(id);
        inner.deadlines.insert((deadline, id));
        inner.count_active(&session.request, true);
        inner.sessions.insert(session);
        drop(inner);
        if let Some(Err(e)) = ticket.map(Ticket::wait) {
            // Not stored, so not created: nothing of it stays, and nothing of it is announced.
            error!(error = %crate::anyhow_like(&e), "cannot persist a new session");
            self.roll_back(id, place);
            return Err(CamaraError::new(
                CamaraCode::Internal,
                "the session could not be stored; nothing was created",
            ));
        }
        if let Some(place) = place {
            self.announcer.release(place);
        }
        self.wake.notify_one();
        debug!(session = %id, profile = %view.session.request.profile, "session created");
        Ok(view)
    }

    /// Whether `req` (its `flow` resolved) may be admitted beside the sessions there are:
    /// no overlapping live session of its device, the device's and the client's quotas (not
    /// checked when `restoring`), and every managed link up.
    fn admissible(
        &self,
        inner: &Inner,
        req: &SessionRequest,
        flow: &AppFlow,
        restoring: bool,
    ) -> Result<(), CamaraError> {
        // Only live sessions hold a device: an ended one stays readable for its retention but
        // blocks nobody, so no client keeps a device from others beyond its own quota of live
        // sessions.
        let same_device: Vec<&Session> = inner
            .by_device
            .get(&flow.device)
            .into_iter()
            .flatten()
            .filter_map(|id| inner.sessions.get(id))
            .filter(|s| matches!(s.state, SessionState::Available { .. }))
            .collect();
        if same_device.iter().any(|s| s.flow.overlaps(flow)) {
            return Err(CamaraError::new(
                CamaraCode::Conflict,
                "conflict with an existing session of the same device whose flow overlaps",
            ));
        }
        if same_device.len() >= MAX_SESSIONS_PER_DEVICE {
            return Err(CamaraError::new(
                CamaraCode::QuotaExceeded,
                format!("a device holds at most {MAX_SESSIONS_PER_DEVICE} live sessions at once"),
            ));
        }
        if !restoring && let Some(usage) = inner.active_by_owner.get(&*req.owner) {
            crate::cluster::quota::client_fits(
                usage.active,
                usage.sinks.len(),
                req.sink
                    .as_ref()
                    .map(|s| usage.sinks.contains_key(&crate::notify::sink_origin(s))),
                self.client_limits(),
                "",
            )?;
        }
        if let Some(link) = inner.links_down.iter().next() {
            return Err(CamaraError::new(
                CamaraCode::Unavailable,
                format!(
                    "managed interface {link} is down; no session can be enforced until it is back"
                ),
            ));
        }
        Ok(())
    }

    /// Undoes the admission of a session that could not be stored, and withdraws its held
    /// event (under the lock: no event of the session can be decided after it).
    fn roll_back(&self, id: SessionId, place: Option<Place>) {
        let mut inner = self.lock();
        if let Some(place) = place {
            self.announcer.withdraw(place);
        }
        let Some(session) = inner.sessions.remove(&id) else {
            return;
        };
        unlink(&mut inner, &session.flow.device, id);
        inner.deadlines.remove(&(session.deadline, id));
        if let SessionState::Available { slot, .. } = session.state {
            if let Err(e) = resync(&mut inner, &session.flow.device, None, None) {
                error!(error = %crate::anyhow_like(&e), "cannot roll back an unpersisted session's rule");
            }
            inner.slots.give_back(slot);
            release(
                &mut inner,
                self.class_ops.as_ref(),
                session.reservation.clone(),
            );
            inner.count_active(&session.request, false);
        }
    }

    /// The session's own HTB classes on the interfaces qodd schedules, after admission control.
    ///
    /// Per interface (its side picks the direction's rates): a guaranteed-rate session gets
    /// rate = target minimum, ceiling = maximum, from the guaranteed pool; a low-latency session
    /// with a maximum gets a strict-priority class at that rate, from the low-latency pool; any
    /// other session with a maximum gets a best-effort class capped there. A direction without a
    /// class shares its band (and is policed in the classifier if it has a maximum). Nothing is
    /// left behind on failure.
    fn reserve(
        &self,
        inner: &mut Inner,
        profile: &QosProfile,
    ) -> Result<Option<Reservation>, CamaraError> {
        let mut wanted: Vec<ReservedClass> = Vec::new();
        for i in &self.interfaces {
            let Some(sched) = i.scheduler else { continue };
            if i.side == Side::Both {
                continue;
            }
            let (target, max) = direction_rates(profile, i.side);
            let bps =
                |r: Option<crate::profile::Rate>| r.map(|r| r.bits_per_second()).filter(|b| *b > 0);
            let (target, max) = (bps(target), bps(max));
            let rule = burst_rule(profile, i.side);
            let class = match (profile.band, target, max) {
                (Band::Guaranteed, Some(t), m) => ReservedClass {
                    spec: ClassSpec::guaranteed(
                        t,
                        m.unwrap_or(sched.capacity_bps),
                        profile.priority,
                        rule,
                    ),
                    pool: Some((Pool::Guaranteed, t)),
                    ..ReservedClass::on(&i.name)
                },
                (Band::LowLatency, _, Some(m)) => ReservedClass {
                    spec: ClassSpec::low_latency(m, rule),
                    pool: Some((Pool::LowLatency, m)),
                    ..ReservedClass::on(&i.name)
                },
                (_, _, Some(m)) => ReservedClass {
                    spec: ClassSpec::capped(m, profile.priority, rule),
                    pool: None,
                    ..ReservedClass::on(&i.name)
                },
                _ => continue,
            };
            if let Some((pool, rate)) = class.pool {
                let limit = match pool {
                    Pool::Guaranteed => sched.guaranteed_pool_bps(),
                    Pool::LowLatency => sched.low_latency_bps(),
                };
                let used = inner
                    .reserved
                    .get(&(i.name.clone(), pool))
                    .copied()
                    .unwrap_or(0);
                if used + rate > limit {
                    return Err(CamaraError::new(
                        CamaraCode::QuotaExceeded,
                        format!(
                            "not enough {} capacity on {}: {} needs {} kbit/s, {} of {} kbit/s are left",
                            pool.name(),
                            i.name,
                            profile.name,
                            rate / 1000,
                            limit.saturating_sub(used) / 1000,
                            limit / 1000
                        ),
                    ));
                }
            }
            wanted.push(class);
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let mut planned: Vec<(ReservedClass, bool)> = Vec::new();
        for mut class in wanted {
            let taken = inner
                .classes
                .get_mut(&class.interface)
                .and_then(ClassPool::take);
            let Some((index, parked)) = taken else {
                for (c, parked) in planned {
                    unreserve(inner, &c);
                    if let Some(pool) = inner.classes.get_mut(&c.interface) {
                        pool.give_back(c.index, parked);
                    }
                }
                return Err(CamaraError::new(
                    CamaraCode::QuotaExceeded,
                    format!(
                        "every per-session scheduler class of {} is in use",
                        class.interface
                    ),
                ));
            };
            class.index = index;
            if let Some((pool, rate)) = class.pool {
                *inner
                    .reserved
                    .entry((class.interface.clone(), pool))
                    .or_default() += rate;
            }
            planned.push((class, parked));
        }
        Ok(Some(Reservation {
            classes: planned.into_iter().map(|(c, _)| c).collect(),
        }))
    }

    /// Makes (or changes: a parked one) each class of `r` in the kernel, with its baseline.
    /// On failure [`release`] gives back the whole reservation.
    fn make_classes(&self, r: &mut Reservation) -> Result<(), CamaraError> {
        for c in &mut r.classes {
            c.baseline = self
                .class_ops
                .set_class(&c.interface, c.index, c.spec)
                .map_err(|e| dataplane_error(&e))?;
        }
        Ok(())
    }

    /// The kernel rule for `flow` under `profile`, ending `duration` seconds from now.
    ///
    /// Steering: a guaranteed-rate session to its own class, low latency to the priority band,
    /// the rest to best effort (unless the profile names `skb_priority`). Maximum rates: a
    /// direction with guaranteed-rate classes is capped by their ceiling; any other direction
    /// with a maximum rate is policed in the classifier.
    /// A session's rule: its flow, its end, its profile's entry `profile_index`, and what its
    /// own classes decide (where a direction has a class: the class as priority unless the
    /// profile sets one, and the class's policer). The rest comes from the profile's entry.
    fn flow_rule(
        &self,
        flow: &AppFlow,
        profile: &QosProfile,
        profile_index: u16,
        slot: u32,
        left: Duration,
        reservation: Option<&Reservation>,
    ) -> FlowRule {
        let (server_addr, server_mask) = network_words(flow.server);
        let ranges = |src: &[PortRange]| {
            let mut out = [PortRange::default(); MAX_PORT_RANGES];
            for (o, r) in out.iter_mut().zip(src) {
                *o = *r;
            }
            out
        };
        let mut rule = FlowRule {
            expires_at_ns: monotonic_ns() + u64::try_from(left.as_nanos()).unwrap_or(u64::MAX / 2),
            slot,
            server_addr,
            server_mask,
            server_prefix_len: flow.server.prefix(),
            // AppFlow::from_request bounds both lists by MAX_PORT_RANGES.
            n_device_ports: flow.device_ports.len().min(MAX_PORT_RANGES) as u8,
            n_server_ports: flow.server_ports.len().min(MAX_PORT_RANGES) as u8,
            device_ports: ranges(&flow.device_ports),
            server_ports: ranges(&flow.server_ports),
            profile: profile_index,
            ..FlowRule::default()
        };
        // The side whose egress carries a direction: downlink leaves on the device side.
        for (side, max, own_priority, own_police) in [
            (
                Side::Server,
                profile.max_upstream_rate,
                OWN_PRIORITY_UP,
                OWN_POLICE_UP,
            ),
            (
                Side::Device,
                profile.max_downstream_rate,
                OWN_PRIORITY_DOWN,
                OWN_POLICE_DOWN,
            ),
        ] {
            let Some(c) = reservation.and_then(|r| self.class_on(r, side)) else {
                continue;
            };
            let (priority, police) = if side == Side::Server {
                (&mut rule.priority_up, &mut rule.police_up)
            } else {
                (&mut rule.priority_down, &mut rule.police_down)
            };
            if profile.skb_priority.is_none() {
                rule.own |= own_priority;
                *priority = session_class(c.index);
            }
            rule.own |= own_police;
            *police = match max.map(|m| m.bits_per_second()).filter(|m| *m > 0) {
                // A low-latency class: the classifier's bucket matches the class's allowance,
                // so what exceeds it is dropped before it can queue behind the delay budget.
                Some(m) if c.spec.prio == 0 => Policer::new(m, c.spec.burst_bytes),
                // Shaped by its own class.
                _ => Policer::default(),
            };
        }
        rule
    }

    /// The rule of AVAILABLE `session` under `policy` (the one in force) for what is left of it;
    /// `None` when its profile is not in the policy.
    fn session_rule(&self, inner: &Inner, policy: &Policy, session: &Session) -> Option<FlowRule> {
        let SessionState::Available { slot, expires_at } = session.state else {
            return None;
        };
        let profile = policy.profiles.get(&session.request.profile)?;
        let index = inner.profiles.index(&session.request.profile)?;
        Some(self.flow_rule(
            &session.flow,
            profile,
            index,
            slot,
            time_left(expires_at),
            session.reservation.as_ref(),
        ))
    }

    /// A managed interface went down or away (`up == false`): every AVAILABLE session ends
    /// `NETWORK_TERMINATED` and new ones are refused until it is back.
    pub fn link_changed(&self, interface: &str, up: bool) {
        let mut inner = self.lock();
        if up {
            if inner.links_down.remove(interface) {
                info!(interface, "managed interface is back");
            }
            return;
        }
        if !inner.links_down.insert(interface.to_owned()) {
            return;
        }
        error!(interface, "managed interface is down; ending its sessions");
        // New sessions are refused from here on; those admitted before are ended in batches in
        // deadline order, the lock handed to waiting readers between two.
        let down_at = OffsetDateTime::now_utc();
        drop(inner);
        let (_, ended) = self.sweep(
            EXPIRY_BATCH,
            Duration::ZERO,
            || true,
            |inner, id, now, endings| {
                // Only those admitted before the loss (the link may be back meanwhile).
                if inner
                    .sessions
                    .get(&id)
                    .is_some_and(|s| s.started_at <= down_at)
                {
                    endings.extend(self.terminate(inner, id, StatusInfo::NetworkTerminated, now));
                }
            },
        );
        info!(interface, ended, "sessions ended by the link loss");
        // Their purge deadlines may come before the one the expiry task sleeps towards.
        self.wake.notify_one();
    }

    /// Attaches the classifier to the managed interfaces (at start, after the restore).
    pub fn attach_managed(&self) -> Result<(), DataPlaneError> {
        self.lock().dp.attach_managed()
    }

    /// Re-attaches the classifier and scheduler to an interface that was re-created.
    pub fn reattach(&self, interface: &str) -> Result<(), DataPlaneError> {
        self.lock().dp.reattach(interface)
    }

    /// Graceful stop of the data plane (schedulers restored unless configured to stay).
    pub fn shutdown(&self) {
        self.lock().dp.shutdown();
    }

    /// `Ok` if `caller` may touch session `id` (as [`Core::get`] would decide, without reading
    /// its counters).
    pub fn check_access(&self, id: SessionId, caller: &Caller) -> Result<(), CamaraError> {
        self.lock().accessible(id, caller).map(drop)
    }

    /// The node's state for metrics and operators: sessions by status and profile, slots,
    /// pools, links. One pass over the sessions under the lock.
    /// Sessions that hold a slot (AVAILABLE), read without walking them.
    /// Whether this node holds session `id` (live or ended).
    pub fn holds(&self, id: SessionId) -> bool {
        self.lock().sessions.contains_key(&id)
    }

    /// The API client of session `id`, if this node holds it.
    pub fn owner_of(&self, id: SessionId) -> Option<Arc<str>> {
        self.lock()
            .sessions
            .get(&id)
            .map(|s| s.request.owner.clone())
    }

    /// What `client` holds here: live sessions and the sink origins they notify.
    pub fn client_usage(&self, client: &str) -> crate::cluster::quota::Usage {
        self.lock()
            .active_by_owner
            .get(client)
            .map(|u| crate::cluster::quota::Usage {
                active: u.active,
                sinks: u.sinks.keys().cloned().collect(),
            })
            .unwrap_or_default()
    }

    /// The API clients with live sessions here.
    pub fn clients(&self) -> Vec<String> {
        self.lock()
            .active_by_owner
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// What one API client may hold: live sessions, distinct sinks they notify.
    pub fn client_limits(&self) -> crate::cluster::quota::ClientLimits {
        crate::cluster::quota::ClientLimits {
            active: self.max_active_per_client,
            sinks: self.max_sinks_per_client,
        }
    }

    pub fn live_sessions(&self) -> u64 {
        self.lock().slots.used()
    }

    pub fn node_stats(&self) -> NodeStats {
        let inner = self.lock();
        // Counted by borrowed name; each profile's name is copied once, not once per session.
        let mut sessions: std::collections::BTreeMap<
            (&'static str, &crate::model::ProfileName),
            u64,
        > = std::collections::BTreeMap::new();
        let mut slots_used = 0;
        let mut session_classes: Vec<(String, u64)> = self
            .interfaces
            .iter()
            .filter(|i| i.scheduler.is_some())
            .map(|i| (i.name.clone(), 0))
            .collect();
        for s in inner.sessions.values() {
            for c in s.reservation.iter().flat_map(|r| &r.classes) {
                if let Some((_, n)) = session_classes.iter_mut().find(|(i, _)| *i == c.interface) {
                    *n += 1;
                }
            }
            let status = match s.state {
                SessionState::Available { .. } => {
                    slots_used += 1;
                    "AVAILABLE"
                }
                SessionState::Unavailable { .. } => "UNAVAILABLE",
            };
            *sessions.entry((status, &s.request.profile)).or_default() += 1;
        }
        let mut pools = Vec::new();
        for i in &self.interfaces {
            let Some(sched) = i.scheduler else { continue };
            for (pool, capacity_bps) in [
                (Pool::Guaranteed, sched.guaranteed_pool_bps()),
                (Pool::LowLatency, sched.low_latency_bps()),
            ] {
                pools.push(PoolStats {
                    interface: i.name.clone(),
                    pool: pool.name(),
                    reserved_bps: inner
                        .reserved
                        .get(&(i.name.clone(), pool))
                        .copied()
                        .unwrap_or(0),
                    capacity_bps,
                });
            }
        }
        NodeStats {
            sessions: sessions
                .into_iter()
                .map(|((status, profile), n)| ((status, profile.to_string()), n))
                .collect(),
            slots_used,
            slots_capacity: u64::from(inner.slots.capacity),
            pools,
            links: self
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), !inner.links_down.contains(&i.name)))
                .collect(),
            session_classes,
            parked_classes: self
                .interfaces
                .iter()
                .filter_map(|i| inner.classes.get(&i.name).map(|p| (i, p)))
                .map(|(i, p)| (i.name.clone(), p.parked.len() as u64))
                .collect(),
            bands: inner.dp.band_counters().unwrap_or_else(|e| {
                warn!(error = %crate::anyhow_like(&e), "cannot read the classifier's band counters");
                Vec::new()
            }),
            queues: inner.dp.queue_stats().unwrap_or_else(|e| {
                warn!(error = %crate::anyhow_like(&e), "cannot read the schedulers' statistics");
                Vec::new()
            }),
            parse: inner.dp.parse_counters().unwrap_or_else(|e| {
                warn!(error = %crate::anyhow_like(&e), "cannot read the classifier's parse counters");
                Vec::new()
            }),
        }
    }

    /// The managed interfaces as configured.
    pub fn interfaces(&self) -> &[ManagedInterface] {
        &self.interfaces
    }

    /// Every session of the node (any client), with its client, matching `filter`, in id order,
    /// the first `limit` after `after`.
    pub fn node_sessions(
        &self,
        filter: &SessionFilter,
        after: Option<SessionId>,
        limit: usize,
    ) -> Vec<(SessionView, String)> {
        let inner = self.lock();
        let mut matching: Vec<&Session> = inner
            .sessions
            .values()
            .filter(|s| after.is_none_or(|a| s.id.to_string() > a.to_string()))
            .filter(|s| {
                filter.status.is_none_or(|want| {
                    matches!(
                        (want, &s.state),
                        (QosStatus::Available, SessionState::Available { .. })
                            | (QosStatus::Unavailable, SessionState::Unavailable { .. })
                    )
                })
            })
            .filter(|s| {
                filter
                    .profile
                    .as_deref()
                    .is_none_or(|p| s.request.profile.to_string() == p)
            })
            .filter(|s| {
                filter
                    .client
                    .as_deref()
                    .is_none_or(|c| *s.request.owner == *c)
            })
            .filter(|s| filter.device.is_none_or(|d| s.flow.device == d))
            .collect();
        matching.sort_by_key(|s| s.id.to_string());
        matching
            .into_iter()
            .take(limit)
            .filter_map(|s| Some((view(&inner, s).ok()?, s.request.owner.to_string())))
            .collect()
    }

    /// The kernel's entries and the scheduler's per-session classes, with the sessions that
    /// own them (by counter slot and class index).
    pub fn kernel_view(&self) -> Result<KernelView, DataPlaneError> {
        let inner = self.lock();
        let mut slot_owner = HashMap::new();
        let mut class_owner = HashMap::new();
        let mut session_profile = HashMap::new();
        for s in inner.sessions.values() {
            if let SessionState::Available { slot, .. } = s.state {
                slot_owner.insert(slot, (s.id, s.flow.device));
                session_profile.insert(s.id, s.request.profile.clone());
                for c in s.reservation.iter().flat_map(|r| &r.classes) {
                    class_owner.insert((c.interface.clone(), c.index), s.id);
                }
            }
        }
        let entries = inner.dp.entries()?;
        let mut classes = Vec::new();
        for i in self.interfaces.iter().filter(|i| i.scheduler.is_some()) {
            for index in inner.dp.session_classes(&i.name)? {
                classes.push((i.name.clone(), index));
            }
        }
        let parked = inner
            .classes
            .iter()
            .flat_map(|(i, pool)| pool.parked.iter().map(|x| (i.clone(), *x)))
            .collect();
        let profiles = inner
            .dp
            .profiles()?
            .into_iter()
            .map(|(index, t)| {
                let name = inner
                    .profiles
                    .name_of(index)
                    .map_or_else(|| RETIRED_PROFILE.to_owned(), ToString::to_string);
                (index, (t, name))
            })
            .collect();
        Ok(KernelView {
            entries,
            classes,
            slot_owner,
            class_owner,
            parked,
            session_profile,
            profiles,
        })
    }

    /// Compares the store's sessions, qodd's memory and the kernel; returns every difference.
    pub fn verify(&self, stored: &[crate::store::StoredSession]) -> Result<Drift, DataPlaneError> {
        let kernel = self.kernel_view()?;
        let wall = OffsetDateTime::now_utc();
        let mut drift = Vec::new();
        let (memory, available): (HashMap<SessionId, bool>, usize) = {
            let inner = self.lock();
            let m: HashMap<SessionId, bool> = inner
                .sessions
                .values()
                .map(|s| (s.id, matches!(s.state, SessionState::Available { .. })))
                .collect();
            let n = m.values().filter(|a| **a).count();
            (m, n)
        };
        let live_in_store: HashSet<SessionId> = stored
            .iter()
            .filter(|s| s.ended.is_none() && s.started_at + secs(s.duration) > wall)
            .map(|s| s.id)
            .collect();
        for id in &live_in_store {
            if memory.get(id) != Some(&true) {
                drift.push(format!(
                    "session {id} is live in the store but not AVAILABLE in qodd"
                ));
            }
        }
        for (id, available) in &memory {
            if *available && !live_in_store.contains(id) {
                drift.push(format!(
                    "session {id} is AVAILABLE in qodd but not live in the store"
                ));
            }
        }
        let mut ruled = HashSet::new();
        for (key, rules) in &kernel.entries {
            for r in rules {
                match kernel.slot_owner.get(&r.slot) {
                    Some((id, device)) if device == key => {
                        ruled.insert(*id);
                        let own = kernel
                            .session_profile
                            .get(id)
                            .map(crate::model::ProfileName::as_str);
                        match kernel.profiles.get(&r.profile) {
                            None => drift.push(format!(
                                "session {id}'s kernel rule follows profile entry {}, which is not in use (it treats nothing)",
                                r.profile
                            )),
                            Some((_, name)) if Some(name.as_str()) != own => drift.push(format!(
                                "session {id}'s kernel rule follows profile entry {} ({name}), not its profile {}'s",
                                r.profile,
                                own.unwrap_or("?")
                            )),
                            Some(_) => {}
                        }
                    }
                    _ => drift.push(format!(
                        "kernel rule for device {} (slot {}) belongs to no AVAILABLE session",
                        crate::audit::device(key),
                        r.slot
                    )),
                }
            }
        }
        for (id, _) in kernel.slot_owner.values() {
            if !ruled.contains(id) {
                drift.push(format!("session {id} is AVAILABLE but has no kernel rule"));
            }
        }
        let present: HashSet<(String, u16)> = kernel.classes.iter().cloned().collect();
        for (interface, index) in &kernel.classes {
            let key = (interface.clone(), *index);
            if !kernel.class_owner.contains_key(&key) && !kernel.parked.contains(&key) {
                drift.push(format!(
                    "scheduler class 1:{:x} on {interface} is held by no session and not parked",
                    crate::dataplane::scheduler::SESSION_MINOR_BASE + index
                ));
            }
        }
        for ((interface, index), id) in &kernel.class_owner {
            if !present.contains(&(interface.clone(), *index)) {
                drift.push(format!(
                    "session {id}'s scheduler class 1:{:x} is missing on {interface}",
                    crate::dataplane::scheduler::SESSION_MINOR_BASE + index
                ));
            }
        }
        drift.sort();
        Ok(Drift {
            store_sessions: stored.len(),
            memory_sessions: memory.len(),
            available,
            kernel_entries: kernel.entries.len(),
            drift,
        })
    }

    /// Why a load balancer should not send this node new sessions now (`None`: ready): every
    /// kernel slot is taken, or a managed link is down.
    pub fn not_ready(&self) -> Option<String> {
        let inner = self.lock();
        if let Some(name) = self
            .interfaces
            .iter()
            .find(|i| inner.links_down.contains(&i.name))
        {
            return Some(format!("managed interface {} is down", name.name));
        }
        inner.slots.take_none_left().then(|| {
            format!(
                "full: {} of {} sessions (max_sessions)",
                inner.slots.capacity, inner.slots.capacity
            )
        })
    }

    ///
    /// Read without the core's lock (see [`Core::reads`]): a live session's counters are read
    /// from its slot, then the session is looked at again; if it changed meanwhile (ended, its
    /// slot perhaps handed to another session already), the read starts over, so the counters
    /// shown are always the session's own.
    pub fn get(&self, id: SessionId, caller: &Caller) -> Result<SessionView, CamaraError> {
        self.read_now(id, caller)
            .unwrap_or_else(|| self.read_locked(id, caller))
    }

    /// Session `id` as the ledger holds it, under the core's lock (a session changing under
    /// each of [`Core::read_now`]'s attempts).
    pub fn read_locked(&self, id: SessionId, caller: &Caller) -> Result<SessionView, CamaraError> {
        let inner = self.lock();
        let session = inner.accessible(id, caller)?;
        view(&inner, session)
    }

    /// [`Core::get`] without ever waiting: a map look-up and, for a live session, one read
    /// of its counters from the kernel (no I/O, no lock held by writers: fit for an async
    /// worker). `None` if the session changed under each of its attempts.
    pub fn read_now(
        &self,
        id: SessionId,
        caller: &Caller,
    ) -> Option<Result<SessionView, CamaraError>> {
        for _ in 0..READ_ATTEMPTS {
            let Some(session) = self.reads.get(&id).map(|s| s.value().clone()) else {
                return Some(Err(not_found(id)));
            };
            if let Err(e) = may_access(caller, &session) {
                return Some(Err(e));
            }
            let counters = match &session.state {
                SessionState::Available { slot, .. } => match self.counters.counters(*slot) {
                    Ok(c) => c,
                    Err(e) => return Some(Err(dataplane_error(&e))),
                },
                SessionState::Unavailable { counters, .. } => **counters,
            };
            let unchanged = self
                .reads
                .get(&id)
                .is_some_and(|s| Arc::ptr_eq(s.value(), &session));
            if unchanged {
                return Some(Ok(SessionView {
                    session: Session::clone(&session),
                    counters,
                }));
            }
        }
        None
    }

    /// [`Core::get`] with [`Core::delivery`].
    pub fn get_delivery(
        &self,
        id: SessionId,
        caller: &Caller,
    ) -> Result<(SessionView, Option<Delivery>), CamaraError> {
        Ok(self.delivery(self.get(id, caller)?))
    }

    /// What each direction of a live session read delivered against what it was granted. The
    /// achieved rate is measured from the previous such reading of the session (at least
    /// [`METER_INTERVAL`] before; the first reading measures from the start). It reads the session's classes
    /// from the kernel (a netlink round trip each) when it has any, else nothing but memory.
    pub fn delivery(&self, v: SessionView) -> (SessionView, Option<Delivery>) {
        let now = Instant::now();
        let id = v.session.id;
        if !matches!(v.session.state, SessionState::Available { .. }) {
            self.meters.lock().remove(&id);
            return (v, None);
        }
        // The classes are read without the lock (a netlink round trip each).
        let policy = self.policy();
        let profile = policy.profiles.get(&v.session.request.profile);
        let mut report = [DirectionReport::default(), DirectionReport::default()];
        // Up leaves through the server side, down through the device side.
        for (n, side) in [Side::Server, Side::Device].into_iter().enumerate() {
            let r = &mut report[n];
            if let Some(p) = profile {
                let (min, max) = direction_rates(p, side);
                r.granted_min_bps = min.map(|r| r.bits_per_second());
                r.granted_max_bps = max.map(|r| r.bits_per_second());
            }
            let class = v
                .session
                .reservation
                .as_ref()
                .and_then(|res| self.class_on(res, side));
            if let Some(c) = class {
                match self.class_ops.class_stats(&c.interface, c.index) {
                    // The backlog is now; the totals since the session took the class.
                    Ok(stats) => {
                        r.class = Some(TcStats {
                            backlog_bytes: stats.backlog_bytes,
                            backlog_packets: stats.backlog_packets,
                            ..stats.minus(c.baseline)
                        });
                    }
                    Err(e) => {
                        warn!(session = %id, error = %crate::anyhow_like(&e), "cannot read a session class")
                    }
                }
            }
        }
        let delivered =
            |n: usize, let_through: u64| report[n].class.map_or(let_through, |c| c.bytes);
        let bytes = [
            delivered(0, v.counters.up_bytes),
            delivered(1, v.counters.down_bytes),
        ];
        let mut meters = self.meters.lock();
        let previous = meters.get(&id).copied();
        let meter = match previous {
            Some(m) if now.duration_since(m.at) < METER_INTERVAL => m,
            _ => {
                let (at, before) = previous.map_or_else(
                    || (self.started_instant(&v.session, now), [0, 0]),
                    |m| (m.at, m.bytes),
                );
                let interval = now.duration_since(at);
                let rate = |n: usize| {
                    let secs = interval.as_secs_f64();
                    (secs > 0.0)
                        .then(|| (bytes[n].saturating_sub(before[n]) as f64 * 8.0 / secs) as u64)
                };
                let m = Meter {
                    at: now,
                    bytes,
                    achieved: [rate(0), rate(1)],
                    interval,
                };
                // Only for a session still live (it may have ended while its classes were read;
                // one ending right after is forgotten at its purge).
                if self
                    .reads
                    .get(&id)
                    .is_some_and(|s| matches!(s.state, SessionState::Available { .. }))
                {
                    meters.insert(id, m);
                }
                m
            }
        };
        for (n, r) in report.iter_mut().enumerate() {
            r.achieved_bps = meter.achieved[n];
            r.interval = Some(meter.interval);
        }
        let [up, down] = report;
        (v, Some(Delivery { up, down }))
    }

    /// `reservation`'s class on the interface of `side`, if it has one there.
    fn class_on<'r>(&self, reservation: &'r Reservation, side: Side) -> Option<&'r ReservedClass> {
        reservation.classes.iter().find(|c| {
            self.interfaces
                .iter()
                .any(|i| i.name == c.interface && i.side == side)
        })
    }

    /// When `session` (live) started, on the monotonic clock.
    fn started_instant(&self, session: &Session, now: Instant) -> Instant {
        let since = OffsetDateTime::now_utc() - session.started_at;
        now.checked_sub(Duration::try_from(since).unwrap_or_default())
            .unwrap_or(now)
    }

    /// Deletes a session. An AVAILABLE one leaves the data plane and emits `DELETE_REQUESTED`;
    /// an UNAVAILABLE one is just forgotten (CAMARA: no event).
    pub fn delete(&self, id: SessionId, caller: &Caller) -> Result<(), CamaraError> {
        let deleted = self.delete_inner(id, caller);
        if let Err(e) = &deleted {
            audit::record(
                audit::Action::Delete,
                &caller.client,
                Some(id),
                None,
                Err(e),
            );
        }
        deleted
    }

    fn delete_inner(&self, id: SessionId, caller: &Caller) -> Result<(), CamaraError> {
        let mut inner = self.lock();
        let session = inner.accessible(id, caller)?.clone();
        let event = if let SessionState::Available { slot, .. } = session.state {
            let counters = inner.dp.counters(slot).unwrap_or_default();
            let now = OffsetDateTime::now_utc();
            let mut ended = session.clone();
            ended.reservation = None;
            ended.state = SessionState::Unavailable {
                info: StatusInfo::DeleteRequested,
                ended_at: now,
                counters: Box::new(counters),
            };
            Some(self.event(
                SessionView {
                    session: ended,
                    counters,
                },
                now,
            ))
        } else {
            None
        };
        // Decided under the lock and applied in order: the kernel (a failure there changes
        // nothing), then the store's removal queued, then the event, held until the removal is
        // durable. The commit is awaited outside the lock, so deletions share commits with
        // everything else instead of each holding the core for its fsync.
        if let SessionState::Available { slot, .. } = session.state {
            resync(&mut inner, &session.flow.device, Some(id), None)
                .map_err(|e| dataplane_error(&e))?;
            inner.slots.give_back(slot);
            release(
                &mut inner,
                self.class_ops.as_ref(),
                session.reservation.clone(),
            );
            inner.count_active(&session.request, false);
        }
        inner.sessions.remove(&id);
        self.meters.lock().remove(&id);
        unlink(&mut inner, &session.flow.device, id);
        inner.deadlines.remove(&(session.deadline, id));
        let (place, extra) = match event {
            Some(e) => {
                let (place, ops) = self.queue_event(e);
                (Some(place), ops)
            }
            None => (None, Vec::new()),
        };
        // A live session's end frees its client's place; an ended one's was freed at its end.
        let live = matches!(session.state, SessionState::Available { .. });
        let ticket = self.forget(id, live.then(|| Holder::of(&session.request)), extra);
        drop(inner);
        if let Some(Err(e)) = ticket.map(Ticket::wait) {
            // Gone from the kernel and from memory, but not from the store: the removal is
            // queued again (it would otherwise come back at the next start) and the end is not
            // announced, since it is not durable.
            error!(session = %id, error = %crate::anyhow_like(&e), "cannot store the deletion; queued again");
            if let Some(place) = place {
                self.announcer.withdraw(place);
            }
            self.forget_logged([id]);
            return Err(CamaraError::new(
                CamaraCode::Internal,
                "the deletion could not be stored; it is retried",
            ));
        }
        if let Some(place) = place {
            self.announcer.release(place);
        }
        audit::record(
            audit::Action::Delete,
            &caller.client,
            Some(id),
            Some(&session.flow.device),
            Ok(()),
        );
        Ok(())
    }

    /// Adds time to an AVAILABLE session, silently capped at the profile's maximum duration.
    pub fn extend(
        &self,
        id: SessionId,
        additional: u32,
        caller: &Caller,
    ) -> Result<SessionView, CamaraError> {
        let extended = self.extend_inner(id, additional, caller);
        match &extended {
            Ok(v) => audit::record(
                audit::Action::Extend,
                &caller.client,
                Some(id),
                Some(&v.session.flow.device),
                Ok(()),
            ),
            Err(e) => audit::record(
                audit::Action::Extend,
                &caller.client,
                Some(id),
                None,
                Err(e),
            ),
        }
        extended
    }

    fn extend_inner(
        &self,
        id: SessionId,
        additional: u32,
        caller: &Caller,
    ) -> Result<SessionView, CamaraError> {
        let mut inner = self.lock();
        let session = inner.accessible(id, caller)?.clone();
        let SessionState::Available { slot, .. } = session.state else {
            return Err(CamaraError::new(
                CamaraCode::SessionExtensionNotAllowed,
                "extending the session is not allowed in the current state (UNAVAILABLE); the session must be in the AVAILABLE state",
            ));
        };
        let policy = self.policy();
        // A reload terminates the sessions whose profile went away, so the profile is there; the
        // fallback (no extension) only guards that invariant.
        let max = policy
            .profiles
            .get(&session.request.profile)
            .and_then(QosProfile::max_duration_secs)
            .unwrap_or(u64::from(session.duration))
            .max(u64::from(session.duration));
        let total = (u64::from(session.duration) + u64::from(additional)).min(max);
        let total = u32::try_from(total.min(i32::MAX as u64)).unwrap_or(i32::MAX as u32);
        let added = total - session.duration;
        // The kernel's end moves by as much as the scheduled one.
        let mut rule = match installed_rule(&inner, &session.flow.device, slot) {
            Ok(rule) => rule,
            // Gone from the kernel (changed behind qodd's back): made again for what is left.
            Err(missing @ DataPlaneError::RuleMissing { .. }) => self
                .session_rule(&inner, &policy, &session)
                .ok_or_else(|| dataplane_error(&missing))?,
            Err(e) => return Err(dataplane_error(&e)),
        };
        rule.expires_at_ns += u64::from(added) * 1_000_000_000;
        let deadline = session.deadline + secs(added);
        let mut updated = session.clone();
        updated.duration = total;
        updated.deadline = deadline;
        updated.state = SessionState::Available {
            slot,
            expires_at: session.started_at + secs(total),
        };
        // The kernel first (a failure there changes nothing), then the store's write queued
        // under the lock and awaited outside it; acknowledged only once durable, undone if not.
        resync(&mut inner, &session.flow.device, Some(id), Some(rule))
            .map_err(|e| dataplane_error(&e))?;
        inner.deadlines.remove(&(session.deadline, id));
        inner.deadlines.insert((deadline, id));
        inner.sessions.insert(updated.clone());
        let ticket = self.submit(&updated, Vec::new());
        // A counters read failing must not turn the extension into an error.
        let counters = inner.dp.counters(slot).unwrap_or_default();
        drop(inner);
        if let Some(Err(e)) = ticket.map(Ticket::wait) {
            error!(session = %id, error = %crate::anyhow_like(&e), "cannot store the extension; undone");
            self.undo_extension(&session, &updated);
            return Err(CamaraError::new(
                CamaraCode::Internal,
                "the extension could not be stored; nothing changed",
            ));
        }
        Ok(SessionView {
            session: updated,
            counters,
        })
    }

    /// Puts `before` back where an extension to `after` could not be stored, unless the session
    /// changed again meanwhile (then that later change stands).
    fn undo_extension(&self, before: &Session, after: &Session) {
        let mut inner = self.lock();
        let unchanged = inner
            .sessions
            .get(&before.id)
            .is_some_and(|s| s.deadline == after.deadline && s.duration == after.duration);
        if !unchanged {
            return;
        }
        // The kernel's end moves back by as much as it was moved.
        let SessionState::Available { slot, .. } = before.state else {
            return;
        };
        let back = u64::from(after.duration.saturating_sub(before.duration)) * 1_000_000_000;
        if let Err(e) = installed_rule(&inner, &before.flow.device, slot).and_then(|mut rule| {
            rule.expires_at_ns = rule.expires_at_ns.saturating_sub(back);
            resync(&mut inner, &before.flow.device, Some(before.id), Some(rule))
        }) {
            error!(session = %before.id, error = %crate::anyhow_like(&e), "cannot undo an unstored extension in the kernel");
        }
        inner.deadlines.remove(&(after.deadline, before.id));
        inner.deadlines.insert((before.deadline, before.id));
        inner.sessions.insert(before.clone());
    }

    /// Sessions of `device` that `caller` may see, under every address the device is known by.
    pub fn retrieve(
        &self,
        device: &DeviceId,
        caller: &Caller,
    ) -> Result<Vec<SessionView>, CamaraError> {
        let keys = self.policy().resolve_all(device)?;
        let inner = self.lock();
        keys.iter()
            .flat_map(|k| inner.by_device.get(k).into_iter().flatten())
            .filter_map(|id| inner.sessions.get(id))
            .filter(|s| caller.may_access(&s.request))
            .map(|s| view(&inner, s))
            .collect()
    }

    /// Ends an AVAILABLE session on the network's side: rule removed, `NETWORK_TERMINATED`.
    fn terminate(
        &self,
        inner: &mut Inner,
        id: SessionId,
        info: StatusInfo,
        now: Instant,
    ) -> Option<Ending> {
        let session = inner.sessions.get(&id)?;
        let SessionState::Available { slot, .. } = session.state else {
            return None;
        };
        let session = session.clone();
        inner.count_active(&session.request, false);
        let counters = inner.dp.counters(slot).unwrap_or_default();
        if let Err(e) = resync(inner, &session.flow.device, Some(id), None) {
            // The kernel ignores the entry past its expiry anyway. Until then the rule still
            // counts into its slot and steers into its classes, so neither is handed out again.
            error!(session = %id, error = %crate::anyhow_like(&e), "cannot remove rule; its slot and classes stay reserved");
        } else {
            inner.slots.give_back(slot);
            release(inner, self.class_ops.as_ref(), session.reservation.clone());
        }
        // An expired session ended at its scheduled end, not when the expiry task got to it.
        let ended_at = match info {
            StatusInfo::DurationExpired => session.started_at + secs(session.duration),
            _ => OffsetDateTime::now_utc(),
        };
        let purge = now + self.retention;
        let mut ended = session;
        ended.reservation = None;
        ended.state = SessionState::Unavailable {
            info,
            ended_at,
            counters: Box::new(counters),
        };
        inner.deadlines.remove(&(ended.deadline, id));
        ended.deadline = purge;
        inner.deadlines.insert((purge, id));
        inner.sessions.insert(ended.clone());
        self.meters.lock().remove(&id);
        // The revision is taken here, in decision order; the event is built, logged, stored
        // and announced by [`Core::tell_endings`] once the lock is released.
        let place = self.announcer.reserve(id, self.store.is_some());
        Some(Ending {
            session: ended,
            counters,
            info,
            ended_at,
            place,
        })
    }

    /// Tells the ends decided by [`Core::terminate`] (call it without the lock): each one's
    /// event is built into its reserved revision, logged and audited; all are written in one
    /// commit with their log records and notifications, and announced once that is durable
    /// (withdrawn if it fails).
    fn tell_endings(&self, endings: Vec<Ending>, place: Option<StorePlace>) {
        if endings.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(endings.len() * 3);
        let mut places = Vec::with_capacity(endings.len());
        for Ending {
            session,
            counters,
            info,
            ended_at,
            place,
        } in endings
        {
            let id = session.id;
            let expired = info == StatusInfo::DurationExpired;
            if expired {
                debug!(session = %id, "session expired");
            } else {
                info!(session = %id, ?info, "session ended");
            }
            audit::record(
                if expired {
                    audit::Action::Expire
                } else {
                    audit::Action::Terminate
                },
                &session.request.owner,
                Some(id),
                Some(&session.flow.device),
                Ok(()),
            );
            // The session's own record first; its event (built from the session, moved) and
            // notification follow it in the same commit.
            ops.extend(self.session_ops(&session, Vec::new()));
            let decided = self.event(SessionView { session, counters }, ended_at);
            ops.extend(self.fill_event(place, decided));
            places.push(place);
        }
        let Some(store) = &self.store else {
            return;
        };
        let announcer = self.announcer.clone();
        let then = move |r: crate::store::Outcome| match r {
            Ok(()) => places.into_iter().for_each(|p| announcer.release(p)),
            Err(e) => {
                error!(error = %crate::anyhow_like(&e), ends = places.len(), "cannot store sessions' ends; they are not announced");
                places.into_iter().for_each(|p| announcer.withdraw(p));
            }
        };
        match place {
            Some(place) => store.fill_then(place, ops, then),
            None => store.submit_then(ops, then),
        }
    }

    /// The store's next place, taken under the lock with the decisions whose writes will fill
    /// it: a change decided after them (a delete of a session just ended, say) is written after
    /// them, however long telling them takes.
    fn store_place(&self, decided: &[Ending]) -> Option<StorePlace> {
        if decided.is_empty() {
            return None;
        }
        self.store.as_ref().map(Store::reserve)
    }

    /// Works through every session in deadline order, `batch` at a time, each batch under one
    /// hold of the lock: `each` acts on one, putting an end it decides into the batch's ends,
    /// which are told once the lock is handed (fairly: taken straight back, it would go to this
    /// sweep again before a waiting reader could wake) to readers, then `pause`. `go_on` is
    /// asked under the lock before each batch. Returns whether it went through every session,
    /// and the ends it told.
    fn sweep(
        &self,
        batch: usize,
        pause: Duration,
        go_on: impl Fn() -> bool,
        mut each: impl FnMut(&mut Inner, SessionId, Instant, &mut Vec<Ending>),
    ) -> (bool, usize) {
        let (mut cursor, mut ended) = (None, 0usize);
        loop {
            let mut inner = self.lock();
            if !go_on() {
                return (false, ended);
            }
            let Some(ids) = live_batch(&inner, &mut cursor, batch) else {
                return (true, ended);
            };
            let now = Instant::now();
            let mut endings = Vec::new();
            for id in ids {
                each(&mut inner, id, now, &mut endings);
            }
            let place = self.store_place(&endings);
            MutexGuard::unlock_fair(inner);
            ended += endings.len();
            self.tell_endings(endings, place);
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Brings the node to `policy`: new sessions take it at once; live ones are brought to it
    /// in batches of [`RELOAD_BATCH`] in deadline order, each under one hold of the lock, so
    /// reads go on between batches. A live session whose profile is gone or `INACTIVE` ends
    /// NETWORK_TERMINATED; the others get their profile's new DSCP, priority, band and policed
    /// maxima (their classes' rates stay as admitted; see the README). A newer reload that
    /// starts meanwhile takes over the sweep.
    pub fn reload(&self, policy: Policy) {
        /// Counts this reload as running until it returns.
        struct Running<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.reloads_running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _running = Running(&self.reloads_running);
        let policy = Arc::new(policy);
        let profiles = policy.profiles.iter().count();
        {
            let mut inner = self.lock();
            // Each profile's entry first: a session of a profile still there follows its new
            // treatment from here on, and one admitted after the swap finds its entry.
            if let Err(e) = self.install_profiles(&mut inner, &policy, false) {
                error!(error = %crate::anyhow_like(&e), "policy reload refused; the running policy stays");
                return;
            }
            *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        }
        info!(profiles, "profile treatments reloaded");
        let mut updated = 0usize;
        let (done, ended) = self.sweep(
            RELOAD_BATCH,
            RELOAD_PAUSE,
            || Arc::ptr_eq(&policy, &self.policy()),
            |inner, id, now, endings| {
                let Some(session) = inner.sessions.get(&id) else {
                    return;
                };
                let SessionState::Available { slot, .. } = session.state else {
                    return;
                };
                match policy.profiles.get(&session.request.profile) {
                    // A session without classes of its own has nothing in its rule that its
                    // profile's entry does not already say.
                    Some(p) if p.status != ProfileStatus::Inactive && session.reservation.is_none() => {}
                    Some(p) if p.status != ProfileStatus::Inactive => {
                        let Some(mut rule) = self.session_rule(inner, &policy, session) else {
                            return;
                        };
                        let device = session.flow.device;
                        // The end stays the one the kernel holds (read now, it would differ by
                        // the nanoseconds since).
                        let installed = installed_rule(inner, &device, slot);
                        if let Ok(i) = &installed {
                            rule.expires_at_ns = i.expires_at_ns;
                        }
                        if installed.as_ref().is_ok_and(|i| *i == rule) {
                            return;
                        }
                        match resync(inner, &device, Some(id), Some(rule)) {
                            Ok(()) => updated += 1,
                            Err(e) => {
                                error!(session = %id, error = %crate::anyhow_like(&e), "cannot apply the reloaded profile")
                            }
                        }
                    }
                    _ => endings.extend(self.terminate(
                        inner,
                        id,
                        StatusInfo::NetworkTerminated,
                        now,
                    )),
                }
            },
        );
        if !done {
            info!(updated, ended, "policy reload superseded by a newer one");
            return;
        }
        // Every session of a profile this reload retired has ended: its entry is free again
        // (unless a newer reload took over, whose own sweep frees them when it is done). The
        // entries the previous run left wait for the start's orphans.
        self.release_retired_profiles(false, |core| Arc::ptr_eq(&policy, &core.policy()));
        self.wake.notify_one();
        info!(updated, ended, "policy reloaded");
    }

    /// Acts on the deadlines up to `now`, in deadline order, at most [`EXPIRY_BATCH`] of them
    /// under one hold of the lock; returns the next deadline (one already due when the batch
    /// was full, so the caller comes back at once and readers get the lock in between).
    pub fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.lock();
        let (mut endings, mut purged) = (Vec::new(), Vec::new());
        let mut next = None;
        while let Some(&(deadline, id)) = inner.deadlines.first() {
            if deadline > now || endings.len() + purged.len() == EXPIRY_BATCH {
                next = Some(deadline);
                break;
            }
            inner.deadlines.pop_first();
            let Some(session) = inner.sessions.get(&id) else {
                continue;
            };
            match session.state {
                SessionState::Available { .. } => {
                    crate::metrics::METRICS
                        .expiry_lateness
                        .observe(now.saturating_duration_since(deadline).as_secs_f64());
                    endings.extend(self.terminate(
                        &mut inner,
                        id,
                        StatusInfo::DurationExpired,
                        now,
                    ));
                }
                SessionState::Unavailable { .. } => {
                    let device = session.flow.device;
                    inner.sessions.remove(&id);
                    self.meters.lock().remove(&id);
                    unlink(&mut inner, &device, id);
                    purged.push(id);
                }
            }
        }
        let place = self.store_place(&endings);
        // A full batch comes back at once: a waiting reader goes first.
        MutexGuard::unlock_fair(inner);
        self.tell_endings(endings, place);
        if !purged.is_empty() {
            debug!(sessions = purged.len(), "unavailable sessions purged");
            self.forget_logged(purged);
        }
        next
    }

    /// Runs expiry until `shutdown` is cancelled.
    pub async fn run_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Expiry may remove scheduler classes (netlink): run it off the async workers.
            let core = self.clone();
            let next = tokio::task::spawn_blocking(move || core.expire_due(Instant::now()))
                .await
                .unwrap_or(None);
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// The event of a status change and, if the session has a sink, its notification (to be
    /// stored with the change, then queued for announcement).
    fn event(&self, session: SessionView, time: OffsetDateTime) -> Decided {
        let id = Uuid::new_v4();
        let s = &session.session;
        let note = s.request.sink.as_ref().map(|sink| Notification {
            event_id: id,
            time,
            sink: sink.clone(),
            credential: s.request.sink_credential.as_deref().cloned(),
            session_id: s.id,
            status: s.qos_status(),
            info: match s.state {
                SessionState::Unavailable { info, .. } => Some(info),
                SessionState::Available { .. } => None,
            },
        });
        Decided {
            event: Event {
                id,
                time,
                observed: OffsetDateTime::now_utc(),
                revision: 0,
                session,
            },
            note,
        }
    }
}

fn view(inner: &Inner, session: &Session) -> Result<SessionView, CamaraError> {
    let counters = match &session.state {
        SessionState::Available { slot, .. } => {
            inner.dp.counters(*slot).map_err(|e| dataplane_error(&e))?
        }
        SessionState::Unavailable { counters, .. } => **counters,
    };
    Ok(SessionView {
        session: session.clone(),
        counters,
    })
}

fn not_found(id: SessionId) -> CamaraError {
    CamaraError::field(
        CamaraCode::NotFound,
        "sessionId",
        format!("session {id} does not exist"),
    )
}

fn dataplane_error(e: &DataPlaneError) -> CamaraError {
    error!(error = %crate::anyhow_like(&e), "data plane operation failed");
    match e {
        DataPlaneError::Full { capacity } => CamaraError::new(
            CamaraCode::QuotaExceeded,
            format!("the data plane holds its maximum of {capacity} sessions"),
        ),
        _ => CamaraError::new(
            CamaraCode::Internal,
            format!("the data plane refused the change: {e}"),
        ),
    }
}

/// The rules of `key`'s AVAILABLE sessions, leaving out `skip` and adding `with`: read back
/// from the kernel (the ledger keeps no copy), where only the sessions' own slots count.
fn device_rules(
    inner: &Inner,
    key: &DeviceKey,
    skip: Option<SessionId>,
    with: Option<FlowRule>,
) -> Result<Vec<FlowRule>, DataPlaneError> {
    let others: smallvec::SmallVec<[u32; 4]> = live_slots(inner, key, skip).collect();
    let mut rules = if others.is_empty() {
        Vec::new()
    } else {
        let mut installed = inner.dp.rules(key)?;
        installed.retain(|r| others.contains(&r.slot));
        installed
    };
    rules.extend(with);
    Ok(rules)
}

/// The audit line of a stored session that could not be installed.
fn audit_unrestored(s: &StoredSession, e: &CamaraError) {
    audit::record(
        audit::Action::Restore,
        &s.request.owner,
        Some(s.id),
        None,
        Err(e),
    );
}

/// The counter slots of `key`'s AVAILABLE sessions in the ledger, but `skip`'s.
fn live_slots<'a>(
    inner: &'a Inner,
    key: &DeviceKey,
    skip: Option<SessionId>,
) -> impl Iterator<Item = u32> + 'a {
    inner
        .by_device
        .get(key)
        .into_iter()
        .flatten()
        .filter(move |id| Some(**id) != skip)
        .filter_map(|id| inner.sessions.get(id))
        .filter_map(|s| match s.state {
            SessionState::Available { slot, .. } => Some(slot),
            SessionState::Unavailable { .. } => None,
        })
}

/// Whether device `key` has an AVAILABLE session in the ledger.
fn has_live_session(inner: &Inner, key: &DeviceKey) -> bool {
    live_slots(inner, key, None).next().is_some()
}

/// What a scoped thread returned (its panic carried on), or `unstarted` if it could not start.
fn joined<T, E>(
    spawned: std::io::Result<std::thread::ScopedJoinHandle<'_, Result<T, E>>>,
    unstarted: impl FnOnce(std::io::Error) -> E,
) -> Result<T, E> {
    match spawned {
        Ok(thread) => thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        Err(e) => Err(unstarted(e)),
    }
}

/// Kernel entries checked for orphans per hold of the core's lock.
const ORPHAN_BATCH: usize = 1024;

/// How far a kept rule's end may lie from the one computed again at restore (the two differ by
/// the rounding of the clocks; more means the wall clock was stepped while qodd was down).
const KEPT_END_TOLERANCE_NS: u64 = 10_000_000;

/// Whether the kernel's entry for `key` holds exactly `rule` (its end within
/// [`KEPT_END_TOLERANCE_NS`]) and no other, with no other live session of the device in the
/// ledger: then there is nothing to write.
fn holds_only(inner: &Inner, key: &DeviceKey, rule: &FlowRule) -> bool {
    if has_live_session(inner, key) {
        return false;
    }
    match inner.dp.rules(key).as_deref() {
        Ok([held]) => {
            held.expires_at_ns.abs_diff(rule.expires_at_ns) <= KEPT_END_TOLERANCE_NS
                && FlowRule {
                    expires_at_ns: rule.expires_at_ns,
                    ..*held
                } == *rule
        }
        _ => false,
    }
}

/// How the dump names a profile entry in use that no profile of the policy in force holds.
pub const RETIRED_PROFILE: &str = "(retired)";

/// Takes profile entry `index` out of use (see [`DataPlane::take_profile_out_of_use`]).
fn clear_profile_entry(inner: &mut Inner, index: u16) {
    if let Err(e) = inner.dp.take_profile_out_of_use(index) {
        // Still in use in the kernel: written over when the entry is given to a profile again.
        warn!(index, error = %crate::anyhow_like(&e), "cannot take a profile entry out of use");
    }
}

/// The rule of the session at `slot` on device `key`, as the kernel holds it.
fn installed_rule(inner: &Inner, key: &DeviceKey, slot: u32) -> Result<FlowRule, DataPlaneError> {
    inner
        .dp
        .rules(key)?
        .into_iter()
        .find(|r| r.slot == slot)
        .ok_or(DataPlaneError::RuleMissing { slot })
}

/// Puts `key`'s AVAILABLE sessions' rules in the kernel, leaving out `skip` and adding `with`
/// (none left: the entry goes).
fn resync(
    inner: &mut Inner,
    key: &DeviceKey,
    skip: Option<SessionId>,
    with: Option<FlowRule>,
) -> Result<(), DataPlaneError> {
    let rules = device_rules(inner, key, skip, with)?;
    if rules.is_empty() {
        inner.dp.remove(key)
    } else {
        inner.dp.install(*key, &rules)
    }
}

/// Forgets that session `id` belongs to `key`.
fn unlink(inner: &mut Inner, key: &DeviceKey, id: SessionId) {
    if let Some(ids) = inner.by_device.get_mut(key) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            inner.by_device.remove(key);
        }
    }
}

/// Gives back the capacity `c` holds.
fn unreserve(inner: &mut Inner, c: &ReservedClass) {
    if let Some((pool, rate)) = c.pool
        && let Some(used) = inner.reserved.get_mut(&(c.interface.clone(), pool))
    {
        *used = used.saturating_sub(rate);
    }
}

/// The next `n` sessions after `cursor` in deadline order (live or not; the caller looks), the
/// cursor moved past them; `None` once there are no more.
fn live_batch(
    inner: &Inner,
    cursor: &mut Option<(Instant, SessionId)>,
    n: usize,
) -> Option<Vec<SessionId>> {
    let batch: Vec<(Instant, SessionId)> = match *cursor {
        None => inner.deadlines.iter().take(n).copied().collect(),
        Some(c) => inner
            .deadlines
            .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
            .take(n)
            .copied()
            .collect(),
    };
    *cursor = Some(*batch.last()?);
    Some(batch.into_iter().map(|(_, id)| id).collect())
}

/// Gives back a reservation's classes (parked for the next session) and capacity.
fn release(inner: &mut Inner, ops: &dyn Classes, reservation: Option<Reservation>) {
    let Some(r) = reservation else { return };
    for c in &r.classes {
        let parked = match ops.park_class(&c.interface, c.index) {
            Ok(()) => true,
            Err(e) => {
                // Unparked, it still carries nothing (no rule steers to it) and the next
                // session to take it sets it whole.
                error!(interface = %c.interface, class = c.index, error = %crate::anyhow_like(&e), "cannot park a session class");
                false
            }
        };
        if let Some(pool) = inner.classes.get_mut(&c.interface) {
            pool.give_back(c.index, parked);
        }
        unreserve(inner, c);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use clap::Parser as _;

    use super::*;
    use crate::{
        config::{Cli, Config},
        dataplane::FakeDataPlane,
        model::{ApplicationServer, Ports, ProfileName, ipv4_key},
    };

    fn policy() -> Policy {
        Config::from_parts(None, &Cli::parse_from(["qodd", "--insecure", "-i", "lo"]))
            .expect("defaults")
            .policy
    }

    /// `p` without profile `name`.
    fn without(mut p: Policy, name: &ProfileName) -> Policy {
        let left: Vec<_> = p
            .profiles
            .iter()
            .filter(|q| q.name != *name)
            .cloned()
            .collect();
        p.profiles = crate::profile::Profiles::new(left);
        p
    }

    /// No managed interface, 360 s retention, a 16-event buffer.
    fn limits(max_sessions: u32, max_active_per_client: u32) -> Limits {
        Limits {
            max_sessions,
            retention: Duration::from_secs(360),
            interfaces: Vec::new(),
            event_log_retention: 1024,
            max_active_per_client,
            max_sinks_per_client: u32::MAX,
            policer_burst: Config::built_in().policer_burst,
        }
    }

    fn core(max: u32) -> (Arc<Core>, FakeDataPlane) {
        let dp = FakeDataPlane::default();
        (
            Arc::new(
                Core::new(Box::new(dp.clone()), policy(), limits(max, u32::MAX), None)
                    .expect("core"),
            ),
            dp,
        )
    }

    /// The API client of these tests.
    fn me() -> Caller {
        Caller {
            client: "client-a".into(),
            subject: None,
            operator: false,
            credential: None,
            relayed: false,
            assigned: None,
        }
    }

    /// A session is its creator's: another client gets PERMISSION_DENIED on get, extend and
    /// delete, which change nothing, and does not see it in retrieve; a three-legged caller of
    /// the same client sees only its own device's sessions.
    /// Given up, sessions leave the kernel, memory and store without a word: no event.
    #[test]
    fn relinquished_sessions_go_silently() {
        let (core, dp) = core(8);
        let mut events = core.subscribe();
        let a = core
            .create(request([10, 0, 0, 1], 60))
            .expect("create")
            .session
            .id;
        core.create(request([10, 0, 0, 2], 60)).expect("create");
        assert_eq!(next_event(&mut events).0, QosStatus::Available);
        assert_eq!(next_event(&mut events).0, QosStatus::Available);
        let rules = || {
            dp.state
                .lock()
                .expect("lock")
                .flows
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        assert_eq!(rules(), 2);
        assert_eq!(core.relinquish(), 2);
        assert_eq!(rules(), 0);
        assert_eq!(core.live_sessions(), 0);
        assert!(core.get(a, &me()).is_err());
        assert!(events.try_next().is_none(), "no event");
        // The slots are free again.
        core.create(request([10, 0, 0, 1], 60))
            .expect("create again");
    }

    #[test]
    fn sessions_belong_to_the_client_that_created_them() {
        let (core, _) = core(8);
        let req = request([10, 0, 0, 1], 60);
        let id = core.create(req.clone()).expect("create").session.id;
        let other = Caller {
            client: "client-b".into(),
            subject: None,
            operator: false,
            credential: None,
            relayed: false,
            assigned: None,
        };
        let three_legged = Caller {
            subject: Some(DeviceId::Ipv4 {
                public: Ipv4Addr::new(10, 0, 0, 9),
                private: Some(Ipv4Addr::new(10, 0, 0, 9)),
                public_port: None,
            }),
            ..me()
        };
        for caller in [&other, &three_legged] {
            let codes = [
                core.get(id, caller).map(|_| ()),
                core.extend(id, 10, caller).map(|_| ()),
                core.delete(id, caller),
            ]
            .map(|r| r.expect_err("denied").code);
            assert_eq!(codes, [CamaraCode::PermissionDenied; 3]);
            assert!(
                core.retrieve(&req.device, caller)
                    .expect("retrieve")
                    .is_empty()
            );
        }
        let v = core.get(id, &me()).expect("still there");
        assert_eq!(v.duration(), 60);
        assert_eq!(
            core.retrieve(&req.device, &me()).expect("retrieve").len(),
            1
        );
        assert_eq!(
            core.get(SessionId::random(), &other)
                .expect_err("none")
                .code,
            CamaraCode::NotFound
        );
    }

    /// Past its quota of active sessions a client gets QUOTA_EXCEEDED; others are not affected,
    /// and ending a session frees a place.
    #[test]
    fn a_client_holds_at_most_its_quota_of_active_sessions() {
        let core = Core::new(
            Box::new(FakeDataPlane::default()),
            policy(),
            limits(16, 2),
            None,
        )
        .expect("core");
        let a = core.create(request([10, 0, 0, 1], 60)).expect("first");
        core.create(request([10, 0, 0, 2], 60)).expect("second");
        assert_eq!(
            core.create(request([10, 0, 0, 3], 60))
                .expect_err("over quota")
                .code,
            CamaraCode::QuotaExceeded
        );
        let mut b = request([10, 0, 0, 3], 60);
        b.owner = "client-b".into();
        core.create(b).expect("another client");
        core.delete(a.session.id, &me()).expect("delete");
        core.create(request([10, 0, 0, 4], 60)).expect("room again");
    }

    fn request(device: [u8; 4], duration: u32) -> SessionRequest {
        crate::model::testing::request(device, duration)
    }

    /// The next event `events` reads, waiting for it up to 5 s (an event held for its
    /// commit is released by the store's writer).
    fn next_logged(events: &mut events::Cursor) -> Arc<Logged> {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = events.try_next() {
                return e;
            }
            assert!(std::time::Instant::now() < until, "no event within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn next_event(events: &mut events::Cursor) -> (QosStatus, Option<StatusInfo>) {
        use qod_proto::v1::StatusInfo as P;
        let (status, info) = next_logged(events).status();
        let info = match info {
            P::DurationExpired => Some(StatusInfo::DurationExpired),
            P::NetworkTerminated => Some(StatusInfo::NetworkTerminated),
            P::DeleteRequested => Some(StatusInfo::DeleteRequested),
            P::Unspecified => None,
        };
        (status, info)
    }

    #[tokio::test(start_paused = true)]
    async fn create_installs_the_profile_and_delete_removes_it() {
        let (core, dp) = core(16);
        let mut events = core.subscribe();
        let v = core.create(request([10, 0, 0, 1], 60)).expect("create");
        let key = ipv4_key(Ipv4Addr::new(10, 0, 0, 1));
        let (rule, treated) = {
            let s = dp.state.lock().expect("lock");
            let rule = s.flows[&key][0];
            (rule, s.treated(&rule).expect("profile entry"))
        };
        assert_eq!(rule.own, 0, "no class of its own: all from the profile");
        assert_eq!(
            (treated.dscp, treated.priority_up, treated.priority_down),
            (32, LOW_LATENCY_CLASS, LOW_LATENCY_CLASS)
        );
        // No scheduled interface here: the 500 kbit/s maximum is policed in the classifier.
        assert_eq!(
            treated.police_down,
            policer(500_000, Config::built_in().policer_burst)
        );
        assert_eq!(
            treated.police_up,
            policer(500_000, Config::built_in().policer_burst)
        );
        assert_eq!(rule.n_server_ports, 2);
        assert_eq!(
            (rule.server_ports[0].from, rule.server_ports[0].to),
            (443, 443)
        );
        assert_eq!(rule.n_device_ports, 0);
        assert_eq!(next_event(&mut events), (QosStatus::Available, None));

        core.delete(v.session.id, &me()).expect("delete");
        assert!(dp.state.lock().expect("lock").flows.is_empty());
        assert_eq!(
            next_event(&mut events),
            (QosStatus::Unavailable, Some(StatusInfo::DeleteRequested))
        );
        assert_eq!(
            core.get(v.session.id, &me()).expect_err("gone").code,
            CamaraCode::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn conflicts_and_failures_change_nothing() {
        let (core, dp) = core(2);
        let first = core.create(request([10, 0, 0, 1], 60)).expect("create");
        let err = core
            .create(request([10, 0, 0, 1], 30))
            .expect_err("conflict");
        assert_eq!(err.code, CamaraCode::Conflict);
        assert_eq!(dp.state.lock().expect("lock").flows.len(), 1);

        dp.state.lock().expect("lock").fail_next_install = true;
        let err = core
            .create(request([10, 0, 0, 2], 60))
            .expect_err("data plane failure");
        assert_eq!(err.code, CamaraCode::QuotaExceeded);
        assert!(
            core.retrieve(&request([10, 0, 0, 2], 1).device, &me())
                .expect("retrieve")
                .is_empty()
        );
        // The slot of the failed create was given back: the second slot is still free.
        core.create(request([10, 0, 0, 2], 60))
            .expect("create after failure");
        let err = core.create(request([10, 0, 0, 3], 60)).expect_err("full");
        assert_eq!(err.code, CamaraCode::QuotaExceeded);
        assert_eq!(
            core.get(first.session.id, &me())
                .expect("first")
                .session
                .qos_status(),
            QosStatus::Available
        );
    }

    #[tokio::test(start_paused = true)]
    async fn duration_bounds_come_from_the_profile() {
        let (core, _) = core(4);
        let err = core
            .create(request([10, 0, 0, 1], 86_401))
            .expect_err("too long");
        assert_eq!(err.code, CamaraCode::DurationOutOfRange);
        let mut r = request([10, 0, 0, 1], 60);
        r.profile = ProfileName::parse("qosProfile", "QOS_X").expect("name");
        assert_eq!(
            core.create(r).expect_err("unknown").code,
            CamaraCode::InvalidArgument
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_then_retention_then_purge() {
        let (core, dp) = core(4);
        let mut events = core.subscribe();
        let v = core.create(request([10, 0, 0, 1], 5)).expect("create");
        let _ = next_event(&mut events);
        // Due at its start + duration by the wall clock, which moves on while this test's
        // tokio clock stands still: a little under 5 s from here.
        let left = core.expire_due(Instant::now()).expect("a deadline") - Instant::now();
        assert!(
            left <= Duration::from_secs(5) && left > Duration::from_millis(4_900),
            "{left:?}"
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        let purge = core.expire_due(Instant::now()).expect("purge deadline");
        assert_eq!(purge - Instant::now(), Duration::from_secs(360));
        assert!(
            dp.state.lock().expect("lock").flows.is_empty(),
            "rule removed at expiry"
        );
        assert_eq!(
            next_event(&mut events),
            (QosStatus::Unavailable, Some(StatusInfo::DurationExpired))
        );
        let s = core.get(v.session.id, &me()).expect("still readable");
        assert_eq!(s.session.qos_status(), QosStatus::Unavailable);
        // Cannot be extended, and no longer holds the device: another client's session for it
        // is admitted while the ended record stays readable.
        assert_eq!(
            core.extend(v.session.id, 10, &me())
                .expect_err("unavailable")
                .code,
            CamaraCode::SessionExtensionNotAllowed
        );
        let mut other = request([10, 0, 0, 1], 5);
        other.owner = "client-b".into();
        let next = core.create(other).expect("an ended session blocks nobody");
        assert_eq!(
            core.get(v.session.id, &me())
                .expect("still readable")
                .session
                .qos_status(),
            QosStatus::Unavailable
        );
        core.delete(
            next.session.id,
            &Caller {
                client: "client-b".into(),
                subject: None,
                operator: false,
                credential: None,
                relayed: false,
                assigned: None,
            },
        )
        .expect("delete");

        tokio::time::advance(Duration::from_secs(360)).await;
        assert_eq!(core.expire_due(Instant::now()), None);
        assert_eq!(
            core.get(v.session.id, &me()).expect_err("purged").code,
            CamaraCode::NotFound
        );
        core.create(request([10, 0, 0, 1], 5))
            .expect("device free again");
    }

    /// Ends due together are acted on in batches, earliest first, each batch one hold of the
    /// lock; every end is announced once, in deadline order.
    #[tokio::test(start_paused = true)]
    async fn an_expiry_storm_is_worked_off_in_batches_in_deadline_order() {
        let n = EXPIRY_BATCH * 2 + 10;
        let (core, _) = core(u32::try_from(n).expect("n"));
        let mut ids = Vec::new();
        for i in 0..n {
            let [_, _, a, b] = u32::try_from(i).expect("i").to_be_bytes();
            ids.push(
                core.create(request([10, 1, a, b], 1))
                    .expect("create")
                    .session
                    .id,
            );
            // Deadlines in creation order.
            tokio::time::advance(Duration::from_micros(10)).await;
        }
        let mut events = core.subscribe();
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        let mut calls = 0;
        while core.expire_due(now).is_some_and(|next| next <= now) {
            calls += 1;
            assert!(calls < 10, "it finishes");
        }
        assert_eq!(calls, 2, "{n} ends in batches of {EXPIRY_BATCH}");
        for id in &ids {
            let e = next_logged(&mut events);
            assert_eq!(e.session, *id);
            assert_eq!(e.status().0, QosStatus::Unavailable);
        }
        assert!(events.try_next().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn extend_is_capped_at_the_maximum_and_moves_the_deadline() {
        let (core, dp) = core(4);
        let v = core.create(request([10, 0, 0, 1], 86_000)).expect("create");
        let before = dp.state.lock().expect("lock").flows[&v.session.flow.device][0].expires_at_ns;
        let ext = core.extend(v.session.id, 1_000, &me()).expect("extend");
        assert_eq!(ext.session.duration, 86_400, "capped at QOS_E's 1 day");
        let after = dp.state.lock().expect("lock").flows[&v.session.flow.device][0].expires_at_ns;
        assert!(after > before, "kernel expiry moved");
        tokio::time::advance(Duration::from_secs(86_000)).await;
        core.expire_due(Instant::now());
        assert_eq!(
            core.get(v.session.id, &me())
                .expect("get")
                .session
                .qos_status(),
            QosStatus::Available
        );
        tokio::time::advance(Duration::from_secs(400)).await;
        core.expire_due(Instant::now());
        assert_eq!(
            core.get(v.session.id, &me())
                .expect("get")
                .session
                .qos_status(),
            QosStatus::Unavailable
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deleting_an_unavailable_session_sends_no_event() {
        let (core, _) = core(4);
        let v = core.create(request([10, 0, 0, 1], 1)).expect("create");
        tokio::time::advance(Duration::from_secs(1)).await;
        core.expire_due(Instant::now());
        let mut events = core.subscribe();
        core.delete(v.session.id, &me()).expect("delete");
        assert!(
            events.try_next().is_none(),
            "no event for an UNAVAILABLE session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reload_updates_or_terminates_live_sessions() {
        let (core, dp) = core(4);
        let e = core.create(request([10, 0, 0, 1], 60)).expect("create");
        let mut l = request([10, 0, 0, 2], 60);
        l.profile = ProfileName::parse("qosProfile", "QOS_L").expect("name");
        let l = core.create(l).expect("create");
        let mut events = core.subscribe();

        let policed = |dp: &FakeDataPlane| treated(dp, &e.session).police_down;
        let before = policed(&dp);
        let l_entry = installed(&dp, &l.session).profile;
        let installs = dp.state.lock().expect("lock").installs;
        let mut next = policy();
        let kept: Vec<_> = next
            .profiles
            .iter()
            .filter(|p| p.name.as_str() != "QOS_L")
            .cloned()
            .map(|mut p| {
                p.dscp = 46;
                p.max_downstream_rate = p.max_downstream_rate.map(|r| crate::profile::Rate {
                    value: r.value / 2,
                    ..r
                });
                p
            })
            .collect();
        next.profiles = crate::profile::Profiles::new(kept);
        core.reload(next);

        assert_eq!(treated(&dp, &e.session).dscp, 46, "new DSCP applied");
        let after = policed(&dp);
        assert_eq!(
            after.ns_per_byte_q16,
            before.ns_per_byte_q16 * 2,
            "half the maximum rate: twice the time per byte"
        );
        let s = dp.state.lock().expect("lock");
        assert_eq!(
            s.installs, installs,
            "the profile's entry changed, no session's rule was written"
        );
        assert!(
            !s.profiles.contains_key(&l_entry),
            "the dropped profile's entry freed once its session ended"
        );
        let flows = s.flows.clone();
        drop(s);
        assert!(
            !flows.contains_key(&l.session.flow.device),
            "rule of the dropped profile removed"
        );
        assert_eq!(
            next_event(&mut events),
            (QosStatus::Unavailable, Some(StatusInfo::NetworkTerminated))
        );
        assert_eq!(
            core.get(e.session.id, &me())
                .expect("get")
                .session
                .qos_status(),
            QosStatus::Available
        );
        let err = core
            .create(l.session.request.clone())
            .expect_err("profile gone");
        assert_eq!(err.code, CamaraCode::InvalidArgument);
    }

    /// A reload sweeps the live sessions in batches: every one of more than two batches' worth
    /// whose profile it drops ends, each once, and only then is the profile's entry freed.
    #[tokio::test(start_paused = true)]
    async fn a_reload_reaches_every_live_session_batch_by_batch() {
        let n = RELOAD_BATCH * 2 + 500;
        let (core, dp) = core(n as u32 + 1);
        let mut sessions = Vec::new();
        for i in 0..n {
            let [_, _, hi, lo] = (i as u32).to_be_bytes();
            sessions.push(
                core.create(request([10, 1, hi, lo], 60 + (i % 7) as u32))
                    .expect("create"),
            );
        }
        let entry = installed(&dp, &sessions[0].session).profile;
        core.reload(without(policy(), &sessions[0].session.request.profile));
        let s = dp.state.lock().expect("lock");
        assert!(
            s.flows.is_empty(),
            "every session of the dropped profile ended"
        );
        assert!(!s.profiles.contains_key(&entry), "its entry freed");
        drop(s);
        for v in &sessions {
            let got = core.get(v.session.id, &me()).expect("get").session;
            assert!(
                matches!(
                    got.state,
                    SessionState::Unavailable {
                        info: StatusInfo::NetworkTerminated,
                        ..
                    }
                ),
                "{:?}",
                got.state
            );
        }
    }

    /// A reload whose profile entries cannot all be written changes nothing: the entries it
    /// wrote are put back, the running policy stays, and its profiles' sessions are created
    /// and treated as before.
    #[tokio::test(start_paused = true)]
    async fn a_reload_that_cannot_write_its_profiles_changes_nothing() {
        let (core, dp) = core(8);
        let e = core.create(request([10, 0, 0, 1], 60)).expect("create");
        let before = treated(&dp, &e.session);
        let entries = dp.state.lock().expect("lock").profiles.clone();
        let mut next = policy();
        let changed: Vec<_> = next
            .profiles
            .iter()
            .cloned()
            .map(|mut p| {
                p.dscp = 46;
                p
            })
            .chain(std::iter::once(crate::profile::QosProfile {
                name: ProfileName::parse("name", "QOS_NEW").expect("name"),
                ..next.profiles.iter().next().expect("a profile").clone()
            }))
            .collect();
        next.profiles = crate::profile::Profiles::new(changed);
        // Entries are written in their order: every profile in force's first (its entry comes
        // before the new one's), then the new one's, which fails; those putting things back
        // succeed.
        let in_force = entries.len();
        dp.state.lock().expect("lock").profile_writes_left = Some(in_force);
        core.reload(next);
        assert_eq!(treated(&dp, &e.session), before, "treatment as before");
        assert_eq!(
            dp.state.lock().expect("lock").profiles,
            entries,
            "every entry as before"
        );
        let again = core.create(request([10, 0, 0, 2], 60)).expect("create");
        assert_eq!(treated(&dp, &again.session).dscp, before.dscp);
    }

    /// A profile that left the configuration while qodd was down keeps its entry until the
    /// start has removed that run's leftover rules, even if a reload completes first; the
    /// profiles still configured keep their entries across the restart.
    #[tokio::test(start_paused = true)]
    async fn the_previous_runs_profile_entries_go_with_its_orphans_not_before() {
        let (before, dp) = core(8);
        let kept = before.create(request([10, 0, 0, 1], 600)).expect("create");
        let kept_entry = installed(&dp, &kept.session).profile;
        let entries = dp.state.lock().expect("lock").profiles.clone();
        drop(before);
        let mut fewer = policy();
        let gone = fewer
            .profiles
            .iter()
            .find(|p| p.name != kept.session.request.profile)
            .expect("another profile")
            .name
            .clone();
        let gone_entry = *entries
            .iter()
            .find(|(_, t)| t.name_hash == profiles::name_hash(gone.as_str()))
            .expect("its entry")
            .0;
        fewer = without(fewer, &gone);
        let after = Arc::new(
            Core::new(
                Box::new(dp.clone()),
                fewer.clone(),
                limits(8, u32::MAX),
                None,
            )
            .expect("core"),
        );
        after.restore(vec![stored_live(&kept)], true);
        assert_eq!(installed(&dp, &kept.session).profile, kept_entry);
        after.reload(fewer);
        assert!(
            dp.state
                .lock()
                .expect("lock")
                .profiles
                .contains_key(&gone_entry),
            "a reload does not free the previous run's entries"
        );
        after.remove_orphans();
        let s = dp.state.lock().expect("lock");
        assert!(
            !s.profiles.contains_key(&gone_entry),
            "freed with the orphans"
        );
        assert!(s.profiles.contains_key(&kept_entry));
    }

    /// Verify finds a live session's rule that follows another profile's entry, or one not in
    /// use.
    #[tokio::test(start_paused = true)]
    async fn verify_finds_a_rule_following_the_wrong_profile_entry() {
        let (core, dp) = core(8);
        let v = core.create(request([10, 0, 0, 1], 60)).expect("create");
        let stored = [stored_live(&v)];
        assert!(core.verify(&stored).expect("verify").drift.is_empty());
        let other = {
            let mut s = dp.state.lock().expect("lock");
            let mine = s.flows[&v.session.flow.device][0].profile;
            let other = *s.profiles.keys().find(|i| **i != mine).expect("another");
            s.flows.get_mut(&v.session.flow.device).expect("rule")[0].profile = other;
            other
        };
        let drift = core.verify(&stored).expect("verify").drift;
        assert!(
            drift.len() == 1 && drift[0].contains(&format!("profile entry {other} (")),
            "{drift:?}"
        );
        dp.state
            .lock()
            .expect("lock")
            .flows
            .get_mut(&v.session.flow.device)
            .expect("rule")[0]
            .profile = 200;
        let drift = core.verify(&stored).expect("verify").drift;
        assert!(
            drift.len() == 1 && drift[0].contains("entry 200, which is not in use"),
            "{drift:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pools_and_directory_resolve_devices() {
        let (core, _) = core(4);
        let mut p = policy();
        p.pools = vec!["10.0.0.0/24".parse().expect("net")];
        let phone = crate::model::PhoneNumber::parse("p", "+34600000001").expect("phone");
        p.directory.insert(
            phone.clone(),
            crate::policy::DeviceAddresses {
                ipv4: Some(Ipv4Addr::new(10, 0, 0, 7)),
                ipv6: None,
            },
        );
        core.reload(p);
        let err = core
            .create(request([10, 0, 1, 1], 60))
            .expect_err("outside pools");
        assert_eq!(err.code, CamaraCode::IdentifierNotFound);
        let mut r = request([10, 0, 0, 1], 60);
        r.device = DeviceId::PhoneNumber(phone.clone());
        let v = core.create(r).expect("by phone");
        assert_eq!(v.session.flow.device, ipv4_key(Ipv4Addr::new(10, 0, 0, 7)));
        let found = core
            .retrieve(&DeviceId::PhoneNumber(phone), &me())
            .expect("retrieve");
        assert_eq!(found.len(), 1);
    }

    fn installed_slot(s: &Session) -> u32 {
        match s.state {
            SessionState::Available { slot, .. } => slot,
            SessionState::Unavailable { .. } => panic!("not AVAILABLE"),
        }
    }

    /// Session `s`'s rule as the (fake) kernel holds it.
    fn installed(dp: &FakeDataPlane, s: &Session) -> FlowRule {
        let SessionState::Available { slot, .. } = s.state else {
            panic!("not AVAILABLE");
        };
        dp.rules(&s.flow.device)
            .expect("rules")
            .into_iter()
            .find(|r| r.slot == slot)
            .expect("the session's rule is installed")
    }

    /// What the classifier does to `s`'s packets: its rule under its profile's entry.
    fn treated(dp: &FakeDataPlane, s: &Session) -> qod_common::Treatment {
        let rule = installed(dp, s);
        dp.state
            .lock()
            .expect("lock")
            .treated(&rule)
            .expect("the session's profile entry is in use")
    }

    fn scheduled_core() -> (Arc<Core>, FakeDataPlane) {
        let dp = FakeDataPlane::default();
        let iface = |name: &str, side| ManagedInterface {
            name: name.into(),
            side,
            scheduler: Some(crate::dataplane::SchedulerConfig {
                capacity_bps: 100_000_000,
                low_latency_share: 0.1,
                guaranteed_share: 0.8,
                replace_foreign_root: false,
            }),
        };
        let limits = Limits {
            max_sessions: 128,
            retention: Duration::from_secs(360),
            interfaces: vec![iface("dev0", Side::Device), iface("srv0", Side::Server)],
            event_log_retention: 1024,
            max_active_per_client: u32::MAX,
            max_sinks_per_client: u32::MAX,
            policer_burst: Config::built_in().policer_burst,
        };
        (
            Arc::new(Core::new(Box::new(dp.clone()), policy(), limits, None).expect("core")),
            dp,
        )
    }

    fn profile_request(device: [u8; 4], profile: &str) -> SessionRequest {
        let mut r = request(device, 60);
        r.profile = ProfileName::parse("qosProfile", profile).expect("name");
        r
    }

    #[tokio::test(start_paused = true)]
    async fn classes_no_session_holds_are_parked_after_restore_and_reused_first() {
        let (core, dp) = scheduled_core();
        let v = core
            .create(profile_request([10, 0, 0, 1], "QOS_L"))
            .expect("fits");
        let held = v.session.reservation.clone().expect("classes").classes[0].index;
        // What an adopted tree may hold: the class of a session that ended while qodd was down.
        let stale = held + 5;
        dp.state.lock().expect("lock").classes.insert(
            ("dev0".into(), stale),
            ClassSpec::capped(1_000_000, None, BurstRule::default()),
        );
        core.restore(Vec::new(), false);
        {
            let state = dp.state.lock().expect("lock");
            assert!(
                state.parked.contains(&("dev0".to_owned(), stale)),
                "stale class parked"
            );
            assert!(!state.classes.contains_key(&("dev0".to_owned(), stale)));
            assert!(
                state.classes.contains_key(&("dev0".to_owned(), held)),
                "a live session's class stays"
            );
        }
        let parked = core.node_stats().parked_classes;
        assert!(parked.contains(&("dev0".to_owned(), 1)), "{parked:?}");
        assert!(parked.contains(&("srv0".to_owned(), 0)), "{parked:?}");
        // The next session on dev0 takes the parked class, not a new index; srv0 numbers its
        // own classes, so the same session's uplink class there has another index.
        dp.state.lock().expect("lock").class_stats.insert(
            ("dev0".into(), stale),
            TcStats {
                packets: 10,
                bytes: 15_000,
                ..TcStats::default()
            },
        );
        let w = core
            .create(profile_request([10, 0, 0, 2], "QOS_L"))
            .expect("fits");
        let r = w.session.reservation.clone().expect("classes");
        let on = |name: &str| {
            r.classes
                .iter()
                .find(|c| c.interface == name)
                .expect("class")
                .clone()
        };
        assert_eq!(on("dev0").index, stale, "the parked class is reused");
        assert_eq!(on("dev0").baseline.bytes, 15_000, "counted from its totals");
        assert_eq!(on("srv0").index, held + 1);
        assert_eq!(treated(&dp, &w.session).priority_down, session_class(stale));
        assert_eq!(
            treated(&dp, &w.session).priority_up,
            session_class(held + 1)
        );
        // What GetSession reports of the reused class starts from there.
        dp.state.lock().expect("lock").class_stats.insert(
            ("dev0".into(), stale),
            TcStats {
                packets: 12,
                bytes: 18_000,
                backlog_packets: 1,
                ..TcStats::default()
            },
        );
        let (_, delivery) = core.get_delivery(w.session.id, &me()).expect("get");
        let down = delivery.expect("live").down.class.expect("class");
        assert_eq!(
            (down.packets, down.bytes, down.backlog_packets),
            (2, 3_000, 1)
        );
        assert!(
            core.node_stats()
                .parked_classes
                .contains(&("dev0".to_owned(), 0))
        );
    }

    /// A restored session ends when it was due by the wall clock, in the kernel's rule and in
    /// the ledger alike: not rounded to whole seconds, and not pushed back by a restore that
    /// takes a while (here its classes take 1.2 s to make, as in a large tree).
    #[test]
    fn a_restored_session_ends_when_it_was_due_however_long_the_restore_takes() {
        let (core, dp) = scheduled_core();
        let due = OffsetDateTime::now_utc() + Duration::from_millis(3_500);
        let stored = StoredSession {
            id: SessionId::random(),
            request: profile_request([10, 0, 0, 7], "QOS_L"),
            started_at: due - Duration::from_secs(60),
            duration: 60,
            ended: None,
            slot: None,
        };
        dp.hold_classes();
        let restoring = {
            let core = core.clone();
            std::thread::spawn(move || core.restore(vec![stored], false))
        };
        let t = std::time::Instant::now();
        while dp.classes_waiting() == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "no class was made");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(1_200));
        dp.release_classes();
        restoring.join().expect("restore");
        let expected = time_left(due).as_secs_f64();
        let rule = dp
            .state
            .lock()
            .expect("lock")
            .flows
            .values()
            .flatten()
            .next()
            .copied()
            .expect("installed");
        let kernel = (rule.expires_at_ns as f64 - monotonic_ns() as f64) / 1e9;
        assert!(
            (kernel - expected).abs() < 0.05,
            "the kernel ends it in {kernel:.3} s, due in {expected:.3} s"
        );
        let next = core.expire_due(Instant::now()).expect("its deadline");
        let ledger = next.saturating_duration_since(Instant::now()).as_secs_f64();
        assert!(
            (ledger - expected).abs() < 0.05,
            "the ledger ends it in {ledger:.3} s, due in {expected:.3} s"
        );
    }

    /// GetSession does not wait for the core's lock: a session (live with its counters, or
    /// ended with the counters it ended with) reads while a writer holds the lock.
    #[test]
    fn a_session_reads_while_a_writer_holds_the_lock() {
        let (core, dp) = core(4);
        let live = core.create(request([10, 0, 0, 1], 600)).expect("create");
        let slot = installed_slot(&live.session);
        dp.state.lock().expect("lock").counters.insert(
            slot,
            FlowCounters {
                up_packets: 3,
                up_bytes: 300,
                ..FlowCounters::default()
            },
        );
        let ended = core.create(request([10, 0, 0, 2], 600)).expect("create");
        core.delete(ended.session.id, &me()).expect("delete");
        let held = core.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let core = core.clone();
            let ids = (live.session.id, ended.session.id);
            std::thread::spawn(move || {
                let read = (core.get(ids.0, &me()), core.get(ids.1, &me()));
                let _ = tx.send(());
                read
            })
        };
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the reads came back while the lock was held");
        drop(held);
        let (live_read, ended_read) = reader.join().expect("reader");
        let live_read = live_read.expect("live");
        assert_eq!(live_read.session.qos_status(), QosStatus::Available);
        assert_eq!(live_read.counters.up_bytes, 300);
        assert_eq!(
            ended_read
                .map(|v| v.session.qos_status())
                .err()
                .map(|e| e.code),
            Some(CamaraCode::NotFound),
            "a deleted session is gone"
        );
        let other = Caller {
            client: "client-b".into(),
            ..me()
        };
        assert_eq!(
            core.get(live.session.id, &other)
                .expect_err("another client")
                .code,
            CamaraCode::PermissionDenied
        );
    }

    /// The slot of a session that ended while qodd was down is free as soon as the restore reads
    /// it: a node at capacity still restores every live session (one of them needing a slot).
    #[tokio::test(start_paused = true)]
    async fn a_restore_at_capacity_frees_the_slot_of_an_ended_session_at_once() {
        let (core, _) = core(2);
        let wall = OffsetDateTime::now_utc();
        let stored = |device: u8, slot: Option<u32>, started: OffsetDateTime| StoredSession {
            id: SessionId::random(),
            request: request([10, 0, 0, device], 60),
            started_at: started,
            duration: 60,
            ended: None,
            slot,
        };
        let ended = stored(1, Some(0), wall - Duration::from_secs(120));
        let (live, fresh) = (stored(2, Some(1), wall), stored(3, None, wall));
        let ids = [live.id, fresh.id];
        core.restore(vec![ended, live, fresh], true);
        for id in ids {
            assert_eq!(
                core.get(id, &me()).expect("restored").session.qos_status(),
                QosStatus::Available
            );
        }
    }

    /// After a reboot the restore's entries are written by the data plane's own thread; a
    /// device whose entry the kernel refused there has its session end NETWORK_TERMINATED (as
    /// when an install is refused at once), and the others stand.
    #[tokio::test(start_paused = true)]
    async fn a_restore_whose_entry_the_bulk_writer_could_not_write_ends_that_session() {
        let (core, dp) = core(4);
        let wall = OffsetDateTime::now_utc();
        let stored = |device: u8| StoredSession {
            id: SessionId::random(),
            request: request([10, 0, 0, device], 60),
            started_at: wall,
            duration: 60,
            ended: None,
            slot: None,
        };
        let (kept, refused) = (stored(1), stored(2));
        let refused_key = crate::model::ipv4_key(std::net::Ipv4Addr::new(10, 0, 0, 2));
        dp.state.lock().expect("lock").refuse_in_bulk = vec![refused_key];
        core.restore(vec![kept.clone(), refused.clone()], false);
        let status = |id| core.get(id, &me()).expect("known").session.qos_status();
        assert_eq!(status(kept.id), QosStatus::Available);
        assert_eq!(status(refused.id), QosStatus::Unavailable);
        let v = core.get(refused.id, &me()).expect("known");
        assert!(matches!(
            v.session.state,
            SessionState::Unavailable {
                info: StatusInfo::NetworkTerminated,
                ..
            }
        ));
        let s = dp.state.lock().expect("lock");
        assert!(!s.bulk, "the bulk writing was ended");
        assert!(s.refuse_in_bulk.is_empty(), "the bulk writing was begun");
        assert_eq!(s.flows.len(), 1, "the kept session's entry alone");
        // Its slot is free again: the node takes as many new sessions as before less one.
        drop(s);
        for d in 3..6 {
            core.create(request([10, 0, 0, d], 60)).expect("fits");
        }
        assert!(core.create(request([10, 0, 0, 9], 60)).is_err(), "full");
    }

    /// An extension finds its session's rule gone from the kernel (changed behind qodd's back):
    /// it makes it again rather than failing.
    #[tokio::test(start_paused = true)]
    async fn an_extension_puts_back_a_rule_the_kernel_lost() {
        let (core, dp) = core(4);
        let v = core.create(request([10, 0, 0, 1], 600)).expect("create");
        let key = v.session.flow.device;
        let was = dp
            .state
            .lock()
            .expect("lock")
            .flows
            .remove(&key)
            .expect("rule");
        core.extend(v.session.id, 60, &me()).expect("extend");
        let now = dp.state.lock().expect("lock").flows[&key].clone();
        assert_eq!(now.len(), 1);
        assert!(
            now[0]
                .expires_at_ns
                .abs_diff(was[0].expires_at_ns + 60_000_000_000)
                < 50_000_000
        );
        assert_eq!(
            FlowRule {
                expires_at_ns: was[0].expires_at_ns,
                ..now[0]
            },
            was[0]
        );
    }

    /// A live session as the store holds it.
    fn stored_live(v: &SessionView) -> StoredSession {
        StoredSession {
            id: v.session.id,
            request: v.session.request.clone(),
            started_at: v.session.started_at,
            duration: v.session.duration,
            ended: None,
            slot: Some(installed_slot(&v.session)),
        }
    }

    /// A qodd started again over the (fake) kernel state `dp` of the last one.
    fn core_over(dp: &FakeDataPlane) -> Arc<Core> {
        Arc::new(
            Core::new(Box::new(dp.clone()), policy(), limits(16, u32::MAX), None).expect("core"),
        )
    }

    /// Continuing over the pinned maps, a session whose rule the kernel holds as it would be
    /// written is verified, not written again; one whose entry differs (the policy changed
    /// while qodd was down, another session's rule left in it) is written.
    #[tokio::test(start_paused = true)]
    async fn a_continuing_restore_writes_only_the_rules_that_differ() {
        let (before, dp) = core(16);
        let stored: Vec<StoredSession> = (1..=3)
            .map(|i| stored_live(&before.create(request([10, 0, 0, i], 600)).expect("create")))
            .collect();
        let key = |i: u8| ipv4_key(Ipv4Addr::new(10, 0, 0, i));
        let kept = dp.state.lock().expect("lock").flows.clone();
        {
            let mut s = dp.state.lock().expect("lock");
            // Device 2's rule changed behind qodd's back, device 3's entry holds a stale rule.
            s.flows.get_mut(&key(2)).expect("2")[0].profile = 9;
            let mut stale = s.flows[&key(3)][0];
            stale.slot = 99;
            s.flows.get_mut(&key(3)).expect("3").push(stale);
            s.installs = 0;
        }
        drop(before);
        let after = core_over(&dp);
        after.restore(stored, true);
        let s = dp.state.lock().expect("lock");
        assert_eq!(s.installs, 2, "devices 2 and 3 written, 1 verified");
        assert_eq!(s.flows[&key(1)], kept[&key(1)], "device 1 untouched");
        for i in 2..=3 {
            let (now, was) = (&s.flows[&key(i)], &kept[&key(i)]);
            assert_eq!(now.len(), 1, "device {i}: the stale rule gone");
            assert!(now[0].expires_at_ns.abs_diff(was[0].expires_at_ns) < 50_000_000);
            let now = FlowRule {
                expires_at_ns: was[0].expires_at_ns,
                ..now[0]
            };
            assert_eq!(now, was[0], "device {i} as it was installed");
        }
    }

    /// Continuing over the pinned maps, a kernel entry no restored session accounts for (its
    /// session deleted in the store, not yet in the kernel, when qodd stopped) is removed once
    /// qodd serves; an entry a create made for that device meanwhile stays, with its rule.
    #[tokio::test(start_paused = true)]
    async fn orphans_go_after_a_continuing_restore_and_a_new_session_of_theirs_stays() {
        let (before, dp) = core(16);
        // Only device 1's session is in the store: those of devices 2 and 3 were deleted.
        let created: Vec<SessionView> = (1..=3)
            .map(|i| before.create(request([10, 0, 0, i], 600)).expect("create"))
            .collect();
        let stored = vec![stored_live(&created[0])];
        let key = |i: u8| ipv4_key(Ipv4Addr::new(10, 0, 0, i));
        drop(before);
        let after = core_over(&dp);
        after.restore(stored, true);
        assert_eq!(
            dp.state.lock().expect("lock").flows.len(),
            3,
            "the orphans of devices 2 and 3 stay until qodd serves"
        );
        let orphans: HashSet<u32> = created[1..]
            .iter()
            .map(|v| installed_slot(&v.session))
            .collect();
        // A create for device 3 before the orphans are looked for: its entry is its own now,
        // and its counter slot is none an orphan counted into (nor its policer one's).
        let mine = after.create(request([10, 0, 0, 3], 60)).expect("create");
        assert!(!orphans.contains(&installed_slot(&mine.session)));
        assert_eq!(after.remove_orphans(), 1, "device 2's entry only");
        let s = dp.state.lock().expect("lock");
        assert!(
            s.flows.contains_key(&key(1)),
            "the restored session's entry"
        );
        assert!(!s.flows.contains_key(&key(2)), "the orphan");
        assert_eq!(
            s.flows[&key(3)].iter().map(|r| r.slot).collect::<Vec<_>>(),
            vec![installed_slot(&mine.session)],
            "the new session's rule"
        );
        drop(s);
        assert_eq!(after.remove_orphans(), 0, "once per start");
        // The slots held for the orphans are free again, the first handed out.
        let next: HashSet<u32> = (4..=5)
            .map(|i| {
                installed_slot(
                    &after
                        .create(request([10, 0, 0, i], 60))
                        .expect("create")
                        .session,
                )
            })
            .collect();
        assert_eq!(next, orphans);
    }

    /// A start that rebuilt the maps has no orphans to look for.
    #[tokio::test(start_paused = true)]
    async fn a_rebuilding_restore_looks_for_no_orphans() {
        let (core, dp) = core(16);
        core.restore(Vec::new(), false);
        dp.state
            .lock()
            .expect("lock")
            .flows
            .insert(ipv4_key(Ipv4Addr::new(10, 0, 0, 9)), Vec::new());
        assert_eq!(core.remove_orphans(), 0);
    }

    /// Making a class can take the kernel milliseconds (a large tree): it happens outside the
    /// core's lock, so reads, deletes and the node's statistics go on meanwhile; two creates
    /// whose flows overlap, both making classes, cannot both be admitted.
    #[test]
    fn classes_are_made_outside_the_lock_and_admission_is_checked_again() {
        let (core, dp) = scheduled_core();
        let a = core
            .create(profile_request([10, 0, 0, 1], "QOS_L"))
            .expect("first");
        dp.hold_classes();
        let wait_for = |n: usize| {
            let t = std::time::Instant::now();
            while dp.classes_waiting() < n {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "no create reached its classes"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let spawn = |device: [u8; 4]| {
            let core = core.clone();
            std::thread::spawn(move || core.create(profile_request(device, "QOS_L")))
        };
        let b = spawn([10, 0, 0, 2]);
        wait_for(1);
        // B is making its classes: nothing else waits for it.
        assert_eq!(
            core.get(a.session.id, &me()).expect("get").session.id,
            a.session.id
        );
        assert!(
            core.get_delivery(a.session.id, &me())
                .expect("get")
                .1
                .is_some()
        );
        let _ = core.node_stats();
        core.delete(a.session.id, &me()).expect("delete");
        // C overlaps B (same device, any port): it passes the first check, as B is not in yet.
        let c = spawn([10, 0, 0, 2]);
        wait_for(2);
        dp.release_classes();
        let (b, c) = (b.join().expect("b"), c.join().expect("c"));
        let (won, lost) = match (b, c) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("exactly one of two overlapping creates is admitted: {other:?}"),
        };
        assert_eq!(lost.code, CamaraCode::Conflict, "{}", lost.message);
        // What the loser held is given back: one session's guarantee per side, one rule.
        let pools = core.node_stats().pools;
        let reserved: Vec<u64> = pools
            .iter()
            .filter(|p| p.pool == "guaranteed")
            .map(|p| p.reserved_bps)
            .collect();
        assert_eq!(reserved, vec![10_000_000, 10_000_000], "{pools:?}");
        let state = dp.state.lock().expect("lock");
        assert_eq!(state.classes.len(), 2, "the winner's two classes");
        let rules: usize = state.flows.values().map(Vec::len).sum();
        assert_eq!(rules, 1, "only the winner's rule");
        drop(state);
        assert_eq!(
            core.get(won.session.id, &me())
                .expect("get")
                .session
                .qos_status(),
            QosStatus::Available
        );
    }

    #[tokio::test(start_paused = true)]
    async fn guaranteed_rates_are_admitted_up_to_the_share() {
        let (core, dp) = scheduled_core();
        // QOS_L guarantees 10 Mbit/s each way; 80 % of 100 Mbit/s admits eight.
        let mut ids = Vec::new();
        for i in 0..8 {
            let v = core
                .create(profile_request([10, 0, 0, i + 1], "QOS_L"))
                .expect("fits");
            let r = v.session.reservation.clone().expect("classes");
            assert_eq!(r.classes.len(), 2, "one class per scheduled interface");
            assert_eq!(
                treated(&dp, &v.session).priority_down,
                session_class(r.classes[0].index)
            );
            assert_eq!(
                treated(&dp, &v.session).priority_up,
                session_class(r.classes[1].index)
            );
            assert_eq!(
                treated(&dp, &v.session).police_down,
                Policer::default(),
                "shaped by its class, not policed"
            );
            ids.push(v.session.id);
        }
        assert_eq!(dp.state.lock().expect("lock").classes.len(), 16);
        let err = core
            .create(profile_request([10, 0, 0, 9], "QOS_L"))
            .expect_err("full");
        assert_eq!(err.code, CamaraCode::QuotaExceeded);
        assert!(
            err.message.contains("dev0") || err.message.contains("srv0"),
            "{}",
            err.message
        );
        assert_eq!(
            dp.state.lock().expect("lock").classes.len(),
            16,
            "nothing left behind"
        );
        // Low latency draws on its own pool: QOS_E gets a strict-priority class at its 500 kbit/s
        // maximum on each side, with ten frames of burst (10 ms at 500 kbit/s is less), and the
        // classifier polices it with the same bucket, so what exceeds it is dropped, not queued.
        let e = core
            .create(profile_request([10, 0, 0, 20], "QOS_E"))
            .expect("low latency");
        let r = e.session.reservation.clone().expect("classes");
        assert_eq!(
            treated(&dp, &e.session).priority_down,
            session_class(r.classes[0].index)
        );
        assert_eq!(
            r.classes[0].spec,
            ClassSpec::low_latency(
                500_000,
                BurstRule {
                    burst_rate_bps: None,
                    delay_budget: Some(Duration::from_millis(10)),
                }
            )
        );
        assert_eq!(
            treated(&dp, &e.session).police_down,
            Policer::new(500_000, r.classes[0].spec.burst_bytes)
        );
        assert_eq!(r.classes[0].spec.burst_bytes, 15_140);
        // 10 % of 100 Mbit/s is 10 Mbit/s of low-latency pool: 20 sessions of 500 kbit/s.
        for i in 21..40 {
            core.create(profile_request([10, 0, 0, i], "QOS_E"))
                .expect("fits");
        }
        let err = core
            .create(profile_request([10, 0, 0, 40], "QOS_E"))
            .expect_err("pool full");
        assert!(err.message.contains("low-latency"), "{}", err.message);
        // Deleting one frees its classes and capacity.
        let before = dp.state.lock().expect("lock").classes.len();
        core.delete(ids[0], &me()).expect("delete");
        assert_eq!(dp.state.lock().expect("lock").classes.len(), before - 2);
        assert_eq!(
            dp.state.lock().expect("lock").parked.len(),
            2,
            "parked, not deleted"
        );
        core.create(profile_request([10, 0, 0, 9], "QOS_L"))
            .expect("fits again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_going_down_ends_sessions_and_refuses_new_ones() {
        let (core, dp) = scheduled_core();
        let v = core
            .create(profile_request([10, 0, 0, 1], "QOS_L"))
            .expect("create");
        let mut events = core.subscribe();
        core.link_changed("dev0", false);
        assert_eq!(
            next_event(&mut events),
            (QosStatus::Unavailable, Some(StatusInfo::NetworkTerminated))
        );
        assert!(dp.state.lock().expect("lock").flows.is_empty());
        assert!(dp.state.lock().expect("lock").classes.is_empty());
        let err = core
            .create(profile_request([10, 0, 0, 2], "QOS_E"))
            .expect_err("link down");
        assert_eq!(err.code, CamaraCode::Unavailable);
        core.link_changed("dev0", true);
        core.create(profile_request([10, 0, 0, 2], "QOS_E"))
            .expect("link back");
        assert_eq!(
            core.get(v.session.id, &me())
                .expect("kept")
                .session
                .qos_status(),
            QosStatus::Unavailable
        );
    }

    /// A link loss ends every live session, batch by batch (more than two batches' worth here),
    /// and none of those created once the link is back.
    #[tokio::test(start_paused = true)]
    async fn a_link_loss_ends_every_session_batch_by_batch() {
        let n = EXPIRY_BATCH * 2 + 10;
        let (core, dp) = core(n as u32 + 1);
        for i in 0..n {
            core.create(request([10, 2, 0, i as u8 + 1], 60))
                .expect("create");
        }
        core.link_changed("dev0", false);
        assert!(
            dp.state.lock().expect("lock").flows.is_empty(),
            "every rule removed"
        );
        core.link_changed("dev0", true);
        let after = core.create(request([10, 3, 0, 1], 60)).expect("link back");
        assert_eq!(
            core.get(after.session.id, &me())
                .expect("get")
                .session
                .qos_status(),
            QosStatus::Available
        );
    }

    /// A session that ends while its create waits for the commit (a link loss here; a 1 s
    /// expiry does the same) is announced AVAILABLE first, then UNAVAILABLE, with increasing
    /// revisions; a create whose commit fails is never announced, and neither is its end.
    #[test]
    fn a_session_is_announced_available_before_it_is_announced_ended() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("store");
        let dp = FakeDataPlane::default();
        let core = Arc::new(
            Core::new(Box::new(dp), policy(), limits(16, u32::MAX), None)
                .expect("core")
                .with_store(store.clone()),
        );
        let mut events = core.subscribe();
        let held = store.hold_commits();
        let creating = {
            let core = core.clone();
            std::thread::spawn(move || core.create(request([10, 0, 0, 1], 60)))
        };
        // The create has decided and waits for its commit.
        while core.lock().sessions.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        core.link_changed("dev0", false);
        assert!(
            events.try_next().is_none(),
            "nothing is announced before the create is durable"
        );
        drop(held);
        let created = creating.join().expect("thread").expect("create");
        let first = next_logged(&mut events);
        let second = next_logged(&mut events);
        assert_eq!(first.session, created.session.id);
        assert_eq!(first.status().0, QosStatus::Available);
        assert_eq!(second.status().0, QosStatus::Unavailable);
        assert!(
            first.revision < second.revision,
            "{} {}",
            first.revision,
            second.revision
        );
        // Both are in the stored log, under the revisions they were announced with.
        let stored: Vec<u64> = store
            .load_events()
            .expect("log")
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(stored, [first.revision, second.revision]);
    }

    /// A deletion and an extension wait for their commit outside the core's lock: while their
    /// fsync is held back, reads and other sessions' calls go on; the deletion's end is announced
    /// only once it is durable.
    #[test]
    fn deletions_and_extensions_wait_for_the_store_outside_the_lock() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("store");
        let dp = FakeDataPlane::default();
        let core = Arc::new(
            Core::new(Box::new(dp.clone()), policy(), limits(16, u32::MAX), None)
                .expect("core")
                .with_store(store.clone()),
        );
        let a = core.create(request([10, 0, 0, 1], 60)).expect("a");
        let b = core.create(request([10, 0, 0, 2], 60)).expect("b");
        let mut events = core.subscribe();
        let held = store.hold_commits();
        let (a_id, b_id) = (a.session.id, b.session.id);
        let deleting = {
            let core = core.clone();
            std::thread::spawn(move || core.delete(a_id, &me()))
        };
        let extending = {
            let core = core.clone();
            std::thread::spawn(move || core.extend(b_id, 30, &me()))
        };
        // Both have been applied to the kernel and memory and wait for their commit.
        while core.lock().sessions.contains_key(&a_id)
            || core
                .lock()
                .sessions
                .get(&b_id)
                .is_some_and(|s| s.duration == 60)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !dp.state
                .lock()
                .expect("lock")
                .flows
                .contains_key(&ipv4_key(Ipv4Addr::new(10, 0, 0, 1))),
            "the deleted session's rule left the kernel first"
        );
        // The lock is free: a read is served while both commits wait.
        assert_eq!(core.get(b_id, &me()).expect("get").session.duration, 90);
        assert!(
            events.try_next().is_none(),
            "the end is not announced before it is durable"
        );
        drop(held);
        deleting.join().expect("thread").expect("delete");
        assert_eq!(
            extending
                .join()
                .expect("thread")
                .expect("extend")
                .session
                .duration,
            90
        );
        let ended = next_logged(&mut events);
        assert_eq!(ended.session, a_id);
        assert_eq!(ended.status().0, QosStatus::Unavailable);
        let stored = store.load().expect("load");
        assert_eq!(stored.len(), 1);
        assert_eq!((stored[0].id, stored[0].duration), (b_id, 90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_holds_several_sessions_with_disjoint_flows() {
        let (core, dp) = core(16);
        let key = ipv4_key(Ipv4Addr::new(10, 0, 0, 1));
        let with_ports = |ports: Vec<u16>| {
            let mut r = request([10, 0, 0, 1], 60);
            r.server_ports = Some(Box::new(Ports {
                ranges: vec![],
                ports,
            }));
            r
        };
        let a = core.create(with_ports(vec![443])).expect("first");
        core.create(with_ports(vec![8443])).expect("disjoint ports");
        assert_eq!(
            dp.state.lock().expect("lock").flows[&key].len(),
            2,
            "both rules under one key"
        );
        let err = core
            .create(with_ports(vec![443, 9000]))
            .expect_err("overlaps the first");
        assert_eq!(err.code, CamaraCode::Conflict);
        // No server ports means every port: overlaps both.
        let mut all = request([10, 0, 0, 1], 60);
        all.server_ports = None;
        assert_eq!(
            core.create(all).expect_err("overlaps").code,
            CamaraCode::Conflict
        );
        // Another server network is another flow.
        let mut other = request([10, 0, 0, 1], 60);
        other.server = ApplicationServer {
            ipv4: Some("198.51.100.0/24".parse().expect("net")),
            ipv6: None,
            given: (None, None),
        };
        core.create(other).expect("other server");
        let d = core.create(with_ports(vec![1])).expect("fourth");
        let err = core.create(with_ports(vec![2])).expect_err("fifth");
        assert_eq!(err.code, CamaraCode::QuotaExceeded);
        // Deleting one leaves the others in the kernel, as they were.
        let rules = |dp: &FakeDataPlane| {
            let mut r = dp.state.lock().expect("lock").flows[&key].clone();
            r.sort_by_key(|r| r.slot);
            r
        };
        let before = rules(&dp);
        core.delete(a.session.id, &me()).expect("delete");
        let after = rules(&dp);
        assert_eq!(after.len(), 3);
        let a_slot = installed_slot(&a.session);
        let kept: Vec<FlowRule> = before.into_iter().filter(|r| r.slot != a_slot).collect();
        assert_eq!(after, kept, "the siblings' rules untouched");
        // Extending one moves its kernel end only.
        core.extend(d.session.id, 60, &me()).expect("extend");
        let moved = rules(&dp);
        for (b, m) in after.iter().zip(&moved) {
            if b.slot == installed_slot(&d.session) {
                assert_eq!(m.expires_at_ns, b.expires_at_ns + 60_000_000_000);
            } else {
                assert_eq!(m, b);
            }
        }
        assert_eq!(
            core.retrieve(&request([10, 0, 0, 1], 1).device, &me())
                .expect("retrieve")
                .len(),
            3
        );
    }
}
