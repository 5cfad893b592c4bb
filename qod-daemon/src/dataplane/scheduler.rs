//! Egress scheduling of a managed interface: an HTB tree that `qodd` owns, set up with iproute2's
//! `tc` (idempotent `replace` operations, each with a deadline); the per-session classes, the hot
//! path, go over rtnetlink ([`super::netlink`]). A tree a previous `qodd` left (the default
//! `on_exit = "keep"`, or a crash) is adopted: HTB cannot `change` its root in place, so the root
//! is kept and its classes are brought to this configuration; the per-session classes no restored
//! session claims are parked once the store is restored.
//!
//! Per-session classes are made once and then reused: the kernel's cost of *adding* (and of
//! deleting) an HTB class grows with the classes already there (each add walks every class to
//! bind filters, and registers a filter block the offload layer also walks: about 0.26 ms per add
//! below 5,000 classes and 1 ms at 10,000 on this machine kind), while *changing* one costs about
//! 11 µs whatever the tree's size. So a class whose session ended is parked
//! ([`ClassSpec::parked`]: a token rate, borrowing up to the capacity, so what it still queues
//! drains) and handed to the next session that needs one on that interface. Each interface
//! numbers its classes on its own.
//!
//! ```text
//! 1:   htb root, unclassified traffic → 1:20
//! └─ 1:1  capacity
//!    ├─ 1:10  shared low-latency band: prio 0, rate = 1 % (sessions with a maximum get classes of
//!    │        their own from the low-latency pool), ceil = capacity; short FIFO leaf
//!    ├─ 1:20  best effort: prio 7, rate = what is left, ceil = capacity; fq_codel if the kernel
//!    │        has it, else a 1000-packet FIFO
//!    └─ 1:1xx one class per session with a rate on this interface: guaranteed (rate = target
//!             minimum, ceil = maximum), low latency with a maximum (prio 0, rate = ceil =
//!             maximum, a byte FIFO of its burst allowance and delay budget), or capped best
//!             effort (ceil = maximum); bursts from the profile (`BurstRule`). Spare capacity:
//!             a profile with a CAMARA `priority` borrows ahead of best effort (guaranteed prio
//!             1-3, capped 4-6, by that priority); without one, the class borrows at best
//!             effort's prio 7 and HTB's round robin gives it and best effort equal shares
//! ```
//!
//! The classifier steers packets by writing the class id into `skb->priority`, which HTB honours
//! before any filter.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    DataPlaneError,
    netlink::{HtbClass, Rtnl, TcStats},
};

/// Longest a `tc` run or a netlink acknowledgement may take before it counts as failed (a
/// stuck `tc` is killed): the daemon never waits on the kernel's tc layer without end.
pub const TC_DEADLINE: Duration = Duration::from_secs(5);

/// `skb->priority` of the low-latency band.
pub const LOW_LATENCY_CLASS: u32 = 0x0001_0010;
/// `skb->priority` of best effort (also HTB's default class).
pub const BEST_EFFORT_CLASS: u32 = 0x0001_0020;
/// First minor id of the per-session classes.
pub const SESSION_MINOR_BASE: u16 = 0x100;
/// Most per-session classes per interface.
pub const MAX_SESSION_CLASSES: u16 = 0xfe00;

/// The class id (`skb->priority`) of per-session class `index`.
pub fn session_class(index: u16) -> u32 {
    0x0001_0000 | u32::from(SESSION_MINOR_BASE + index)
}

/// One full Ethernet frame, the unit of HTB's quantum and of the smallest burst.
const FRAME: u64 = 1514;
/// Fewest bytes a burst allowance holds: ten full frames. tc's default is one rate tick of this
/// kernel's 1 GHz psched clock, about one frame, which makes the third packet of a small burst
/// wait for tokens (tens of ms at low rates).
pub const MIN_BURST_BYTES: u64 = 10 * FRAME;
/// The burst window of a profile that gives no `packetDelayBudget`.
pub const DEFAULT_BURST_WINDOW: Duration = Duration::from_millis(10);

/// Bytes `bps` carries in `d`.
pub fn bytes_in(bps: u64, d: Duration) -> u64 {
    u64::try_from(u128::from(bps) * d.as_nanos() / 8_000_000_000).unwrap_or(u64::MAX)
}

