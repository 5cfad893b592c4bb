//! Traffic for the congestion lab and the tests: bulk TCP, paced UDP, latency probes and
//! bursts, single exchanges.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::Netns;

/// Throughput sampling interval.
pub const SAMPLE: Duration = Duration::from_millis(100);

/// What a set of TCP flows delivered.
#[derive(Clone, Debug, Default)]
pub struct Delivered {
    /// Bytes received per flow.
    pub bytes: Vec<u64>,
    /// Bytes received by all flows together in each `SAMPLE` interval.
    pub samples: Vec<u64>,
    pub duration: Duration,
}

impl Delivered {
    /// Goodput in bit/s, leaving out the first `warmup` (slow start).
    pub fn goodput_bps(&self, warmup: Duration) -> f64 {
        let skip = (warmup.as_millis() / SAMPLE.as_millis()) as usize;
        let kept = &self.samples[skip.min(self.samples.len())..];
        if kept.is_empty() {
            return 0.0;
        }
        kept.iter().sum::<u64>() as f64 * 8.0 / (kept.len() as f64 * SAMPLE.as_secs_f64())
    }
}

/// What the byte count `total` grew by in each `SAMPLE` interval, for `duration`.
fn sample(duration: Duration, total: impl Fn() -> u64) -> Vec<u64> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last = 0u64;
    while start.elapsed() < duration {
        std::thread::sleep(SAMPLE);
        let now = total();
        samples.push(now - last);
        last = now;
    }
    samples
}

