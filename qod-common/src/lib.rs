//! Types shared by the qod eBPF classifier and user space.
//!
//! Every type here is a map key or value: `#[repr(C)]`, no implicit padding (the verifier and the
//! map hash both see every byte), and a compile-time size check so a layout change cannot slip in
//! without bumping [`LAYOUT_VERSION`].
#![no_std]

use core::mem::size_of;

/// Bumped on any change to a map's name, key, value or meaning.
pub const LAYOUT_VERSION: u32 = 1;

/// Hash map `DeviceKey -> FlowRule`: one entry per installed session.
pub const FLOWS_MAP: &str = "QOD_FLOWS";
/// Per-CPU array of `FlowCounters`, indexed by `FlowRule::slot`.
pub const COUNTERS_MAP: &str = "QOD_COUNTERS";
/// Name of the tc classifier program in the object.
pub const CLASSIFIER: &str = "qod_tc";

/// Most port ranges a rule holds per side; a request's ports are merged into ranges first.
pub const MAX_PORT_RANGES: usize = 8;
/// IPv6 devices are keyed by their /64 (CAMARA: the session covers the device's whole prefix).
pub const IPV6_DEVICE_PREFIX_LEN: u8 = 64;

pub const FAMILY_IPV4: u32 = 4;
pub const FAMILY_IPV6: u32 = 6;

/// Identifies a device as the classifier sees it.
///
/// `addr` holds address bytes in network order: IPv4 in `addr[0]` with the rest zero; IPv6 masked
/// to its /64 (`addr[2..]` zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub family: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<DeviceKey>() == 20);

/// An inclusive port range in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}
const _: () = assert!(size_of::<PortRange>() == 4);

impl PortRange {
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        self.from <= port && port <= self.to
    }
}

/// What the classifier does with a packet of one session, in either direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRule {
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) instant after which the entry is ignored, so an
    /// entry left behind by a dead daemon stops acting on time. 0 never expires.
    pub expires_at_ns: u64,
    /// Written to `skb->priority` (a tc classid `major:minor` or a `TC_PRIO_*` band).
    pub skb_priority: u32,
    /// Index of this session's counters in `COUNTERS_MAP`.
    pub slot: u32,
    /// Application server network in network byte order, already masked.
    pub server_addr: [u32; 4],
    /// Mask for `server_addr`; all ones for a single address.
    pub server_mask: [u32; 4],
    /// DSCP written to matched packets (0..=63); the ECN bits are kept.
    pub dscp: u8,
    /// Number of used entries in `device_ports`; 0 means any device port.
    pub n_device_ports: u8,
    /// Number of used entries in `server_ports`; 0 means any server port.
    pub n_server_ports: u8,
    pub _pad: u8,
    pub device_ports: [PortRange; MAX_PORT_RANGES],
    pub server_ports: [PortRange; MAX_PORT_RANGES],
    pub _reserved: u32,
}
const _: () = assert!(size_of::<FlowRule>() == 120);

impl FlowRule {
    /// Whether packets must be TCP or UDP (the session names ports); otherwise any protocol.
    #[inline(always)]
    pub fn needs_ports(&self) -> bool {
        self.n_device_ports != 0 || self.n_server_ports != 0
    }
}

/// Per-session, per-CPU packet and byte counts. Bytes are `skb->len` at the managed interface's
/// egress (the L2 frame without FCS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Device to application server.
    pub up_packets: u64,
    pub up_bytes: u64,
    /// Application server to device.
    pub down_packets: u64,
    pub down_bytes: u64,
}
const _: () = assert!(size_of::<FlowCounters>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::{DeviceKey, FlowCounters, FlowRule};
    // SAFETY: all three are `#[repr(C)]`, made only of integers, with no implicit padding (sizes
    // asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for DeviceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowCounters {}
}