/// What one direction of a profile says about bursts: CAMARA's `max*BurstRate` and
/// `packetDelayBudget`. It sizes the burst allowance of the direction's class (HTB `burst` /
/// `cburst`, and the classifier's bucket in front of a low-latency class) and its leaf queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BurstRule {
    /// `max*BurstRate`, bit/s.
    pub burst_rate_bps: Option<u64>,
    /// `packetDelayBudget`.
    pub delay_budget: Option<Duration>,
}

impl BurstRule {
    /// The window W over which bursts are measured: the delay budget, or
    /// [`DEFAULT_BURST_WINDOW`].
    pub fn window(&self) -> Duration {
        self.delay_budget.unwrap_or(DEFAULT_BURST_WINDOW)
    }

    /// The burst allowance A of a token bucket filling at `rate_bps`. With a burst rate P, in
    /// any window W at most P × W bytes pass (A + rate × W = P × W) and over longer times the
    /// rate holds; without one, A = rate × W (the allowance of a burst rate twice the rate).
    /// Never less than [`MIN_BURST_BYTES`].
    pub fn allowance(&self, rate_bps: u64) -> u64 {
        let extra = self
            .burst_rate_bps
            .map_or(rate_bps, |p| p.saturating_sub(rate_bps));
        bytes_in(extra, self.window()).max(MIN_BURST_BYTES)
    }
}

/// A class's leaf FIFO: a length in packets, or in bytes where a delay budget bounds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    Packets(u32),
    Bytes(u32),
}

/// Leaf of a throughput class without a delay budget: deep enough for TCP at the class's rate.
const THROUGHPUT_LEAF: Leaf = Leaf::Packets(300);

/// One session's HTB class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    pub rate_bps: u64,
    pub ceil_bps: u64,
    /// HTB `burst`: bytes the class may send at once above its rate after idling.
    pub burst_bytes: u64,
    /// HTB `cburst`: the same against the ceiling.
    pub cburst_bytes: u64,
    /// HTB priority (who borrows spare capacity first, 0 first): 0 low latency, 1..=3
    /// guaranteed and 4..=6 capped best effort when the profile gives a CAMARA `priority`, 7
    /// the shared best-effort class and every session class whose profile gives none.
    pub prio: u8,
    pub leaf: Leaf,
}

/// HTB priority of best effort, and of every session class whose profile gives no CAMARA
/// `priority`: classes at one HTB priority share spare capacity by deficit round robin, one
/// frame (`QUANTUM`) each per round, so best effort gets an equal share beside them.
pub const BEST_EFFORT_PRIO: u8 = 7;

/// Who borrows spare capacity first. A profile with a CAMARA `priority` (1..=100, lower is more
/// important) says its sessions go ahead of best effort: it is scaled onto three HTB priorities
/// from `base`. Without one, the session shares spare capacity equally with best effort.
fn scaled(base: u8, priority: Option<u8>) -> u8 {
    match priority {
        Some(p) => {
            let p = u16::from(p.clamp(1, 100));
            // (p - 1) * 3 / 100 is 0..=2.
            base + ((p - 1) * 3 / 100) as u8
        }
        None => BEST_EFFORT_PRIO,
    }
}

/// A byte length for a bfifo (saturated at 32 bits).
fn byte_leaf(bytes: u64) -> Leaf {
    Leaf::Bytes(u32::try_from(bytes).unwrap_or(u32::MAX))
}

/// The leaf of a class that may send up to `ceil` with `cburst`: with a delay budget D, what
/// its allowance plus D at the ceiling holds (a longer queue could only hold packets beyond the
/// budget); without one, [`THROUGHPUT_LEAF`].
fn throughput_leaf(ceil: u64, cburst: u64, rule: BurstRule) -> Leaf {
    rule.delay_budget
        .map_or(THROUGHPUT_LEAF, |d| byte_leaf(cburst + bytes_in(ceil, d)))
}

