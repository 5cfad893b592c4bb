//! Test kit for qod's integration tests and the demo: throwaway network namespaces, a
//! device / edge / server lab, packet capture on the wire, traffic generators, and the real
//! `qodd` binary as a child process.
//!
//! Everything created here has a unique name and is removed on drop, also when a test panics.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use qod_daemon::devkit::{DevPki, TokenSpec};
use qod_proto::client::{self, QodChannel};
use qod_proto::v1::{
    qos_profiles_client::QosProfilesClient, quality_on_demand_client::QualityOnDemandClient,
};

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prefix of every namespace the kit creates; the process id follows it.
const NS_PREFIX: &str = "qodt";

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale);
    format!(
        "{NS_PREFIX}{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes namespaces left by kit users that were killed (no Drop ran): those whose process is
/// gone.
fn sweep_stale() {
    let Ok(list) = sh("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique(tag);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection: addresses are usable at once, and nothing else is here.
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// As [`Netns::run`] without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> JoinHandle<anyhow::Result<T>> {
        in_netns(&self.name, f)
    }

    /// A TCP connection to `to` from inside this namespace (from `from` when given); the
    /// socket stays in the namespace whichever thread uses it.
    pub fn tcp_connect(
        &self,
        to: SocketAddr,
        from: Option<SocketAddr>,
    ) -> anyhow::Result<std::net::TcpStream> {
        tcp_connect_in(&self.name, to, from)
    }
}

/// Runs `f` on a new thread that has entered network namespace `name`.
fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
}

