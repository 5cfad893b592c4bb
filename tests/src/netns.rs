//! Network namespaces the tests make (unique names, removed on drop and on panic) and commands in them.

#[allow(unused_imports)]
use super::*;

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

pub(crate) fn unique(tag: &str) -> String {
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
pub(crate) fn in_netns<T: Send + 'static>(
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
pub(crate) fn tcp_connect_in(
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
