//! `qodd` configuration: a TOML file (defaults in `qodd.toml`, embedded) overridden by flags,
//! validated into a typed [`Config`] before any socket is bound or program loaded.

mod error;
mod file;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use ipnetwork::IpNetwork;
use serde::Deserialize;

pub use self::error::{ConfigError, Conflict, DeviceProblem, InterfaceProblem, ProfileProblem};
use self::{
    error::within,
    file::{
        AuthConfig, ClientAuth, ClusterConfig, DeviceEntry, DurationOutOfRange, FileConfig,
        InterfaceEntry, InterfaceTable, LimitsConfig, NotificationsConfig, OnExit, ProfileConfig,
        RestConfig, SkbPriority, TlsConfig,
    },
};
use crate::{
    auth::{
        AuthSettings, ClientLimits, JwksSource, TokenRules,
        jwt::{SUPPORTED_ALGORITHMS, parse_jwks},
    },
    dataplane::SchedulerConfig,
    error::CamaraCode,
    model::{PhoneNumber, ProfileName},
    notify::NotifyConfig,
    policy::{DeviceAddresses, Policy},
    profile::{Band, Profiles, QosProfile},
};

/// The documented defaults; also what `qodd --print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("../../qodd.toml");

/// Exit code for a configuration that does not validate (`EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Most `[[profiles]]`: half the classifier's profile table, so that a reload replacing every
/// profile finds entries for the new ones while the old ones' sessions are being ended.
pub const MAX_CONFIGURED_PROFILES: usize = qod_common::MAX_PROFILES as usize / 2;

/// Command line of `qodd`.
#[derive(Debug, Parser)]
#[command(
    name = "qodd",
    version,
    about = "CAMARA Quality-on-Demand enforcement daemon"
)]
pub struct Cli {
    /// TOML configuration file; without it the embedded defaults apply.
    #[arg(short, long, env = "QODD_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address: host:port or unix:/path.
    #[arg(long)]
    pub listen: Option<String>,
    /// CAMARA REST API listen address: host:port, or "off".
    #[arg(long)]
    pub rest_listen: Option<String>,
    /// Managed interface NAME[:SIDE[:MBIT]] (repeat for several; replaces the file's list).
    /// SIDE is device, server or both; MBIT, the capacity, makes qodd own its egress queueing.
    #[arg(short, long = "interface")]
    pub interfaces: Vec<String>,
    /// Classifier attachment: auto, tcx or clsact.
    #[arg(long, value_parser = ["auto", "tcx", "clsact"])]
    pub attach: Option<String>,
    /// Most sessions held at once.
    #[arg(long)]
    pub max_sessions: Option<u32>,
    /// Print the default configuration file and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Validate the configuration (file and flags), print the effective one and exit: 0 when it
    /// is valid, 64 when not. Binds nothing, loads nothing, writes nothing.
    #[arg(long)]
    pub check_config: bool,
    /// LABS ONLY: serve without TLS and without access tokens, so any local process may create,
    /// read and delete every session. Logged as a warning at start.
    #[arg(long)]
    pub insecure: bool,
}

pub use crate::dataplane::{AttachMode, ManagedInterface, Side};

/// Where the gRPC API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Listen,
    /// Where `/metrics` and `/readyz` are served (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub interfaces: Vec<ManagedInterface>,
    /// Tear the data plane (classifier, maps, schedulers) down on a graceful stop; by default it
    /// stays, pinned, and the next qodd carries on with it.
    pub teardown_on_exit: bool,
    /// Where maps and links are pinned (a versioned directory under it).
    pub pin_path: PathBuf,
    /// What to do with a pinned data plane this qodd cannot reuse.
    pub incompatible_pins: IncompatiblePins,
    pub attach: AttachMode,
    pub bpffs: PathBuf,
    /// Where the session store lives.
    pub state_dir: PathBuf,
    pub max_sessions: u32,
    pub unavailable_retention: Duration,
    /// How often the managed links' state is read in full beside their netlink events.
    pub link_resync: Duration,
    /// Depth of a maximum-rate policer's bucket, as time at the rate (where qodd does not own
    /// the queue).
    pub policer_burst: Duration,
    /// Events the log keeps for watchers to resume from (`after_revision`).
    pub event_log_retention: u64,
    /// Profiles, pools, directory: what SIGHUP reloads.
    pub policy: Policy,
    pub notify: NotifyConfig,
    pub security: Security,
    pub limits: ClientLimits,
    pub connections: crate::listener::ConnectionLimits,
    /// CAMARA's REST API (`None`: off).
    pub rest: Option<RestSettings>,
    /// Cluster mode on etcd (`None`: a single node, the default).
    pub cluster: Option<crate::cluster::Settings>,
}

/// Where and how CAMARA's REST API is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestSettings {
    pub listen: SocketAddr,
    /// The path of `apiRoot`: `""`, or `/a/b` (no trailing `/`).
    pub api_root: String,
    /// `apiRoot` as clients reach it, for the served OpenAPI documents' `servers`; `None`: the
    /// scheme and `Host` of each request.
    pub public_url: Option<String>,
    /// For a request's headers, and again for its body.
    pub request_timeout: Duration,
}

/// How log lines are written (to stderr, which journald takes under systemd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human text.
    Text,
    /// One JSON object per line: timestamp, level, target, fields, and the `rpc` span's fields.
    Json,
}

/// What to do with a pinned data plane of another layout or capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncompatiblePins {
    /// Remove it and rebuild from the session store (treatment pauses until restored).
    Rebuild,
    /// Refuse to start.
    Refuse,
}

/// How callers are authenticated.
#[derive(Clone, Debug)]
pub enum Security {
    /// `--insecure`: plain text, no tokens (labs only).
    Insecure,
    Secure {
        tls: Box<TlsSettings>,
        auth: Box<AuthSettings>,
    },
}

