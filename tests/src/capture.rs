//! Packets seen on the wire: a packet socket in a namespace, and frame parsing.

#[allow(unused_imports)]
use super::*;

/// One packet as seen on the wire by [`Capture`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub dscp: u8,
    pub ecn: u8,
    /// Whole frame length (what `skb->len` is at egress).
    pub frame_len: usize,
    /// Whether the IPv4 header checksum verifies (always true for IPv6).
    pub checksum_ok: bool,
}

/// Captures every IP packet received on an interface (AF_PACKET), from start until `stop`.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Seen>>>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let ifname = ifname.to_owned();
        let thread = ns.spawn(move || {
            let sock = match packet_socket(&ifname) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65_536];
            // After the stop flag, keep reading without waiting until the queue is empty, so
            // nothing that arrived is left unread.
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                let flags = libc::MSG_TRUNC | if stopping { libc::MSG_DONTWAIT } else { 0 };
                // SAFETY: buf and from are valid for the sizes passed; the socket is open.
                let n = unsafe {
                    libc::recvfrom(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        flags,
                        (&raw mut from).cast(),
                        &mut len,
                    )
                };
                if n < 0 {
                    if stopping {
                        break;
                    }
                    continue; // timeout: check the stop flag
                }
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let n = n as usize;
                if let Some(p) = parse_frame(&buf[..n.min(buf.len())], n) {
                    seen.push(p);
                }
            }
            Ok(seen)
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("capture on {}: {e}", ns.name),
            Err(_) => bail!("capture on {} did not start", ns.name),
        }
    }

    /// Stops after a short settle time and returns what was seen.
    pub fn finish(mut self) -> anyhow::Result<Vec<Seen>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("capture already finished")?;
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn packet_socket(ifname: &str) -> anyhow::Result<OwnedFd> {
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "bind AF_PACKET to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    // A large buffer so a burst (tests run in parallel on few CPUs) is not dropped before it is
    // read: a capture that misses packets would make exact counter checks flaky.
    let rcvbuf: libc::c_int = 32 << 20;
    // SAFETY: rcvbuf is a valid c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: tv is a valid timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(sock)
}

/// Parses an Ethernet frame carrying IPv4 or IPv6 (no VLAN in the lab).
pub fn parse_frame(f: &[u8], frame_len: usize) -> Option<Seen> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (src, dst, protocol, tos, l4, checksum_ok) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let hdr = ip.get(..ihl)?;
            let mut sum: u32 = hdr
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let src = IpAddr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            (src, dst, ip[9], ip[1], ip.get(ihl..)?, sum == 0xffff)
        }
        0x86dd => {
            let tc = ((ip.first()? & 0x0f) << 4) | (ip.get(1)? >> 4);
            let src = IpAddr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            (src, dst, ip[6], tc, ip.get(40..)?, true)
        }
        _ => return None,
    };
    let (sport, dport) = match (protocol, l4.get(..4)) {
        (6 | 17, Some(p)) => (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        _ => (0, 0),
    };
    Some(Seen {
        src,
        dst,
        protocol,
        sport,
        dport,
        dscp: tos >> 2,
        ecn: tos & 3,
        frame_len,
        checksum_ok,
    })
}