impl ClassSpec {
    /// Guaranteed `rate`, borrowing up to `ceil` ahead of best effort, in CAMARA `priority` order.
    pub fn guaranteed(rate: u64, ceil: u64, priority: Option<u8>, rule: BurstRule) -> Self {
        let ceil = ceil.max(rate);
        let cburst = rule.allowance(ceil);
        Self {
            rate_bps: rate,
            ceil_bps: ceil,
            burst_bytes: BurstRule {
                burst_rate_bps: None,
                ..rule
            }
            .allowance(rate),
            cburst_bytes: cburst,
            prio: scaled(1, priority),
            leaf: throughput_leaf(ceil, cburst, rule),
        }
    }

    /// Strict priority up to `max`, never borrowing. Its allowance A passes at once; the leaf
    /// holds A plus the delay budget at `max` in bytes, so a flow within its allowance is never
    /// queued longer than the budget (the classifier polices the session at `max` with the same
    /// A in front of it, so the excess of a flow beyond its allowance is dropped, not queued).
    pub fn low_latency(max: u64, rule: BurstRule) -> Self {
        let allowance = rule.allowance(max);
        Self {
            rate_bps: max,
            ceil_bps: max,
            burst_bytes: allowance,
            cburst_bytes: allowance,
            prio: 0,
            leaf: byte_leaf(allowance + bytes_in(max, rule.window())),
        }
    }

    /// Best effort, capped at `max`, borrowing ahead of the shared best-effort class in CAMARA
    /// `priority` order. Its own rate is a token 1 kbit/s (HTB needs one), so many capped sessions
    /// do not oversubscribe the link.
    pub fn capped(max: u64, priority: Option<u8>, rule: BurstRule) -> Self {
        let cburst = rule.allowance(max);
        Self {
            rate_bps: 1_000.min(max),
            ceil_bps: max,
            burst_bytes: MIN_BURST_BYTES,
            cburst_bytes: cburst,
            prio: scaled(4, priority),
            leaf: throughput_leaf(max, cburst, rule),
        }
    }
}

/// The token rate of a parked class (see the module docs): high enough that its burst fits
/// HTB's 32-bit buffer at this kernel's 1 GHz psched clock.
pub const PARKED_RATE_BPS: u64 = 64_000;

impl ClassSpec {
    /// A class no session holds: nothing is steered to it; what it still queues from its last
    /// session drains by borrowing at best effort's priority. Its leaf is left as it is.
    pub fn parked(capacity_bps: u64) -> Self {
        Self {
            rate_bps: PARKED_RATE_BPS,
            ceil_bps: capacity_bps.max(PARKED_RATE_BPS),
            burst_bytes: MIN_BURST_BYTES,
            cburst_bytes: burst_bytes(capacity_bps),
            prio: BEST_EFFORT_PRIO,
            leaf: THROUGHPUT_LEAF,
        }
    }
}

/// Shares of an interface's capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub capacity_bps: u64,
    /// Guaranteed to the low-latency band (it may borrow up to the capacity).
    pub low_latency_share: f64,
    /// The most that guaranteed-rate sessions may reserve together (admission control).
    pub guaranteed_share: f64,
    /// Replace a root qdisc qodd does not own instead of refusing to start.
    pub replace_foreign_root: bool,
}

impl SchedulerConfig {
    pub fn low_latency_bps(&self) -> u64 {
        (self.capacity_bps as f64 * self.low_latency_share) as u64
    }

    pub fn guaranteed_pool_bps(&self) -> u64 {
        (self.capacity_bps as f64 * self.guaranteed_share) as u64
    }

    /// The shared low-latency band's own rate: small, since sessions with a maximum get classes
    /// of their own from the low-latency pool (it still borrows up to the capacity at prio 0).
    pub fn shared_low_latency_bps(&self) -> u64 {
        (self.capacity_bps / 100).max(8_000)
    }

    /// Best effort's own rate: what the pools and the shared band leave.
    pub fn best_effort_bps(&self) -> u64 {
        self.capacity_bps
            .saturating_sub(
                self.low_latency_bps() + self.guaranteed_pool_bps() + self.shared_low_latency_bps(),
            )
            .max(8_000)
    }
}

/// Runs `tc args`: its stdout, or an error naming the command and what tc said. A run past
/// [`TC_DEADLINE`] is killed and fails.
fn tc_output(args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run tc: {e}"))?;
    // Read both pipes while waiting: a large listing must not block tc on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < TC_DEADLINE => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "tc {}: no answer within {TC_DEADLINE:?}; killed",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("cannot wait for tc: {e}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        Err(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&stderr).trim()
        ))
    }
}