/// TLS material, read and checked at validation.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Mutual TLS: client certificates must chain to these CAs.
    pub client_ca_pem: Option<Vec<u8>>,
    /// With a client CA: a client may also connect without a certificate.
    pub client_auth_optional: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsSettings")
            .field("mutual", &self.client_ca_pem.is_some())
            .field("client_auth_optional", &self.client_auth_optional)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// The server side of tonic's TLS.
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut c =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            c = c
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(self.client_auth_optional);
        }
        c
    }
}

/// A key the merged configuration must hold: the built-in defaults set it.
fn need<T>(v: Option<T>, key: &'static str) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::NoDefault { key })
}

/// [`need`], within `range`.
fn need_within<T: PartialOrd + std::fmt::Display + Copy>(
    v: Option<T>,
    key: &'static str,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    within(key, need(v, key)?, range)
}

impl Config {
    /// Reads the file named by `cli` (if any) over the defaults, applies the flags, validates.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let text = Self::read(cli)?;
        Self::from_parts(cli.config.as_deref().zip(text.as_deref()), cli)
    }

    fn read(cli: &Cli) -> Result<Option<String>, ConfigError> {
        cli.config
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()
    }

    /// The effective configuration as TOML, for `qodd --check-config`: the built-in defaults,
    /// the file's keys over them, the flags over both, exactly as [`Config::load`] merges them.
    /// Validate with [`Config::load`] first.
    pub fn effective_toml(cli: &Cli) -> Result<String, ConfigError> {
        let text = Self::read(cli)?;
        let merged = file::layered(cli.config.as_deref().zip(text.as_deref()), cli)?;
        let mut out = String::new();
        if cli.insecure {
            out.push_str("# --insecure: no TLS and no access tokens ([tls] and [auth] unused)\n");
        }
        out.push_str(&toml::to_string(&merged).unwrap_or_default());
        Ok(out)
    }

    /// The built-in configuration of a lab (`--insecure`, interface `lo`), for tests that need
    /// a default without restating it.
    #[cfg(test)]
    pub fn built_in() -> Self {
        Self::from_parts(None, &Cli::parse_from(["qodd", "--insecure", "-i", "lo"]))
            .expect("the built-in defaults validate")
    }

    /// As [`Config::load`], with the file's text given.
    pub fn from_parts(file: Option<(&Path, &str)>, cli: &Cli) -> Result<Self, ConfigError> {
        Self::validate(file::typed(file::layered(file, cli)?)?, cli.insecure)
    }

    fn validate(f: FileConfig, insecure: bool) -> Result<Self, ConfigError> {
        let listen = parse_listen(&need(f.listen, "listen")?)?;
        let metrics_listen =
            endpoint("metrics_listen", &need(f.metrics_listen, "metrics_listen")?)?;
        let rest = validate_rest(need(f.rest, "rest")?)?;
        let interfaces = need(f.interfaces, "interfaces")?;
        if interfaces.is_empty() {
            return Err(ConfigError::NoInterface);
        }
        let max = qod_common::MAX_INTERFACES as usize;
        if interfaces.len() > max {
            return Err(ConfigError::TooManyInterfaces {
                count: interfaces.len(),
                max,
            });
        }
        let interfaces = interfaces
            .into_iter()
            .map(validate_interface)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for i in &interfaces {
            if !seen.insert(i.name.clone()) {
                return Err(ConfigError::Duplicate {
                    what: "interface",
                    name: i.name.clone(),
                });
            }
        }
        let bpffs = need(f.bpffs, "bpffs")?;
        let pin_path = f.pin_path.unwrap_or_else(|| bpffs.join("qod"));
        if pin_path.parent().is_none() || pin_path == bpffs {
            return Err(ConfigError::Value {
                key: "pin_path".into(),
                value: pin_path.display().to_string(),
                expected: "a directory of qodd's own inside bpffs, not its root",
            });
        }
        let max_sessions = need_within(f.max_sessions, "max_sessions", 1..=4_000_000)?;
        let pools = networks("ue_pools", need(f.ue_pools, "ue_pools")?)?;
        let directory = validate_devices(f.devices.unwrap_or_default())?;
        let duration_error = match need(f.duration_out_of_range, "duration_out_of_range")? {
            DurationOutOfRange::Camara => CamaraCode::DurationOutOfRange,
            DurationOutOfRange::InvalidArgument => CamaraCode::InvalidArgument,
        };
        let notify = validate_notifications(need(f.notifications, "notifications")?)?;
        let (limits, connections) = validate_limits(need(f.limits, "limits")?)?;
        let link_resync = Duration::from_secs(need_within(
            f.link_resync_secs,
            "link_resync_secs",
            1..=3600,
        )?);
        let policer_burst = Duration::from_millis(need_within(
            f.policer_burst_ms,
            "policer_burst_ms",
            5..=5000,
        )?);
        let event_log_retention =
            need_within(f.event_log_retention, "event_log_retention", 1..=10_000_000)?;
        let unavailable_retention = Duration::from_secs(need_within(
            f.unavailable_retention_secs,
            "unavailable_retention_secs",
            360..=31_536_000,
        )?);
        let security = if insecure {
            Security::Insecure
        } else {
            validate_security(need(f.tls, "tls")?, need(f.auth, "auth")?)?
        };
        let cluster = validate_cluster(need(f.cluster, "cluster")?, &pools, insecure)?;
        let profiles = need(f.profiles, "profiles")?;
        if profiles.is_empty() {
            return Err(ConfigError::Required {
                key: "profiles",
                why: "define at least one [[profiles]]",
            });
        }
        if profiles.len() > MAX_CONFIGURED_PROFILES {
            return Err(ConfigError::TooManyProfiles {
                count: profiles.len(),
                max: MAX_CONFIGURED_PROFILES,
            });
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(profiles.len());
        for p in profiles {
            let profile = validate_profile(p)?;
            if !names.insert(profile.name.clone()) {
                return Err(ConfigError::Duplicate {
                    what: "profile",
                    name: profile.name.to_string(),
                });
            }
            out.push(profile);
        }
        Ok(Self {
            listen,
            metrics_listen,
            log_format: need(f.log_format, "log_format")?,
            interfaces,
            teardown_on_exit: need(f.on_exit, "on_exit")? == OnExit::Teardown,
            incompatible_pins: need(f.incompatible_pins, "incompatible_pins")?,
            attach: need(f.attach, "attach")?,
            pin_path,
            bpffs,
            state_dir: need(f.state_dir, "state_dir")?,
            max_sessions,
            unavailable_retention,
            link_resync,
            policer_burst,
            event_log_retention,
            policy: Policy {
                profiles: Profiles::new(out),
                pools,
                directory,
                duration_error,
            },
            notify,
            security,
            limits,
            connections,
            rest,
            cluster,
        })
    }
}

