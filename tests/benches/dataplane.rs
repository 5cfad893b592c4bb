//! Data plane benchmarks. Run with `cargo xtask bench` (root). Prints numbers; asserts nothing.
//!
//! 1. Classifier cost per packet, `BPF_PROG_TEST_RUN` (the kernel times `repeat` runs of the
//!    program on one skb and reports the mean): a matching uplink UDP packet of a session with
//!    every feature on (8 device and 8 server port ranges, a server subnet, a policer that
//!    conforms with qodd's default 250 ms bucket, DSCP rewrite, skb->priority, per-CPU
//!    counters), and a packet of no session (two misses), with 1, 1k, 100k and 1M sessions
//!    installed. Median of 5 runs of 1M repeats. Beside it, in the same run: the floor probe
//!    (`qod-ebpf/src/bin/qod-floor.rs`: one hash look-up on the IPv4 destination, a per-CPU
//!    counter, skb->priority) on the same packet, its runs interleaved with the matching
//!    packet's so a change of the VM's state touches both; and the matching packet with a 10 ms
//!    bucket (the policer on the fine clock) and with no policer. `QOD_BENCH_FIRST_RANGE=1`
//!    puts the packet's ports in the first ranges instead (a session with one port each side).
//!    After the first run the DSCP is already set, so later runs skip the checksum update (a few
//!    ns). Fragments of the session's datagram: a first fragment (its ports remembered in a
//!    fragment slot) and a later one (its ports looked up there). An IPv6 session's matching
//!    packet, and the same packet behind a hop-by-hop header (the extension walk).
//! 2. The same DSCP-marking job in the forwarding path of a namespace lab, for eBPF (qod's
//!    classifier on the edge's egress), nftables (one verdict-map lookup on the source address)
//!    and iptables (one mangle rule per session, DSCP target): a single UDP sender pushes 64-byte
//!    datagrams for 3 s from the device through the edge to the server, whose receiver counts
//!    them. Every packet matches the session installed last (the worst case for a rule list).
//!    Cost per packet = 1/pps(method) − 1/pps(nothing installed); sender, forwarding and receiver
//!    share the CPU (veth delivers in the sender's softirq), so the difference is the marking
//!    cost plus noise. iptables stops at 10k rules: loading and walking more is impractical, which
//!    is the point.
//! 3. Per-session HTB classes over qodd's own rtnetlink path (`Scheduler::set_class` /
//!    `park_class`) on a veth in a namespace of its own: the tree grows to 60,000 classes
//!    (`QOD_BENCH_CLASSES`) and at every 10,000 the mean time is printed of adding 500 new
//!    classes (class, leaf and the statistics read, one exchange), of changing 500 existing ones
//!    the same way (what a session taking a parked class costs), and of parking 500.
//! 4. The verifier: the classifier loaded into the kernel five times (the BPF verifier runs on
//!    each load), with its median wall time and the instructions the verifier processed
//!    (`verified_insns`). Every start after a reboot pays one such load, beside the restore.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use qod_common::{FlowRule, MAX_PORT_RANGES, Policer, PortRange, ProfileTreatment};
use qod_daemon::{
    config::Side,
    dataplane::{AyaDataPlane, DataPlane as _, EBPF_OBJECT, FLOOR_OBJECT, monotonic_ns},
    model::{ipv4_key, ipv6_key, network_words},
};
use qod_testkit::{
    EDGE_SRV_IF, Lab, addr,
    bpf::{eth, ipv4, ipv6, l4, test_run},
};

/// The measured session's policer (a conforming one: 400 Gbit/s) with a bucket `ms` deep; qodd's
/// default is 250 ms, on the coarse clock; 10 ms reads the fine one.
fn policer(ms: u64) -> Policer {
    const RATE: u64 = 400_000_000_000;
    Policer::new(RATE, RATE / 8 * ms / 1000)
}