/// See [`Netns::tcp_connect`].
fn tcp_connect_in(
    name: &str,
    to: SocketAddr,
    from: Option<SocketAddr>,
) -> anyhow::Result<std::net::TcpStream> {
    in_netns(name, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(from) = from {
            socket.bind(&from.into())?;
        }
        socket
            .connect_timeout(&to.into(), Duration::from_secs(5))
            .with_context(|| format!("connect to {to}"))?;
        Ok(socket.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Addresses of the lab (the same in every lab: each lab has its own namespaces).
pub mod addr {
    pub const DEVICE_V4: &str = "10.0.1.2";
    pub const OTHER_DEVICE_V4: &str = "10.0.1.3";
    pub const EDGE_DEV_V4: &str = "10.0.1.1";
    pub const EDGE_SRV_V4: &str = "10.0.2.1";
    pub const SERVER_V4: &str = "10.0.2.2";
    pub const OTHER_SERVER_V4: &str = "10.0.2.3";
    pub const DEVICE_V6: &str = "fd00:1::2";
    /// In another /64 than the device, so it is another device.
    pub const OTHER_DEVICE_V6: &str = "fd00:11::3";
    pub const EDGE_DEV_V6: &str = "fd00:1::1";
    pub const EDGE_SRV_V6: &str = "fd00:2::1";
    pub const SERVER_V6: &str = "fd00:2::2";
    pub const OTHER_SERVER_V6: &str = "fd00:2::3";
}

/// device ⇄ edge ⇄ server: three namespaces and two veth pairs. The edge forwards between
/// `EDGE_DEV_IF` and `EDGE_SRV_IF`, the interfaces `qodd` manages.
pub struct Lab {
    pub device: Netns,
    pub edge: Netns,
    pub server: Netns,
}

pub const DEVICE_IF: &str = "dev0";
pub const EDGE_DEV_IF: &str = "edge-dev";
pub const EDGE_SRV_IF: &str = "edge-srv";
pub const SERVER_IF: &str = "srv0";

/// Adds `addrs` to `ifname` in `ns` (IPv6 without duplicate address detection), brings it up and
/// turns offloads off so packets on the wire are what the classifier and the capture see.
fn configure(ns: &Netns, ifname: &str, addrs: &[&str]) -> anyhow::Result<()> {
    for a in addrs {
        let mut args = vec!["addr", "add", a, "dev", ifname];
        if a.contains(':') {
            args.push("nodad");
        }
        ns.ip(&args)?;
    }
    ns.ip(&["link", "set", ifname, "up"])?;
    let _ = ns.exec(
        "ethtool",
        &["-K", ifname, "tso", "off", "gso", "off", "gro", "off"],
    );
    Ok(())
}

impl Lab {
    pub fn new() -> anyhow::Result<Self> {
        let lab = Self {
            device: Netns::new("dev")?,
            edge: Netns::new("edge")?,
            server: Netns::new("srv")?,
        };
        lab.link_device_side()?;
        lab.link_server_side()?;
        lab.edge.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        lab.edge
            .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        lab.wait_ready()?;
        Ok(lab)
    }

    /// (Re)creates the device ⇄ edge veth pair with its addresses and the device's routes.
    pub fn link_device_side(&self) -> anyhow::Result<()> {
        use addr::*;
        let (d, e) = (&self.device, &self.edge);
        d.ip(&[
            "link",
            "add",
            DEVICE_IF,
            "type",
            "veth",
            "peer",
            "name",
            EDGE_DEV_IF,
            "netns",
            &e.name,
        ])?;
        configure(
            d,
            DEVICE_IF,
            &[
                &format!("{DEVICE_V4}/24"),
                &format!("{OTHER_DEVICE_V4}/24"),
                &format!("{DEVICE_V6}/64"),
                &format!("{OTHER_DEVICE_V6}/64"),
            ],
        )?;
        configure(
            e,
            EDGE_DEV_IF,
            &[
                &format!("{EDGE_DEV_V4}/24"),
                &format!("{EDGE_DEV_V6}/64"),
                "fd00:11::1/64",
            ],
        )?;
        d.ip(&["route", "add", "default", "via", EDGE_DEV_V4])?;
        d.ip(&["-6", "route", "add", "default", "via", EDGE_DEV_V6])?;
        Ok(())
    }

    /// Creates the edge ⇄ server veth pair with its addresses and the server's routes.
    fn link_server_side(&self) -> anyhow::Result<()> {
        use addr::*;
        let (e, s) = (&self.edge, &self.server);
        e.ip(&[
            "link",
            "add",
            EDGE_SRV_IF,
            "type",
            "veth",
            "peer",
            "name",
            SERVER_IF,
            "netns",
            &s.name,
        ])?;
        configure(
            e,
            EDGE_SRV_IF,
            &[&format!("{EDGE_SRV_V4}/24"), &format!("{EDGE_SRV_V6}/64")],
        )?;
        configure(
            s,
            SERVER_IF,
            &[
                &format!("{SERVER_V4}/24"),
                &format!("{OTHER_SERVER_V4}/24"),
                &format!("{SERVER_V6}/64"),
                &format!("{OTHER_SERVER_V6}/64"),
            ],
        )?;
        s.ip(&["route", "add", "default", "via", EDGE_SRV_V4])?;
        s.ip(&["-6", "route", "add", "default", "via", EDGE_SRV_V6])?;
        Ok(())
    }

    /// Waits until every veth reports carrier and IPv6 has installed its prefix routes (the
    /// kernel does both asynchronously, up to a second after `link set up`); packets sent before
    /// that are dropped for want of a route.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let checks: [(&Netns, &str, &str); 4] = [
            (&self.device, DEVICE_IF, "fd00:1::/64"),
            (&self.edge, EDGE_DEV_IF, "fd00:1::/64"),
            (&self.edge, EDGE_SRV_IF, "fd00:2::/64"),
            (&self.server, SERVER_IF, "fd00:2::/64"),
        ];
        loop {
            let ready = checks.iter().all(|(ns, ifname, prefix)| {
                let up = ns
                    .ip(&["-o", "link", "show", "dev", ifname])
                    .is_ok_and(|o| o.contains("state UP"));
                let routed = ns
                    .ip(&["-6", "route", "show", prefix, "dev", ifname])
                    .is_ok_and(|o| !o.trim().is_empty());
                up && routed
            });
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "lab links did not come up within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

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

/// `GET http://127.0.0.1:{port}{path}` inside `ns`: status, content type and body.
/// The samples of an OpenMetrics text: `name{labels}` → value.
pub fn metric_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sample `key`; a missing one fails with the samples of that metric.
pub fn metric_value(samples: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *samples.get(key).unwrap_or_else(|| {
        let name = key.split('{').next().unwrap_or(key);
        let near: Vec<_> = samples.keys().filter(|k| k.starts_with(name)).collect();
        panic!("no sample {key}; {name} has {near:?}")
    })
}

pub fn http_get(ns: &Netns, port: u16, path: &str) -> (u16, String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let resp = reqwest::Client::new().get(&url).send().await?;
            let status = resp.status().as_u16();
            let kind = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            Ok((status, kind, resp.text().await?))
        })
    })
    .expect("HTTP GET inside the namespace")
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

/// Where `cargo build` put the `qodd` binary: `$QODD_BIN`, else next to the test executable.
pub fn qodd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QODD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/qodd
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("qodd"))
        .unwrap_or_default()
}

/// The workspace root (the test kit lives in `tests/` under it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A binary of the release build (`cargo build --release -p qod-daemon --bins`), which the demo,
/// the lab and the benchmarks run.
pub fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

/// A running `qodd` in a namespace, reachable on a Unix socket with TLS and access tokens (a
/// dev PKI of its own); stopped on drop.
pub struct Qodd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    netns: String,
    /// The dev CA, certificates and token key this instance trusts.
    pub pki: DevPki,
    /// A token of [`TEST_CLIENT`] with every scope.
    pub token: String,
    /// This instance's pin root in bpffs (removed on drop).
    pub pin_path: PathBuf,
    /// How long a start may take before it counts as failed.
    pub start_timeout: Duration,
    /// How the process is started.
    pub launch: Launch,
}

/// How a test starts the `qodd` process, beyond its configuration.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// A command (and its arguments) that runs qodd inside the namespace, e.g.
    /// `setpriv --bounding-set …`.
    pub wrapper: Vec<String>,
    /// Extra environment, e.g. `NOTIFY_SOCKET`.
    pub env: Vec<(String, String)>,
    /// Listen on this TCP address inside the namespace instead of the Unix socket; the test
    /// kit's clients reach it from inside the namespace.
    pub tcp_listen: Option<SocketAddr>,
}