/// `[cluster]`: `None` without etcd endpoints (a single node).
fn validate_cluster(
    c: ClusterConfig,
    pools: &[IpNetwork],
    insecure: bool,
) -> Result<Option<crate::cluster::Settings>, ConfigError> {
    use crate::cluster::{EtcdTls, Settings};
    let etcd = need(c.etcd, "cluster.etcd")?;
    if etcd.is_empty() {
        return Ok(None);
    }
    let allow_http = need(c.etcd_allow_http, "cluster.etcd_allow_http")?;
    for e in &etcd {
        let url = web_url("cluster.etcd", e, "http(s)://host:port of an etcd member")?;
        if url.scheme() == "http" && !allow_http {
            return Err(ConfigError::Value {
                key: "cluster.etcd".into(),
                value: e.clone(),
                expected: "an https:// URL (plain http only with cluster.etcd_allow_http = true, for labs)",
            });
        }
        if url.scheme() == "https" && c.etcd_ca.is_none() {
            return Err(ConfigError::Required {
                key: "cluster.etcd_ca",
                why: "https:// etcd endpoints are verified against this CA",
            });
        }
    }
    let node_id = need(c.node_id, "cluster.node_id")?;
    let id_char = |ch: char| ch.is_ascii_alphanumeric() || "-._".contains(ch);
    if node_id.is_empty() || node_id.len() > 63 || !node_id.chars().all(id_char) {
        return Err(ConfigError::Value {
            key: "cluster.node_id".into(),
            value: node_id,
            expected: "1 to 63 letters, digits, '-', '.' or '_', unique in the cluster",
        });
    }
    if pools.is_empty() {
        return Err(ConfigError::Required {
            key: "ue_pools",
            why: "in a cluster each node names the device pools it serves",
        });
    }
    let prefix = need(c.prefix, "cluster.prefix")?;
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.contains("//") {
        return Err(ConfigError::Value {
            key: "cluster.prefix".into(),
            value: prefix,
            expected: "a key prefix such as \"/qod/\" (starting and ending with '/')",
        });
    }
    let tls = match (c.etcd_ca, c.etcd_cert, c.etcd_key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => {
            let identity = match (cert, key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some((
                    read_file("cluster.etcd_cert", &cert)?,
                    read_file("cluster.etcd_key", &key)?,
                )),
                _ => {
                    return Err(ConfigError::Required {
                        key: "cluster.etcd_cert",
                        why: "a client certificate for etcd needs both etcd_cert and etcd_key",
                    });
                }
            };
            Some(EtcdTls {
                ca: read_file("cluster.etcd_ca", &ca)?,
                identity,
            })
        }
        (None, _, _) => {
            return Err(ConfigError::Required {
                key: "cluster.etcd_ca",
                why: "a client certificate for etcd is only sent over TLS",
            });
        }
    };
    let peer_ca = match c.peer_ca {
        Some(ca) => Some(read_file("cluster.peer_ca", &ca)?),
        None if insecure => None,
        None => {
            return Err(ConfigError::Required {
                key: "cluster.peer_ca",
                why: "calls are passed on to the node that serves the device over TLS, verified against this CA",
            });
        }
    };
    let record_key_file = need(c.record_key_file, "cluster.record_key_file")?;
    let text = read_file("cluster.record_key_file", &record_key_file)?;
    let hex = String::from_utf8_lossy(&text);
    let hex = hex.trim();
    let record_key: [u8; 32] = (hex.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .flatten()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| ConfigError::Value {
            key: "cluster.record_key_file".into(),
            value: record_key_file.display().to_string(),
            expected: "a file holding 64 hex digits (32 bytes; e.g. `openssl rand -hex 32`), the same on every node",
        })?;
    Ok(Some(Settings {
        away_grace: Duration::from_secs(need_within(
            c.away_grace_secs,
            "cluster.away_grace_secs",
            0..=86_400,
        )?),
        record_key,
        peer_ca,
        etcd,
        node_id,
        role: need(c.role, "cluster.role")?,
        advertise: need(c.advertise, "cluster.advertise")?,
        prefix,
        lease_ttl: Duration::from_secs(need_within(
            c.lease_ttl_secs,
            "cluster.lease_ttl_secs",
            2..=600,
        )?),
        timeout: Duration::from_millis(need_within(
            c.etcd_timeout_ms,
            "cluster.etcd_timeout_ms",
            100..=60_000,
        )?),
        install_wait: Duration::from_millis(need_within(
            c.install_wait_ms,
            "cluster.install_wait_ms",
            100..=60_000,
        )?),
        tls,
        pools: pools.to_vec(),
    }))
}

