//! The classifier on crafted packets through `BPF_PROG_TEST_RUN`: every branch that can see a
//! packet. Needs root (loads eBPF).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use qod_common::{
    BAND_GUARANTEED, DeviceKey, FlowRule, FragmentKey, MAX_PORT_RANGES, OWN_POLICE_DOWN,
    OWN_POLICE_UP, OWN_PRIORITY_DOWN, OWN_PRIORITY_UP, Policer, PortRange, ProfileTreatment,
    fragment_slot,
};
use qod_daemon::{
    config::Side,
    dataplane::{AyaDataPlane, DataPlane as _, monotonic_ns},
    model::{ipv4_key, ipv6_key, network_words},
};
use qod_testkit::bpf::{checksum, eth, ipv4, ipv6, l4, test_run};

/// TC_ACT_UNSPEC: the classifier never decides a packet's fate, except the policer's drops.
const CARRY_ON: i32 = -1;
/// TC_ACT_SHOT: dropped by the maximum-rate policer.
const DROP: i32 = 2;
const DSCP: u8 = 46;
const PRIO: u32 = 0x0001_0010;
const UDP: u8 = 17;
const TCP: u8 = 6;

const DEV4: [u8; 4] = [10, 0, 1, 2];
const SRV4: [u8; 4] = [10, 0, 2, 2];
const DEV6: &str = "fd00:1::2";
const SRV6: &str = "fd00:2::2";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().expect("ipv6").octets()
}

struct Harness {
    dp: AyaDataPlane,
}

fn rule(
    server: IpNetwork,
    device_ports: &[(u16, u16)],
    server_ports: &[(u16, u16)],
    slot: u32,
) -> FlowRule {
    let (server_addr, server_mask) = network_words(server);
    let fill = |src: &[(u16, u16)]| {
        let mut out = [PortRange::default(); MAX_PORT_RANGES];
        for (o, &(from, to)) in out.iter_mut().zip(src) {
            *o = PortRange { from, to };
        }
        out
    };
    // The priorities and policers are the rule's own (as a session's classes make them); DSCP
    // and band come from profile entry 0 (see `Harness::new`).
    FlowRule {
        expires_at_ns: monotonic_ns() + 600_000_000_000,
        priority_up: PRIO,
        priority_down: PRIO,
        slot,
        server_addr,
        server_mask,
        own: OWN_PRIORITY_UP | OWN_PRIORITY_DOWN | OWN_POLICE_UP | OWN_POLICE_DOWN,
        server_prefix_len: server.prefix(),
        n_device_ports: device_ports.len() as u8,
        n_server_ports: server_ports.len() as u8,
        device_ports: fill(device_ports),
        server_ports: fill(server_ports),
        profile: 0,
        _reserved: [0; 6],
        police_up: Policer::default(),
        police_down: Policer::default(),
    }
}

/// A profile entry in use that marks `dscp` and sets `priority`, without a policer.
fn treatment(dscp: u8, priority: u32) -> ProfileTreatment {
    ProfileTreatment {
        dscp,
        priority_up: priority,
        priority_down: priority,
        in_use: 1,
        ..ProfileTreatment::default()
    }
}

impl Harness {
    fn new() -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "loading eBPF needs root: run through cargo xtask test"
        );
        let mut dp = AyaDataPlane::load_ephemeral(1024).expect("load classifier");
        dp.set_profile(0, &treatment(DSCP, 0)).expect("profile");
        // IPv4: device 10.0.1.2 ↔ 10.0.2.0/24, server ports 5000-5010 and 6000.
        let r4 = rule(
            "10.0.2.0/24".parse().expect("net"),
            &[],
            &[(5000, 5010), (6000, 6000)],
            1,
        );
        dp.reset_counters(1).expect("reset");
        dp.install(ipv4_key(Ipv4Addr::from(DEV4)), &[r4])
            .expect("install v4");
        // IPv6: device fd00:1::/64 ↔ fd00:2::2/128, device port 40000.
        let r6 = rule(
            "fd00:2::2/128".parse().expect("net"),
            &[(40000, 40000)],
            &[],
            2,
        );
        dp.reset_counters(2).expect("reset");
        dp.install(ipv6_key(DEV6.parse().expect("v6")), &[r6])
            .expect("install v6");
        Self { dp }
    }

    fn run(&self, frame: &[u8]) -> qod_testkit::bpf::RunResult {
        let r = self.run_any(frame);
        assert_eq!(
            r.retval, CARRY_ON,
            "the classifier must not drop or redirect here"
        );
        r
    }

    fn run_any(&self, frame: &[u8]) -> qod_testkit::bpf::RunResult {
        test_run(self.dp.program_fd().expect("fd"), frame, 1).expect("test run")
    }

    /// Asserts the frame left untouched (bytes and priority).
    fn untouched(&self, frame: &[u8], what: &str) {
        let r = self.run(frame);
        assert_eq!(r.data, frame, "{what}: packet modified");
        assert_eq!(r.priority, 0, "{what}: priority set");
    }
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tos: u8) -> Vec<u8> {
    eth(
        0x0800,
        &[],
        &ipv4(src, dst, UDP, tos, &[], 0, &l4(UDP, sport, dport, 32)),
    )
}

