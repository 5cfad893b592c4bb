//! Types shared by the qod eBPF classifier and user space.
//!
//! Every type here is a map key or value: `#[repr(C)]`, no implicit padding (the verifier and the
//! map hash both see every byte), and a compile-time size check so a layout change cannot slip in
//! without bumping [`LAYOUT_VERSION`].
#![no_std]

use core::mem::size_of;

/// Bumped on any change to a map's name, key, value or meaning.
pub const LAYOUT_VERSION: u32 = 10;

/// Hash map IPv4 device address (`u32`, network byte order) -> `DeviceRules`.
pub const FLOWS_V4_MAP: &str = "QOD_FLOWS_V4";
/// Hash map IPv6 device /64 (`[u32; 2]`, network byte order) -> `DeviceRules`.
pub const FLOWS_V6_MAP: &str = "QOD_FLOWS_V6";
/// Most sessions (with non-overlapping flows) one device may hold at once.
pub const MAX_SESSIONS_PER_DEVICE: usize = 4;
/// Per-CPU array of `FlowCounters`, indexed by `FlowRule::slot`.
pub const COUNTERS_MAP: &str = "QOD_COUNTERS";
/// Array of `PolicerState`, indexed by `FlowRule::slot`; shared by all CPUs.
pub const POLICERS_MAP: &str = "QOD_POLICERS";
/// Array of [`ProfileTreatment`], indexed by [`FlowRule::profile`]: what a QoS profile does to
/// its sessions' packets, one entry per profile, so a profile's change reaches every session of
/// it with one map update.
pub const PROFILES_MAP: &str = "QOD_PROFILES";
/// Entries of [`PROFILES_MAP`]: profiles a node offers at once, plus those a reload retired
/// whose sessions are still being ended.
pub const MAX_PROFILES: u32 = 256;
/// The tc classifier program.
pub const CLASSIFIER: &str = "qod_tc";
/// Array of [`InterfaceInfo`] by `ifindex & IFINDEX_MASK`: which end of a packet leaving that
/// interface can be a device (so a one-sided interface costs one look-up instead of two), and
/// where its per-band counters live.
pub const INTERFACES_MAP: &str = "QOD_INTERFACES";
pub const IFINDEX_MASK: u32 = 0xffff;
/// Per-CPU array of [`BandCounters`], indexed by [`band_counter_index`]: what the classifier
/// treated on each managed interface, per band.
pub const BAND_COUNTERS_MAP: &str = "QOD_BAND_COUNTERS";
/// Most managed interfaces with counters of their own; counter slot 0 gathers packets on
/// interfaces without one (an index past the interface map).
pub const MAX_INTERFACES: u32 = 63;
/// Band codes carried in [`FlowRule::band`] (a power-of-two count keeps the index a shift).
pub const BAND_BEST_EFFORT: u8 = 0;
pub const BAND_LOW_LATENCY: u8 = 1;
pub const BAND_GUARANTEED: u8 = 2;
pub const BANDS: u32 = 4;
pub const BAND_COUNTERS_ENTRIES: u32 = (MAX_INTERFACES + 1) * BANDS;

/// The [`BAND_COUNTERS_MAP`] index of interface counter slot `slot` and band `band`.
#[inline(always)]
pub const fn band_counter_index(slot: u8, band: u8) -> u32 {
    ((slot as u32 & MAX_INTERFACES) << 2) | (band as u32 & (BANDS - 1))
}

/// One managed interface, as the classifier sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// `SIDE_*`.
    pub side: u8,
    /// Counter slot (1..=`MAX_INTERFACES`); 0 when none was given.
    pub counters: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<InterfaceInfo>() == 4);

/// Per-CPU packets and bytes one interface treated in one band (`skb->len` at egress), and what
/// the maximum-rate policer dropped there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BandCounters {
    pub packets: u64,
    pub bytes: u64,
    pub policer_dropped_packets: u64,
    pub policer_dropped_bytes: u64,
}
const _: () = assert!(size_of::<BandCounters>() == 32);
/// Array of [`FragmentSlot`], indexed by [`fragment_slot`]: the ports of a fragmented datagram
/// whose first fragment matched a session, so its later fragments (which carry no transport
/// header) get the same treatment. Direct-mapped: a datagram whose key lands on a taken slot
/// takes it over (its earlier owner's later fragments are then "unknown"), so remembering costs
/// a few stores instead of an LRU map's locked update.
pub const FRAGMENTS_MAP: &str = "QOD_FRAGMENTS";
/// Slots (a power of two). With d datagrams of sessions in flight at once, a given one loses its
/// slot to another with probability about d / FRAGMENTS_ENTRIES (0.1 % at 64).
pub const FRAGMENTS_ENTRIES: u32 = 65_536;
const _: () = assert!(FRAGMENTS_ENTRIES.is_power_of_two());