fn validate_interface(e: InterfaceEntry) -> Result<ManagedInterface, ConfigError> {
    let t = match e {
        InterfaceEntry::Name(name) => InterfaceTable::named(name),
        InterfaceEntry::Table(t) => t,
    };
    let name = t.name;
    let problem = |problem| ConfigError::Interface {
        name: name.clone(),
        problem,
    };
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0', ':']) {
        return Err(problem(InterfaceProblem::BadName));
    }
    if let Err(e) = nix::net::if_::if_nametoindex(name.as_str()) {
        return Err(problem(InterfaceProblem::Missing(e)));
    }
    let scheduler = match t.capacity_mbit {
        None => None,
        Some(c) if !(c.is_finite() && c >= 0.1) => {
            return Err(problem(InterfaceProblem::Capacity(c)));
        }
        Some(_) if t.side == Side::Both => {
            return Err(problem(InterfaceProblem::CapacityOnBothSides));
        }
        Some(c) => {
            for (key, value) in [
                ("low_latency_share", t.low_latency_share),
                ("guaranteed_share", t.guaranteed_share),
            ] {
                if !(0.0..=1.0).contains(&value) {
                    return Err(problem(InterfaceProblem::Share { key, value }));
                }
            }
            if t.low_latency_share + t.guaranteed_share > 0.95 {
                return Err(problem(InterfaceProblem::NoBestEffort));
            }
            Some(SchedulerConfig {
                capacity_bps: (c * 1_000_000.0) as u64,
                low_latency_share: t.low_latency_share,
                guaranteed_share: t.guaranteed_share,
                replace_foreign_root: t.replace_foreign_root,
            })
        }
    };
    Ok(ManagedInterface {
        name,
        side: t.side,
        scheduler,
    })
}

fn validate_devices(
    entries: Vec<DeviceEntry>,
) -> Result<HashMap<PhoneNumber, DeviceAddresses>, ConfigError> {
    let mut directory = HashMap::new();
    for d in entries {
        let problem = |problem| ConfigError::Device {
            entry: d.phone_number.clone(),
            problem,
        };
        let phone = PhoneNumber::parse("phone_number", &d.phone_number)
            .map_err(|e| problem(DeviceProblem::PhoneNumber(e.message)))?;
        let ipv4 = device_address("IPv4", d.ipv4_address.as_deref()).map_err(problem)?;
        let ipv6 = device_address("IPv6", d.ipv6_address.as_deref()).map_err(problem)?;
        if ipv4.is_none() && ipv6.is_none() {
            return Err(problem(DeviceProblem::NoAddress));
        }
        if directory
            .insert(phone, DeviceAddresses { ipv4, ipv6 })
            .is_some()
        {
            return Err(ConfigError::Duplicate {
                what: "devices: phone number",
                name: d.phone_number,
            });
        }
    }
    Ok(directory)
}

fn device_address<A>(family: &'static str, value: Option<&str>) -> Result<Option<A>, DeviceProblem>
where
    A: std::str::FromStr<Err = std::net::AddrParseError>,
{
    value
        .map(|a| {
            a.parse().map_err(|source| DeviceProblem::Address {
                family,
                value: a.to_owned(),
                source,
            })
        })
        .transpose()
}

fn validate_notifications(n: NotificationsConfig) -> Result<NotifyConfig, ConfigError> {
    let ms = |v: Option<u64>, key: &'static str, range| {
        need(v, key)
            .and_then(|v| within(&format!("notifications.{key}"), v, range))
            .map(Duration::from_millis)
    };
    Ok(NotifyConfig {
        event_type: need(n.event_type, "notifications.event_type")?,
        source: need(n.source, "notifications.source")?,
        queue: need_within(n.queue, "notifications.queue", 1..=10_000_000)?,
        timeout: ms(n.timeout_ms, "timeout_ms", 1..=600_000)?,
        max_attempts: need_within(n.max_attempts, "notifications.max_attempts", 1..=1000)?,
        backoff_base: ms(n.backoff_base_ms, "backoff_base_ms", 1..=3_600_000)?,
        backoff_max: ms(n.backoff_max_ms, "backoff_max_ms", 1..=86_400_000)?,
        sinks: crate::notify::SinkRules {
            http_hosts: need(n.allow_http_hosts, "notifications.allow_http_hosts")?,
            addresses: crate::notify::SinkAddresses {
                allow: networks(
                    "notifications.allow_sink_ranges",
                    need(n.allow_sink_ranges, "notifications.allow_sink_ranges")?,
                )?,
                deny: networks(
                    "notifications.deny_sink_ranges",
                    need(n.deny_sink_ranges, "notifications.deny_sink_ranges")?,
                )?,
            },
        },
    })
}

/// A list of CIDR networks (an address alone is its own /32 or /128).
fn networks(key: &'static str, v: Vec<String>) -> Result<Vec<IpNetwork>, ConfigError> {
    v.into_iter()
        .map(|n| {
            n.parse().map_err(|source| ConfigError::Network {
                key,
                value: n,
                source,
            })
        })
        .collect()
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_owned(),
        source,
    })
}

/// `value` of `key` as an http(s) URL with a host.
fn web_url(
    key: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(value).map_err(|source| ConfigError::Url {
        key,
        value: value.to_owned(),
        source,
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::Value {
            key: key.into(),
            value: value.to_owned(),
            expected,
        });
    }
    Ok(url)
}

