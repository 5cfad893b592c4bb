//! The qod tc classifier.
//!
//! Attached on the egress of every managed interface. For an IPv4 or IPv6 packet (optionally behind
//! up to two VLAN tags) it looks the destination, then the source, up in `QOD_FLOWS` as a device; on
//! a live entry whose server network and ports match the other end, it rewrites DSCP (ECN kept,
//! IPv4 checksum fixed incrementally), sets `skb->priority` and counts the packet. Anything else
//! passes untouched. The verdict is always "carry on" (`TC_ACT_UNSPEC`, which is `TCX_NEXT`), so
//! qod never drops or steals a packet and composes with other tc programs.
#![no_std]
#![no_main]
// `atomic_xadd`: the bpfel target has no compare-and-swap, so `AtomicU64::fetch_add` does not
// exist there; the intrinsic lowers to BPF's atomic add.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, see above")]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use qod_common::{
    Admit, BAND_COUNTERS_ENTRIES, BandCounters, DeviceRules, FAMILY_IPV4, FAMILY_IPV6,
    FRAGMENTS_ENTRIES, FlowCounters, FlowRule, FragmentKey, FragmentPorts, FragmentSlot,
    IFINDEX_MASK, InterfaceInfo, MAX_INTERFACES, MAX_PORT_RANGES, MAX_PROFILES,
    MAX_SESSIONS_PER_DEVICE, ParseCounters, Policer, PolicerState, PortRange, ProfileTreatment,
    SIDE_DOWNLINK, SIDE_UPLINK, band_counter_index, fragment_slot,
};

/// Default capacity; user space sets the configured `max_sessions` at load time. Every map is
/// pinned by name (in qodd's versioned pin directory), so the data plane outlives qodd.
const DEFAULT_MAX_SESSIONS: u32 = 65_536;

#[map]
static QOD_FLOWS_V4: HashMap<u32, DeviceRules> =
    HashMap::pinned(DEFAULT_MAX_SESSIONS, BPF_F_NO_PREALLOC);

#[map]
static QOD_FLOWS_V6: HashMap<[u32; 2], DeviceRules> =
    HashMap::pinned(DEFAULT_MAX_SESSIONS, BPF_F_NO_PREALLOC);

/// Side and counter slot of each managed interface, by `ifindex & IFINDEX_MASK` (zero, both
/// sides and slot 0, when unset).
#[map]
static QOD_INTERFACES: Array<InterfaceInfo> = Array::pinned(IFINDEX_MASK + 1, 0);

/// What each interface treated, per band.
#[map]
static QOD_BAND_COUNTERS: PerCpuArray<BandCounters> = PerCpuArray::pinned(BAND_COUNTERS_ENTRIES, 0);

/// Ports of fragmented datagrams whose first fragment matched a session, direct-mapped by
/// [`fragment_slot`].
#[map]
static QOD_FRAGMENTS: Array<FragmentSlot> = Array::pinned(FRAGMENTS_ENTRIES, 0);

/// What could not be parsed, and the fragments followed, per interface counter slot.
#[map]
static QOD_PARSE_COUNTERS: PerCpuArray<ParseCounters> = PerCpuArray::pinned(MAX_INTERFACES + 1, 0);

/// What each QoS profile does to its sessions' packets, by [`FlowRule::profile`].
#[map]
static QOD_PROFILES: Array<ProfileTreatment> = Array::pinned(MAX_PROFILES, 0);

#[map]
static QOD_POLICERS: Array<PolicerState> = Array::pinned(DEFAULT_MAX_SESSIONS, 0);