/// The [`FRAGMENTS_MAP`] slot of a datagram: its key's words mixed (multiply and fold).
#[inline(always)]
pub fn fragment_slot(k: &FragmentKey) -> u32 {
    let mut h = k.id ^ (u32::from(k.protocol) << 16) ^ (u32::from(k.family) << 24);
    let mut i = 0;
    while i < 4 {
        h = (h ^ k.src[i]).wrapping_mul(0x9e37_79b1);
        h = (h ^ k.dst[i]).wrapping_mul(0x85eb_ca6b);
        i += 1;
    }
    (h ^ (h >> 16)) & (FRAGMENTS_ENTRIES - 1)
}

/// One remembered datagram: whose it is, and its ports. `key.family` 0 marks an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentSlot {
    pub key: FragmentKey,
    pub ports: FragmentPorts,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FragmentSlot>() == 48);
/// Per-CPU array of [`ParseCounters`], indexed by an interface's counter slot (as bands are).
pub const PARSE_COUNTERS_MAP: &str = "QOD_PARSE_COUNTERS";

/// Identifies one fragmented datagram (RFC 791 / RFC 8200: addresses, protocol and the
/// identification field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragmentKey>() == 40);

/// The transport ports of a fragmented datagram, as its first fragment carried them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src: u16,
    pub dst: u16,
}
const _: () = assert!(size_of::<FragmentPorts>() == 4);

/// Per-CPU, per interface: what the classifier could not read, and the fragments it followed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseCounters {
    /// IPv6 packets whose extension-header chain is longer than the classifier walks: their
    /// ports are unknown, so only sessions without ports can match them.
    pub ipv6_chain_too_long: u64,
    /// First fragments of a session's datagram whose ports were remembered.
    pub fragments_remembered: u64,
    /// Later fragments given their datagram's ports.
    pub fragments_followed: u64,
    /// Later fragments with ports unknown (first fragment not seen, not a session's, or
    /// forgotten): only sessions without ports can match them.
    pub fragments_unknown: u64,
}
const _: () = assert!(size_of::<ParseCounters>() == 32);

/// Either end, destination first (the default for an interface not in the map).
pub const SIDE_BOTH: u8 = 0;
/// Device-facing: egress is downlink, the device is the destination.
pub const SIDE_DOWNLINK: u8 = 1;
/// Server-facing: egress is uplink, the device is the source.
pub const SIDE_UPLINK: u8 = 2;

/// Most port ranges a rule holds per side; a request's ports are merged into ranges first.
pub const MAX_PORT_RANGES: usize = 8;
/// IPv6 devices are keyed by their /64 (CAMARA: the session covers the device's whole prefix).
pub const IPV6_DEVICE_PREFIX_LEN: u8 = 64;

pub const FAMILY_IPV4: u32 = 4;
pub const FAMILY_IPV6: u32 = 6;

/// Identifies a device (user space's key; the kernel maps use `addr[0]` for IPv4 and
/// `addr[..2]` for IPv6, so each family hashes only the bytes it has).
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

/// Which session of a device a packet belongs to, and what the session itself (not its profile)
/// decides about the packet; the rest comes from its profile's [`ProfileTreatment`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRule {
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) instant after which the entry is ignored, so an
    /// entry left behind by a dead daemon stops acting on time. 0 never expires.
    pub expires_at_ns: u64,
    /// Written to `skb->priority` of uplink packets when `own` has [`OWN_PRIORITY_UP`]: the
    /// session's own class on a scheduled interface (a tc classid `major:minor`).
    pub priority_up: u32,
    /// The same for downlink packets ([`OWN_PRIORITY_DOWN`]).
    pub priority_down: u32,
    /// Index of this session's counters in `COUNTERS_MAP` and its clocks in `POLICERS_MAP`.
    pub slot: u32,
    /// Application server network in network byte order, already masked.
    pub server_addr: [u32; 4],
    /// Mask for `server_addr`; all ones for a single address.
    pub server_mask: [u32; 4],
    /// `OWN_*`: which of the rule's priorities and policers apply instead of the profile's.
    pub own: u8,
    /// Prefix length of the server network: the most specific matching rule wins.
    pub server_prefix_len: u8,
    /// Number of used entries in `device_ports`; 0 means any device port.
    pub n_device_ports: u8,
    /// Number of used entries in `server_ports`; 0 means any server port.
    pub n_server_ports: u8,
    /// The first `n_device_ports` / `n_server_ports` entries hold sorted, disjoint ranges, the
    /// rest are zero (the classifier stops at the first entry that ends at or after a port).
    pub device_ports: [PortRange; MAX_PORT_RANGES],
    pub server_ports: [PortRange; MAX_PORT_RANGES],
    /// The session's profile: its index in [`PROFILES_MAP`].
    pub profile: u16,
    pub _reserved: [u8; 6],
    /// Maximum-rate policer per direction when `own` has [`OWN_POLICE_UP`] /
    /// [`OWN_POLICE_DOWN`] (a zero `ns_per_byte_q16` means no policing).
    pub police_up: Policer,
    pub police_down: Policer,
}
const _: () = assert!(size_of::<FlowRule>() == 160);