/// Writes profile entry 0, the one every rule here follows: DSCP 46, priority 1:10, and `police`
/// on uplink (as a profile with a maximum rate on an interface without a scheduler).
fn profile(dp: &mut AyaDataPlane, police: Policer) -> anyhow::Result<()> {
    dp.set_profile(
        0,
        &ProfileTreatment {
            police_up: police,
            priority_up: 0x0001_0010,
            priority_down: 0x0001_0010,
            dscp: 46,
            in_use: 1,
            ..ProfileTreatment::default()
        },
    )?;
    Ok(())
}

/// A session's rule as qodd writes one without classes of its own: all treatment from its
/// profile's entry (0).
fn rule(slot: u32) -> FlowRule {
    rule_to(slot, "10.0.2.0/24")
}

/// [`rule`] towards `server` (a network).
fn rule_to(slot: u32, server: &str) -> FlowRule {
    let server: ipnetwork::IpNetwork = server.parse().expect("net");
    let (server_addr, server_mask) = network_words(server);
    let mut ranges = [PortRange::default(); MAX_PORT_RANGES];
    for (i, r) in ranges.iter_mut().enumerate() {
        let base = 1000 * (i as u16 + 1);
        *r = PortRange {
            from: base,
            to: base + 10,
        };
    }
    FlowRule {
        expires_at_ns: monotonic_ns() + 3_600_000_000_000,
        slot,
        server_addr,
        server_mask,
        server_prefix_len: server.prefix(),
        n_device_ports: MAX_PORT_RANGES as u8,
        n_server_ports: MAX_PORT_RANGES as u8,
        device_ports: ranges,
        server_ports: ranges,
        profile: 0,
        ..FlowRule::default()
    }
}

/// The n-th filler device address: 11.x.y.z.
fn filler(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000 | (n + 1))
}

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The floor probe (`qod-ebpf/src/bin/qod-floor.rs`) loaded with `n` entries, the last one for
/// `dst`; returns the loaded object (its program runs with [`floor_fd`]).
fn floor(n: u32, dst: Ipv4Addr) -> anyhow::Result<aya::Ebpf> {
    use aya::{maps::HashMap, programs::SchedClassifier};
    let mut obj = aya::Ebpf::load(FLOOR_OBJECT)?;
    for name in ["qod_floor", "qod_empty"] {
        let prog: &mut SchedClassifier = obj
            .program_mut(name)
            .ok_or_else(|| anyhow::anyhow!("floor probe has no program {name}"))?
            .try_into()?;
        prog.load()?;
    }
    let mut flows: HashMap<_, u32, [u32; 2]> = HashMap::try_from(
        obj.map_mut("QOD_FLOOR_FLOWS")
            .ok_or_else(|| anyhow::anyhow!("floor probe has no flow map"))?,
    )?;
    for i in 0..n.saturating_sub(1) {
        flows.insert(u32::from(filler(i)).to_be(), [0x0001_0010, i], 0)?;
    }
    flows.insert(u32::from(dst).to_be(), [0x0001_0010, n], 0)?;
    Ok(obj)
}

/// The floor probe's program `name`: `qod_floor`, or `qod_empty` (returns at once).
fn floor_fd<'a>(obj: &'a aya::Ebpf, name: &str) -> anyhow::Result<std::os::fd::BorrowedFd<'a>> {
    use aya::programs::SchedClassifier;
    use std::os::fd::AsFd as _;
    let prog: &SchedClassifier = obj
        .program(name)
        .ok_or_else(|| anyhow::anyhow!("floor probe has no program"))?
        .try_into()?;
    Ok(prog.fd()?.as_fd())
}

/// The median ns/packet of 5 × 1M runs of the classifier on `pkt`, on an interface of `side`.
fn runs(dp: &mut AyaDataPlane, side: Side, pkt: &[u8]) -> anyhow::Result<u32> {
    // test_run hands the skb the loopback device (index 1).
    dp.set_side(1, side)?;
    let fd = dp.program_fd()?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let r = test_run(fd, pkt, 1_000_000)?;
        anyhow::ensure!(r.retval == -1, "unexpected verdict {}", r.retval);
        v.push(r.ns_per_run);
    }
    Ok(median(v))
}