/// The bpffs test instances of qodd pin their data planes under.
pub const TEST_BPFFS: &str = "/run/qodt-bpffs";

/// The client id of [`Qodd::token`].
pub const TEST_CLIENT: &str = "test-client";

impl Qodd {
    /// Starts `qodd` in `ns` with `extra_toml` appended to a config that sets the socket and
    /// interfaces (names, or inline tables like `{ name = "x", side = "device", capacity_mbit = 100 }`),
    /// and waits until its API answers.
    pub async fn start(ns: &Netns, interfaces: &[&str], extra_toml: &str) -> anyhow::Result<Self> {
        Self::start_bin(&qodd_bin(), ns, interfaces, extra_toml).await
    }

    /// As [`Qodd::start`] with an explicit binary.
    pub async fn start_bin(
        bin: &Path,
        ns: &Netns,
        interfaces: &[&str],
        extra_toml: &str,
    ) -> anyhow::Result<Self> {
        Self::start_secured(bin, ns, interfaces, extra_toml, DevPki::config_toml).await
    }

    /// As [`Qodd::start_bin`], with the `[tls]` / `[auth]` / `[limits]` part of the config
    /// written by `security` from this instance's dev PKI.
    pub async fn start_secured(
        bin: &Path,
        ns: &Netns,
        interfaces: &[&str],
        extra_toml: &str,
        security: impl FnOnce(&DevPki) -> String,
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, ns, interfaces, extra_toml, security, Launch::default()).await
    }

    /// As [`Qodd::start_secured`], launched as `launch` says (also on every restart).
    pub async fn start_with(
        bin: &Path,
        ns: &Netns,
        interfaces: &[&str],
        extra_toml: &str,
        security: impl FnOnce(&DevPki) -> String,
        launch: Launch,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = DevPki::ensure(&dir.path().join("pki"))?;
        // `ip netns exec` gives qodd a /sys of its own, so pins under /sys/fs/bpf would die
        // with it: the test bpffs is mounted where the host's mounts stay visible. It is shared
        // by every namespace, so each instance pins under its own root.
        // Once per process: two racing mounts would stack, hiding the first one's pins.
        static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
        {
            let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
            if !*mounted {
                qod_daemon::dataplane::ensure_bpffs(Path::new(TEST_BPFFS))?;
                *mounted = true;
            }
        }
        let pin_path = Path::new(TEST_BPFFS).join(format!(
            "qodt-{}",
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().trim_start_matches('.').to_owned())
                .unwrap_or_default()
        ));
        let token = pki.mint(&TokenSpec::full(TEST_CLIENT))?;
        let socket = dir.path().join("qodd.sock");
        let config = dir.path().join("qodd.toml");
        // An entry that is already an inline table (`{ name = ... }`) goes in as it is.
        let list: Vec<String> = interfaces
            .iter()
            .map(|i| {
                if i.starts_with('{') {
                    (*i).to_owned()
                } else {
                    format!("{i:?}")
                }
            })
            .collect();
        fs::write(
            &config,
            format!(
                "listen = \"{}\"\nstate_dir = \"{}\"\nbpffs = \"{TEST_BPFFS}\"\npin_path = \"{}\"\ninterfaces = [{}]\n{extra_toml}\n{}",
                launch
                    .tcp_listen
                    .map_or_else(|| format!("unix:{}", socket.display()), |a| a.to_string()),
                dir.path().join("state").display(),
                pin_path.display(),
                list.join(", "),
                security(&pki),
            ),
        )?;
        ensure!(
            bin.exists(),
            "qodd binary not found at {} (build it first: cargo build -p qod-daemon --bins, or set QODD_BIN)",
            bin.display()
        );
        let mut q = Self {
            child: None,
            socket,
            dir,
            bin: bin.to_owned(),
            netns: ns.name.clone(),
            pki,
            token,
            pin_path,
            start_timeout: Duration::from_secs(30),
            launch,
        };
        q.launch().await?;
        Ok(q)
    }

    /// Starts the binary on the same configuration and state, and waits until it answers.
    async fn launch(&mut self) -> anyhow::Result<()> {
        self.spawn_process()?;
        self.wait_serving().await
    }

    /// Starts `qodd` again after [`Qodd::kill9`] or [`Qodd::stop`] without waiting for it.
    pub fn restart_no_wait(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn_process()
    }

    fn spawn_process(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("qodd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(&self.launch.wrapper)
            .arg(&self.bin)
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn qodd")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until health says SERVING (the store restored), or fails on exit or timeout.
    pub async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("qodd exited with {status} during start:\n{}", self.log());
            }
            // Health needs no token (the API's readiness for probes): SERVING once the store is
            // restored.
            // Bounded: something else listening on the address may never answer.
            if let Ok(Ok(channel)) =
                tokio::time::timeout(Duration::from_secs(2), self.channel()).await
                && tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "qod.v1.QualityOnDemand".into(),
                    })
                    .await
                    .is_ok_and(|r| {
                        r.into_inner().status()
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                    })
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "qodd did not answer within {:?}:\n{}",
                    self.start_timeout,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `qodd` again after [`Qodd::kill9`] or [`Qodd::stop`], same configuration and state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch().await
    }

    pub fn addr(&self) -> String {
        match self.launch.tcp_listen {
            Some(a) => a.to_string(),
            None => format!("unix:{}", self.socket.display()),
        }
    }

    /// TLS trusting this instance's CA, with the dev client certificate (offered only if qodd
    /// asks for one: mutual TLS) and `token`.
    pub fn options(&self, token: Option<&str>) -> anyhow::Result<client::Options> {
        Ok(client::Options {
            token: token.map(str::to_owned),
            ca_pem: Some(self.pki.read("ca.crt")?),
            identity: Some((self.pki.read("client.crt")?, self.pki.read("client.key")?)),
            server_name: None,
        })
    }

    /// A channel as [`TEST_CLIENT`] with every scope.
    pub async fn channel(&self) -> anyhow::Result<QodChannel> {
        self.channel_with(&self.options(Some(&self.token))?).await
    }

    pub async fn channel_with(&self, options: &client::Options) -> anyhow::Result<QodChannel> {
        let dial = self.launch.tcp_listen.map(|to| {
            let netns = self.netns.clone();
            let dial: client::Dial = std::sync::Arc::new(move || {
                let netns = netns.clone();
                Box::pin(async move {
                    let s = tokio::task::spawn_blocking(move || tcp_connect_in(&netns, to, None))
                        .await
                        .map_err(std::io::Error::other)?
                        .map_err(std::io::Error::other)?;
                    s.set_nonblocking(true)?;
                    tokio::net::TcpStream::from_std(s)
                })
            });
            dial
        });
        client::connect_via(&self.addr(), options, dial)
            .await
            .map_err(|e| anyhow::anyhow!("connect to qodd: {e}"))
    }

    pub async fn sessions(&self) -> anyhow::Result<QualityOnDemandClient<QodChannel>> {
        Ok(QualityOnDemandClient::new(self.channel().await?))
    }

    /// The sessions API as the bearer of `token`.
    pub async fn sessions_as(
        &self,
        token: &str,
    ) -> anyhow::Result<QualityOnDemandClient<QodChannel>> {
        self.sessions_with(&self.options(Some(token))?).await
    }

    /// The sessions API over a connection made with `options`.
    pub async fn sessions_with(
        &self,
        options: &client::Options,
    ) -> anyhow::Result<QualityOnDemandClient<QodChannel>> {
        Ok(QualityOnDemandClient::new(
            self.channel_with(options).await?,
        ))
    }

    pub async fn profiles(&self) -> anyhow::Result<QosProfilesClient<QodChannel>> {
        Ok(QosProfilesClient::new(self.channel().await?))
    }

    /// The profiles API as the bearer of `token`.
    pub async fn profiles_as(&self, token: &str) -> anyhow::Result<QosProfilesClient<QodChannel>> {
        Ok(QosProfilesClient::new(
            self.channel_with(&self.options(Some(token))?).await?,
        ))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("qodd.log")).unwrap_or_default()
    }

    /// SIGTERM, then wait for the exit status (SIGKILL after 15 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Qodd {
    fn drop(&mut self) {
        self.stop();
        // qodd leaves its data plane pinned on exit; the test's goes with it.
        let _ = fs::remove_dir_all(&self.pin_path);
    }
}