/// [`FlowRule::own`] bits.
pub const OWN_PRIORITY_UP: u8 = 1;
pub const OWN_PRIORITY_DOWN: u8 = 2;
pub const OWN_POLICE_UP: u8 = 4;
pub const OWN_POLICE_DOWN: u8 = 8;

/// What one QoS profile does to the packets of its sessions (those of a rule's fields its `own`
/// bits do not override).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileTreatment {
    pub police_up: Policer,
    pub police_down: Policer,
    /// Written to `skb->priority`: a `TC_PRIO_*` band or the profile's configured value.
    pub priority_up: u32,
    pub priority_down: u32,
    /// Which profile holds the entry (a hash of its name, for user space to find its entries
    /// again after a restart); the classifier does not read it.
    pub name_hash: u64,
    /// DSCP written to matched packets (0..=63); the ECN bits are kept.
    pub dscp: u8,
    /// `BAND_*`: which band's interface counters count the packets.
    pub band: u8,
    /// 0 for an entry no profile holds: a rule pointing at it leaves packets untouched.
    pub in_use: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<ProfileTreatment>() == 56);

/// What the classifier does to a packet of a rule under its profile's treatment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Treatment {
    pub dscp: u8,
    pub band: u8,
    pub priority_up: u32,
    pub priority_down: u32,
    pub police_up: Policer,
    pub police_down: Policer,
}

impl FlowRule {
    /// The priority of a packet in one direction.
    #[inline(always)]
    pub fn priority(&self, t: &ProfileTreatment, uplink: bool) -> u32 {
        match (uplink, self.own) {
            (true, own) if own & OWN_PRIORITY_UP != 0 => self.priority_up,
            (true, _) => t.priority_up,
            (false, own) if own & OWN_PRIORITY_DOWN != 0 => self.priority_down,
            (false, _) => t.priority_down,
        }
    }

    /// The policer of a packet in one direction.
    #[inline(always)]
    pub fn policer<'a>(&'a self, t: &'a ProfileTreatment, uplink: bool) -> &'a Policer {
        match (uplink, self.own) {
            (true, own) if own & OWN_POLICE_UP != 0 => &self.police_up,
            (true, _) => &t.police_up,
            (false, own) if own & OWN_POLICE_DOWN != 0 => &self.police_down,
            (false, _) => &t.police_down,
        }
    }

    /// Everything the classifier does to this rule's packets under `t`.
    pub fn treated(&self, t: &ProfileTreatment) -> Treatment {
        Treatment {
            dscp: t.dscp,
            band: t.band,
            priority_up: self.priority(t, true),
            priority_down: self.priority(t, false),
            police_up: *self.policer(t, true),
            police_down: *self.policer(t, false),
        }
    }
}

/// Every session of one device, as the classifier matches them (first `n` used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRules {
    pub n: u32,
    pub _pad: u32,
    pub rules: [FlowRule; MAX_SESSIONS_PER_DEVICE],
}
const _: () = assert!(size_of::<DeviceRules>() == 8 + 160 * MAX_SESSIONS_PER_DEVICE);

/// A maximum rate enforced in the classifier as a GCRA (virtual scheduling) token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policer {
    /// Nanoseconds one byte costs at the rate, in 48.16 fixed point; 0 disables the policer.
    pub ns_per_byte_q16: u64,
    /// How far the virtual clock may run ahead of real time: the burst, in nanoseconds.
    pub burst_ns: u64,
}
const _: () = assert!(size_of::<Policer>() == 16);