fn classifier() -> anyhow::Result<()> {
    println!("## classifier, BPF_PROG_TEST_RUN, ns/packet (median of 5 × 1M runs)\n");
    println!(
        "The floor probe (one hash look-up on the IPv4 destination, a per-CPU counter, skb->priority)\n\
         and an empty program run the same packet, interleaved with the matching packet's runs.\n"
    );
    println!(
        "| sessions | empty program | floor probe | matching packet | ratio | 10 ms bucket | no policer | no session | ratio | no session, two-sided program | first fragment | later fragment | IPv6 matching | IPv6 behind a hop-by-hop header |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes = [1u32, 1_000, 100_000, 1_000_000];
    let mut first = None;
    for &n in &sizes {
        let mut dp = AyaDataPlane::load_ephemeral(n + 16)?;
        profile(&mut dp, policer(250))?;
        // Fillers first, then the measured session (last installed).
        for i in 0..n.saturating_sub(1) {
            dp.install(ipv4_key(filler(i)), &[rule(i % (n + 16))])?;
        }
        let slot = n;
        dp.reset_counters(slot)?;
        let device = ipv4_key(Ipv4Addr::new(10, 0, 1, 2));
        dp.install(device, &[rule(slot)])?;
        // An IPv6 device of its own (fd00:1::/64) towards fd00:2::/64, same ports.
        dp.reset_counters(slot + 1)?;
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().expect("ipv6");
        dp.install(
            ipv6_key(v6("fd00:1::2")),
            &[rule_to(slot + 1, "fd00:2::/64")],
        )?;
        // A UDP frame from `src` to `dst` with the IPv4 fragment field `frag`, carrying `l4`.
        let udp = |src: [u8; 4], dst: [u8; 4], frag: u16, l4: &[u8]| {
            eth(0x0800, &[], &ipv4(src, dst, 17, 0, &[], frag, l4))
        };
        let (device_ip, server_ip) = ([10, 0, 1, 2], [10, 0, 2, 7]);
        let ports = if std::env::var_os("QOD_BENCH_FIRST_RANGE").is_some() {
            l4(17, 1005, 1003, 18)
        } else {
            l4(17, 8005, 5003, 18)
        };
        let hit = udp(device_ip, server_ip, 0, &ports);
        let miss = udp([10, 9, 1, 2], [10, 9, 2, 7], 0, &ports);
        // A fragmented datagram of the session: the first fragment (MF, offset 0) remembers its
        // ports in its fragment slot; a later one (offset 1480) looks them up before the rule.
        let first_fragment = udp(device_ip, server_ip, 0x2000, &ports);
        let later_fragment = udp(device_ip, server_ip, 185, &[0x5a; 26]);
        let udp6 = |ext: &[(u8, Vec<u8>)]| {
            let (d, s) = (v6("fd00:1::2").octets(), v6("fd00:2::7").octets());
            eth(0x86dd, &[], &ipv6(d, s, 17, 0, 0, ext, &ports))
        };
        // Hop-by-hop: 8 bytes, a PadN option filling it.
        let hit6 = udp6(&[]);
        let hit6_ext = udp6(&[(0u8, vec![0, 1, 4, 0, 0, 0, 0])]);
        // The uplink program (server-facing interface) sees the uplink packet; the two-sided one
        // (an interface carrying both directions) pays two look-ups on a miss.
        // The floor and the matching packet, run by run in turn, so a change of the VM's state
        // touches both.
        let floor_obj = floor(n, Ipv4Addr::new(10, 0, 2, 7))?;
        let ffd = floor_fd(&floor_obj, "qod_floor")?;
        let efd = floor_fd(&floor_obj, "qod_empty")?;
        dp.set_side(1, Side::Server)?;
        let (mut fl, mut hv, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            ev.push(test_run(efd, &hit, 1_000_000)?.ns_per_run);
            let r = test_run(ffd, &hit, 1_000_000)?;
            anyhow::ensure!(
                r.priority == 0x0001_0010,
                "the floor probe did not match its packet"
            );
            fl.push(r.ns_per_run);
            let r = test_run(dp.program_fd()?, &hit, 1_000_000)?;
            anyhow::ensure!(r.retval == -1, "unexpected verdict {}", r.retval);
            hv.push(r.ns_per_run);
        }
        let (fl, h, empty) = (median(fl), median(hv), median(ev));
        drop(floor_obj);
        let (m, m2, f1, f2) = (
            runs(&mut dp, Side::Server, &miss)?,
            runs(&mut dp, Side::Both, &miss)?,
            runs(&mut dp, Side::Server, &first_fragment)?,
            runs(&mut dp, Side::Server, &later_fragment)?,
        );
        let (h6, h6x) = (
            runs(&mut dp, Side::Server, &hit6)?,
            runs(&mut dp, Side::Server, &hit6_ext)?,
        );
        let c = dp.counters(slot)?;
        anyhow::ensure!(c.up_packets > 0, "the measured packet did not match");
        let c = dp.counters(slot + 1)?;
        anyhow::ensure!(
            c.up_packets >= 10_000_000,
            "the IPv6 packets did not both match"
        );
        // The same session with a shallow bucket (the fine clock), then with no policer.
        profile(&mut dp, policer(10))?;
        let shallow = runs(&mut dp, Side::Server, &hit)?;
        profile(&mut dp, Policer::default())?;
        let unpoliced = runs(&mut dp, Side::Server, &hit)?;
        first.get_or_insert(h);
        let ratio = |x: u32| f64::from(x) / f64::from(fl.max(1));
        println!(
            "| {n} | {empty} | {fl} | {h} | {:.2}× | {shallow} | {unpoliced} | {m} | {:.2}× | {m2} | {f1} | {f2} | {h6} | {h6x} |",
            ratio(h),
            ratio(m)
        );
    }
    if let Some(one) = first {
        println!(
            "\n(1M sessions vs 1: see the matching packet's last and first rows; 1 session = {one} ns)\n"
        );
    }
    Ok(())
}

/// Packets per second delivered from device to server through the edge.
fn blast(lab: &Lab, secs: Duration) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (received.clone(), stop.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = lab.server.spawn(move || {
        let sock = UdpSocket::bind((addr::SERVER_V4, 6000))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    ready_rx.recv_timeout(Duration::from_secs(5))?;
    let tx = lab.device.spawn(move || {
        let sock = UdpSocket::bind((addr::DEVICE_V4, 6001))?;
        let to: SocketAddr = (addr::SERVER_V4.parse::<Ipv4Addr>()?, 6000).into();
        let payload = [0u8; 22]; // 64-byte frames
        let end = Instant::now() + secs;
        while Instant::now() < end {
            for _ in 0..64 {
                let _ = sock.send_to(&payload, to);
            }
        }
        Ok(())
    });
    let start = received.load(Ordering::Relaxed);
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    rx.join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok((received.load(Ordering::Relaxed) - start) as f64 / secs.as_secs_f64())
}

/// Runs per measurement (median taken).
const REPS: usize = 5;

fn forwarding() -> anyhow::Result<()> {
    println!(
        "## DSCP marking in the forwarding path (64-byte UDP, one sender), ns/packet over no marking\n"
    );
    let secs = Duration::from_millis(1500);
    let lab = Lab::new()?;
    // The median of several short runs; a baseline is taken next to every measurement so slow
    // drift of the machine cancels out.
    let measure = |lab: &Lab| -> anyhow::Result<f64> {
        let mut v = Vec::new();
        for _ in 0..REPS {
            v.push(blast(lab, secs)?);
        }
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    };
    println!(
        "| sessions | baseline kpps | eBPF ns | nftables map ns | iptables rules ns | nft / eBPF | iptables / eBPF |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let cost = |pps: f64, base: f64| 1e9 / pps - 1e9 / base;
    for n in [1u32, 1_000, 10_000, 100_000, 1_000_000] {
        let base = measure(&lab)?;
        // eBPF: the classifier on the edge's egress towards the server, N sessions.
        let ebpf = {
            let mut dp = AyaDataPlane::load_ephemeral(n + 16)?;
            profile(&mut dp, Policer::default())?;
            for i in 0..n.saturating_sub(1) {
                dp.install(ipv4_key(filler(i)), &[rule(i % (n + 16))])?;
            }
            let mut r = rule(n);
            r.n_device_ports = 0;
            r.n_server_ports = 0;
            dp.reset_counters(n)?;
            dp.install(ipv4_key(addr::DEVICE_V4.parse()?), &[r])?;
            // Attach from inside the edge namespace (interface names are per namespace).
            let dp = lab.edge.run(move || {
                let mut dp = dp;
                dp.attach(
                    EDGE_SRV_IF,
                    Side::Server,
                    qod_daemon::config::AttachMode::Auto,
                )?;
                Ok(dp)
            })?;
            let pps = measure(&lab)?;
            drop(dp);
            pps
        };
        // nftables: a verdict map keyed by source address.
        let nft = {
            let mut script = String::from(
                "table ip qodbench {\n chain qod_mark {\n  ip dscp set ef\n }\n map sessions {\n  type ipv4_addr : verdict\n",
            );
            let mut elems: Vec<String> = (0..n.saturating_sub(1))
                .map(|i| format!("{} : jump qod_mark", filler(i)))
                .collect();
            elems.push(format!("{} : jump qod_mark", addr::DEVICE_V4));
            script.push_str(&format!("  elements = {{ {} }}\n }}\n", elems.join(", ")));
            script.push_str(" chain post {\n  type filter hook postrouting priority mangle;\n  ip saddr vmap @sessions\n }\n}\n");
            let file = std::env::temp_dir().join(format!("qodbench-{}.nft", std::process::id()));
            std::fs::write(&file, script)?;
            lab.edge
                .exec("nft", &["-f", file.to_str().unwrap_or_default()])?;
            let _ = std::fs::remove_file(&file);
            let pps = measure(&lab)?;
            lab.edge
                .exec("nft", &["delete", "table", "ip", "qodbench"])?;
            pps
        };
        // iptables: one mangle rule per session, the measured one last.
        let ipt = if n <= 10_000 {
            let mut rules = String::from("*mangle\n");
            for i in 0..n.saturating_sub(1) {
                rules.push_str(&format!(
                    "-A POSTROUTING -s {}/32 -j DSCP --set-dscp 46\n",
                    filler(i)
                ));
            }
            rules.push_str(&format!(
                "-A POSTROUTING -s {}/32 -j DSCP --set-dscp 46\nCOMMIT\n",
                addr::DEVICE_V4
            ));
            let file = std::env::temp_dir().join(format!("qodbench-{}.ipt", std::process::id()));
            std::fs::write(&file, rules)?;
            let status = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.edge.name,
                    "sh",
                    "-c",
                    &format!("iptables-restore < {}", file.display()),
                ])
                .status()?;
            let _ = std::fs::remove_file(&file);
            anyhow::ensure!(status.success(), "iptables-restore failed");
            let pps = measure(&lab)?;
            lab.edge.exec("iptables", &["-t", "mangle", "-F"])?;
            Some(pps)
        } else {
            None
        };
        let (e, f) = (cost(ebpf, base), cost(nft, base));
        let ratio = |x: f64| {
            if e > 10.0 {
                format!("{:.1}×", x / e)
            } else {
                "-".into()
            }
        };
        let (ipt_ns, ipt_ratio) = ipt.map_or(("-".into(), "-".into()), |p| {
            (format!("{:.0}", cost(p, base)), ratio(cost(p, base)))
        });
        println!(
            "| {n} | {:.0} | {e:.0} | {f:.0} | {ipt_ns} | {} | {ipt_ratio} |",
            base / 1e3,
            ratio(f)
        );
    }
    println!(
        "\n(ns are per packet over the adjacent baseline; negative or small values are within the noise)"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "benchmarks load eBPF and build namespaces: run as root (cargo xtask bench)"
    );
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if only.as_deref().is_none_or(|o| o == "classifier") {
        classifier()?;
    }
    if only.as_deref().is_none_or(|o| o == "forwarding") {
        forwarding()?;
    }
    if only.as_deref().is_none_or(|o| o == "classes") {
        classes()?;
    }
    if only.as_deref().is_none_or(|o| o == "verifier") {
        verifier()?;
    }
    Ok(())
}

/// Part 3 (see the module docs).
fn classes() -> anyhow::Result<()> {
    use qod_daemon::dataplane::scheduler::{BurstRule, ClassSpec, Scheduler, SchedulerConfig};
    let top: u16 = std::env::var("QOD_BENCH_CLASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    println!("\nper-session HTB classes over rtnetlink (mean per class of 500)");
    println!(
        "{:>8}  {:>10}  {:>10}  {:>10}",
        "classes", "add µs", "change µs", "park µs"
    );
    let ns = qod_testkit::Netns::new("qodcls")?;
    ns.ip(&["link", "add", "qc0", "type", "veth", "peer", "name", "qc1"])?;
    ns.ip(&["link", "set", "qc0", "up"])?;
    ns.ip(&["link", "set", "qc1", "up"])?;
    ns.run(move || {
        let config = SchedulerConfig {
            capacity_bps: 100_000_000_000,
            low_latency_share: 0.1,
            guaranteed_share: 0.8,
            replace_foreign_root: false,
        };
        let sched = Scheduler::install("qc0", config)?;
        let spec = |n: u16| {
            ClassSpec::guaranteed(
                100_000 + u64::from(n % 7) * 1_000,
                1_000_000,
                None,
                BurstRule::default(),
            )
        };
        let per = |t: Instant, n: u16| t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        let batch = 500u16;
        let mut made = 0u16;
        while made < top {
            // Grow to just below the next checkpoint, then time the last 500 adds.
            let next = (made / 10_000 + 1) * 10_000;
            let next = next.min(top);
            while made < next - batch {
                sched.set_class(made, spec(made))?;
                made += 1;
            }
            let t = Instant::now();
            for i in made..next {
                sched.set_class(i, spec(i))?;
            }
            let add = per(t, batch);
            made = next;
            let t = Instant::now();
            for i in 0..batch {
                sched.set_class(i, spec(i + 1))?;
            }
            let change = per(t, batch);
            let t = Instant::now();
            for i in 0..batch {
                sched.park_class(i)?;
            }
            let park = per(t, batch);
            println!("{made:>8}  {add:>10.0}  {change:>10.0}  {park:>10.0}");
        }
        sched.remove();
        Ok(())
    })
}

/// Part 4 (see the module docs).
fn verifier() -> anyhow::Result<()> {
    use aya::programs::SchedClassifier;
    println!("\n## The verifier: loading the classifier (median of 5 loads)\n");
    let (mut took, mut insns) = (Vec::new(), 0);
    for _ in 0..5 {
        // Its maps are pinned: into a directory of this load's own, removed after it.
        let pins = tempfile::Builder::new()
            .prefix("qod-bench-verifier")
            .tempdir_in("/sys/fs/bpf")?;
        let mut obj = aya::EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load(EBPF_OBJECT)?;
        let prog: &mut SchedClassifier = obj
            .program_mut(qod_common::CLASSIFIER)
            .ok_or_else(|| anyhow::anyhow!("the object has no classifier"))?
            .try_into()?;
        let t = Instant::now();
        prog.load()?;
        took.push(u32::try_from(t.elapsed().as_micros())?);
        insns = prog.info()?.verified_instruction_count().unwrap_or(0);
    }
    println!("| load ms | instructions verified |\n|---:|---:|");
    println!("| {:.1} | {insns} |", f64::from(median(took)) / 1000.0);
    Ok(())
}