/// `BPF_PROG_TEST_RUN` for tc programs, and builders for the packets it is fed.
pub mod bpf {
    use std::os::fd::{AsRawFd as _, BorrowedFd};

    use anyhow::ensure;

    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    /// `sizeof(struct __sk_buff)` in this kernel's UAPI.
    const SKB_CTX_WORDS: usize = 48;
    /// Index of `priority` in `struct __sk_buff` viewed as `u32`s.
    const SKB_PRIORITY: usize = 8;

    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }

    /// What one run produced.
    #[derive(Debug)]
    pub struct RunResult {
        pub retval: i32,
        /// The packet after the program ran.
        pub data: Vec<u8>,
        /// `skb->priority` after the program ran.
        pub priority: u32,
        /// Average nanoseconds per run, as the kernel measured it.
        pub ns_per_run: u32,
    }

    /// Runs the program `repeat` times on `packet` (an Ethernet frame).
    pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> anyhow::Result<RunResult> {
        let mut out = vec![0u8; packet.len() + 256];
        let ctx_in = [0u32; SKB_CTX_WORDS];
        let mut ctx_out = [0u32; SKB_CTX_WORDS];
        let mut attr = TestRunAttr {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ctx_size_in: (SKB_CTX_WORDS * 4) as u32,
            ctx_size_out: (SKB_CTX_WORDS * 4) as u32,
            ctx_in: ctx_in.as_ptr() as u64,
            ctx_out: ctx_out.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: attr points at buffers that outlive the call, with their sizes set.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        ensure!(
            rc == 0,
            "BPF_PROG_TEST_RUN: {}",
            std::io::Error::last_os_error()
        );
        out.truncate(attr.data_size_out as usize);
        Ok(RunResult {
            retval: attr.retval as i32,
            data: out,
            priority: ctx_out[SKB_PRIORITY],
            ns_per_run: attr.duration,
        })
    }

    pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    pub const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    /// Ethernet header, with 802.1Q tags (VLAN ids) before the ethertype.
    pub fn eth(ethertype: u16, vlans: &[u16], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(payload.len() + 22);
        f.extend_from_slice(&MAC_DST);
        f.extend_from_slice(&MAC_SRC);
        for vid in vlans {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// UDP (17) or TCP (6) header with the given ports, then `payload` bytes.
    pub fn l4(protocol: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        if protocol == 6 {
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            h.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
        }
        h.extend(std::iter::repeat_n(0xabu8, payload));
        h
    }

    /// Internet checksum of `data`.
    pub fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// IPv4 packet; `options` must be a multiple of 4 bytes; `frag` is the flags+offset field.
    pub fn ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        tos: u8,
        options: &[u8],
        frag: u16,
        body: &[u8],
    ) -> Vec<u8> {
        let ihl = 5 + options.len() / 4;
        let total = ihl * 4 + body.len();
        let mut h = vec![(4 << 4) | ihl as u8, tos];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, protocol, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    /// IPv6 packet; `ext` is a list of (header type, bytes without the next-header byte).
    pub fn ipv6(
        src: [u8; 16],
        dst: [u8; 16],
        protocol: u8,
        tclass: u8,
        flow: u32,
        ext: &[(u8, Vec<u8>)],
        body: &[u8],
    ) -> Vec<u8> {
        let mut chain = Vec::new();
        let types: Vec<u8> = ext.iter().map(|(t, _)| *t).chain([protocol]).collect();
        for (i, (_, bytes)) in ext.iter().enumerate() {
            chain.push(types[i + 1]);
            chain.extend_from_slice(bytes);
        }
        let first = (6u32 << 28) | (u32::from(tclass) << 20) | (flow & 0xfffff);
        let mut h = first.to_be_bytes().to_vec();
        h.extend_from_slice(&((chain.len() + body.len()) as u16).to_be_bytes());
        h.push(types[0]);
        h.push(64);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&chain);
        h.extend_from_slice(body);
        h
    }
}

impl Qodd {
    /// The configuration file `qodd` was started with (rewrite it, then [`Qodd::reload`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("qodd.toml")
    }

    /// Sends SIGHUP: `qodd` re-reads its configuration.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("qodd is stopped")?.id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        Ok(())
    }
}