#[test]
fn ipv4_match_rewrites_dscp_keeps_ecn_fixes_checksum_and_counts() {
    let h = Harness::new();
    // Uplink, ECN = ECT(0).
    let frame = udp4(DEV4, SRV4, 40000, 5005, 0x02);
    let r = h.run(&frame);
    let ip = &r.data[14..34];
    assert_eq!(ip[1], (DSCP << 2) | 0x02, "DSCP set, ECN kept");
    assert_eq!(checksum(ip), 0, "IPv4 header checksum still verifies");
    assert_eq!(r.priority, PRIO);
    assert_eq!(&r.data[..14], &frame[..14]);
    assert_eq!(&r.data[34..], &frame[34..], "payload untouched");
    // Downlink from the second server port range entry.
    let r = h.run(&udp4(SRV4, DEV4, 6000, 40000, 0));
    assert_eq!(r.data[15] >> 2, DSCP);
    let c = h.dp.counters(1).expect("counters");
    assert_eq!((c.up_packets, c.up_bytes), (1, frame.len() as u64));
    assert_eq!(c.down_packets, 1);
}

#[test]
fn ipv4_non_matching_packets_pass_untouched() {
    let h = Harness::new();
    h.untouched(
        &udp4(DEV4, [10, 0, 3, 2], 40000, 5005, 0),
        "server outside the subnet",
    );
    h.untouched(
        &udp4(DEV4, SRV4, 40000, 5011, 0),
        "server port outside the ranges",
    );
    h.untouched(&udp4([10, 0, 1, 3], SRV4, 40000, 5005, 0), "another device");
    h.untouched(
        &udp4(SRV4, DEV4, 40000, 5005, 0),
        "downlink from a port outside the ranges",
    );
    let icmp = eth(
        0x0800,
        &[],
        &ipv4(DEV4, SRV4, 1, 0, &[], 0, &[8, 0, 0, 0, 0, 0, 0, 0]),
    );
    h.untouched(&icmp, "ICMP when the session names ports");
    let c = h.dp.counters(1).expect("counters");
    assert_eq!(c.up_packets + c.down_packets, 0, "nothing counted");
}