impl Policer {
    /// A policer for `rate_bps` allowing bursts of `burst_bytes`.
    pub const fn new(rate_bps: u64, burst_bytes: u64) -> Self {
        if rate_bps == 0 {
            return Self {
                ns_per_byte_q16: 0,
                burst_ns: 0,
            };
        }
        let q16 = (8_000_000_000u128 << 16) / rate_bps as u128;
        let q16 = if q16 > u64::MAX as u128 {
            u64::MAX
        } else {
            q16 as u64
        };
        Self {
            ns_per_byte_q16: q16,
            burst_ns: ((burst_bytes as u128 * q16 as u128) >> 16) as u64,
        }
    }

    /// This policer with the deeper of its own bucket and `other`'s (same rate).
    pub const fn max_burst(self, other: Self) -> Self {
        Self {
            ns_per_byte_q16: self.ns_per_byte_q16,
            burst_ns: if other.burst_ns > self.burst_ns {
                other.burst_ns
            } else {
                self.burst_ns
            },
        }
    }

    #[inline(always)]
    pub fn cost_ns(&self, bytes: u64) -> u64 {
        (bytes * self.ns_per_byte_q16) >> 16
    }

    /// Whether this policer may run on the coarse monotonic clock: a bucket at least
    /// [`COARSE_CLOCK_MIN_BURST_NS`] deep. That clock moves a tick at a time (4 ms at HZ=250,
    /// 10 ms at HZ=100), which moves the depth a burst really gets by up to one tick either way
    /// (see [`Policer::admit`]); against such a bucket that is a few per cent, and the long-run
    /// rate is exact whatever the clock.
    #[inline(always)]
    pub fn coarse_clock_ok(&self) -> bool {
        self.burst_ns >= COARSE_CLOCK_MIN_BURST_NS
    }

    /// The GCRA (virtual scheduling) decision for a packet of `len` bytes at `now`, given the
    /// session's virtual clock `tat`: an idle clock (behind `now`, the bucket full) restarts at
    /// `now` plus the packet's cost; one no more than the burst ahead of `now` advances by the
    /// cost; one further ahead refuses the packet.
    ///
    /// With `now` from a clock that lags real time by up to a tick, a refusal can come up to a
    /// tick early and a restart sets the clock up to a tick behind: the depth a burst gets is the
    /// burst give or take one tick, and the long-run rate is the same (every byte let through
    /// moves the clock by its exact cost).
    #[inline(always)]
    pub fn admit(&self, tat: u64, now: u64, len: u64) -> Admit {
        let cost = self.cost_ns(len);
        if tat < now {
            Admit::Restart(now + cost)
        } else if tat - now > self.burst_ns {
            Admit::Refuse
        } else {
            Admit::Advance(cost)
        }
    }
}

/// Policers whose bucket is at least this deep (100 ms) read the coarse monotonic clock, which
/// costs a fraction of the fine one; shallower ones read the fine clock. qodd's default bucket
/// (`policer_burst_ms`) is 250 ms.
pub const COARSE_CLOCK_MIN_BURST_NS: u64 = 100_000_000;

/// What [`Policer::admit`] decided for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Let through; the clock was idle and restarts at this value (a plain store: CPUs racing
    /// here all store about the same instant).
    Restart(u64),
    /// Let through; the clock advances by this cost (an atomic add on state all CPUs share).
    Advance(u64),
    /// Over the rate: drop.
    Refuse,
}

/// Per-session policer clocks (theoretical arrival times, `bpf_ktime_get_ns` nanoseconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicerState {
    pub up_tat: u64,
    pub down_tat: u64,
}
const _: () = assert!(size_of::<PolicerState>() == 16);

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
    /// Packets dropped by the maximum-rate policer, per direction.
    pub up_dropped: u64,
    pub down_dropped: u64,
    /// Bytes of those packets (so matched = let through + dropped, in bytes too).
    pub up_dropped_bytes: u64,
    pub down_dropped_bytes: u64,
}
const _: () = assert!(size_of::<FlowCounters>() == 64);