/// What a [`SinkServer`] answers on a path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// This HTTP status.
    Status(u16),
    /// Hold the request this long, then 204 (recorded on arrival).
    Hang(Duration),
    /// 200 with this JSON body (a document to serve, such as a JWKS).
    Json(String),
}

/// One request a [`SinkServer`] received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: serde_json::Value,
    /// What it was answered.
    pub status: u16,
}

type Script = std::collections::HashMap<String, std::collections::VecDeque<Reply>>;
/// What the sink's handler shares with [`SinkServer`].
type SinkState = (
    Arc<std::sync::Mutex<Vec<Received>>>,
    Arc<std::sync::Mutex<Script>>,
);

/// A real HTTP server in a namespace, standing in for a notification sink. Each path answers
/// from its script (the last reply repeats; unscripted paths answer 204) and every request is
/// recorded.
pub struct SinkServer {
    pub port: u16,
    received: Arc<std::sync::Mutex<Vec<Received>>>,
    script: Arc<std::sync::Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SinkServer {
    /// Listens on 127.0.0.1 inside `ns`.
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        use axum::{extract::State, http::HeaderMap, http::StatusCode, http::Uri};
        let received: Arc<std::sync::Mutex<Vec<Received>>> = Arc::default();
        let script: Arc<std::sync::Mutex<Script>> = Arc::default();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = (received.clone(), script.clone());
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = port_tx.send(listener.local_addr()?.port());
                let app = axum::Router::new().fallback(
                    |State((received, script)): State<SinkState>,
                     uri: Uri,
                     headers: HeaderMap,
                     body: String| async move {
                        let path = uri.path().to_owned();
                        let reply = {
                            let mut script = script.lock().unwrap_or_else(|p| p.into_inner());
                            match script.get_mut(&path) {
                                Some(q) if q.len() > 1 => q.pop_front(),
                                Some(q) => q.front().cloned(),
                                None => None,
                            }
                        };
                        let (status, hang, answer) = match reply {
                            Some(Reply::Status(s)) => (s, None, String::new()),
                            Some(Reply::Hang(d)) => (204, Some(d), String::new()),
                            Some(Reply::Json(b)) => (200, None, b),
                            None => (204, None, String::new()),
                        };
                        let header = |h: &str| {
                            headers
                                .get(h)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        // Recorded on arrival, so a request the sender gave up on still counts.
                        received
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Received {
                                path,
                                content_type: header("content-type"),
                                authorization: header("authorization"),
                                body: serde_json::from_str(&body)
                                    .unwrap_or(serde_json::Value::Null),
                                status,
                            });
                        if let Some(d) = hang {
                            tokio::time::sleep(d).await;
                        }
                        (
                            StatusCode::from_u16(status)
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            answer,
                        )
                    },
                );
                axum::serve(listener, app.with_state(state))
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await?;
                anyhow::Ok(())
            })
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("sink server did not start")?;
        Ok(Self {
            port,
            received,
            script,
            stop: Some(stop_tx),
        })
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Answers on `path` from `replies` in order, the last one repeating.
    pub fn script(&self, path: &str, replies: &[Reply]) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_owned(), replies.iter().cloned().collect());
    }

    /// Requests received on `path` so far.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` has received at least `n` requests; returns them.
    pub async fn wait_for(
        &self,
        path: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received(path);
            if got.len() >= n {
                return Ok(got);
            }
            ensure!(
                Instant::now() < deadline,
                "{path}: {} of {n} requests within {within:?}: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Traffic for the congestion lab: bulk TCP, a latency probe, a measured single flow.
pub mod traffic {
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
        let counters: Arc<Vec<AtomicU64>> =
            Arc::new((0..flows).map(|_| AtomicU64::new(0)).collect());
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

    /// Round trips of a UDP probe; `None` for a probe that never came back.
    #[derive(Clone, Debug, Default)]
    pub struct Probe {
        pub rtts: Vec<Option<Duration>>,
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
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            while !echo_done.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
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
                let mut buf = [0u8; 2048];
                let end = start + duration + Duration::from_secs(1);
                while Instant::now() < end {
                    if let Ok(n) = rx.recv(&mut buf)
                        && n >= 16
                    {
                        let seq =
                            u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()) as usize;
                        let sent = Duration::from_nanos(u64::from_be_bytes(
                            buf[8..16].try_into().unwrap_or_default(),
                        ));
                        if let Some(slot) = rtts.get_mut(seq) {
                            *slot = Some(start.elapsed().saturating_sub(sent));
                        }
                    }
                }
                rtts
            });
            let mut pkt = vec![0u8; bursts.size.max(16)];
            for tick in 0..ticks {
                let due = start + interval * tick as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                for n in 0..bursts.count {
                    let seq = tick * bursts.count + n;
                    pkt[..8].copy_from_slice(&(seq as u64).to_be_bytes());
                    pkt[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
                    let _ = sock.send_to(&pkt, server);
                }
            }
            let rtts = receiver
                .join()
                .map_err(|_| anyhow::anyhow!("probe receiver panicked"));
            done.store(true, Ordering::Relaxed);
            echo.join()
                .map_err(|_| anyhow::anyhow!("echo panicked"))??;
            Ok(Probe { rtts: rtts? })
        }))
    }
}

