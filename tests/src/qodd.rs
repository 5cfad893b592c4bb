//! The real qodd as a process: configuration, PKI and tokens, start, restart, kill, logs, its metrics and store.

#[allow(unused_imports)]
use super::*;

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
    /// How often a start is polled for readiness (benchmarks time starts more finely).
    pub start_poll: Duration,
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
    /// A dev PKI directory to trust and serve with instead of one of its own (the nodes of a
    /// cluster share one: the same token issuer, the same CA).
    pub pki: Option<PathBuf>,
}

/// The bpffs test instances of qodd pin their data planes under.
pub const TEST_BPFFS: &str = "/run/qodt-bpffs";

/// The security part of a config for mutual TLS: client certificates of the dev CA required,
/// the client id taken from the certificate (pass to [`Qodd::start_secured`]).
pub fn mutual_tls(pki: &DevPki) -> String {
    format!(
        "{}client_id_from_certificate = true\n",
        pki.config_toml().replace(
            "\n[auth]",
            &format!("client_ca = {:?}\n\n[auth]", pki.path("ca.crt"))
        )
    )
}

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
        let pki = DevPki::ensure(&launch.pki.clone().unwrap_or_else(|| dir.path().join("pki")))?;
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
            start_poll: Duration::from_millis(100),
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
            tokio::time::sleep(self.start_poll).await;
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
                    // As tonic's own connector does: without it Nagle holds each call's
                    // last segment for the peer's delayed ACK (40 ms a call).
                    s.set_nodelay(true)?;
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

/// Runs the `qodctl` built beside `qodd` against `qodd`: (success, stdout, stderr).
pub fn qodctl(qodd: &Qodd, tls: bool, args: &[&str]) -> (bool, String, String) {
    qodctl_as(qodd, &qodd.token, tls, args)
}

/// As [`qodctl`] with `token`.
pub fn qodctl_as(
    qodd: &Qodd,
    token_text: &str,
    tls: bool,
    args: &[&str],
) -> (bool, String, String) {
    let token = qodd.dir.path().join("qodctl.token");
    std::fs::write(&token, token_text).expect("token file");
    let qodctl = qodd_bin().with_file_name("qodctl");
    // A TCP listener is inside qodd's namespace: so is qodctl then.
    let mut cmd = if qodd.launch.tcp_listen.is_some() {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &qodd.netns]).arg(&qodctl);
        c
    } else {
        Command::new(&qodctl)
    };
    cmd.env("QODCTL_ADDR", qodd.addr())
        .env("QODCTL_TOKEN_FILE", &token)
        .env_remove("QODCTL_CA");
    if tls {
        cmd.env("QODCTL_CA", qodd.pki.path("ca.crt"));
    }
    let out = cmd.args(args).output().expect("run qodctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// Live sessions of `profile` for `n` device addresses 10.x.y.z, written straight into the store.
pub fn fill_store(dir: &std::path::Path, n: u32, profile: &str) -> anyhow::Result<()> {
    fill_store_ending(
        dir,
        n,
        profile,
        time::OffsetDateTime::now_utc() + time::Duration::days(1),
        time::Duration::ZERO,
    )
}

/// As [`fill_store`], the sessions (each of 86,400 s) ending evenly spread over `spread` from
/// `ends_at` on, in the order they are written.
pub fn fill_store_ending(
    dir: &std::path::Path,
    n: u32,
    profile: &str,
    ends_at: time::OffsetDateTime,
    spread: time::Duration,
) -> anyhow::Result<()> {
    let store = qod_daemon::store::Store::open(dir)?;
    let first = ends_at - time::Duration::days(1);
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
                started_at: first + spread * (f64::from(i) / f64::from(n.max(1))),
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