fn validate_security(t: TlsConfig, a: AuthConfig) -> Result<Security, ConfigError> {
    let cert = need(t.cert, "tls.cert")?;
    let key = need(t.key, "tls.key")?;
    let client_auth_optional = need(t.client_auth, "tls.client_auth")? == ClientAuth::Optional;
    let tls = TlsSettings {
        cert_pem: read_file("tls.cert", &cert)?,
        key_pem: read_file("tls.key", &key)?,
        client_ca_pem: t
            .client_ca
            .as_deref()
            .map(|p| read_file("tls.client_ca", p))
            .transpose()?,
        client_auth_optional,
    };
    if let Err(source) = tonic::transport::Server::builder().tls_config(tls.server_config()) {
        // tonic says only "transport error"; the cause is in its sources.
        let mut mismatch = false;
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(&source);
        while let Some(c) = cause {
            let text = c.to_string();
            mismatch |= text.contains("KeyMismatch") || text.contains("does not match");
            cause = c.source();
        }
        return Err(if mismatch {
            ConfigError::KeyMismatch { cert, key }
        } else {
            ConfigError::Tls { cert, key, source }
        });
    }

    let algorithms = need(a.algorithms, "auth.algorithms")?
        .into_iter()
        .map(|name| {
            SUPPORTED_ALGORITHMS
                .into_iter()
                .find(|a| format!("{a:?}") == name)
                .ok_or(ConfigError::Algorithm { name })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if algorithms.is_empty() {
        return Err(ConfigError::Required {
            key: "auth.algorithms",
            why: "name at least one of RS256, ES256, EdDSA",
        });
    }
    let jwks = match (a.jwks_file, a.jwks_url) {
        (Some(_), Some(_)) => return Err(ConfigError::Conflict(Conflict::JwksFileAndUrl)),
        (None, Some(u)) => {
            let url = web_url("auth.jwks_url", &u, "an https:// URL with a host")?;
            // The key set is the trust root of every token: over plain http anyone on the path
            // could swap it. Only a lab may say so.
            if url.scheme() == "http" && !need(a.jwks_allow_http, "auth.jwks_allow_http")? {
                return Err(ConfigError::PlainHttpJwks { url: u });
            }
            JwksSource::Url(url)
        }
        (Some(path), None) => {
            let text = String::from_utf8(read_file("auth.jwks_file", &path)?).map_err(|_| {
                ConfigError::Jwks {
                    path: path.clone(),
                    reason: "not UTF-8".into(),
                }
            })?;
            parse_jwks(&text, &algorithms).map_err(|reason| ConfigError::Jwks {
                path: path.clone(),
                reason,
            })?;
            JwksSource::File(path)
        }
        (None, None) => {
            return Err(ConfigError::Required {
                key: "auth.jwks_file",
                why: "or auth.jwks_url: the keys access tokens are verified with",
            });
        }
    };
    let required = |v: Option<String>, key: &'static str| {
        v.filter(|v| !v.is_empty()).ok_or(ConfigError::Required {
            key,
            why: "the value every access token must carry",
        })
    };
    let claim = |v: Option<String>, key: &'static str| {
        let v = need(v, key)?;
        if v.trim().is_empty() {
            return Err(ConfigError::Required {
                key,
                why: "the name of a token claim",
            });
        }
        Ok(v)
    };
    let client_id_claim = claim(a.client_id_claim, "auth.client_id_claim")?;
    let device_claim = claim(a.device_claim, "auth.device_claim")?;
    let client_id_from_certificate = need(
        a.client_id_from_certificate,
        "auth.client_id_from_certificate",
    )?;
    if client_id_from_certificate && (tls.client_ca_pem.is_none() || tls.client_auth_optional) {
        return Err(ConfigError::Conflict(
            Conflict::CertificateIdWithoutMutualTls,
        ));
    }
    let leeway = need_within(a.leeway_secs, "auth.leeway_secs", 0..=300)?;
    let refresh = need_within(a.jwks_refresh_secs, "auth.jwks_refresh_secs", 10..=86_400)?;
    Ok(Security::Secure {
        tls: Box::new(tls),
        auth: Box::new(AuthSettings {
            jwks,
            jwks_refresh: Duration::from_secs(refresh),
            rules: TokenRules {
                issuer: required(a.issuer, "auth.issuer")?,
                audience: required(a.audience, "auth.audience")?,
                leeway: Duration::from_secs(leeway),
                algorithms,
            },
            client_id_claim,
            device_claim,
            client_id_from_certificate,
        }),
    })
}

fn validate_limits(
    l: LimitsConfig,
) -> Result<(ClientLimits, crate::listener::ConnectionLimits), ConfigError> {
    let bounded = |v: Option<u32>, key: &'static str, range: std::ops::RangeInclusive<u32>| {
        need(v, key).and_then(|v| within(&format!("limits.{key}"), v, range))
    };
    let max_connections = bounded(l.max_connections, "max_connections", 1..=1_000_000)?;
    let handshake = need(l.handshake_timeout_ms, "handshake_timeout_ms")?;
    let connections = crate::listener::ConnectionLimits {
        max_connections,
        max_connections_per_peer: bounded(
            l.max_connections_per_peer,
            "max_connections_per_peer",
            1..=max_connections,
        )?,
        handshake_timeout: Duration::from_millis(within(
            "limits.handshake_timeout_ms",
            handshake,
            100..=60_000,
        )?),
        max_streams_per_connection: bounded(
            l.max_streams_per_connection,
            "max_streams_per_connection",
            1..=10_000,
        )?,
    };
    let positive = |v: Option<u32>, key: &'static str| bounded(v, key, 1..=u32::MAX);
    let max_message_bytes = within(
        "limits.max_message_bytes",
        need(l.max_message_bytes, "max_message_bytes")?,
        1024..=16 << 20,
    )?;
    let nonzero = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
    let client = ClientLimits {
        max_active_sessions: positive(
            l.max_active_sessions_per_client,
            "max_active_sessions_per_client",
        )?,
        max_sinks: positive(l.max_sinks_per_client, "max_sinks_per_client")?,
        max_watches: positive(l.max_watches_per_client, "max_watches_per_client")?,
        requests_per_second: nonzero(positive(l.requests_per_second, "requests_per_second")?),
        request_burst: nonzero(positive(l.request_burst, "request_burst")?),
        max_message_bytes,
    };
    Ok((client, connections))
}

/// `"host:port"`, or `"off"` (also `""`).
fn endpoint(key: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    match value {
        "" | "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|source| ConfigError::Address {
                key,
                value: addr.to_owned(),
                expected: "\"host:port\" or \"off\"",
                source,
            }),
    }
}

fn validate_rest(r: RestConfig) -> Result<Option<RestSettings>, ConfigError> {
    let Some(listen) = endpoint("rest.listen", &need(r.listen, "rest.listen")?)? else {
        return Ok(None);
    };
    let api_root = need(r.api_root, "rest.api_root")?;
    let path_char = |c: char| c.is_ascii_alphanumeric() || "-._~/".contains(c);
    if !api_root.is_empty()
        && (!api_root.starts_with('/')
            || api_root.ends_with('/')
            || api_root.contains("//")
            || !api_root.chars().all(path_char))
    {
        return Err(ConfigError::Value {
            key: "rest.api_root".into(),
            value: api_root,
            expected: "\"\" or a path such as \"/camara\" (no trailing '/')",
        });
    }
    let public_url = r
        .public_url
        .map(|u| {
            web_url(
                "rest.public_url",
                &u,
                "an http:// or https:// URL with a host",
            )?;
            Ok(u.trim_end_matches('/').to_owned())
        })
        .transpose()?;
    let timeout = need_within(
        r.request_timeout_ms,
        "rest.request_timeout_ms",
        100..=300_000,
    )?;
    Ok(Some(RestSettings {
        listen,
        api_root,
        public_url,
        request_timeout: Duration::from_millis(timeout),
    }))
}