/// Building requests and reading answers of the qod gRPC API, for tests and the lab.
pub mod api {
    use std::{net::SocketAddr, time::Duration};

    use anyhow::Context as _;
    use qod_proto::v1 as pb;
    use tokio_stream::StreamExt as _;
    use tonic_types::StatusExt as _;

    use super::{EDGE_DEV_IF, EDGE_SRV_IF};

    pub fn ip(s: &str) -> std::net::IpAddr {
        s.parse()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    pub fn sa(s: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip(s), port)
    }

    /// A device by address: IPv6, or IPv4 without NAT (private = public).
    pub fn device(addr: &str) -> pb::Device {
        if addr.contains(':') {
            pb::Device {
                ipv6_address: Some(addr.into()),
                ..Default::default()
            }
        } else {
            pb::Device {
                ipv4_address: Some(pb::DeviceIpv4Addr {
                    public_address: Some(addr.into()),
                    private_address: Some(addr.into()),
                    public_port: None,
                }),
                ..Default::default()
            }
        }
    }

    /// An application server by address or network, IPv4 or IPv6.
    pub fn server(addr: &str) -> pb::ApplicationServer {
        if addr.contains(':') {
            pb::ApplicationServer {
                ipv6_address: Some(addr.into()),
                ..Default::default()
            }
        } else {
            pb::ApplicationServer {
                ipv4_address: Some(addr.into()),
                ..Default::default()
            }
        }
    }

    fn ports(list: &[u32]) -> Option<pb::PortsSpec> {
        (!list.is_empty()).then(|| pb::PortsSpec {
            ports: list.to_vec(),
            ranges: vec![],
        })
    }