#[test]
fn ipv4_with_options_vlan_and_fragments() {
    let h = Harness::new();
    // IHL 7: two option words (NOPs, then end-of-list) shift the UDP header.
    let opts = [1, 1, 1, 1, 1, 1, 1, 0];
    let body = l4(UDP, 40000, 5000, 16);
    let r = h.run(&eth(
        0x0800,
        &[],
        &ipv4(DEV4, SRV4, UDP, 0, &opts, 0, &body),
    ));
    assert_eq!(r.data[15] >> 2, DSCP, "options: ports read past them");
    assert_eq!(checksum(&r.data[14..14 + 28]), 0);
    // Ports must be read after the options: here the option bytes right after the fixed header
    // look like ports 5000/5000, but the real ports (7000) are outside the session's ranges.
    let with_opts = eth(
        0x0800,
        &[],
        &ipv4(
            DEV4,
            SRV4,
            UDP,
            0,
            &[0x13, 0x88, 0x13, 0x88, 1, 1, 1, 0],
            0,
            &l4(UDP, 40000, 7000, 16),
        ),
    );
    h.untouched(&with_opts, "option bytes are not ports");
    // One and two VLAN tags.
    let inner = ipv4(DEV4, SRV4, UDP, 0, &[], 0, &l4(UDP, 40000, 5000, 16));
    let r = h.run(&eth(0x0800, &[100], &inner));
    assert_eq!(r.data[18 + 1] >> 2, DSCP, "802.1Q");
    let r = h.run(&eth(0x0800, &[100, 200], &inner));
    assert_eq!(r.data[22 + 1] >> 2, DSCP, "QinQ");
    // First fragment (MF, offset 0) carries the ports: matched, and its ports remembered. A
    // later fragment of the same datagram (same addresses, protocol and id) has no transport
    // header but gets the same treatment; one of another datagram cannot be claimed by a
    // session that names ports.
    let before = h.dp.parse_counters_at(0).expect("parse counters");
    let r = h.run(&eth(
        0x0800,
        &[],
        &ipv4(DEV4, SRV4, UDP, 0, &[], 0x2000, &l4(UDP, 40000, 5000, 16)),
    ));
    assert_eq!(r.data[15] >> 2, DSCP, "first fragment");
    let later = eth(
        0x0800,
        &[],
        &ipv4(DEV4, SRV4, UDP, 0, &[], 0x0010, &[0x5a; 24]),
    );
    let r = h.run(&later);
    assert_eq!(
        r.data[15] >> 2,
        DSCP,
        "a later fragment of the same datagram"
    );
    assert_eq!(checksum(&r.data[14..34]), 0);
    let mut other = later.clone();
    other[18..20].copy_from_slice(&[0x43, 0x21]);
    other[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&other[14..34]);
    other[24..26].copy_from_slice(&c.to_be_bytes());
    h.untouched(&other, "a later fragment of another datagram");
    let after = h.dp.parse_counters_at(0).expect("parse counters");
    assert_eq!(
        (
            after.fragments_remembered - before.fragments_remembered,
            after.fragments_followed - before.fragments_followed,
            after.fragments_unknown - before.fragments_unknown,
        ),
        (1, 1, 1)
    );
}