#[map]
static QOD_COUNTERS: PerCpuArray<FlowCounters> = PerCpuArray::pinned(DEFAULT_MAX_SESSIONS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HLEN: usize = 40;
/// Furthest offset a header is read at directly in the linear data; beyond it (long IPv6
/// extension chains) headers are copied out with `bpf_skb_load_bytes`, which also reaches
/// paged data.
const MAX_HEADER_OFFSET: usize = 1024;
/// IPv6 extension headers walked before giving up on finding the transport header (each may be
/// up to 2 KiB; the whole chain must lie in the first 64 KiB).
const MAX_IPV6_EXT_HEADERS: usize = 32;

/// Why a packet was left alone; every variant means "pass untouched".
enum Skip {
    /// The packet ends before the header we need.
    Truncated,
    /// Not IPv4/IPv6, or no session covers it.
    NoMatch,
}

#[classifier]
pub fn qod_tc(ctx: TcContext) -> i32 {
    match try_qod_tc(&ctx) {
        Ok(verdict) => verdict,
        Err(Skip::Truncated) | Err(Skip::NoMatch) => TC_ACT_UNSPEC,
    }
}

/// Bounds-checked pointer to a `T` at `off` bytes into the packet's linear data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*mut T, Skip> {
    // Headers we read all lie in the first bytes; the explicit bound also keeps the verifier's
    // knowledge of `off` when it was spilled to the stack.
    if off > MAX_HEADER_OFFSET {
        return Err(Skip::Truncated);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(Skip::Truncated);
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Skip> {
    // SAFETY: ptr_at checked that `size_of::<T>()` bytes at `off` lie inside the packet; the read
    // is unaligned because packet headers carry no alignment guarantee.
    Ok(unsafe { core::ptr::read_unaligned(ptr_at::<T>(ctx, off)?) })
}

/// The addressing of one packet, as far as classification needs it.
struct Packet {
    family: u32,
    /// Offset of the IP header.
    l3: usize,
    src: [u32; 4],
    dst: [u32; 4],
    /// `Some((src_port, dst_port))` for TCP/UDP with a readable header in the first fragment.
    ports: Option<(u16, u16)>,
    /// What fragment of a larger datagram the packet is (plain scalars, always set: the
    /// verifier refuses a spill of an undefined register, which an `Option` can compile to).
    fragment: Fragment,
    /// The IPv6 extension chain is longer than the classifier walks.
    chain_too_long: bool,
}

/// A fragment of a datagram: its identification, transport protocol, and which one it is.
#[derive(Clone, Copy)]
struct Fragment {
    id: u32,
    protocol: u8,
    kind: u8,
}

/// [`Fragment::kind`]: not a fragment, the first one (carrying the transport header), a later one.
const NOT_FRAGMENT: u8 = 0;
const FIRST_FRAGMENT: u8 = 1;
const LATER_FRAGMENT: u8 = 2;

impl Fragment {
    const NONE: Self = Self {
        id: 0,
        protocol: 0,
        kind: NOT_FRAGMENT,
    };
}

impl Packet {
    fn fragment_key(&self, f: &Fragment) -> FragmentKey {
        FragmentKey {
            src: self.src,
            dst: self.dst,
            id: f.id,
            protocol: f.protocol,
            family: self.family as u8,
            _pad: [0; 2],
        }
    }
}

/// [`ParseCounters`] fields, as word indexes (the struct is four `u64`s).
const CHAIN_TOO_LONG: usize = 0;
const FRAGMENTS_REMEMBERED: usize = 1;
const FRAGMENTS_FOLLOWED: usize = 2;
const FRAGMENTS_UNKNOWN: usize = 3;
const _: () = assert!(core::mem::size_of::<ParseCounters>() == 4 * 8);

/// Adds one to word `field` of an interface's parse counters.
#[inline(always)]
fn count_parse(slot: u32, field: usize) {
    if let Some(c) = QOD_PARSE_COUNTERS.get_ptr_mut(slot & MAX_INTERFACES) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and this program is not re-entered on
        // the same CPU while it runs; `field & 3` stays inside the four words.
        unsafe { *c.cast::<u64>().add(field & 3) += 1 };
    }
}

fn try_qod_tc(ctx: &TcContext) -> Result<i32, Skip> {
    // SAFETY: the context pointer the kernel handed us; `ifindex` is readable from tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // An index past the map is never aliased onto another interface's side: look both ways.
    let iface = if ifindex > IFINDEX_MASK {
        InterfaceInfo::default()
    } else {
        QOD_INTERFACES.get(ifindex).copied().unwrap_or_default()
    };
    let sides = iface.side;
    let slot = u32::from(iface.counters);
    let mut pkt = parse(ctx)?;
    if pkt.chain_too_long {
        count_parse(slot, CHAIN_TOO_LONG);
    }
    // A later fragment has no transport header: it takes the ports its first fragment had,
    // when that one matched a session.
    if pkt.fragment.kind == LATER_FRAGMENT {
        let key = pkt.fragment_key(&pkt.fragment);
        match QOD_FRAGMENTS.get(fragment_slot(&key)) {
            Some(s) if s.key == key => {
                pkt.ports = Some((s.ports.src, s.ports.dst));
                count_parse(slot, FRAGMENTS_FOLLOWED);
            }
            _ => count_parse(slot, FRAGMENTS_UNKNOWN),
        }
    }
    // Downlink: the destination is a device. Uplink: the source is.
    let down = || lookup(&pkt, pkt.dst, pkt.src, false);
    let up = || lookup(&pkt, pkt.src, pkt.dst, true);
    let ((rule, now), uplink) = match sides {
        SIDE_DOWNLINK => (down().ok_or(Skip::NoMatch)?, false),
        SIDE_UPLINK => (up().ok_or(Skip::NoMatch)?, true),
        _ => match down() {
            Some(found) => (found, false),
            None => (up().ok_or(Skip::NoMatch)?, true),
        },
    };
    // The session's profile: DSCP, band, and the priority and policer the rule does not set
    // itself. An entry not in use (never written, or taken out of use) treats nothing.
    let profile = match QOD_PROFILES.get(u32::from(rule.profile)) {
        Some(p) if p.in_use != 0 => p,
        _ => return Err(Skip::NoMatch),
    };

    if pkt.fragment.kind == FIRST_FRAGMENT
        && let Some((src, dst)) = pkt.ports
    {
        let key = pkt.fragment_key(&pkt.fragment);
        if let Some(s) = QOD_FRAGMENTS.get_ptr_mut(fragment_slot(&key)) {
            // SAFETY: `s` points into an array map value that lives as long as the map. The
            // ports are stored before the key, so a reader on another CPU that sees this key
            // sees these ports; two first fragments racing for one slot at the same instant can
            // leave one's key with the other's ports, a fragment treated as the other flow.
            unsafe {
                core::ptr::write_volatile(&raw mut (*s).ports, FragmentPorts { src, dst });
                core::ptr::write_volatile(&raw mut (*s).key, key);
            }
            count_parse(slot, FRAGMENTS_REMEMBERED);
        }
    }

    let len = u64::from(ctx.len());
    let conforms = police(rule.policer(profile, uplink), rule.slot, uplink, len, now);
    if let Some(c) = QOD_COUNTERS.get_ptr_mut(rule.slot) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and this program is not re-entered on
        // the same CPU while it runs.
        unsafe {
            match (uplink, conforms) {
                (true, true) => {
                    (*c).up_packets += 1;
                    (*c).up_bytes += len;
                }
                (false, true) => {
                    (*c).down_packets += 1;
                    (*c).down_bytes += len;
                }
                (true, false) => {
                    (*c).up_dropped += 1;
                    (*c).up_dropped_bytes += len;
                }
                (false, false) => {
                    (*c).down_dropped += 1;
                    (*c).down_dropped_bytes += len;
                }
            }
        }
    }
    if let Some(b) = QOD_BAND_COUNTERS.get_ptr_mut(band_counter_index(iface.counters, profile.band))
    {
        // SAFETY: a per-CPU slot, as above.
        unsafe {
            if conforms {
                (*b).packets += 1;
                (*b).bytes += len;
            } else {
                (*b).policer_dropped_packets += 1;
                (*b).policer_dropped_bytes += len;
            }
        }
    }
    if !conforms {
        return Ok(TC_ACT_SHOT);
    }

    set_dscp(ctx, &pkt, profile.dscp)?;
    let priority = rule.priority(profile, uplink);
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel handed us; `priority` is writable
    // from tc programs.
    unsafe { (*ctx.skb.skb).priority = priority };
    Ok(TC_ACT_UNSPEC)
}