fn parse_listen(s: &str) -> Result<Listen, ConfigError> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConfigError::Value {
                key: "listen".into(),
                value: s.to_owned(),
                expected: "unix: followed by a socket path",
            });
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    s.parse()
        .map(Listen::Tcp)
        .map_err(|source| ConfigError::Address {
            key: "listen",
            value: s.to_owned(),
            expected: "host:port (e.g. 127.0.0.1:50051) or unix:/path",
            source,
        })
}

fn validate_profile(p: ProfileConfig) -> Result<QosProfile, ConfigError> {
    let p_band = p.band;
    let name = ProfileName::parse("name", &p.name).map_err(|e| ConfigError::Profile {
        name: format!("{:?}", p.name),
        problem: ProfileProblem::Name(e.message),
    })?;
    let bad = |problem| ConfigError::Profile {
        name: name.to_string(),
        problem,
    };
    for (field, rate) in [
        ("target_min_upstream_rate", p.target_min_upstream_rate),
        ("max_upstream_rate", p.max_upstream_rate),
        ("max_upstream_burst_rate", p.max_upstream_burst_rate),
        ("target_min_downstream_rate", p.target_min_downstream_rate),
        ("max_downstream_rate", p.max_downstream_rate),
        ("max_downstream_burst_rate", p.max_downstream_burst_rate),
    ] {
        if let Some(r) = rate
            && r.value > 1024
        {
            return Err(bad(ProfileProblem::Rate {
                field,
                value: r.value,
            }));
        }
    }
    for (field, d) in [
        ("min_duration", p.min_duration),
        ("max_duration", p.max_duration),
        ("packet_delay_budget", p.packet_delay_budget),
        ("jitter", p.jitter),
    ] {
        if let Some(d) = d
            && (d.value == 0 || d.value > i32::MAX as u32)
        {
            return Err(bad(ProfileProblem::Duration {
                field,
                value: d.value,
                max: i32::MAX as u32,
            }));
        }
    }
    if let (Some(min), Some(max)) = (p.min_duration, p.max_duration)
        && min.as_duration() > max.as_duration()
    {
        return Err(bad(ProfileProblem::MinOverMax));
    }
    if let Some(max) = p.max_duration
        && max.as_duration() < Duration::from_secs(1)
    {
        return Err(bad(ProfileProblem::MaxUnderOneSecond));
    }
    if let Some(prio) = p.priority
        && !(1..=100).contains(&prio)
    {
        return Err(bad(ProfileProblem::Priority(prio)));
    }
    if let Some(per) = p.packet_error_loss_rate
        && !(1..=10).contains(&per)
    {
        return Err(bad(ProfileProblem::PacketErrorLossRate(per)));
    }
    let dscp = match (p.dscp, p.service_class) {
        (Some(d), _) if d > 63 => return Err(bad(ProfileProblem::Dscp(d))),
        (Some(d), _) => d,
        (None, Some(class)) => class.dscp(),
        (None, None) => 0,
    };
    let skb_priority = match p.skb_priority {
        None => None,
        Some(SkbPriority::Number(n)) => Some(n),
        Some(SkbPriority::Handle(h)) => {
            Some(parse_tc_handle(&h).ok_or_else(|| bad(ProfileProblem::SkbPriority(h.clone())))?)
        }
    };
    Ok(QosProfile {
        name,
        description: p.description,
        status: p.status,
        country_availability: p.country_availability,
        target_min_upstream_rate: p.target_min_upstream_rate,
        max_upstream_rate: p.max_upstream_rate,
        max_upstream_burst_rate: p.max_upstream_burst_rate,
        target_min_downstream_rate: p.target_min_downstream_rate,
        max_downstream_rate: p.max_downstream_rate,
        max_downstream_burst_rate: p.max_downstream_burst_rate,
        min_duration: p.min_duration,
        max_duration: p.max_duration,
        priority: p.priority,
        packet_delay_budget: p.packet_delay_budget,
        jitter: p.jitter,
        packet_error_loss_rate: p.packet_error_loss_rate,
        l4s_queue_type: p.l4s_queue_type,
        service_class: p.service_class,
        dscp,
        skb_priority,
        band: Band::BestEffort,
    })
    .map(|mut profile: QosProfile| {
        profile.band = p_band.unwrap_or_else(|| profile.implied_band());
        profile
    })
}

