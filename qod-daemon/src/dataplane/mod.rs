//! The data plane: where sessions become kernel state. [`AyaDataPlane`] drives the real eBPF
//! maps; [`FakeDataPlane`] records calls for unit tests of the layers above.

mod aya_dp;
mod batch;
mod fake;
pub(crate) mod netlink;
pub mod scheduler;

pub use aya_dp::{
    AyaDataPlane, EBPF_OBJECT, FLOOR_OBJECT, Pinned, ensure_bpffs, inspect_pins, pin_dir,
    remove_pins,
};
pub use fake::FakeDataPlane;
pub use netlink::TcStats;
use std::sync::Arc;

use qod_common::{BANDS, BandCounters, DeviceKey, FlowCounters, FlowRule, ProfileTreatment};
pub use scheduler::{QueueStats, SchedulerConfig};

/// Which traffic leaves through a managed interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Faces the devices: its egress carries downlink.
    Device,
    /// Faces the servers: its egress carries uplink.
    Server,
    /// Both directions (marking only).
    Both,
}

/// A managed interface, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedInterface {
    pub name: String,
    pub side: Side,
    /// Present when qodd owns the interface's egress queueing.
    pub scheduler: Option<SchedulerConfig>,
}

/// How the classifier is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Auto,
    Tcx,
    Clsact,
}