/// GCRA ([`Policer::admit`]): a packet conforms when the session's virtual clock (`tat`) is no
/// more than the burst ahead of now; a conforming packet advances it by the packet's cost. The
/// advance is an atomic add on state shared by all CPUs; the reset of an idle clock to now is a
/// plain store (two CPUs racing there both store about the same instant).
///
/// A deep bucket uses the coarse clock the look-up read (`coarse_now`), a shallow one reads the
/// fine clock: see [`Policer::coarse_clock_ok`].
#[inline(always)]
fn police(p: &Policer, slot: u32, uplink: bool, len: u64, coarse_now: u64) -> bool {
    if p.ns_per_byte_q16 == 0 {
        return true;
    }
    let Some(state) = QOD_POLICERS.get_ptr_mut(slot) else {
        return true;
    };
    let now = if p.coarse_clock_ok() {
        coarse_now
    } else {
        // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
        unsafe { bpf_ktime_get_ns() }
    };
    // SAFETY: `state` points into an array map value that lives as long as the map; the clock is
    // only ever accessed through these single-word loads, stores and atomic adds.
    unsafe {
        let tat = if uplink {
            &raw mut (*state).up_tat
        } else {
            &raw mut (*state).down_tat
        };
        match p.admit(core::ptr::read_volatile(tat), now, len) {
            Admit::Restart(t) => core::ptr::write_volatile(tat, t),
            Admit::Advance(cost) => {
                core::intrinsics::atomic_xadd::<
                    u64,
                    u64,
                    { core::intrinsics::AtomicOrdering::Relaxed },
                >(tat, cost);
            }
            Admit::Refuse => return false,
        }
    }
    true
}