/// `flows` TCP flows, each sending as fast as it can for `duration`, from `sender_ns` (bound
/// to `sender_ip`) to listeners in `receiver_ns` on `receiver`'s address, ports
/// `receiver.port()..+flows`.
pub fn tcp_flows(
    sender_ns: &Netns,
    sender_ip: std::net::IpAddr,
    receiver_ns: &Netns,
    receiver: SocketAddr,
    flows: u16,
    duration: Duration,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Delivered>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..flows).map(|_| AtomicU64::new(0)).collect());
    let recv_counters = counters.clone();
    let receivers = receiver_ns.spawn(move || {
        let listeners = (0..flows)
            .map(|i| TcpListener::bind(SocketAddr::new(receiver.ip(), receiver.port() + i)))
            .collect::<Result<Vec<_>, _>>()
            .context("listen")?;
        let _ = ready_tx.send(());
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let counters = recv_counters.clone();
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let (mut s, _) = l.accept()?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut buf = vec![0u8; 128 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return Ok(()),
                            Ok(n) => {
                                counters[i].fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("receivers did not listen")?;
    let senders = sender_ns.spawn(move || {
        let handles: Vec<_> = (0..flows)
            .map(|i| {
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let sock = socket2::Socket::new(
                        socket2::Domain::for_address(receiver),
                        socket2::Type::STREAM,
                        None,
                    )?;
                    sock.bind(&SocketAddr::new(sender_ip, 0).into())?;
                    sock.connect_timeout(
                        &SocketAddr::new(receiver.ip(), receiver.port() + i).into(),
                        Duration::from_secs(5),
                    )?;
                    let mut s: TcpStream = sock.into();
                    s.set_write_timeout(Some(Duration::from_millis(200)))?;
                    let buf = vec![0x5au8; 64 * 1024];
                    let end = Instant::now() + duration;
                    while Instant::now() < end {
                        let _ = s.write(&buf);
                    }
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        Ok(())
    });
    Ok(std::thread::spawn(move || {
        let samples = sample(duration, || {
            counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
        });
        senders
            .join()
            .map_err(|_| anyhow::anyhow!("senders panicked"))??;
        receivers
            .join()
            .map_err(|_| anyhow::anyhow!("receivers panicked"))??;
        Ok(Delivered {
            bytes: counters.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            samples,
            duration,
        })
    }))
}

/// A paced UDP flow of `rate_bps` (1200-byte datagrams) from `sender` in `sender_ns` to
/// `receiver` in `receiver_ns` for `duration`; what arrived, in `SAMPLE` intervals.
pub fn udp_flood(
    sender_ns: &Netns,
    sender: SocketAddr,
    receiver_ns: &Netns,
    receiver: SocketAddr,
    rate_bps: u64,
    duration: Duration,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Delivered>>> {
    const SIZE: usize = 1200;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiving = receiver_ns.spawn(move || {
        let sock = UdpSocket::bind(receiver).context("bind the receiver")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 2048];
        let end = Instant::now() + duration + Duration::from_millis(500);
        while Instant::now() < end {
            if let Ok(n) = sock.recv(&mut buf) {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the receiver did not bind")?;
    let sending = sender_ns.spawn(move || {
        let sock = UdpSocket::bind(sender).context("bind the sender")?;
        let data = vec![0x5au8; SIZE];
        let gap = Duration::from_secs_f64(SIZE as f64 * 8.0 / rate_bps as f64);
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < duration {
            let _ = sock.send_to(&data, receiver);
            sent += 1;
            if let Some(wait) = (start + gap * sent).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    });
    Ok(std::thread::spawn(move || {
        let samples = sample(duration, || received.load(Ordering::Relaxed));
        sending
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        receiving
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
        Ok(Delivered {
            bytes: vec![received.load(Ordering::Relaxed)],
            samples,
            duration,
        })
    }))
}

/// TCP segments retransmitted so far by the stack of `ns` (`TcpRetransSegs`).
pub fn tcp_retransmits(ns: &Netns) -> anyhow::Result<u64> {
    ns.run(|| {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next(), tcp.next());
        let (Some(names), Some(values)) = (names, values) else {
            anyhow::bail!("no Tcp lines in /proc/net/snmp");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RetransSegs")
            .and_then(|(_, v)| v.parse().ok())
            .context("no RetransSegs")
    })
}

/// Round trips of a UDP probe; `None` for a probe that never came back. `one_way` holds, for
/// the same datagrams, the time from just before the sender's `sendto` to the kernel's receive
/// timestamp at the echo (`SO_TIMESTAMPNS`, taken when the packet leaves the last queue of the
/// path and enters the receiver's stack): the delay the path's queues add, without the wake-ups
/// of the echo and of the probe's receiver, which on a two-core VM full of bulk senders can add
/// milliseconds of their own.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    pub rtts: Vec<Option<Duration>>,
    pub one_way: Vec<Option<Duration>>,
}

impl Probe {
    pub fn loss(&self) -> f64 {
        if self.rtts.is_empty() {
            return 0.0;
        }
        self.rtts.iter().filter(|r| r.is_none()).count() as f64 / self.rtts.len() as f64
    }

    /// The probe without its first `n` datagrams (the first of a new flow also waits for
    /// neighbour resolution on the way).
    pub fn skip(&self, n: usize) -> Probe {
        Probe {
            rtts: self.rtts.get(n..).unwrap_or_default().to_vec(),
            one_way: self.one_way.get(n..).unwrap_or_default().to_vec(),
        }
    }

    /// The one-way delays as a probe of their own (so the same quantiles read them).
    pub fn one_way(&self) -> Probe {
        Probe {
            rtts: self.one_way.clone(),
            one_way: self.one_way.clone(),
        }
    }

    /// Sorted round trips of the answered probes.
    pub fn sorted(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.rtts.iter().flatten().copied().collect();
        v.sort();
        v
    }

    /// The `q` quantile (0..=1) of the answered round trips.
    pub fn quantile(&self, q: f64) -> Duration {
        let v = self.sorted();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

/// An echo server on `server` in `server_ns` and a client from `client` in `client_ns`
/// sending a 64-byte probe every `interval` for `duration`.
pub fn udp_probe(
    client_ns: &Netns,
    client: SocketAddr,
    server_ns: &Netns,
    server: SocketAddr,
    interval: Duration,
    duration: Duration,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Probe>>> {
    udp_bursts(
        client_ns,
        client,
        server_ns,
        server,
        Bursts { count: 1, size: 64 },
        interval,
        duration,
    )
}

/// Bursts of `count` datagrams of `size` bytes sent back to back (the shape of a game tick,
/// a video frame, a voice packet train).
#[derive(Clone, Copy, Debug)]
pub struct Bursts {
    pub count: usize,
    pub size: usize,
}

/// [`udp_probe`] sending a burst every `interval`: each datagram is answered with its first
/// 64 bytes, so what is measured is the way out (towards the server's answer).
pub fn udp_bursts(
    client_ns: &Netns,
    client: SocketAddr,
    server_ns: &Netns,
    server: SocketAddr,
    bursts: Bursts,
    interval: Duration,
    duration: Duration,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Probe>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The echo runs until the client is done, so the port is free for the next probe.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo_done = done.clone();
    let echo = server_ns.spawn(move || {
        let sock = UdpSocket::bind(server).context("bind echo")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .context("SO_TIMESTAMPNS")?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        while !echo_done.load(Ordering::Relaxed) {
            if let Some((n, from, arrived)) = recv_stamped(&sock, &mut buf) {
                // Bytes 16..24 carry the sender's wall clock; 24..32 get the one-way delay.
                if n >= ECHO_HEADER {
                    let sent = u64::from_be_bytes(buf[16..24].try_into().unwrap_or_default());
                    let one_way = arrived.map_or(u64::MAX, |a| a.saturating_sub(sent));
                    buf[24..32].copy_from_slice(&one_way.to_be_bytes());
                }
                let _ = sock.send_to(&buf[..n.min(64)], from);
            }
        }
        Ok(())
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(echo
            .join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("echo did not start")));
    }
    Ok(client_ns.spawn(move || {
        let sock = UdpSocket::bind(client).context("bind probe")?;
        let rx = sock.try_clone()?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))?;
        let ticks = (duration.as_micros() / interval.as_micros().max(1)) as usize;
        let count = ticks * bursts.count;
        let start = Instant::now();
        let receiver = std::thread::spawn(move || {
            let mut rtts = vec![None; count];
            let mut one_way = vec![None; count];
            let mut buf = [0u8; 2048];
            let end = start + duration + Duration::from_secs(1);
            while Instant::now() < end {
                if let Ok(n) = rx.recv(&mut buf)
                    && n >= ECHO_HEADER
                {
                    let word = |at: usize| {
                        u64::from_be_bytes(buf[at..at + 8].try_into().unwrap_or_default())
                    };
                    let seq = word(0) as usize;
                    let sent = Duration::from_nanos(word(8));
                    let delay = word(24);
                    if let Some(slot) = rtts.get_mut(seq) {
                        *slot = Some(start.elapsed().saturating_sub(sent));
                        one_way[seq] = (delay != u64::MAX).then(|| Duration::from_nanos(delay));
                    }
                }
            }
            (rtts, one_way)
        });
        let mut pkt = vec![0u8; bursts.size.max(ECHO_HEADER)];
        for tick in 0..ticks {
            let due = start + interval * tick as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            for n in 0..bursts.count {
                let seq = tick * bursts.count + n;
                pkt[..8].copy_from_slice(&(seq as u64).to_be_bytes());
                pkt[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
                pkt[16..24].copy_from_slice(&wall_clock_ns().to_be_bytes());
                let _ = sock.send_to(&pkt, server);
            }
        }
        let rtts = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("probe receiver panicked"));
        done.store(true, Ordering::Relaxed);
        echo.join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))??;
        let (rtts, one_way) = rtts?;
        Ok(Probe { rtts, one_way })
    }))
}

/// A probe datagram's header: sequence, monotonic send time, wall-clock send time (the
/// kernel's receive timestamps are wall clock), one-way delay filled in by the echo.
const ECHO_HEADER: usize = 32;

fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One datagram with its sender and the kernel's receive timestamp (wall clock, ns) when the
/// socket has `SO_TIMESTAMPNS` on; `None` on timeout or error.
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr, Option<u64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .ok()?;
    let arrived = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmTimestampns(ts) => {
            Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        }
        _ => None,
    });
    let from = msg.address.as_ref().and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
            })
    })?;
    Some((msg.bytes, from, arrived))
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` (bound in `ns`) to `to`.
pub fn udp_send(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    count: usize,
    payload: usize,
) -> anyhow::Result<()> {
    ns.run(move || {
        let sock = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
        let data = vec![0x5au8; payload];
        for _ in 0..count {
            sock.send_to(&data, to)
                .with_context(|| format!("send to {to}"))?;
            // Pace a little so no queue on the path can drop.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

/// A TCP exchange: `server_ns` listens on `server`, `client_ns` connects from `client`; each side
/// sends `bytes` and reads the other's. Returns when both are done.
pub fn tcp_exchange(
    client_ns: &Netns,
    client: SocketAddr,
    server_ns: &Netns,
    server: SocketAddr,
    bytes: usize,
) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server_ns.spawn(move || {
        let listener = TcpListener::bind(server).with_context(|| format!("listen {server}"))?;
        let _ = tx.send(());
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = vec![0u8; bytes];
        s.read_exact(&mut got)?;
        s.write_all(&vec![0xa5u8; bytes])?;
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("server did not listen")?;
    client_ns.run(move || {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(client),
            socket2::Type::STREAM,
            None,
        )?;
        sock.bind(&client.into())?;
        sock.connect_timeout(&server.into(), Duration::from_secs(10))?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&vec![0x5au8; bytes])?;
        let mut got = vec![0u8; bytes];
        s.read_exact(&mut got)?;
        Ok(())
    })?;
    srv.join()
        .map_err(|_| anyhow::anyhow!("tcp server panicked"))?
}