/// Failure of a data plane operation.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("eBPF map {map} rejected the operation")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the flow map is full ({capacity} entries)")]
    Full { capacity: u32 },
    #[error("the kernel holds no rule for counter slot {slot} (changed behind qodd's back?)")]
    RuleMissing { slot: u32 },
    #[error("cannot load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {program} failed: {what}")]
    Program {
        program: &'static str,
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach the classifier to {interface}: {what}")]
    Attach { interface: String, what: String },
    #[error("cannot mount bpffs at {path}")]
    Bpffs {
        path: std::path::PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("scheduler on {interface}: {what}")]
    Scheduler { interface: String, what: String },
    /// An rtnetlink exchange of the scheduler failed (the kernel's answer, or its deadline).
    #[error("scheduler on {interface}: {op}")]
    Netlink {
        interface: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned data plane at {path}")]
    PinDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface} does not exist")]
    NoInterface {
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot count the CPUs ({what})")]
    Cpus {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned data plane at {path}: {what}")]
    Pins {
        path: std::path::PathBuf,
        what: String,
    },
}

/// The per-session HTB classes of the scheduled interfaces. Each call is one rtnetlink exchange
/// with a deadline; calls on different classes may run concurrently (the kernel serialises them).
pub trait Classes: Send + Sync {
    /// Creates or changes per-session class `index` on `interface`'s scheduler; returns what the
    /// class has counted so far (a reused class keeps its totals).
    fn set_class(
        &self,
        interface: &str,
        index: u16,
        spec: scheduler::ClassSpec,
    ) -> Result<TcStats, DataPlaneError>;
    /// Parks per-session class `index` on `interface` for reuse (cheap, unlike deleting it).
    fn park_class(&self, interface: &str, index: u16) -> Result<(), DataPlaneError>;
    /// What per-session class `index` on `interface` delivered (after its queue), dropped (its
    /// queue full) and holds now.
    fn class_stats(&self, interface: &str, index: u16) -> Result<TcStats, DataPlaneError>;
}

/// Kernel state for sessions. Every call is a few syscalls and never blocks on the network.
/// Reads sessions' counters from any thread, without whoever owns the data plane.
pub trait CountersReader: Send + Sync {
    /// Sum over CPUs of the counters at `slot`.
    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError>;
}

/// Lists the devices the kernel holds rules for, from any thread, without whoever owns the
/// data plane (the entries may change meanwhile).
pub trait DeviceLister: Send + Sync {
    fn device_entries(&self) -> Result<KernelEntries, DataPlaneError>;
}

/// What [`DeviceLister::device_entries`] found: every device with an entry, and every counter
/// slot those entries' rules count into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelEntries {
    pub devices: Vec<DeviceKey>,
    pub slots: Vec<u32>,
}

impl KernelEntries {
    fn add(&mut self, key: DeviceKey, rules: &[FlowRule]) {
        self.devices.push(key);
        self.slots.extend(rules.iter().map(|r| r.slot));
    }
}

pub trait DataPlane: Send + 'static {
    /// Installs or replaces every rule of device `key` (1 to `MAX_SESSIONS_PER_DEVICE`).
    fn install(&mut self, key: DeviceKey, rules: &[FlowRule]) -> Result<(), DataPlaneError>;
    /// Device `key`'s rules as installed (none without an entry). The ledger keeps no copy of
    /// them: this is where a session's rule is read back to change it or a sibling's.
    fn rules(&self, key: &DeviceKey) -> Result<Vec<FlowRule>, DataPlaneError>;
    /// Removes device `key`'s rules; a missing entry is not an error.
    fn remove(&mut self, key: &DeviceKey) -> Result<(), DataPlaneError>;
    /// From here to [`DataPlane::end_bulk`], [`DataPlane::install`] and [`DataPlane::remove`]
    /// may hand their entry to a thread of its own, which writes the entries in the order given
    /// while the caller goes on; [`DataPlane::rules`] sees them at once. For a restore with no
    /// classifier attached yet (after a reboot), where nothing else reads the entries
    /// meanwhile. A data plane without such a thread writes at once.
    fn begin_bulk(&mut self) -> Result<(), DataPlaneError> {
        Ok(())
    }
    /// Waits until every entry handed over since [`DataPlane::begin_bulk`] is written, and
    /// returns the devices whose entry the kernel refused, with why (none, outside bulk
    /// writing).
    fn end_bulk(&mut self) -> Vec<(DeviceKey, DataPlaneError)> {
        Vec::new()
    }
    /// Sum over CPUs of the counters at `slot`.
    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError>;
    /// The same reads, for readers that do not hold this data plane.
    fn counters_reader(&self) -> Arc<dyn CountersReader>;
    /// What the classifier treated on each managed interface (configured order), per band
    /// (`qod_common::BAND_*`), summed over CPUs.
    fn band_counters(
        &self,
    ) -> Result<Vec<(String, [BandCounters; BANDS as usize])>, DataPlaneError>;
    /// What the classifier could not parse, and the fragments it followed, per managed
    /// interface (configured order), summed over CPUs.
    fn parse_counters(&self) -> Result<Vec<(String, qod_common::ParseCounters)>, DataPlaneError> {
        Ok(Vec::new())
    }
    /// Writes what profile entry `index` does to its sessions' packets (in effect for all of
    /// them at once); a treatment that is not `in_use` takes the entry out of use (rules that
    /// point at it then treat nothing).
    fn set_profile(&mut self, index: u16, t: &ProfileTreatment) -> Result<(), DataPlaneError>;
    /// The profile entries in use (those a previous run left, over pinned maps).
    fn profiles(&self) -> Result<Vec<(u16, ProfileTreatment)>, DataPlaneError>;
    /// Takes profile entry `index` out of use by its `in_use` flag alone, so a packet reading it
    /// meanwhile sees the whole old treatment or none.
    fn take_profile_out_of_use(&mut self, index: u16) -> Result<(), DataPlaneError>;
    /// Zeroes the counters and policer state at `slot` before it is handed to a new session.
    fn reset_counters(&mut self, slot: u32) -> Result<(), DataPlaneError>;
    /// The schedulers' per-session class operations, usable by many threads at once without
    /// whoever owns this data plane (they touch no map).
    fn classes(&self) -> Arc<dyn Classes>;
    /// Each scheduled interface's queues (configured order).
    fn queue_stats(&self) -> Result<Vec<(String, QueueStats)>, DataPlaneError> {
        Ok(Vec::new())
    }
    /// The indexes of the per-session classes on `interface`'s scheduler now (an adopted tree
    /// holds those of the previous run).
    fn session_classes(&self, interface: &str) -> Result<Vec<u16>, DataPlaneError>;
    /// Attaches the classifier (and scheduler) to `interface` again after it was re-created.
    fn reattach(&mut self, interface: &str) -> Result<(), DataPlaneError>;
    /// Attaches the classifier to every managed interface (at start, once the sessions are
    /// installed).
    fn attach_managed(&mut self) -> Result<(), DataPlaneError> {
        Ok(())
    }
    /// Graceful stop: the data plane stays (pinned) unless configured to be torn down.
    fn shutdown(&mut self) {}
    /// Lists every device key with rules in the kernel (to find entries no session accounts
    /// for), from any thread.
    fn device_lister(&self) -> Arc<dyn DeviceLister>;
    /// Every kernel entry with its rules, as the classifier reads them (operators' dump).
    fn entries(&self) -> Result<Vec<(DeviceKey, Vec<FlowRule>)>, DataPlaneError>;
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux; 0 ("never expires") is only a fallback that the
    // user-space expiry still covers.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}