/// The live rule of `device` whose server network and ports match the other end; when several
/// do, the one with the most specific server network. With it, the coarse clock, read once a
/// device is found (the policer reuses it).
#[inline(always)]
fn lookup(
    pkt: &Packet,
    device: [u32; 4],
    server: [u32; 4],
    uplink: bool,
) -> Option<(&'static FlowRule, u64)> {
    let rules = if pkt.family == FAMILY_IPV4 {
        QOD_FLOWS_V4.get_ptr(device[0])?
    } else {
        QOD_FLOWS_V6.get_ptr([device[0], device[1]])?
    };
    // SAFETY: the maps are BPF_F_NO_PREALLOC, so an entry replaced or deleted by user space stays
    // valid until this program returns (RCU); nothing here outlives that.
    let rules: &'static DeviceRules = unsafe { &*rules };
    // Expiry reads the coarse monotonic clock (same epoch, at most a tick behind, much cheaper
    // than the fine one). Read once, before the rules, so every path through them carries the
    // same value.
    // SAFETY: bpf_ktime_get_coarse_ns takes no arguments and cannot fail.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut best: Option<&'static FlowRule> = None;
    let mut i = 0;
    while i < MAX_SESSIONS_PER_DEVICE {
        if i >= rules.n as usize {
            break;
        }
        let rule = &rules.rules[i];
        i += 1;
        if best.is_some_and(|b| b.server_prefix_len >= rule.server_prefix_len)
            || (rule.expires_at_ns != 0 && now >= rule.expires_at_ns)
            || !matches(pkt, rule, server, uplink)
        {
            continue;
        }
        best = Some(rule);
    }
    best.map(|rule| (rule, now))
}

#[inline(always)]
fn matches(pkt: &Packet, rule: &FlowRule, server: [u32; 4], uplink: bool) -> bool {
    // An IPv4 address is the first word (the others are zero in the packet and the rule alike).
    let words = if pkt.family == FAMILY_IPV4 { 1 } else { 4 };
    let mut i = 0;
    while i < 4 {
        if i >= words {
            break;
        }
        if server[i] & rule.server_mask[i] != rule.server_addr[i] {
            return false;
        }
        i += 1;
    }
    if rule.needs_ports() {
        let Some((sport, dport)) = pkt.ports else {
            return false;
        };
        let (device_port, server_port) = if uplink {
            (sport, dport)
        } else {
            (dport, sport)
        };
        if !in_ranges(&rule.device_ports, rule.n_device_ports, device_port)
            || !in_ranges(&rule.server_ports, rule.n_server_ports, server_port)
        {
            return false;
        }
    }
    true
}