/// Fragment slots are direct-mapped: a datagram whose first fragment lands on the slot another
/// datagram holds takes it over, and the other's later fragments then pass untouched (counted
/// unknown) while its own follow.
#[test]
fn a_datagram_landing_on_a_taken_fragment_slot_takes_it_over() {
    let h = Harness::new();
    // The key as the classifier reads it: addresses and id as they lie in the packet.
    let key = |dst: [u8; 4], id: [u8; 2]| FragmentKey {
        src: [u32::from_ne_bytes(DEV4), 0, 0, 0],
        dst: [u32::from_ne_bytes(dst), 0, 0, 0],
        id: u32::from(u16::from_ne_bytes(id)),
        protocol: UDP,
        family: 4,
        _pad: [0; 2],
    };
    // Datagram A goes to SRV4 with the ipv4 helper's id; B to another server of the session's
    // /24, with an id that puts it on A's slot.
    let a_id = [0x12, 0x34];
    let a = fragment_slot(&key(SRV4, a_id));
    let (b_dst, b_id) = (1..=254u8)
        .flat_map(|host| (0..=u16::MAX).map(move |id| ([10, 0, 2, host], id.to_be_bytes())))
        .find(|&(dst, id)| (dst, id) != (SRV4, a_id) && fragment_slot(&key(dst, id)) == a)
        .expect("a datagram on A's slot");
    let frame = |dst: [u8; 4], id: [u8; 2], frag: u16, body: &[u8]| {
        let mut f = eth(0x0800, &[], &ipv4(DEV4, dst, UDP, 0, &[], frag, body));
        f[18..20].copy_from_slice(&id);
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    let first = |dst, id| frame(dst, id, 0x2000, &l4(UDP, 40000, 5000, 16));
    let later = |dst, id| frame(dst, id, 0x0010, &[0x5a; 24]);
    let before = h.dp.parse_counters_at(0).expect("parse counters");
    assert_eq!(h.run(&first(SRV4, a_id)).data[15] >> 2, DSCP, "A's first");
    assert_eq!(h.run(&first(b_dst, b_id)).data[15] >> 2, DSCP, "B's first");
    h.untouched(
        &later(SRV4, a_id),
        "A's later fragment, its slot taken by B",
    );
    assert_eq!(
        h.run(&later(b_dst, b_id)).data[15] >> 2,
        DSCP,
        "B's later fragment"
    );
    let after = h.dp.parse_counters_at(0).expect("parse counters");
    assert_eq!(
        (
            after.fragments_remembered - before.fragments_remembered,
            after.fragments_followed - before.fragments_followed,
            after.fragments_unknown - before.fragments_unknown,
        ),
        (2, 1, 1)
    );
}

/// IPv6: fragments follow their first one, and extension chains are walked up to 32 headers of
/// any size (each up to 2 KiB, copied out past the first KiB); a longer chain is counted.
#[test]
fn ipv6_fragments_and_long_extension_chains() {
    let h = Harness::new();
    let dscp_of = |data: &[u8]| ((u16::from_be_bytes([data[14], data[15]]) >> 4) as u8) >> 2;
    // Fragment header: next header (filled in by ipv6()), reserved, offset|M, id.
    let frag = |offset_units: u16, more: bool, id: u32| {
        let word = (offset_units << 3) | u16::from(more);
        let mut v = vec![0];
        v.extend_from_slice(&word.to_be_bytes());
        v.extend_from_slice(&id.to_be_bytes());
        (44u8, v)
    };
    let first = eth(
        0x86dd,
        &[],
        &ipv6(
            v6(DEV6),
            v6(SRV6),
            UDP,
            0,
            0,
            &[frag(0, true, 7)],
            &l4(UDP, 40000, 443, 16),
        ),
    );
    assert_eq!(dscp_of(&h.run(&first).data), DSCP, "first fragment");
    let later = |id: u32| {
        eth(
            0x86dd,
            &[],
            &ipv6(
                v6(DEV6),
                v6(SRV6),
                UDP,
                0,
                0,
                &[frag(3, false, id)],
                &[0x5a; 24],
            ),
        )
    };
    assert_eq!(
        dscp_of(&h.run(&later(7)).data),
        DSCP,
        "a later fragment follows"
    );
    h.untouched(&later(8), "a later fragment of another datagram");

    let before = h.dp.parse_counters_at(0).expect("parse counters");
    let dst_opts = |len_units: u8| {
        (60u8, {
            // PadN filling the header: 2 + 8·len_units − 2 bytes after next-header and length.
            let total = 8 * (usize::from(len_units) + 1);
            let mut v = vec![len_units, 1, (total - 4) as u8];
            v.resize(total - 1, 0);
            v
        })
    };
    let chain = |n: usize| vec![dst_opts(0); n];
    let through = |ext: &[(u8, Vec<u8>)]| {
        eth(
            0x86dd,
            &[],
            &ipv6(v6(DEV6), v6(SRV6), UDP, 0, 0, ext, &l4(UDP, 40000, 443, 16)),
        )
    };
    assert_eq!(
        dscp_of(&h.run(&through(&chain(31))).data),
        DSCP,
        "31 headers"
    );
    // One 2 KiB header: the transport header lies past the first KiB.
    assert_eq!(
        dscp_of(&h.run(&through(&[dst_opts(255)])).data),
        DSCP,
        "a 2 KiB header"
    );
    h.untouched(&through(&chain(40)), "40 headers: beyond the walk");
    let after = h.dp.parse_counters_at(0).expect("parse counters");
    assert_eq!(after.ipv6_chain_too_long - before.ipv6_chain_too_long, 1);
}

#[test]
fn ipv6_match_through_extension_headers_and_prefix() {
    let h = Harness::new();
    // Hop-by-hop (8 bytes) and destination options (16 bytes) before TCP.
    let hbh = (0u8, vec![0, 1, 4, 0, 0, 0, 0]);
    let dst_opts = (60u8, vec![1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Another host of the device's /64 is the same device.
    let dev = v6("fd00:1::abcd");
    let pkt = ipv6(
        dev,
        v6(SRV6),
        TCP,
        0x01,
        0xabcde,
        &[hbh, dst_opts],
        &l4(TCP, 40000, 443, 10),
    );
    let frame = eth(0x86dd, &[], &pkt);
    let r = h.run(&frame);
    let first = u32::from_be_bytes([r.data[14], r.data[15], r.data[16], r.data[17]]);
    assert_eq!(first >> 28, 6, "version kept");
    assert_eq!(
        ((first >> 20) & 0xff) as u8,
        (DSCP << 2) | 0x01,
        "DSCP set, ECN kept"
    );
    assert_eq!(first & 0xfffff, 0xabcde, "flow label kept");
    assert_eq!(r.priority, PRIO);
    assert_eq!(&r.data[18..], &frame[18..]);
    // Downlink.
    let down = eth(
        0x86dd,
        &[],
        &ipv6(v6(SRV6), v6(DEV6), UDP, 0, 0, &[], &l4(UDP, 443, 40000, 10)),
    );
    let r = h.run(&down);
    assert_eq!(
        ((u16::from_be_bytes([r.data[14], r.data[15]]) >> 4) as u8) >> 2,
        DSCP
    );
    let c = h.dp.counters(2).expect("counters");
    assert_eq!((c.up_packets, c.down_packets), (1, 1));
    // Non-matching: another /64, another server, another device port, a later fragment.
    let other_dev = eth(
        0x86dd,
        &[],
        &ipv6(
            v6("fd00:11::2"),
            v6(SRV6),
            UDP,
            0,
            0,
            &[],
            &l4(UDP, 40000, 443, 10),
        ),
    );
    h.untouched(&other_dev, "another /64");
    let other_srv = eth(
        0x86dd,
        &[],
        &ipv6(
            v6(DEV6),
            v6("fd00:2::3"),
            UDP,
            0,
            0,
            &[],
            &l4(UDP, 40000, 443, 10),
        ),
    );
    h.untouched(&other_srv, "another server");
    let other_port = eth(
        0x86dd,
        &[],
        &ipv6(v6(DEV6), v6(SRV6), UDP, 0, 0, &[], &l4(UDP, 40001, 443, 10)),
    );
    h.untouched(&other_port, "another device port");
    let frag = (44u8, vec![0, 0x00, 0x08, 0, 0, 0, 1]); // offset 1 (8 bytes)
    let later = eth(
        0x86dd,
        &[],
        &ipv6(
            v6(DEV6),
            v6(SRV6),
            UDP,
            0,
            0,
            &[frag],
            &[0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 0],
        ),
    );
    h.untouched(&later, "non-first IPv6 fragment");
}

#[test]
fn truncated_and_non_ip_frames_pass_untouched() {
    let h = Harness::new();
    let full = udp4(DEV4, SRV4, 40000, 5005, 0);
    // Cut inside the IPv4 header, and inside the UDP ports. The kernel's test runner refuses an
    // untagged IPv4 frame shorter than an IPv4 header, so that cut is shown behind a VLAN tag
    // (the classifier follows the tag to the same truncated header).
    let tagged = eth(
        0x0800,
        &[7],
        &ipv4(DEV4, SRV4, UDP, 0, &[], 0, &l4(UDP, 40000, 5005, 32)),
    );
    h.untouched(&tagged[..18 + 12], "truncated IPv4 header");
    h.untouched(&full[..14 + 20 + 2], "truncated UDP header");
    let v6full = eth(
        0x86dd,
        &[],
        &ipv6(v6(DEV6), v6(SRV6), UDP, 0, 0, &[], &l4(UDP, 40000, 443, 10)),
    );
    let v6tagged = eth(
        0x86dd,
        &[7],
        &ipv6(v6(DEV6), v6(SRV6), UDP, 0, 0, &[], &l4(UDP, 40000, 443, 10)),
    );
    h.untouched(&v6tagged[..18 + 30], "truncated IPv6 header");
    h.untouched(&v6full[..14 + 40 + 1], "truncated IPv6 transport header");
    // ARP, and an IPv4 ethertype whose header says version 6.
    let arp = eth(
        0x0806,
        &[],
        &[
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 0, 1, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2,
        ],
    );
    h.untouched(&arp, "ARP");
    let mut liar = full.clone();
    liar[14] = 0x65;
    h.untouched(&liar, "bad IP version");
    let c = h.dp.counters(1).expect("counters");
    assert_eq!(c.up_packets, 0);
}

#[test]
fn expired_entries_are_ignored_by_the_kernel() {
    let h = Harness::new();
    let mut dp = h.dp;
    let mut r = rule("10.0.2.0/24".parse().expect("net"), &[], &[], 3);
    // The classifier reads the coarse clock (at most a tick behind): a second is well past.
    r.expires_at_ns = monotonic_ns() - 1_000_000_000;
    let key: DeviceKey = ipv4_key(Ipv4Addr::new(10, 0, 1, 9));
    dp.install(key, &[r]).expect("install");
    let h = Harness { dp };
    h.untouched(&udp4([10, 0, 1, 9], SRV4, 1, 2, 0), "expired entry");
}

#[test]
fn the_policer_passes_the_burst_then_drops_and_counts() {
    // 1 Mbit/s down: back-to-back 1 000-byte frames pass until the bucket is spent (the clock
    // refills 125 bytes per millisecond; the runs take microseconds). A 10 000-byte bucket
    // (80 ms) is policed on the fine clock, qodd's default depth of 250 ms (31 250 bytes) on the
    // coarse one, which may move a tick (up to 10 ms, 1 250 bytes) during the runs.
    for (bucket, frames, expected) in [(10_000u64, 20usize, 10..=12), (31_250, 50, 31..=34)] {
        let h = Harness::new();
        let mut dp = h.dp;
        let mut r = rule("10.0.2.0/24".parse().expect("net"), &[], &[], 5);
        r.police_down = Policer::new(1_000_000, bucket);
        assert_eq!(r.police_down.coarse_clock_ok(), bucket > 10_000);
        let key = ipv4_key(Ipv4Addr::new(10, 0, 1, 50));
        dp.reset_counters(5).expect("reset");
        dp.install(key, &[r]).expect("install");
        let h = Harness { dp };
        let frame = eth(
            0x0800,
            &[],
            &ipv4(
                SRV4,
                [10, 0, 1, 50],
                UDP,
                0,
                &[],
                0,
                &l4(UDP, 80, 4000, 1000 - 42),
            ),
        );
        assert_eq!(frame.len(), 1000);
        let verdicts: Vec<i32> = (0..frames).map(|_| h.run_any(&frame).retval).collect();
        // A frame passes or is dropped, nothing else; the bucket's worth passes first, and by
        // the end it is spent (a tick of the clock between two runs may let one more through).
        let passed = verdicts.iter().filter(|v| **v == CARRY_ON).count();
        assert!(
            verdicts.iter().all(|v| *v == CARRY_ON || *v == DROP),
            "{verdicts:?}"
        );
        assert!(
            expected.contains(&passed)
                && verdicts[..*expected.start()].iter().all(|v| *v == CARRY_ON)
                && verdicts[frames - 1] == DROP,
            "a bucket of {bucket} bytes passed {passed} frames: {verdicts:?}"
        );
        let c = h.dp.counters(5).expect("counters");
        assert_eq!(c.down_packets, passed as u64);
        assert_eq!(c.down_dropped, (frames - passed) as u64);
        // Uplink has no policer: never dropped.
        let up = eth(
            0x0800,
            &[],
            &ipv4(
                [10, 0, 1, 50],
                SRV4,
                UDP,
                0,
                &[],
                0,
                &l4(UDP, 4000, 80, 958),
            ),
        );
        assert!((0..20).all(|_| h.run_any(&up).retval == CARRY_ON));
    }
}

/// `test_run` gives the skb the loopback device, index 1.
const TEST_RUN_IFINDEX: u32 = 1;

#[test]
fn one_sided_interfaces_look_one_way_only() {
    let mut h = Harness::new();
    let up = udp4(DEV4, SRV4, 40000, 5005, 0);
    let down = udp4(SRV4, DEV4, 5005, 40000, 0);
    // Server-facing egress carries uplink: the source is the device.
    h.dp.set_side(TEST_RUN_IFINDEX, Side::Server).expect("side");
    assert_eq!(h.run(&up).data[15] >> 2, DSCP);
    assert_eq!(
        h.run(&down).data,
        down,
        "downlink is not looked up on the uplink side"
    );
    // Device-facing egress carries downlink: the destination is the device.
    h.dp.set_side(TEST_RUN_IFINDEX, Side::Device).expect("side");
    assert_eq!(h.run(&down).data[15] >> 2, DSCP);
    assert_eq!(
        h.run(&up).data,
        up,
        "uplink is not looked up on the downlink side"
    );
}

#[test]
fn several_sessions_of_one_device_and_the_most_specific_server_wins() {
    let h = Harness::new();
    let mut dp = h.dp;
    // Device 10.0.1.60: port 443 to 10.0.2.0/24 (DSCP 46), anything to 10.0.2.9/32 (DSCP 26).
    let web = rule("10.0.2.0/24".parse().expect("net"), &[], &[(443, 443)], 6);
    let mut host = rule("10.0.2.9/32".parse().expect("net"), &[], &[], 7);
    dp.set_profile(1, &treatment(26, 0)).expect("profile");
    host.profile = 1;
    host.priority_up = 0x0001_0107;
    host.priority_down = 0x0001_0107;
    dp.install(ipv4_key(Ipv4Addr::new(10, 0, 1, 60)), &[web, host])
        .expect("install");
    let h = Harness { dp };
    let dev = [10, 0, 1, 60];
    let r = h.run(&udp4(dev, [10, 0, 2, 5], 40000, 443, 0));
    assert_eq!((r.data[15] >> 2, r.priority), (DSCP, PRIO), "first rule");
    let r = h.run(&udp4(dev, [10, 0, 2, 9], 40000, 80, 0));
    assert_eq!(
        (r.data[15] >> 2, r.priority),
        (26, 0x0001_0107),
        "second rule"
    );
    // Both match 10.0.2.9:443; the /32 is more specific.
    let r = h.run(&udp4(dev, [10, 0, 2, 9], 40000, 443, 0));
    assert_eq!(r.data[15] >> 2, 26, "longest prefix wins");
    h.untouched(&udp4(dev, [10, 0, 2, 5], 40000, 80, 0), "neither rule");
    assert_eq!(h.dp.counters(7).expect("counters").up_packets, 2);
    assert_eq!(h.dp.counters(6).expect("counters").up_packets, 1);
}

#[test]
fn each_direction_gets_its_own_priority() {
    // Each scheduled interface numbers its per-session classes on its own, so a session's
    // uplink and downlink classes can have different ids.
    let h = Harness::new();
    let mut dp = h.dp;
    let mut r = rule("10.0.2.0/24".parse().expect("net"), &[], &[], 8);
    r.priority_up = 0x0001_0105;
    r.priority_down = 0x0001_0233;
    dp.reset_counters(8).expect("reset");
    dp.install(ipv4_key(Ipv4Addr::new(10, 0, 1, 61)), &[r])
        .expect("install");
    let h = Harness { dp };
    let dev = [10, 0, 1, 61];
    let up = h.run(&udp4(dev, [10, 0, 2, 5], 40000, 443, 0));
    assert_eq!(up.priority, 0x0001_0105, "uplink");
    let down = h.run(&udp4([10, 0, 2, 5], dev, 443, 40000, 0));
    assert_eq!(down.priority, 0x0001_0233, "downlink");
}

/// A rule takes DSCP and band from its profile's entry, and the priority and policer of each
/// direction from the entry unless it has its own: a change of the entry reaches the rule's
/// packets at once, without the rule being written again; an entry not in use treats nothing.
#[test]
fn a_rule_follows_its_profile_entry() {
    let h = Harness::new();
    let mut dp = h.dp;
    let mut r = rule("10.0.2.0/24".parse().expect("net"), &[], &[], 9);
    // Its own uplink priority (a class) and downlink policer; the rest from entry 3.
    r.own = OWN_PRIORITY_UP | OWN_POLICE_DOWN;
    r.priority_up = 0x0001_0105;
    r.profile = 3;
    dp.reset_counters(9).expect("reset");
    dp.set_profile(3, &treatment(10, 6)).expect("profile");
    dp.install(ipv4_key(Ipv4Addr::new(10, 0, 1, 62)), &[r])
        .expect("install");
    let mut h = Harness { dp };
    let dev = [10, 0, 1, 62];
    let up = udp4(dev, [10, 0, 2, 5], 40000, 443, 0);
    let down = udp4([10, 0, 2, 5], dev, 443, 40000, 0);
    let seen = |h: &Harness, frame: &[u8]| {
        let r = h.run_any(frame);
        (r.retval, r.data[15] >> 2, r.priority)
    };
    assert_eq!(seen(&h, &up), (CARRY_ON, 10, 0x0001_0105), "uplink");
    assert_eq!(seen(&h, &down), (CARRY_ON, 10, 6), "downlink");
    // The profile changes: DSCP, priority, band, and a policer of 8 bit/s with a 1-byte
    // bucket, which only a direction without its own policer (uplink) takes.
    let mut t = treatment(46, 7);
    t.band = BAND_GUARANTEED;
    t.police_up = Policer::new(8, 1);
    t.police_down = Policer::new(8, 1);
    h.dp.set_profile(3, &t).expect("profile");
    assert_eq!(seen(&h, &down), (CARRY_ON, 46, 7), "downlink after");
    assert_eq!(seen(&h, &up), (CARRY_ON, 46, 0x0001_0105), "first uplink");
    assert_eq!(seen(&h, &up).0, DROP, "uplink over the profile's policer");
    let c = h.dp.counters(9).expect("counters");
    assert_eq!((c.up_packets, c.up_dropped, c.down_packets), (2, 1, 2));
    // Out of use (only `in_use` cleared, as qodd does): the rule treats nothing, and a packet
    // already marked keeps its DSCP (not rewritten to the entry's, nor to 0).
    h.dp.set_profile(3, &ProfileTreatment { in_use: 0, ..t })
        .expect("profile");
    h.untouched(&up, "entry not in use");
    h.untouched(&down, "entry not in use");
    h.untouched(
        &udp4(dev, [10, 0, 2, 5], 40000, 443, 26 << 2),
        "marked, entry not in use",
    );
}

/// A pin root of its own under bpffs, removed on drop (also on panic).
struct PinRoot(std::path::PathBuf);

impl PinRoot {
    fn new(name: &str) -> Self {
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        qod_daemon::dataplane::ensure_bpffs(bpffs).expect("bpffs");
        Self(bpffs.join(format!("qodt-{name}-{}", std::process::id())))
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = qod_daemon::dataplane::remove_pins(&self.0);
    }
}

#[test]
fn a_restart_over_its_own_pins_takes_the_verified_classifier_up_and_nothing_else() {
    use qod_daemon::dataplane::pin_dir;
    let root = PinRoot::new("reuse");
    let key = ipv4_key(Ipv4Addr::new(10, 0, 1, 77));
    let mut first = AyaDataPlane::load(64, &root.0).expect("first load");
    assert!(!first.reused() && !first.classifier_reused());
    first.attach_managed().expect("verified and pinned");
    drop(first);
    // Maps and program pinned: the next load takes the program up without the verifier, and
    // it classifies over the maps this load opened.
    let mut second = AyaDataPlane::load(64, &root.0).expect("second load");
    assert!(second.reused() && second.classifier_reused());
    second.set_profile(0, &treatment(DSCP, 0)).expect("profile");
    second
        .install(
            key,
            &[rule("10.0.2.0/24".parse().expect("net"), &[], &[], 2)],
        )
        .expect("install");
    let h = Harness { dp: second };
    let r = h.run(&udp4([10, 0, 1, 77], SRV4, 1, 2, 0));
    assert_eq!(
        r.priority, PRIO,
        "the reused program reads this load's maps"
    );
    drop(h);
    // A program pinned over other maps (one of them made anew) is not taken up: it would
    // classify with a map nobody writes.
    std::fs::remove_file(pin_dir(&root.0).join(qod_common::POLICERS_MAP)).expect("unpin");
    let third = AyaDataPlane::load(64, &root.0).expect("third load");
    assert!(third.reused(), "the other maps are reused");
    assert!(
        !third.classifier_reused(),
        "a program using a map that is not one of ours must be verified anew"
    );
    third
        .program_fd()
        .expect_err("verified on its own thread: not ready before attaching");
}

#[test]
fn the_kernel_lists_every_device_once_a_batch_at_a_time() {
    // More devices than one batch (1,024) holds, in both families, and an empty map.
    let mut dp = AyaDataPlane::load_ephemeral(4096).expect("load");
    assert_eq!(
        dp.device_entries_batched().expect("empty maps"),
        Default::default()
    );
    let mut installed = std::collections::HashSet::new();
    let mut slots = Vec::new();
    let net = "10.0.2.0/24".parse().expect("net");
    for i in 0..2500u32 {
        let key = ipv4_key(Ipv4Addr::from(0x0a64_0000 + i));
        dp.install(key, &[rule(net, &[], &[], i)])
            .expect("install v4");
        installed.insert(key);
        slots.push(i);
    }
    for i in 0..1100u16 {
        let key = ipv6_key(Ipv6Addr::new(0xfd00, 0x64, 0, i, 0, 0, 0, 2));
        // Two sessions on this device: both slots are listed.
        let (a, b) = (3000 + u32::from(i), 3000 + u32::from(i) + 1100);
        dp.install(key, &[rule(net, &[], &[], a), rule(net, &[], &[], b)])
            .expect("install v6");
        installed.insert(key);
        slots.extend([a, b]);
    }
    let mut listed = dp.device_entries_batched().expect("batched");
    assert_eq!(listed.devices.len(), installed.len(), "each device once");
    assert_eq!(
        listed
            .devices
            .into_iter()
            .collect::<std::collections::HashSet<_>>(),
        installed
    );
    listed.slots.sort_unstable();
    slots.sort_unstable();
    assert_eq!(listed.slots, slots, "each rule's counter slot");
}