#[cfg(feature = "user")]
mod pod {
    use super::{
        BandCounters, DeviceKey, DeviceRules, FlowCounters, FlowRule, FragmentSlot, InterfaceInfo,
        ParseCounters, PolicerState, ProfileTreatment,
    };
    // SAFETY: all three are `#[repr(C)]`, made only of integers, with no implicit padding (sizes
    // asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for DeviceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicerState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DeviceRules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InterfaceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BandCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ParseCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragmentSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProfileTreatment {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// Runs a sender offering `offered_bps` in `len`-byte packets for `secs` through `p`, with
    /// the clock read `tick_ns` at a time (1 = the fine clock); returns the bytes let through.
    fn police(p: &Policer, offered_bps: u64, len: u64, secs: u64, tick_ns: u64) -> u64 {
        let gap = len * 8 * 1_000_000_000 / offered_bps;
        // An arbitrary start far from zero, not on a tick.
        let start = 7_777_777_777u64;
        let (mut tat, mut passed, mut t) = (0u64, 0u64, start);
        while t < start + secs * 1_000_000_000 {
            let now = t / tick_ns * tick_ns;
            match p.admit(tat, now, len) {
                Admit::Restart(v) => {
                    tat = v;
                    passed += len;
                }
                Admit::Advance(c) => {
                    tat += c;
                    passed += len;
                }
                Admit::Refuse => {}
            }
            t += gap;
        }
        passed
    }

    #[test]
    fn the_coarse_clock_keeps_the_rate_and_moves_the_burst_by_a_tick_at_most() {
        let rate = 20_000_000u64; // 20 Mbit/s
        let burst_ms = 250;
        let p = Policer::new(rate, rate / 8 * burst_ms / 1000);
        assert!(p.coarse_clock_ok());
        let (secs, len) = (20, 1500);
        // Offered at twice the rate: what passes is the rate over the run plus one bucket.
        let bucket = (rate / 8 * burst_ms / 1000) as f64;
        let ideal = (rate / 8 * secs) as f64 + bucket;
        for tick_ms in [4u64, 10] {
            let tick_ns = tick_ms * 1_000_000;
            let tick_bytes = (rate / 8 * tick_ms / 1000) as f64;
            let fine = police(&p, 2 * rate, len, secs, 1) as f64;
            let coarse = police(&p, 2 * rate, len, secs, tick_ns) as f64;
            assert!(
                (fine - ideal).abs() <= 2.0 * len as f64,
                "fine {fine} vs {ideal}"
            );
            assert!(
                (coarse - ideal).abs() <= tick_bytes + 2.0 * len as f64,
                "tick {tick_ms} ms: {coarse} vs {ideal} (a tick is {tick_bytes} bytes)"
            );
        }
        // Under the rate nothing is dropped, on either clock.
        let offered = (rate / 2 / 8 * secs) as f64;
        for tick_ns in [1, 4_000_000] {
            let under = police(&p, rate / 2, len, secs, tick_ns) as f64;
            assert!(
                (under - offered).abs() <= len as f64,
                "{under} vs {offered}"
            );
        }
    }

    #[test]
    fn fragment_slots_spread_datagrams() {
        // 4,096 datagrams of one flow pair (ids 0..4096) and of 4,096 devices (one id each):
        // each set lands on nearly as many distinct slots as a random choice would give.
        let key = |src: u32, id: u32| FragmentKey {
            src: [src, 0, 0, 0],
            dst: [0x0a00_0207, 0, 0, 0],
            id,
            protocol: 17,
            family: 4,
            _pad: [0; 2],
        };
        for keys in [
            (0..4096)
                .map(|id| key(0x0a00_0102, id))
                .collect::<std::vec::Vec<_>>(),
            (0..4096).map(|d| key(0x0a00_0000 | d, 7)).collect(),
        ] {
            let mut slots: std::vec::Vec<u32> = keys.iter().map(fragment_slot).collect();
            assert!(slots.iter().all(|s| *s < FRAGMENTS_ENTRIES));
            slots.sort_unstable();
            slots.dedup();
            // Random placement of 4,096 keys in 65,536 slots keeps about 3,971 distinct.
            assert!(slots.len() > 3_900, "{} distinct slots", slots.len());
        }
    }

    #[test]
    fn a_full_bucket_lets_one_burst_through_then_the_rate() {
        let p = Policer::new(8_000_000, 10_000); // 1 MB/s, 10 kB bucket: 10 ms deep
        assert!(!p.coarse_clock_ok());
        // Back to back at one instant: the bucket's worth (and the packet that reaches past it).
        let (mut tat, mut passed) = (0, 0);
        for _ in 0..100 {
            match p.admit(tat, 1_000_000_000, 1000) {
                Admit::Restart(v) => tat = v,
                Admit::Advance(c) => tat += c,
                Admit::Refuse => continue,
            }
            passed += 1000;
        }
        assert_eq!(passed, 11_000);
        assert_eq!(p.admit(tat, 1_000_000_000, 1), Admit::Refuse);
    }
}