/// True when `n` is 0 (no constraint) or `port` falls in one of the first `n` ranges. User space
/// merges a request's ports into sorted, disjoint ranges and leaves the unused entries zero, so
/// the first entry that ends at or after `port` decides: a used one holds it or nothing does,
/// and an unused one (0..=0) is only reached by port 0, which it does not hold. One comparison
/// for each entry before it, and `n` read once.
#[inline(always)]
fn in_ranges(ranges: &[PortRange; MAX_PORT_RANGES], n: u8, port: u16) -> bool {
    if n == 0 {
        return true;
    }
    let mut i = 0;
    while i < MAX_PORT_RANGES {
        if port <= ranges[i].to {
            return i < n as usize && ranges[i].from <= port;
        }
        i += 1;
    }
    false
}

fn parse(ctx: &TcContext) -> Result<Packet, Skip> {
    let mut off = ETH_HLEN;
    let mut proto = u16::from_be(load::<u16>(ctx, 12)?);
    // Up to two VLAN tags (802.1Q, or QinQ with an 802.1ad outer tag).
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be(load::<u16>(ctx, off + 2)?);
        off += 4;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = u16::from_be(load::<u16>(ctx, off + 2)?);
            off += 4;
        }
    }
    match proto {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => Err(Skip::NoMatch),
    }
}

fn parse_ipv4(ctx: &TcContext, l3: usize) -> Result<Packet, Skip> {
    let vihl = load::<u8>(ctx, l3)?;
    if vihl >> 4 != 4 {
        return Err(Skip::NoMatch);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(Skip::NoMatch);
    }
    // Make sure the whole fixed header is there before reading the addresses.
    load::<[u8; 20]>(ctx, l3)?;
    let frag = u16::from_be(load::<u16>(ctx, l3 + 6)?);
    let protocol = load::<u8>(ctx, l3 + 9)?;
    let src = load::<u32>(ctx, l3 + 12)?;
    let dst = load::<u32>(ctx, l3 + 16)?;
    // Only a first (or unfragmented) packet carries the transport header.
    let first_fragment = frag & 0x1fff == 0;
    let more_fragments = frag & 0x2000 != 0;
    let ports = if first_fragment {
        l4_ports(ctx, protocol, l3 + ihl)
    } else {
        None
    };
    let fragment = Fragment {
        id: u32::from(load::<u16>(ctx, l3 + 4)?),
        protocol,
        kind: if !first_fragment {
            LATER_FRAGMENT
        } else if more_fragments {
            FIRST_FRAGMENT
        } else {
            NOT_FRAGMENT
        },
    };
    Ok(Packet {
        family: FAMILY_IPV4,
        l3,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        ports,
        fragment,
        chain_too_long: false,
    })
}