/// `"major:minor"` in hex, as tc writes class handles.
fn parse_tc_handle(s: &str) -> Option<u32> {
    let (major, minor) = s.split_once(':')?;
    let major = u32::from_str_radix(major, 16)
        .ok()
        .filter(|m| *m <= 0xffff)?;
    let minor = if minor.is_empty() {
        0
    } else {
        u32::from_str_radix(minor, 16)
            .ok()
            .filter(|m| *m <= 0xffff)?
    };
    Some((major << 16) | minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line for a lab (`--insecure`) plus `args`.
    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(
            ["qodd", "--insecure"]
                .into_iter()
                .chain(args.iter().copied()),
        )
    }

    /// Without `--insecure` the defaults need TLS material and a JWKS, and say so.
    #[test]
    fn the_defaults_require_tls_and_tokens() {
        let err = Config::from_parts(None, &Cli::parse_from(["qodd", "-i", "lo"]))
            .expect_err("no TLS files");
        let msg = err.to_string();
        assert!(
            msg.contains("tls.cert") && msg.contains("--insecure"),
            "{msg}"
        );

        let dir = tempfile::tempdir().expect("dir");
        let pki = crate::devkit::DevPki::ensure(dir.path()).expect("pki");
        let secure = Config::from_parts(
            Some((Path::new("t.toml"), &pki.config_toml())),
            &Cli::parse_from(["qodd", "-i", "lo"]),
        )
        .expect("valid with the dev PKI");
        assert!(matches!(secure.security, Security::Secure { .. }));
        // The issuer is required: no default can be right.
        let no_issuer = pki.config_toml().replace("issuer", "# issuer");
        let err = Config::from_parts(
            Some((Path::new("t.toml"), &no_issuer)),
            &Cli::parse_from(["qodd", "-i", "lo"]),
        )
        .expect_err("no issuer");
        assert!(err.to_string().contains("auth.issuer"), "{err}");
    }

    #[test]
    fn defaults_validate_with_an_interface() {
        let c = Config::from_parts(None, &cli(&["--interface", "lo"])).expect("valid");
        assert_eq!(
            c.listen,
            Listen::Tcp("127.0.0.1:50051".parse().expect("addr"))
        );
        let names: Vec<_> = c
            .policy
            .profiles
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(names, ["QOS_E", "QOS_L", "QOS_M", "QOS_S"]);
        let e = c
            .policy
            .profiles
            .get(&ProfileName::parse("n", "QOS_E").expect("name"))
            .expect("QOS_E");
        assert_eq!(e.dscp, 32);
        assert_eq!(e.skb_priority, None);
        assert_eq!(e.band, crate::profile::Band::LowLatency);
        let l = c
            .policy
            .profiles
            .get(&ProfileName::parse("n", "QOS_L").expect("name"))
            .expect("QOS_L");
        assert_eq!(l.band, crate::profile::Band::Guaranteed);
        assert_eq!(e.max_duration_secs(), Some(86_400));
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = |text: &str| {
            Config::from_parts(Some((Path::new("t.toml"), text)), &cli(&["-i", "lo"]))
                .expect_err("must be refused")
        };
        assert!(matches!(err("lisen = \"x\""), ConfigError::Parse { .. }));
        assert!(
            err("listen = \"nowhere\"")
                .to_string()
                .contains("host:port")
        );
        assert!(err("max_sessions = 0").to_string().contains("max_sessions"));
        let dup = "[[profiles]]\nname=\"AAA\"\nstatus=\"ACTIVE\"\n[[profiles]]\nname=\"AAA\"\nstatus=\"ACTIVE\"\n";
        assert!(err(dup).to_string().contains("twice"));
        let rate = "[[profiles]]\nname=\"AAA\"\nstatus=\"ACTIVE\"\nmax_upstream_rate={value=2000,unit=\"kbps\"}\n";
        assert!(err(rate).to_string().contains("1024"));
        let dir = tempfile::tempdir().expect("dir");
        let pki = crate::devkit::DevPki::ensure(dir.path()).expect("pki");
        let jwks_url = |url: &str, extra: &str| {
            pki.config_toml().replace(
                &format!("jwks_file = {:?}", pki.path("jwks.json")),
                &format!("jwks_url = {url:?}\n{extra}"),
            )
        };
        let secure = |text: &str| {
            Config::from_parts(
                Some((Path::new("t.toml"), text)),
                &Cli::parse_from(["qodd", "-i", "lo"]),
            )
        };
        let plain = secure(&jwks_url("http://idp.example/jwks", ""))
            .expect_err("plain http JWKS")
            .to_string();
        assert!(
            plain.contains("jwks_allow_http") && plain.contains("https"),
            "{plain}"
        );
        secure(&jwks_url(
            "http://idp.example/jwks",
            "jwks_allow_http = true",
        ))
        .expect("allowed in a lab");
        secure(&jwks_url("https://idp.example/jwks", "")).expect("https");
        // A key of another certificate is named as such.
        let other = tempfile::tempdir().expect("dir");
        let other = crate::devkit::DevPki::ensure(other.path()).expect("pki");
        let mismatched = pki.config_toml().replace(
            &format!("{:?}", pki.path("server.key")),
            &format!("{:?}", other.path("server.key")),
        );
        let e = secure(&mismatched).expect_err("mismatch").to_string();
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let missing = Config::from_parts(None, &cli(&["-i", "qod-no-such0"])).expect_err("refused");
        assert!(missing.to_string().contains("does not exist"));
    }

    /// The whole chain of an error, as `qodd` prints it.
    fn chain(e: &ConfigError) -> String {
        let mut out = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }

    /// Each kind of mistake is its own variant naming the key; a wrong word is refused by the
    /// parser with the key and the choices.
    #[test]
    fn a_cluster_section_is_checked_before_any_etcd_is_asked() {
        let key_dir = tempfile::tempdir().expect("dir");
        let key = key_dir.path().join("cluster.key");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("key");
        let parse = |text: &str| {
            let text = text.replace(
                "[cluster]\n",
                &format!("[cluster]\nrecord_key_file = {key:?}\n"),
            );
            Config::from_parts(Some((Path::new("t.toml"), &text)), &cli(&["-i", "lo"]))
        };
        let pools = "ue_pools = [\"10.1.0.0/16\"]\n";
        // No endpoints: a single node, whatever else the section says.
        assert!(
            parse("[cluster]\nnode_id = \"\"")
                .expect("single")
                .cluster
                .is_none()
        );
        let ok = parse(&format!(
            "{pools}[cluster]\netcd = [\"http://10.0.0.1:2379\"]\netcd_allow_http = true\nnode_id = \"edge-1\"\nrole = \"standby\""
        ))
        .expect("valid")
        .cluster
        .expect("cluster mode");
        assert_eq!(ok.role, crate::cluster::Role::Standby);
        assert_eq!(ok.lease_ttl, Duration::from_secs(10));
        assert_eq!(ok.prefix, "/qod/");
        assert_eq!(
            ok.pools,
            vec!["10.1.0.0/16".parse::<IpNetwork>().expect("cidr")]
        );
        let err = |text: String| chain(&parse(&text).expect_err("must be refused"));
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "PEM").expect("ca");
        let section = |extra: &str| {
            let id = if extra.starts_with("node_id") {
                ""
            } else {
                "node_id = \"n1\"\n"
            };
            format!(
                "{pools}[cluster]\netcd = [\"https://10.0.0.1:2379\"]\n{id}etcd_ca = {ca:?}\n{extra}"
            )
        };
        assert!(
            err(format!(
                "{pools}[cluster]\netcd = [\"http://10.0.0.1:2379\"]\nnode_id = \"n1\""
            ))
            .contains("plain http only with cluster.etcd_allow_http"),
        );
        assert!(
            err(format!(
                "{pools}[cluster]\netcd = [\"https://10.0.0.1:2379\"]\nnode_id = \"n1\""
            ))
            .contains("cluster.etcd_ca is required")
        );
        assert!(
            err(format!("{pools}[cluster]\netcd = [\"https://10.0.0.1:2379\"]\nnode_id = \"n1\"\netcd_ca = \"/nonexistent/ca.crt\""))
                .contains("cluster.etcd_ca /nonexistent/ca.crt cannot be read")
        );
        assert!(
            parse(&section(""))
                .expect("valid")
                .cluster
                .expect("cluster")
                .tls
                .is_some()
        );
        assert!(err(section("node_id = \"a b\"")).contains("cluster.node_id"));
        assert!(err(section("role = \"leader\"")).contains("standby"));
        assert!(err(section("prefix = \"qod\"")).contains("cluster.prefix"));
        assert!(
            err(section("lease_ttl_secs = 1"))
                .contains("cluster.lease_ttl_secs = 1: must be 2 to 600")
        );
        assert!(
            err(section("etcd_cert = \"/x.crt\"")).contains("needs both etcd_cert and etcd_key")
        );
        assert!(
            err(section("").replace(pools, ""))
                .contains("each node names the device pools it serves")
        );
    }

    #[test]
    fn mistakes_are_typed_and_name_the_key() {
        let err = |text: &str| {
            Config::from_parts(Some((Path::new("t.toml"), text)), &cli(&["-i", "lo"]))
                .expect_err("must be refused")
        };
        let e = err("on_exit = \"explode\"");
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let text = chain(&e);
        assert!(
            text.contains("on_exit") && text.contains("keep") && text.contains("teardown"),
            "{text}"
        );
        let e = err("[[interfaces]]\nname = \"lo\"\nside = \"devcie\"");
        let text = chain(&e);
        assert!(text.contains("devcie") && text.contains("server"), "{text}");
        assert!(matches!(
            err("max_sessions = 0"),
            ConfigError::OutOfRange { ref key, ref value, .. } if key == "max_sessions" && value == "0"
        ));
        assert!(matches!(
            err("listen = \"nowhere\""),
            ConfigError::Address { key: "listen", .. }
        ));
        assert!(matches!(
            err("ue_pools = [\"10.0.0.0/33\"]"),
            ConfigError::Network {
                key: "ue_pools",
                ..
            }
        ));
        assert!(matches!(
            err("[limits]\nmax_connections = 0"),
            ConfigError::OutOfRange { ref key, .. } if key == "limits.max_connections"
        ));
        assert!(matches!(
            err("[[devices]]\nphone_number = \"+34600000001\"\nipv4_address = \"10.0.0.300\""),
            ConfigError::Device {
                problem: DeviceProblem::Address { family: "IPv4", .. },
                ..
            }
        ));
        let e = Config::from_parts(None, &cli(&["-i", "lo:sideways"])).expect_err("bad flag");
        assert!(
            matches!(
                e,
                ConfigError::Flag {
                    flag: "--interface",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    /// The defaults are one file: a user's table is merged over the default one key by key, so
    /// naming one key of `[rest]` keeps the others' defaults; a file's `jwks_url` replaces the
    /// default `jwks_file` instead of clashing with it; what `--check-config` prints is what
    /// runs.
    #[test]
    fn a_file_overrides_the_defaults_key_by_key() {
        let c = Config::from_parts(
            Some((Path::new("t.toml"), "[rest]\nlisten = \"127.0.0.1:0\"\n")),
            &cli(&["-i", "lo"]),
        )
        .expect("valid");
        let rest = c.rest.expect("on");
        assert_eq!(
            rest.request_timeout,
            Duration::from_secs(10),
            "default kept"
        );
        assert_eq!(rest.api_root, "");

        let dir = tempfile::tempdir().expect("dir");
        let pki = crate::devkit::DevPki::ensure(dir.path()).expect("pki");
        let text = pki.config_toml().replace(
            &format!("jwks_file = {:?}", pki.path("jwks.json")),
            "jwks_url = \"https://idp.example/jwks\"",
        );
        let c = Config::from_parts(
            Some((Path::new("t.toml"), &text)),
            &Cli::parse_from(["qodd", "-i", "lo"]),
        )
        .expect("the url replaces the default file");
        let Security::Secure { auth, .. } = c.security else {
            panic!("secure")
        };
        assert!(matches!(auth.jwks, JwksSource::Url(_)));

        let file = dir.path().join("qodd.toml");
        std::fs::write(&file, "[notifications]\nqueue = 7\n").expect("write");
        let cli = Cli::parse_from([
            "qodd",
            "--insecure",
            "-i",
            "lo",
            "--config",
            file.to_str().expect("utf-8"),
        ]);
        let effective: toml::Table = Config::effective_toml(&cli)
            .expect("effective")
            .parse()
            .expect("toml");
        assert_eq!(effective["notifications"]["queue"].as_integer(), Some(7));
        assert_eq!(
            effective["notifications"]["max_attempts"].as_integer(),
            Some(8),
            "the default beside the file's key"
        );
        assert_eq!(Config::load(&cli).expect("valid").notify.queue, 7);
    }

    #[test]
    fn tc_handles_parse_like_tc() {
        assert_eq!(parse_tc_handle("1:10"), Some(0x0001_0010));
        assert_eq!(parse_tc_handle("ffff:"), Some(0xffff_0000));
        assert_eq!(parse_tc_handle("1"), None);
    }
}
