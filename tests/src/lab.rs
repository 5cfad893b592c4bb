//! The three-namespace lab (device, edge, server) and qodd started on it, in every mode.

#[allow(unused_imports)]
use super::*;

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

impl Mode {
    /// The lab's edge interfaces as qodd's `interfaces` entries in this mode.
    pub fn interfaces(self) -> Vec<String> {
        match self {
            Mode::Marking => vec![EDGE_DEV_IF.to_owned(), EDGE_SRV_IF.to_owned()],
            Mode::Scheduled => vec![
                format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 1000 }}"),
                format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 1000 }}"),
            ],
        }
    }
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
    let interfaces = mode.interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
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

/// The lab's device pools and phone directory as config text (a literal, for `concat!`): its
/// two IPv4 device addresses' /24 and IPv6 prefixes are served; `+34600000001` is the lab's
/// device, `+34600000002` a device this node does not serve. Top-level keys go before it.
#[macro_export]
macro_rules! lab_directory {
    () => {
        r#"
ue_pools = ["10.0.1.0/24", "fd00:1::/64", "fd00:11::/64"]

[[devices]]
phone_number = "+34600000001"
ipv4_address = "10.0.1.2"

[[devices]]
phone_number = "+34600000002"
ipv4_address = "192.0.2.50"
"#
    };
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