fn tc(args: &[&str]) -> Result<(), String> {
    tc_output(args).map(drop)
}

fn bits(bps: u64) -> String {
    format!("{bps}bit")
}

/// What `tc -j` printed, parsed.
fn tc_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let all: Vec<&str> = std::iter::once("-j").chain(args.iter().copied()).collect();
    serde_json::from_str(&tc_output(&all)?).map_err(|e| format!("tc -j {}: {e}", args.join(" ")))
}

/// What holds an interface's root.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Root {
    /// The kernel's default (handle `0:`: noqueue, pfifo_fast, mq, fq_codel...).
    Default,
    /// The HTB tree qodd installs: handle `1:`, unclassified traffic to best effort (`1:20`).
    Qod,
    /// Someone else's: its kind and handle.
    Foreign { kind: String, handle: String },
}

/// Reads `tc -j qdisc show dev X root` output.
fn root_of(json: &serde_json::Value) -> Root {
    let Some(q) = json
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["root"].as_bool().unwrap_or(false))
    else {
        return Root::Default;
    };
    let kind = q["kind"].as_str().unwrap_or("?").to_owned();
    let handle = q["handle"].as_str().unwrap_or("?").to_owned();
    if handle == "0:" {
        Root::Default
    } else if kind == "htb" && handle == "1:" && q["options"]["default"] == "0x20" {
        Root::Qod
    } else {
        Root::Foreign { kind, handle }
    }
}

/// The per-session class indexes in `tc class show` output (`class htb 1:1xx parent 1:1 …`).
fn session_class_indexes(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (class, kind, handle) = (words.next()?, words.next()?, words.next()?);
            let parent = (words.next()? == "parent").then(|| words.next())??;
            (class == "class" && kind == "htb" && parent == "1:1").then_some(())?;
            let minor = u16::from_str_radix(handle.strip_prefix("1:")?, 16).ok()?;
            minor
                .checked_sub(SESSION_MINOR_BASE)
                .filter(|index| *index < MAX_SESSION_CLASSES)
        })
        .collect()
}

/// HTB `burst` / `cburst` in bytes of the tree's own classes (capacity, shared bands) at
/// `rate_bps`: ten full frames, or 1 ms at the rate if that is more.
pub fn burst_bytes(rate_bps: u64) -> u64 {
    MIN_BURST_BYTES.max(bytes_in(rate_bps, Duration::from_millis(1)))
}

/// Bytes a class may send per round: one full frame, so low rates stay accurate.
const QUANTUM: u32 = FRAME as u32;

/// The statistics of one interface's tree by queue (see [`Scheduler::queue_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub low_latency: TcStats,
    pub best_effort: TcStats,
    pub sessions: TcStats,
}

/// The HTB tree on one interface.
#[derive(Debug)]
pub struct Scheduler {
    pub interface: String,
    pub config: SchedulerConfig,
    /// The leaf qdisc chosen for best effort.
    pub best_effort_leaf: &'static str,
    ifindex: u32,
    /// Per-session classes are made and changed over this socket.
    rtnl: Mutex<Rtnl>,
    /// Statistics are read over this one, so a read never queues behind class changes (adding
    /// a class to a large tree takes the kernel milliseconds).
    reads: Mutex<Rtnl>,
}

