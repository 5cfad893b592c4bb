//! A real etcd cluster (Debian's `etcd-server`) in a network namespace of its own, with a
//! bridge that other namespaces (a lab's edge, where qodd runs) are wired to.
//!
//! Members listen on `10.77.0.1` (client port `2379 + 10·i`, peer port `2380 + 10·i`); a
//! namespace joined with [`EtcdCluster::connect`] gets `10.77.0.<host>` on an `etcd0` veth.
//! Client traffic is TLS with client certificates from a dev PKI of the cluster's own.

use super::*;

/// The bridge address the members listen on.
pub const ETCD_HOST: &str = "10.77.0.1";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster; its members are killed and the namespace removed on drop.
pub struct EtcdCluster {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    /// Signs the members' certificates and the clients' (qodd's) certificates.
    pub pki: DevPki,
    members: Vec<Member>,
    links: AtomicU32,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster is healthy.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let ns = Netns::new("etcd")?;
        // An address of its own: otherwise the bridge takes the lowest of its ports' and
        // changes it as ports join, and the nodes' ARP entries point nowhere for a while.
        ns.ip(&[
            "link",
            "add",
            "br0",
            "address",
            "02:00:00:77:00:01",
            "type",
            "bridge",
        ])?;
        ns.ip(&["addr", "add", &format!("{ETCD_HOST}/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let dir = tempfile::tempdir()?;
        let pki = DevPki::ensure(&dir.path().join("pki"))?;
        let (cert, key) = pki.server_cert(&[ETCD_HOST])?;
        fs::write(dir.path().join("etcd.crt"), cert)?;
        fs::write(dir.path().join("etcd.key"), key)?;
        // The nodes share this PKI too (Launch::pki): their API certificate names every
        // address a node may have here, so nodes verify each other.
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend((2..=60).map(|h| format!("10.77.0.{h}")));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (cert, key) = pki.server_cert(&names)?;
        fs::write(pki.path("server.crt"), cert)?;
        fs::write(pki.path("server.key"), key)?;
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: 2379 + 10 * i as u16,
                peer_port: 2380 + 10 * i as u16,
                child: None,
            })
            .collect();
        let mut cluster = Self {
            ns,
            dir,
            pki,
            members,
            links: AtomicU32::new(0),
        };
        for i in 0..n {
            cluster.start_member(i)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://{ETCD_HOST}:{}", m.client_port))
            .collect()
    }

    /// (Re)starts member `i` on its data directory.
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{ETCD_HOST}:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let client = format!("https://{ETCD_HOST}:{}", m.client_port);
        let peer = format!("http://{ETCD_HOST}:{}", m.peer_port);
        let log = fs::File::create(self.dir.path().join(format!("{}.log", m.name)))?;
        let d = self.dir.path();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "etcd"])
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", d.join(&m.name).display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-token={}", self.ns.name))
            .arg("--initial-cluster-state=new")
            .arg(format!("--cert-file={}", d.join("etcd.crt").display()))
            .arg(format!("--key-file={}", d.join("etcd.key").display()))
            .arg(format!(
                "--trusted-ca-file={}",
                self.pki.path("ca.crt").display()
            ))
            .arg("--client-cert-auth")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start etcd (apt-get install etcd-server)")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcdctl` against the cluster, with the cluster's client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let d = self.dir.path();
        if !d.join("etcdctl.crt").exists() {
            let (cert, key) = self.pki.client_cert("etcdctl")?;
            fs::write(d.join("etcdctl.crt"), cert)?;
            fs::write(d.join("etcdctl.key"), key)?;
        }
        let endpoints = format!("--endpoints={}", self.live_endpoints().join(","));
        let cacert = format!("--cacert={}", self.pki.path("ca.crt").display());
        let cert = format!("--cert={}", d.join("etcdctl.crt").display());
        let key = format!("--key={}", d.join("etcdctl.key").display());
        let mut all = vec![
            endpoints.as_str(),
            cacert.as_str(),
            cert.as_str(),
            key.as_str(),
            "--command-timeout=3s",
        ];
        all.extend_from_slice(args);
        self.ns.exec("etcdctl", &all)
    }

    fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("https://{ETCD_HOST}:{}", m.client_port))
            .collect()
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.etcdctl(&["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let logs: String = self
                        .members
                        .iter()
                        .map(|m| {
                            fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                                .unwrap_or_default()
                        })
                        .collect();
                    bail!("etcd not healthy within {within:?}: {e:#}\n{logs}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Wires `ns` to the cluster's bridge as `10.77.0.<host>` (on `etcd0`).
    pub fn connect(&self, ns: &Netns, host: u8) -> anyhow::Result<()> {
        let port = format!("p{}", self.links.fetch_add(1, Ordering::Relaxed));
        self.ns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "etcd0", "netns", &ns.name,
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("10.77.0.{host}/24"), "dev", "etcd0"])?;
        ns.ip(&["link", "set", "etcd0", "up"])?;
        Ok(())
    }

    /// The `[cluster]` section of a qodd config for node `id` on this cluster, with a client
    /// certificate of its own (written into `dir`); `extra` goes inside the section.
    pub fn qodd_section(&self, dir: &Path, id: &str, extra: &str) -> anyhow::Result<String> {
        let (cert, key) = self.pki.client_cert(&format!("qodd-{id}"))?;
        let (c, k) = (
            dir.join(format!("etcd-{id}.crt")),
            dir.join(format!("etcd-{id}.key")),
        );
        fs::write(&c, cert)?;
        fs::write(&k, key)?;
        // One record key for the whole cluster.
        let record_key = self.dir.path().join("cluster.key");
        if !record_key.exists() {
            let key = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            fs::write(&record_key, key)?;
        }
        Ok(format!(
            "[cluster]\netcd = {:?}\nnode_id = {id:?}\netcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}\npeer_ca = {:?}\nrecord_key_file = {record_key:?}\n{extra}\n",
            self.endpoints(),
            self.pki.path("ca.crt"),
            c,
            k,
            self.pki.path("ca.crt"),
        ))
    }
}

impl EtcdCluster {
    /// A lab of its own whose qodd (`bin`) is cluster node `id`: wired to the cluster as
    /// `10.77.0.<host>`, its API there on port 50051 (advertised), on the cluster's shared PKI,
    /// serving `pools`, metrics on 127.0.0.1:9464 in its namespace; `top_level` keys before the
    /// `[cluster]` section, `section` inside it.
    #[allow(clippy::too_many_arguments)]
    pub async fn node(
        &self,
        bin: &Path,
        mode: Mode,
        id: &str,
        host: u8,
        pools: &[&str],
        top_level: &str,
        section: &str,
    ) -> anyhow::Result<(Lab, Qodd)> {
        let lab = Lab::new()?;
        self.connect(&lab.edge, host)?;
        let interfaces = mode.interfaces();
        let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
        let toml = format!(
            "ue_pools = {pools:?}\nmetrics_listen = \"127.0.0.1:9464\"\n{top_level}\n{}",
            self.qodd_section(
                self.dir.path(),
                id,
                &format!("advertise = [\"10.77.0.{host}:50051\"]\n{section}")
            )?
        );
        let launch = Launch {
            tcp_listen: Some(format!("10.77.0.{host}:50051").parse()?),
            pki: Some(self.pki.dir.clone()),
            ..Launch::default()
        };
        let qodd = Qodd::start_with(
            bin,
            &lab.edge,
            &interfaces,
            &toml,
            DevPki::config_toml,
            launch,
        )
        .await?;
        Ok((lab, qodd))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