fn parse_ipv6(ctx: &TcContext, l3: usize) -> Result<Packet, Skip> {
    let first = load::<u8>(ctx, l3)?;
    if first >> 4 != 6 {
        return Err(Skip::NoMatch);
    }
    let src = load::<[u32; 4]>(ctx, l3 + 8)?;
    let dst = load::<[u32; 4]>(ctx, l3 + 24)?;
    let mut next = load::<u8>(ctx, l3 + 6)?;
    let mut off = l3 + IPV6_HLEN;
    let mut fragment = Fragment::NONE;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        let kind = next;
        if !is_ipv6_extension(kind) {
            break;
        }
        // Every extension header is at least 8 bytes: one copy serves each kind. The kernel
        // copies it (`bpf_skb_load_bytes`), so deep or paged headers are reached too, and the
        // verifier sees one path per header instead of a tree of bounds checks.
        let hdr = ctx.load::<[u8; 8]>(off).map_err(|_| Skip::Truncated)?;
        next = hdr[0];
        if kind == 44 {
            // Fragment header: fixed 8 bytes; a non-zero offset means no transport header.
            let first = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 == 0;
            fragment = Fragment {
                id: u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
                protocol: next,
                kind: if first {
                    FIRST_FRAGMENT
                } else {
                    LATER_FRAGMENT
                },
            };
            off += 8;
            // What follows a later fragment's header is payload, not headers.
            if !first {
                break;
            }
        } else if kind == 51 {
            // Authentication header: length in 4-octet units, minus 2.
            off += (usize::from(hdr[1]) + 2) * 4;
        } else {
            // The others: length in 8-octet units, not counting the first 8.
            off += (usize::from(hdr[1]) + 1) * 8;
        }
        // A bound the verifier can hold across iterations (the chain must lie in 64 KiB).
        if off > 0xffff {
            return Err(Skip::Truncated);
        }
        i += 1;
    }
    let later_fragment = fragment.kind == LATER_FRAGMENT;
    let chain_too_long = !later_fragment && is_ipv6_extension(next);
    let ports = if chain_too_long || later_fragment {
        None
    } else {
        l4_ports(ctx, next, off)
    };
    Ok(Packet {
        family: FAMILY_IPV6,
        l3,
        src,
        dst,
        ports,
        fragment,
        chain_too_long,
    })
}

/// Hop-by-hop, routing, fragment, authentication, destination options, mobility, HIP, shim6.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// Reads a `T` at `off`: straight from the linear data when it lies there, else copied out by
/// the kernel (deep offsets, paged data).
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Skip> {
    match load::<T>(ctx, off) {
        Ok(v) => Ok(v),
        Err(_) if off <= 0xffff => ctx.load::<T>(off).map_err(|_| Skip::Truncated),
        Err(e) => Err(e),
    }
}

#[inline(always)]
fn l4_ports(ctx: &TcContext, protocol: u8, off: usize) -> Option<(u16, u16)> {
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let ports = read::<[u16; 2]>(ctx, off).ok()?;
    Some((u16::from_be(ports[0]), u16::from_be(ports[1])))
}

/// Rewrites the DSCP bits, keeping ECN.
#[inline(always)]
fn set_dscp(ctx: &TcContext, pkt: &Packet, dscp: u8) -> Result<(), Skip> {
    if pkt.family == FAMILY_IPV4 {
        // One bounds check covers version/IHL, TOS and the checksum (bytes 0..12).
        let hdr = ptr_at::<[u8; 12]>(ctx, pkt.l3)?;
        // SAFETY: bounds-checked by ptr_at; tc programs may write packet data.
        unsafe {
            let vihl = (*hdr)[0];
            let old = (*hdr)[1];
            let new = (dscp << 2) | (old & 0x03);
            if old == new {
                return Ok(());
            }
            (*hdr)[1] = new;
            // RFC 1624 incremental update, HC' = ~(~HC + ~m + m'), on the 16-bit word holding
            // version/IHL and TOS; the version/IHL byte is unchanged so only the low byte moves.
            let old_word = u32::from(u16::from_be_bytes([vihl, old]));
            let new_word = u32::from(u16::from_be_bytes([vihl, new]));
            let hc = u32::from(u16::from_be_bytes([(*hdr)[10], (*hdr)[11]]));
            let mut sum = (!hc & 0xffff) + (!old_word & 0xffff) + new_word;
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            let [c0, c1] = (!(sum as u16)).to_be_bytes();
            (*hdr)[10] = c0;
            (*hdr)[11] = c1;
        }
    } else {
        let p = ptr_at::<[u8; 2]>(ctx, pkt.l3)?;
        // SAFETY: bounds-checked by ptr_at; tc programs may write packet data.
        unsafe {
            let [b0, b1] = *p;
            // Version (4 bits) | traffic class (8) | flow label (20): TC straddles b0 and b1.
            let tc = (b0 << 4) | (b1 >> 4);
            let new_tc = (dscp << 2) | (tc & 0x03);
            *p = [(b0 & 0xf0) | (new_tc >> 4), (new_tc << 4) | (b1 & 0x0f)];
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