impl Scheduler {
    /// Replaces the interface's root qdisc with qod's tree.
    pub fn install(interface: &str, config: SchedulerConfig) -> Result<Self, DataPlaneError> {
        let quantum = QUANTUM.to_string();
        let err = |what: String| DataPlaneError::Scheduler {
            interface: interface.to_owned(),
            what,
        };
        let cap = bits(config.capacity_bps);
        let cap_burst = burst_bytes(config.capacity_bps).to_string();
        let root = root_of(&tc_json(&["qdisc", "show", "dev", interface, "root"]).map_err(err)?);
        let adopted = root == Root::Qod;
        if let Root::Foreign { kind, handle } = &root {
            if !config.replace_foreign_root {
                return Err(err(format!(
                    "the root qdisc is {kind} {handle}, which is not qodd's: refusing to replace it \
                     (remove it, or set replace_foreign_root = true on this interface to let qodd \
                     replace it)"
                )));
            }
            warn!(interface, kind = %kind, handle = %handle, "replacing a root qdisc that is not qodd's (replace_foreign_root)");
            tc(&["qdisc", "del", "dev", interface, "root"]).map_err(err)?;
        }
        if !adopted {
            tc(&[
                "qdisc", "replace", "dev", interface, "root", "handle", "1:", "htb", "default",
                "20",
            ])
            .map_err(err)?;
        }
        tc(&[
            "class", "replace", "dev", interface, "parent", "1:", "classid", "1:1", "htb", "rate",
            &cap, "ceil", &cap, "burst", &cap_burst, "cburst", &cap_burst, "quantum", &quantum,
        ])
        .map_err(err)?;
        for (minor, rate, prio) in [
            ("1:10", config.shared_low_latency_bps(), "0"),
            ("1:20", config.best_effort_bps(), "7"),
        ] {
            tc(&[
                "class",
                "replace",
                "dev",
                interface,
                "parent",
                "1:1",
                "classid",
                minor,
                "htb",
                "rate",
                &bits(rate),
                "ceil",
                &cap,
                "burst",
                &burst_bytes(rate).to_string(),
                "cburst",
                &cap_burst,
                "prio",
                prio,
                "quantum",
                &quantum,
            ])
            .map_err(err)?;
        }
        // A short FIFO keeps the low-latency band's queue (and so its delay) small.
        tc(&[
            "qdisc", "replace", "dev", interface, "parent", "1:10", "handle", "10:", "pfifo",
            "limit", "100",
        ])
        .map_err(err)?;
        // Best effort: fq_codel where the kernel has it; this kernel may not.
        let best_effort_leaf = if tc(&[
            "qdisc", "replace", "dev", interface, "parent", "1:20", "handle", "20:", "fq_codel",
        ])
        .is_ok()
        {
            "fq_codel"
        } else {
            tc(&[
                "qdisc", "replace", "dev", interface, "parent", "1:20", "handle", "20:", "pfifo",
                "limit", "1000",
            ])
            .map_err(err)?;
            "pfifo"
        };
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .map_err(|e| err(format!("no such interface ({e})")))?;
        let socket = || {
            Rtnl::open(TC_DEADLINE).map_err(|source| DataPlaneError::Netlink {
                interface: interface.to_owned(),
                op: "open an rtnetlink socket".into(),
                source,
            })
        };
        let (rtnl, reads) = (socket()?, socket()?);
        info!(
            interface,
            capacity_bps = config.capacity_bps,
            best_effort_leaf,
            adopted,
            "{}",
            if adopted {
                "scheduler adopted from a previous qodd"
            } else {
                "scheduler installed"
            }
        );
        Ok(Self {
            interface: interface.to_owned(),
            config,
            best_effort_leaf,
            ifindex,
            rtnl: Mutex::new(rtnl),
            reads: Mutex::new(reads),
        })
    }