    /// A `CreateSession` for `device_addr` ⇄ `server_addr` with optional port lists.
    pub fn session(
        device_addr: &str,
        server_addr: &str,
        profile: &str,
        device_ports: &[u32],
        server_ports: &[u32],
        duration: i32,
    ) -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            device: Some(device(device_addr)),
            application_server: Some(server(server_addr)),
            device_ports: ports(device_ports),
            application_server_ports: ports(server_ports),
            qos_profile: profile.into(),
            duration,
            ..Default::default()
        }
    }

    /// The CAMARA code of an error (its `google.rpc.ErrorInfo` reason).
    pub fn reason(status: &tonic::Status) -> String {
        status
            .get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default()
    }

    /// Fails the test with a clear message unless it runs as root.
    pub fn require_root() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "these tests create network namespaces and load eBPF: run them as root (cargo xtask test)"
        );
    }

    /// The next status change to UNAVAILABLE on a watch stream, within `within`.
    pub async fn next_unavailable(
        events: &mut tonic::Streaming<pb::SessionEvent>,
        within: Duration,
    ) -> anyhow::Result<pb::QosStatusChanged> {
        tokio::time::timeout(within, async {
            while let Some(ev) = events.next().await {
                if let Some(pb::session_event::Kind::QosStatusChanged(c)) = ev?.kind
                    && c.qos_status() == pb::QosStatus::Unavailable
                {
                    return Ok(c);
                }
            }
            anyhow::bail!("the watch stream ended")
        })
        .await
        .context("no UNAVAILABLE event in time")?
    }

    /// The lab's edge interfaces as qodd-scheduled, 100 Mbit/s each way.
    pub fn scheduled_interfaces() -> [String; 2] {
        [
            format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100 }}"),
            format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 100 }}"),
        ]
    }

    /// Profiles for congestion experiments: low latency (500 kbit/s cap), 20 Mbit/s guaranteed,
    /// 10 Mbit/s capped best effort.
    pub const CONGESTION_PROFILES: &str = r#"
[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
max_downstream_rate = { value = 500, unit = "kbps" }
max_upstream_rate = { value = 500, unit = "kbps" }

[[profiles]]
name = "QOS_G"
status = "ACTIVE"
service_class = "high_throughput_data"
target_min_downstream_rate = { value = 20, unit = "Mbps" }
max_downstream_rate = { value = 20, unit = "Mbps" }
target_min_upstream_rate = { value = 1, unit = "Mbps" }

[[profiles]]
name = "QOS_C"
status = "ACTIVE"
band = "best_effort"
max_downstream_rate = { value = 10, unit = "Mbps" }

[[profiles]]
name = "QOS_GU"
status = "ACTIVE"
service_class = "high_throughput_data"
target_min_downstream_rate = { value = 20, unit = "Mbps" }
"#;
}

impl Lab {
    /// Sends 5 uplink UDP datagrams `device:device_port → server:server_port` and returns the
    /// DSCP of each that reached the server (empty: none arrived).
    pub fn uplink_dscp(
        &self,
        device: &str,
        device_port: u16,
        server: &str,
        server_port: u16,
    ) -> anyhow::Result<Vec<u8>> {
        let capture = Capture::start(&self.server, SERVER_IF)?;
        udp_send(
            &self.device,
            api::sa(device, device_port),
            api::sa(server, server_port),
            5,
            64,
        )?;
        let (src, dst) = (api::ip(device), api::ip(server));
        Ok(capture
            .finish()?
            .iter()
            .filter(|p| p.src == src && p.dst == dst && p.dport == server_port)
            .map(|p| p.dscp)
            .collect())
    }
}

/// A lab with `qodd` on its edge managing both edge interfaces (marking only), `extra_toml`
/// appended to its configuration. Fails the test unless it runs as root.
pub async fn lab_with_qodd(extra_toml: &str) -> (Lab, Qodd) {
    lab_in(Mode::Marking, extra_toml).await
}

/// How `qodd` treats the lab's edge interfaces: restart and failure tests run in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Marking and policing only (no capacity).
    Marking,
    /// Both edge interfaces scheduled (`capacity_mbit = 1000`: HTB trees qodd owns).
    Scheduled,
}

/// A lab with `qodd` on its edge in `mode`, the built-in profiles, `extra_toml` appended.
pub async fn lab_in(mode: Mode, extra_toml: &str) -> (Lab, Qodd) {
    lab_launched(mode, extra_toml, Launch::default()).await
}

/// As [`lab_in`], qodd started as `launch` says.
pub async fn lab_launched(mode: Mode, extra_toml: &str, launch: Launch) -> (Lab, Qodd) {
    api::require_root();
    let lab = Lab::new().expect("lab");
    // 1 Gbit/s, so the pools admit the dozens of rated sessions these tests create
    // (100 Mbit/s holds 20 QOS_E sessions in its low-latency pool).
    let scheduled = [
        format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 1000 }}"),
        format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 1000 }}"),
    ];
    let interfaces: Vec<&str> = match mode {
        Mode::Marking => vec![EDGE_DEV_IF, EDGE_SRV_IF],
        Mode::Scheduled => scheduled.iter().map(String::as_str).collect(),
    };
    let qodd = Qodd::start_with(
        &qodd_bin(),
        &lab.edge,
        &interfaces,
        extra_toml,
        DevPki::config_toml,
        launch,
    )
    .await
    .expect("qodd");
    (lab, qodd)
}

/// Runs an `async fn(Mode)` test once per [`Mode`], as `NAME::marking` and `NAME::scheduled`.
#[macro_export]
macro_rules! in_every_mode {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn marking() {
                super::$body($crate::Mode::Marking).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn scheduled() {
                super::$body($crate::Mode::Scheduled).await
            }
        }
    };
}