    fn rtnl(&self) -> std::sync::MutexGuard<'_, Rtnl> {
        self.rtnl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reads(&self) -> std::sync::MutexGuard<'_, Rtnl> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn htb_class(&self, index: u16, spec: ClassSpec) -> HtbClass {
        let ceil = spec
            .ceil_bps
            .clamp(spec.rate_bps, self.config.capacity_bps.max(spec.rate_bps));
        HtbClass {
            ifindex: self.ifindex,
            parent: 0x0001_0001,
            classid: session_class(index),
            rate_bps: spec.rate_bps,
            ceil_bps: ceil,
            burst_bytes: spec.burst_bytes,
            cburst_bytes: spec.cburst_bytes,
            quantum: QUANTUM,
            prio: spec.prio,
        }
    }

    /// Creates or changes per-session class `index` and its FIFO leaf (rtnetlink, one
    /// exchange); returns what the class reports right after (a reused class keeps its
    /// predecessors' totals: the holder counts from here).
    pub fn set_class(&self, index: u16, spec: ClassSpec) -> Result<TcStats, DataPlaneError> {
        let minor = SESSION_MINOR_BASE + index;
        self.rtnl()
            .replace_class(
                &self.htb_class(index, spec),
                u32::from(minor) << 16,
                spec.leaf,
            )
            .map_err(|source| self.netlink(format!("replace class 1:{minor:x}"), source))
    }

    /// Parks per-session class `index` ([`ClassSpec::parked`]; its leaf stays).
    pub fn park_class(&self, index: u16) -> Result<(), DataPlaneError> {
        let minor = SESSION_MINOR_BASE + index;
        self.rtnl()
            .change_class(&self.htb_class(index, ClassSpec::parked(self.config.capacity_bps)))
            .map_err(|source| self.netlink(format!("park class 1:{minor:x}"), source))
    }

    fn netlink(&self, op: String, source: std::io::Error) -> DataPlaneError {
        DataPlaneError::Netlink {
            interface: self.interface.clone(),
            op,
            source,
        }
    }

    /// What per-session class `index` delivered and dropped, and holds now.
    pub fn class_stats(&self, index: u16) -> Result<TcStats, DataPlaneError> {
        self.reads()
            .class_stats(self.ifindex, session_class(index))
            .map_err(|e| {
                let minor = SESSION_MINOR_BASE + index;
                self.netlink(format!("statistics of class 1:{minor:x}"), e)
            })
    }

    /// The tree's queues: the shared low-latency band, best effort, and every per-session class
    /// together (the capacity class less the two shared ones, so the sum keeps counting up when
    /// session classes come and go).
    pub fn queue_stats(&self) -> Result<QueueStats, DataPlaneError> {
        let mut rtnl = self.reads();
        let class = |rtnl: &mut Rtnl, id: u32| {
            rtnl.class_stats(self.ifindex, id).map_err(|e| {
                let op = format!("statistics of class {:x}:{:x}", id >> 16, id & 0xffff);
                self.netlink(op, e)
            })
        };
        let low_latency = class(&mut rtnl, LOW_LATENCY_CLASS)?;
        let best_effort = class(&mut rtnl, BEST_EFFORT_CLASS)?;
        let root = rtnl
            .root_stats(self.ifindex, 0x0001_0000)
            .map_err(|e| self.netlink("statistics of qdisc 1:".into(), e))?;
        Ok(QueueStats {
            low_latency,
            best_effort,
            sessions: root.minus(low_latency).minus(best_effort),
        })
    }

    /// The indexes of the per-session classes in the interface's tree now.
    pub fn session_classes(&self) -> Result<Vec<u16>, DataPlaneError> {
        // iproute2 6.1 prints HTB classes as text even with `-j`.
        let out = tc_output(&["class", "show", "dev", &self.interface]).map_err(|what| {
            DataPlaneError::Scheduler {
                interface: self.interface.clone(),
                what,
            }
        })?;
        Ok(session_class_indexes(&out))
    }

    /// Gives the interface back its default qdisc.
    pub fn remove(&self) {
        if let Err(e) = tc(&["qdisc", "del", "dev", &self.interface, "root"]) {
            warn!(interface = %self.interface, error = %e, "cannot remove the scheduler");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_told_apart_by_kind_handle_and_default_class() {
        let read = |s: &str| root_of(&serde_json::from_str(s).expect("json"));
        assert_eq!(read("[]"), Root::Default);
        assert_eq!(
            read(r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}}]"#),
            Root::Default
        );
        assert_eq!(
            read(
                r#"[{"kind":"htb","handle":"1:","root":true,"options":{"r2q":10,"default":"0x20","direct_packets_stat":0}}]"#
            ),
            Root::Qod
        );
        assert_eq!(
            read(
                r#"[{"kind":"htb","handle":"1:","root":true,"options":{"r2q":10,"default":"0x1"}}]"#
            ),
            Root::Foreign {
                kind: "htb".into(),
                handle: "1:".into()
            }
        );
        assert_eq!(
            read(r#"[{"kind":"tbf","handle":"5:","root":true,"options":{}}]"#),
            Root::Foreign {
                kind: "tbf".into(),
                handle: "5:".into()
            }
        );
    }

    #[test]
    fn session_classes_are_read_from_tc_output() {
        let text = "class htb 1:100 parent 1:1 prio 0 rate 20Mbit ceil 20Mbit burst 15140b cburst 15140b \n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) \nclass htb 1:1 root rate 100Mbit ceil 100Mbit\nclass htb 1:10 parent 1:1 prio 0 rate 1Mbit\nclass htb 1:20 parent 1:1 prio 7 rate 9Mbit\nclass htb 1:1ff parent 1:1 prio 2 rate 1Mbit\nclass htb 2:105 parent 2:1 rate 1Mbit\n";
        assert_eq!(session_class_indexes(text), vec![0, 0xff]);
    }

    #[test]
    fn bursts_are_ten_frames_or_a_millisecond() {
        assert_eq!(burst_bytes(500_000), 15_140);
        assert_eq!(burst_bytes(100_000_000), 15_140);
        assert_eq!(burst_bytes(1_000_000_000), 125_000);
    }

    #[test]
    fn camara_priority_orders_borrowing() {
        let r = BurstRule::default();
        assert_eq!(ClassSpec::guaranteed(1, 2, Some(1), r).prio, 1);
        assert_eq!(ClassSpec::guaranteed(1, 2, Some(50), r).prio, 2);
        assert_eq!(ClassSpec::guaranteed(1, 2, Some(100), r).prio, 3);
        assert_eq!(ClassSpec::capped(10_000_000, Some(1), r).prio, 4);
        assert_eq!(ClassSpec::capped(10_000_000, Some(100), r).prio, 6);
        // Without a priority the profile does not say to go first: spare capacity is shared
        // equally with best effort.
        assert_eq!(ClassSpec::guaranteed(1, 2, None, r).prio, BEST_EFFORT_PRIO);
        assert_eq!(
            ClassSpec::capped(10_000_000, None, r).prio,
            BEST_EFFORT_PRIO
        );
    }

    #[test]
    fn allowances_follow_the_burst_rate_and_the_delay_budget() {
        let ms = Duration::from_millis;
        // QOS_E (500 kbit/s, 10 ms budget): 625 B of window, so ten frames.
        let qos_e = BurstRule {
            burst_rate_bps: None,
            delay_budget: Some(ms(10)),
        };
        assert_eq!(qos_e.allowance(500_000), MIN_BURST_BYTES);
        let c = ClassSpec::low_latency(500_000, qos_e);
        assert_eq!((c.burst_bytes, c.cburst_bytes), (15_140, 15_140));
        // The leaf holds the allowance and 10 ms at 500 kbit/s.
        assert_eq!(c.leaf, Leaf::Bytes(15_140 + 625));
        // A 20 Mbit/s maximum bursting at 100 Mbit/s over a 50 ms budget: 80 Mbit/s × 50 ms.
        let bursty = BurstRule {
            burst_rate_bps: Some(100_000_000),
            delay_budget: Some(ms(50)),
        };
        assert_eq!(bursty.allowance(20_000_000), 500_000);
        // In any 50 ms, allowance plus 50 ms at the maximum is the burst rate's 50 ms.
        assert_eq!(
            bursty.allowance(20_000_000) + bytes_in(20_000_000, ms(50)),
            bytes_in(100_000_000, ms(50))
        );
        // A burst rate at or below the maximum adds nothing beyond the floor.
        let flat = BurstRule {
            burst_rate_bps: Some(10_000_000),
            delay_budget: None,
        };
        assert_eq!(flat.allowance(20_000_000), MIN_BURST_BYTES);
        // Without either: 10 ms at the rate.
        assert_eq!(BurstRule::default().allowance(30_000_000), 37_500);
        // A guaranteed class: its rate bucket ignores the burst rate, its ceiling's uses it, and
        // its leaf is a byte FIFO only under a delay budget.
        let g = ClassSpec::guaranteed(10_000_000, 20_000_000, None, bursty);
        assert_eq!(g.burst_bytes, bytes_in(10_000_000, ms(50)));
        assert_eq!(g.cburst_bytes, 500_000);
        assert_eq!(g.leaf, Leaf::Bytes(500_000 + 125_000));
        let plain = ClassSpec::guaranteed(10_000_000, 20_000_000, None, BurstRule::default());
        assert_eq!(plain.leaf, Leaf::Packets(300));
    }
}