/// A lab with `qodd` on its edge owning a 100 Mbit/s scheduler on both edge interfaces
/// ([`api::scheduled_interfaces`]) with [`api::CONGESTION_PROFILES`]; `extra_toml` (top-level keys)
/// goes before the profiles. Fails the test unless it runs as root.
pub async fn scheduled_lab_with_qodd(extra_toml: &str) -> (Lab, Qodd) {
    api::require_root();
    let lab = Lab::new().expect("lab");
    let interfaces = api::scheduled_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    let qodd = Qodd::start(
        &lab.edge,
        &interfaces,
        &format!("{extra_toml}\n{}", api::CONGESTION_PROFILES),
    )
    .await
    .expect("qodd");
    (lab, qodd)
}

/// Every session of `device` the caller may see (RetrieveSessionsByDevice).
pub async fn sessions_of_device(
    api: &mut QualityOnDemandClient<QodChannel>,
    device: &str,
) -> Vec<qod_proto::v1::SessionInfo> {
    api.retrieve_sessions_by_device(qod_proto::v1::RetrieveSessionsByDeviceRequest {
        device: Some(api::device(device)),
    })
    .await
    .expect("retrieve sessions by device")
    .into_inner()
    .sessions
}

/// Session `id` as GetSession returns it (the test fails if the call does).
pub async fn session_info(
    api: &mut QualityOnDemandClient<QodChannel>,
    id: &str,
) -> qod_proto::v1::SessionInfo {
    api.get_session(qod_proto::v1::GetSessionRequest {
        session_id: id.to_owned(),
    })
    .await
    .unwrap_or_else(|e| panic!("get session {id}: {e:?}"))
    .into_inner()
}

/// A QOS_G session (20 Mbit/s guaranteed downlink under [`api::CONGESTION_PROFILES`]) for
/// `device`, any server port, `duration` seconds.
pub async fn rated_session(
    api: &mut QualityOnDemandClient<QodChannel>,
    device: &str,
    duration: i32,
) -> qod_proto::v1::SessionInfo {
    api.create_session(api::session(
        device,
        addr::SERVER_V4,
        "QOS_G",
        &[],
        &[],
        duration,
    ))
    .await
    .expect("create a rated session")
    .into_inner()
}

/// A QOS_E session (DSCP 32) for the lab device's uplink to the server's port 5000, 10 minutes.
pub async fn marked_flow(
    api: &mut QualityOnDemandClient<QodChannel>,
) -> qod_proto::v1::SessionInfo {
    api.create_session(api::session(
        addr::DEVICE_V4,
        addr::SERVER_V4,
        "QOS_E",
        &[],
        &[5000],
        600,
    ))
    .await
    .expect("create the marked flow's session")
    .into_inner()
}

/// Every session event from now on.
pub async fn watch_all(
    api: &mut QualityOnDemandClient<QodChannel>,
) -> tonic::Streaming<qod_proto::v1::SessionEvent> {
    api.watch_session_events(qod_proto::v1::WatchSessionEventsRequest::default())
        .await
        .expect("watch")
        .into_inner()
}

/// Live sessions of `profile` for `n` device addresses 10.x.y.z, written straight into the store.
pub fn fill_store(dir: &std::path::Path, n: u32, profile: &str) -> anyhow::Result<()> {
    let store = qod_daemon::store::Store::open(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let ip = std::net::Ipv4Addr::from(0x0a40_0000 + i);
        batch.push(qod_daemon::store::Op::PutSession(Box::new(
            qod_daemon::store::StoredSession {
                id: qod_daemon::model::SessionId::random(),
                request: qod_daemon::model::SessionRequest {
                    device: qod_daemon::model::DeviceId::Ipv4 {
                        public: ip,
                        private: Some(ip),
                        public_port: None,
                    },
                    server: qod_daemon::model::ApplicationServer {
                        ipv4: Some(format!("{}/32", addr::SERVER_V4).parse()?),
                        ipv6: None,
                        given: (Some(addr::SERVER_V4.into()), None),
                    },
                    device_ports: None,
                    server_ports: None,
                    profile: qod_daemon::model::ProfileName::parse("qosProfile", profile)?,
                    sink: None,
                    sink_credential: None,
                    duration: 86_400,
                    device_given: None,
                    owner: TEST_CLIENT.into(),
                    subject: None,
                },
                started_at: now,
                duration: 86_400,
                ended: None,
                slot: None,
            },
        )));
        if batch.len() == 10_000 {
            store.submit(std::mem::take(&mut batch)).wait()?;
        }
    }
    store.submit(batch).wait()?;
    Ok(())
}

/// A gRPC codec of raw bytes, to send what no generated client would.
pub mod raw {
    /// Sends raw bytes as a request message (and reads whatever comes back as bytes).
    #[derive(Clone, Copy, Default)]
    pub struct Raw;

    pub struct RawCoder;

    impl tonic::codec::Encoder for RawCoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: Vec<u8>,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            use bytes::BufMut as _;
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl tonic::codec::Decoder for RawCoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf as _;
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }

    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCoder;
        type Decoder = RawCoder;
        fn encoder(&mut self) -> RawCoder {
            RawCoder
        }
        fn decoder(&mut self) -> RawCoder {
            RawCoder
        }
    }
}
