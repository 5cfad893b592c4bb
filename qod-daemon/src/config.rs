//! `qodd` configuration: a TOML file (defaults in `qodd.toml`, embedded) overridden by flags,
//! validated into a typed [`Config`] before any socket is bound or program loaded.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use serde::Deserialize;

use std::collections::HashMap;

use ipnetwork::IpNetwork;

use std::num::NonZeroU32;

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
    profile::{
        Band, CamaraDuration, CountryAvailability, L4sQueueType, ProfileStatus, Profiles,
        QosProfile, Rate, ServiceClass,
    },
};

/// The documented defaults; also what `qodd --print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("../qodd.toml");

/// Exit code for a configuration that does not validate (`EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

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
    #[arg(long)]
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

/// The file's shape. Every field is optional so a user file overrides only what it names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<String>,
    interfaces: Option<Vec<InterfaceEntry>>,
    on_exit: Option<String>,
    pin_path: Option<PathBuf>,
    incompatible_pins: Option<String>,
    attach: Option<String>,
    bpffs: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_sessions: Option<u32>,
    unavailable_retention_secs: Option<u64>,
    link_resync_secs: Option<u64>,
    policer_burst_ms: Option<u64>,
    event_log_retention: Option<u64>,
    profiles: Option<Vec<ProfileConfig>>,
    ue_pools: Option<Vec<String>>,
    devices: Option<Vec<DeviceEntry>>,
    duration_out_of_range: Option<String>,
    notifications: Option<NotificationsConfig>,
    tls: Option<TlsConfig>,
    auth: Option<AuthConfig>,
    limits: Option<LimitsConfig>,
    rest: Option<RestConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestConfig {
    listen: Option<String>,
    api_root: Option<String>,
    public_url: Option<String>,
    request_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsConfig {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_auth: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthConfig {
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_allow_http: Option<bool>,
    jwks_refresh_secs: Option<u64>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: Option<u64>,
    algorithms: Option<Vec<String>>,
    client_id_claim: Option<String>,
    device_claim: Option<String>,
    client_id_from_certificate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsConfig {
    max_active_sessions_per_client: Option<u32>,
    max_sinks_per_client: Option<u32>,
    max_watches_per_client: Option<u32>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
    max_message_bytes: Option<usize>,
    max_connections: Option<u32>,
    max_connections_per_peer: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    max_streams_per_connection: Option<u32>,
}

/// `interfaces` entries: a name (marking only, both directions), or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InterfaceEntry {
    Name(String),
    Table(InterfaceTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterfaceTable {
    name: String,
    /// `device` (egress carries downlink), `server` (uplink) or `both`.
    side: Option<String>,
    /// Capacity in Mbit/s: qodd then owns the egress scheduling.
    capacity_mbit: Option<f64>,
    low_latency_share: Option<f64>,
    guaranteed_share: Option<f64>,
    /// Let qodd replace a root qdisc that is not its own (default: refuse to start).
    replace_foreign_root: Option<bool>,
}

fn parse_cli_interface(s: &str) -> Result<InterfaceEntry, ConfigError> {
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default().to_owned();
    let side = parts.next().map(str::to_owned);
    let capacity_mbit = parts
        .next()
        .map(|c| {
            c.parse::<f64>().map_err(|_| {
                invalid(format!(
                    "--interface {s:?}: capacity {c:?} is not a number of Mbit/s"
                ))
            })
        })
        .transpose()?;
    if parts.next().is_some() {
        return Err(invalid(format!(
            "--interface {s:?}: expected NAME[:SIDE[:MBIT]]"
        )));
    }
    Ok(InterfaceEntry::Table(InterfaceTable {
        name,
        side,
        capacity_mbit,
        ..Default::default()
    }))
}

fn validate_interface(e: InterfaceEntry) -> Result<ManagedInterface, ConfigError> {
    let t = match e {
        InterfaceEntry::Name(name) => InterfaceTable {
            name,
            ..Default::default()
        },
        InterfaceEntry::Table(t) => t,
    };
    let name = t.name;
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0', ':']) {
        return Err(invalid(format!(
            "interface name {name:?} is not a valid Linux interface name"
        )));
    }
    if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
        return Err(invalid(format!(
            "interface {name:?} does not exist in this network namespace"
        )));
    }
    let side = match t.side.as_deref().unwrap_or("both") {
        "device" => Side::Device,
        "server" => Side::Server,
        "both" => Side::Both,
        other => {
            return Err(invalid(format!(
                "interface {name}: side = {other:?}: expected device, server or both"
            )));
        }
    };
    let share = |v: Option<f64>, d: f64, what: &str| -> Result<f64, ConfigError> {
        let v = v.unwrap_or(d);
        if !(0.0..=1.0).contains(&v) {
            return Err(invalid(format!(
                "interface {name}: {what} = {v} must be between 0 and 1"
            )));
        }
        Ok(v)
    };
    let scheduler = match t.capacity_mbit {
        None => None,
        Some(c) if !(c.is_finite() && c >= 0.1) => {
            return Err(invalid(format!(
                "interface {name}: capacity_mbit = {c} must be at least 0.1"
            )));
        }
        Some(_) if side == Side::Both => {
            return Err(invalid(format!(
                "interface {name}: a capacity needs side = \"device\" or \"server\" (which direction's rates apply)"
            )));
        }
        Some(c) => {
            let config = SchedulerConfig {
                capacity_bps: (c * 1_000_000.0) as u64,
                low_latency_share: share(t.low_latency_share, 0.1, "low_latency_share")?,
                guaranteed_share: share(t.guaranteed_share, 0.8, "guaranteed_share")?,
                replace_foreign_root: t.replace_foreign_root.unwrap_or(false),
            };
            if config.low_latency_share + config.guaranteed_share > 0.95 {
                return Err(invalid(format!(
                    "interface {name}: low_latency_share + guaranteed_share must leave at least 5% to best effort"
                )));
            }
            Some(config)
        }
    };
    Ok(ManagedInterface {
        name,
        side,
        scheduler,
    })
}

pub use crate::dataplane::{AttachMode, ManagedInterface, Side};

/// A device directory entry: a phone number and the addresses the device uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    phone_number: String,
    ipv4_address: Option<String>,
    ipv6_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotificationsConfig {
    event_type: Option<String>,
    source: Option<String>,
    allow_http_hosts: Option<Vec<String>>,
    allow_sink_ranges: Option<Vec<String>>,
    deny_sink_ranges: Option<Vec<String>>,
    queue: Option<usize>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
}

impl FileConfig {
    fn overlay(self, over: FileConfig) -> FileConfig {
        FileConfig {
            listen: over.listen.or(self.listen),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            log_format: over.log_format.or(self.log_format),
            interfaces: over.interfaces.or(self.interfaces),
            on_exit: over.on_exit.or(self.on_exit),
            pin_path: over.pin_path.or(self.pin_path),
            incompatible_pins: over.incompatible_pins.or(self.incompatible_pins),
            attach: over.attach.or(self.attach),
            bpffs: over.bpffs.or(self.bpffs),
            state_dir: over.state_dir.or(self.state_dir),
            max_sessions: over.max_sessions.or(self.max_sessions),
            unavailable_retention_secs: over
                .unavailable_retention_secs
                .or(self.unavailable_retention_secs),
            link_resync_secs: over.link_resync_secs.or(self.link_resync_secs),
            policer_burst_ms: over.policer_burst_ms.or(self.policer_burst_ms),
            event_log_retention: over.event_log_retention.or(self.event_log_retention),
            profiles: over.profiles.or(self.profiles),
            ue_pools: over.ue_pools.or(self.ue_pools),
            devices: over.devices.or(self.devices),
            duration_out_of_range: over.duration_out_of_range.or(self.duration_out_of_range),
            notifications: over.notifications.or(self.notifications),
            tls: over.tls.or(self.tls),
            auth: over.auth.or(self.auth),
            limits: over.limits.or(self.limits),
            rest: match (self.rest, over.rest) {
                (Some(base), Some(over)) => Some(RestConfig {
                    listen: over.listen.or(base.listen),
                    api_root: over.api_root.or(base.api_root),
                    public_url: over.public_url.or(base.public_url),
                    request_timeout_ms: over.request_timeout_ms.or(base.request_timeout_ms),
                }),
                (base, over) => over.or(base),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileConfig {
    name: String,
    #[serde(default)]
    description: String,
    status: ProfileStatus,
    #[serde(default)]
    country_availability: Vec<CountryAvailability>,
    target_min_upstream_rate: Option<Rate>,
    max_upstream_rate: Option<Rate>,
    max_upstream_burst_rate: Option<Rate>,
    target_min_downstream_rate: Option<Rate>,
    max_downstream_rate: Option<Rate>,
    max_downstream_burst_rate: Option<Rate>,
    min_duration: Option<CamaraDuration>,
    max_duration: Option<CamaraDuration>,
    priority: Option<u8>,
    packet_delay_budget: Option<CamaraDuration>,
    jitter: Option<CamaraDuration>,
    packet_error_loss_rate: Option<u8>,
    l4s_queue_type: Option<L4sQueueType>,
    service_class: Option<ServiceClass>,
    dscp: Option<u8>,
    skb_priority: Option<SkbPriority>,
    band: Option<Band>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SkbPriority {
    Number(u32),
    Handle(String),
}

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human text.
    Text,
    /// One JSON object per line: timestamp, level, target, fields, and the `rpc` span's fields.
    Json,
}

/// What to do with a pinned data plane of another layout or capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl Config {
    /// Reads the file named by `cli` (if any) over the defaults, applies the flags, validates.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Some((path.as_path(), text))
            }
            None => None,
        };
        Self::from_parts(file.as_ref().map(|(p, t)| (*p, t.as_str())), cli)
    }

    /// The effective configuration as TOML, for `qodd --check-config`: the built-in defaults,
    /// the file's keys over them, the flags over both (each top-level key replaced whole, as
    /// [`Config::load`] merges them). Validate with [`Config::load`] first.
    pub fn effective_toml(cli: &Cli) -> Result<String, ConfigError> {
        let parse = |path: &Path, text: &str| {
            text.parse::<toml::Table>()
                .map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })
        };
        let mut merged = parse(Path::new("<built-in defaults>"), DEFAULT_CONFIG)?;
        if let Some(path) = &cli.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            merged.extend(parse(path, &text)?);
        }
        if let Some(listen) = &cli.listen {
            merged.insert("listen".into(), listen.clone().into());
        }
        if let Some(attach) = &cli.attach {
            merged.insert("attach".into(), attach.clone().into());
        }
        if let Some(max) = cli.max_sessions {
            merged.insert("max_sessions".into(), i64::from(max).into());
        }
        if !cli.interfaces.is_empty() {
            let mut list = toml::value::Array::new();
            for i in &cli.interfaces {
                let InterfaceEntry::Table(t) = parse_cli_interface(i)? else {
                    continue;
                };
                let mut entry = toml::Table::new();
                entry.insert("name".into(), t.name.into());
                if let Some(side) = t.side {
                    entry.insert("side".into(), side.into());
                }
                if let Some(mbit) = t.capacity_mbit {
                    entry.insert("capacity_mbit".into(), mbit.into());
                }
                if let Some(replace) = t.replace_foreign_root {
                    entry.insert("replace_foreign_root".into(), replace.into());
                }
                list.push(entry.into());
            }
            merged.insert("interfaces".into(), list.into());
        }
        let mut out = String::new();
        if cli.insecure {
            out.push_str("# --insecure: no TLS and no access tokens ([tls] and [auth] unused)\n");
        }
        out.push_str(&toml::to_string(&merged).unwrap_or_default());
        Ok(out)
    }

    /// As [`Config::load`], with the file's text given.
    pub fn from_parts(file: Option<(&Path, &str)>, cli: &Cli) -> Result<Self, ConfigError> {
        let parse = |path: &Path, text: &str| {
            toml::from_str::<FileConfig>(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })
        };
        let mut merged = parse(Path::new("<built-in defaults>"), DEFAULT_CONFIG)?;
        if let Some((path, text)) = file {
            merged = merged.overlay(parse(path, text)?);
        }
        merged = merged.overlay(FileConfig {
            listen: cli.listen.clone(),
            interfaces: (!cli.interfaces.is_empty())
                .then(|| {
                    cli.interfaces
                        .iter()
                        .map(|i| parse_cli_interface(i))
                        .collect()
                })
                .transpose()?,
            attach: cli.attach.clone(),
            max_sessions: cli.max_sessions,
            rest: cli.rest_listen.clone().map(|listen| RestConfig {
                listen: Some(listen),
                ..RestConfig::default()
            }),
            ..FileConfig::default()
        });
        Self::validate(merged, cli.insecure)
    }

    fn validate(f: FileConfig, insecure: bool) -> Result<Self, ConfigError> {
        let listen = parse_listen(f.listen.as_deref().unwrap_or_default())?;
        let metrics_listen = match f.metrics_listen.as_deref().unwrap_or("") {
            "" | "off" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|e| {
                invalid(format!(
                    "metrics_listen = {addr:?}: expected \"host:port\" or \"off\" ({e})"
                ))
            })?),
        };
        let rest = validate_rest(f.rest.unwrap_or_default())?;
        let log_format = match f.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(format!(
                    "log_format = {other:?}: expected \"text\" or \"json\""
                )));
            }
        };
        let interfaces = f.interfaces.unwrap_or_default();
        if interfaces.is_empty() {
            return Err(invalid(
                "no managed interface: set `interfaces` in the config file or pass --interface",
            ));
        }
        if interfaces.len() > qod_common::MAX_INTERFACES as usize {
            return Err(invalid(format!(
                "{} managed interfaces: at most {} (each has its own classifier counters)",
                interfaces.len(),
                qod_common::MAX_INTERFACES
            )));
        }
        let interfaces = interfaces
            .into_iter()
            .map(validate_interface)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for i in &interfaces {
            if !seen.insert(i.name.clone()) {
                return Err(invalid(format!("interface {:?} is listed twice", i.name)));
            }
        }
        let teardown_on_exit = match f.on_exit.as_deref().unwrap_or("keep") {
            "keep" => false,
            "teardown" => true,
            other => {
                return Err(invalid(format!(
                    "on_exit = {other:?}: expected \"keep\" or \"teardown\""
                )));
            }
        };
        let bpffs = f
            .bpffs
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf"));
        let pin_path = f.pin_path.clone().unwrap_or_else(|| bpffs.join("qod"));
        if pin_path.parent().is_none() || pin_path == bpffs {
            return Err(invalid(format!(
                "pin_path = {:?} must be a directory of qodd's own inside bpffs, not its root",
                pin_path.display()
            )));
        }
        let incompatible_pins = match f.incompatible_pins.as_deref().unwrap_or("rebuild") {
            "rebuild" => IncompatiblePins::Rebuild,
            "refuse" => IncompatiblePins::Refuse,
            other => {
                return Err(invalid(format!(
                    "incompatible_pins = {other:?}: expected \"rebuild\" or \"refuse\""
                )));
            }
        };
        let attach = match f.attach.as_deref().unwrap_or("auto") {
            "auto" => AttachMode::Auto,
            "tcx" => AttachMode::Tcx,
            "clsact" => AttachMode::Clsact,
            other => {
                return Err(invalid(format!(
                    "attach = {other:?}: expected \"auto\", \"tcx\" or \"clsact\""
                )));
            }
        };
        let max_sessions = f.max_sessions.unwrap_or(65_536);
        if !(1..=4_000_000).contains(&max_sessions) {
            return Err(invalid(format!(
                "max_sessions = {max_sessions}: must be 1 to 4000000"
            )));
        }
        let pools = f
            .ue_pools
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.parse::<IpNetwork>().map_err(|_| {
                    invalid(format!(
                        "ue_pools: {p:?} is not an IP network like 10.0.0.0/8"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut directory = HashMap::new();
        for d in f.devices.unwrap_or_default() {
            let phone = PhoneNumber::parse("phone_number", &d.phone_number)
                .map_err(|e| invalid(format!("devices: {}", e.message)))?;
            let ipv4 = d
                .ipv4_address
                .map(|a| {
                    a.parse()
                        .map_err(|_| invalid(format!("devices: {a:?} is not an IPv4 address")))
                })
                .transpose()?;
            let ipv6 = d
                .ipv6_address
                .map(|a| {
                    a.parse()
                        .map_err(|_| invalid(format!("devices: {a:?} is not an IPv6 address")))
                })
                .transpose()?;
            if ipv4.is_none() && ipv6.is_none() {
                return Err(invalid(format!(
                    "devices: {} has no ipv4_address or ipv6_address",
                    d.phone_number
                )));
            }
            if directory
                .insert(phone, DeviceAddresses { ipv4, ipv6 })
                .is_some()
            {
                return Err(invalid(format!(
                    "devices: {} is listed twice",
                    d.phone_number
                )));
            }
        }
        let duration_error = match f.duration_out_of_range.as_deref().unwrap_or("camara") {
            "camara" => CamaraCode::DurationOutOfRange,
            "invalid_argument" => CamaraCode::InvalidArgument,
            other => {
                return Err(invalid(format!(
                    "duration_out_of_range = {other:?}: expected \"camara\" or \"invalid_argument\""
                )));
            }
        };
        let n = f.notifications.unwrap_or_default();
        let defaults = NotifyConfig::default();
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        let notify = NotifyConfig {
            event_type: n.event_type.unwrap_or(defaults.event_type),
            source: n.source.unwrap_or(defaults.source),
            queue: n.queue.unwrap_or(defaults.queue),
            timeout: ms(n.timeout_ms, defaults.timeout),
            max_attempts: n.max_attempts.unwrap_or(defaults.max_attempts),
            backoff_base: ms(n.backoff_base_ms, defaults.backoff_base),
            backoff_max: ms(n.backoff_max_ms, defaults.backoff_max),
            sinks: crate::notify::SinkRules {
                http_hosts: n.allow_http_hosts.unwrap_or_default(),
                addresses: crate::notify::SinkAddresses {
                    allow: networks("notifications.allow_sink_ranges", n.allow_sink_ranges)?,
                    deny: networks("notifications.deny_sink_ranges", n.deny_sink_ranges)?,
                },
            },
        };
        if notify.queue == 0 || notify.max_attempts == 0 || notify.timeout.is_zero() {
            return Err(invalid(
                "notifications: queue, max_attempts and timeout_ms must be positive",
            ));
        }
        let (limits, connections) = validate_limits(f.limits.unwrap_or_default())?;
        let link_resync = match f.link_resync_secs.unwrap_or(30) {
            secs @ 1..=3600 => Duration::from_secs(secs),
            other => {
                return Err(invalid(format!(
                    "link_resync_secs = {other}: must be 1 to 3600"
                )));
            }
        };
        let policer_burst = match f
            .policer_burst_ms
            .unwrap_or(crate::core::DEFAULT_POLICER_BURST_MS)
        {
            ms @ 5..=5000 => Duration::from_millis(ms),
            other => {
                return Err(invalid(format!(
                    "policer_burst_ms = {other}: must be 5 to 5000"
                )));
            }
        };
        let event_log_retention = match f
            .event_log_retention
            .unwrap_or(crate::store::DEFAULT_EVENT_RETENTION)
        {
            n @ 1..=10_000_000 => n,
            other => {
                return Err(invalid(format!(
                    "event_log_retention = {other}: must be 1 to 10000000"
                )));
            }
        };
        let security = if insecure {
            Security::Insecure
        } else {
            validate_security(f.tls.unwrap_or_default(), f.auth.unwrap_or_default())?
        };
        let profiles = f.profiles.unwrap_or_default();
        if profiles.is_empty() {
            return Err(invalid("no QoS profile is defined"));
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(profiles.len());
        for p in profiles {
            let profile = validate_profile(p)?;
            if !names.insert(profile.name.clone()) {
                return Err(invalid(format!(
                    "profile {} is defined twice",
                    profile.name
                )));
            }
            out.push(profile);
        }
        Ok(Self {
            listen,
            metrics_listen,
            log_format,
            interfaces,
            teardown_on_exit,
            incompatible_pins,
            attach,
            pin_path,
            bpffs,
            state_dir: f
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/qodd")),
            max_sessions,
            unavailable_retention: Duration::from_secs(f.unavailable_retention_secs.unwrap_or(360)),
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
        })
    }
}

/// A list of CIDR networks (an address alone is its own /32 or /128).
fn networks(key: &str, v: Option<Vec<String>>) -> Result<Vec<ipnetwork::IpNetwork>, ConfigError> {
    v.unwrap_or_default()
        .iter()
        .map(|n| {
            n.parse().map_err(|e| {
                invalid(format!(
                    "{key}: {n:?} is not an address or CIDR network ({e})"
                ))
            })
        })
        .collect()
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        invalid(format!(
            "{what} {} cannot be read ({e}); configure it, or run a lab with --insecure",
            path.display()
        ))
    })
}

fn validate_security(t: TlsConfig, a: AuthConfig) -> Result<Security, ConfigError> {
    let cert = t
        .cert
        .unwrap_or_else(|| PathBuf::from("/etc/qodd/tls/server.crt"));
    let key = t
        .key
        .unwrap_or_else(|| PathBuf::from("/etc/qodd/tls/server.key"));
    let client_auth_optional = match t.client_auth.as_deref().unwrap_or("required") {
        "required" => false,
        "optional" => true,
        other => {
            return Err(invalid(format!(
                "tls.client_auth = {other:?}: expected \"required\" or \"optional\""
            )));
        }
    };
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
    tonic::transport::Server::builder()
        .tls_config(tls.server_config())
        .map_err(|e| {
            // tonic says only "transport error"; the cause is in its sources.
            let mut why = Vec::new();
            let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
            while let Some(c) = cause {
                why.push(c.to_string());
                cause = c.source();
            }
            let why = why.join(": ");
            if why.contains("KeyMismatch") || why.contains("does not match") {
                invalid(format!(
                    "tls: the key {} does not belong to the certificate {} (their public keys differ)",
                    key.display(),
                    cert.display()
                ))
            } else {
                invalid(format!(
                    "tls: the certificate {}, key {} or client CA is not usable: {why}",
                    cert.display(),
                    key.display()
                ))
            }
        })?;

    let algorithms = match a.algorithms {
        None => SUPPORTED_ALGORITHMS.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                SUPPORTED_ALGORITHMS
                    .into_iter()
                    .find(|a| format!("{a:?}") == *n)
                    .ok_or_else(|| {
                        invalid(format!(
                            "auth.algorithms: {n:?} is not one of RS256, ES256, EdDSA"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if algorithms.is_empty() {
        return Err(invalid("auth.algorithms must name at least one algorithm"));
    }
    let jwks = match (a.jwks_file, a.jwks_url) {
        (Some(_), Some(_)) => {
            return Err(invalid("auth: set jwks_file or jwks_url, not both"));
        }
        (None, Some(u)) => {
            let url = url::Url::parse(&u)
                .ok()
                .filter(|u| matches!(u.scheme(), "https" | "http") && u.host().is_some())
                .ok_or_else(|| invalid(format!("auth.jwks_url = {u:?} is not an https URL")))?;
            // The key set is the trust root of every token: over plain http anyone on the path
            // could swap it. Only a lab may say so.
            if url.scheme() == "http" && !a.jwks_allow_http.unwrap_or(false) {
                return Err(invalid(format!(
                    "auth.jwks_url = {u:?} is plain http, which lets anyone on the path replace the keys tokens are trusted with; use https, or set auth.jwks_allow_http = true in a lab"
                )));
            }
            JwksSource::Url(url)
        }
        (file, None) => {
            let path = file.unwrap_or_else(|| PathBuf::from("/etc/qodd/jwks.json"));
            let text = String::from_utf8(read_file("auth.jwks_file", &path)?)
                .map_err(|_| invalid(format!("auth.jwks_file {} is not UTF-8", path.display())))?;
            parse_jwks(&text, &algorithms)
                .map_err(|e| invalid(format!("auth.jwks_file {}: {e}", path.display())))?;
            JwksSource::File(path)
        }
    };
    let required = |v: Option<String>, key: &str| {
        v.filter(|v| !v.is_empty()).ok_or_else(|| {
            invalid(format!(
                "auth.{key} is required: the value every access token must carry"
            ))
        })
    };
    let claim = |v: Option<String>, d: &str| v.filter(|v| !v.is_empty()).unwrap_or(d.to_owned());
    let client_id_from_certificate = a.client_id_from_certificate.unwrap_or(false);
    if client_id_from_certificate && (tls.client_ca_pem.is_none() || tls.client_auth_optional) {
        return Err(invalid(
            "auth.client_id_from_certificate needs tls.client_ca with client_auth = \"required\"",
        ));
    }
    let leeway = a.leeway_secs.unwrap_or(30);
    if leeway > 300 {
        return Err(invalid(format!(
            "auth.leeway_secs = {leeway}: at most 300 (a small allowance for clock skew)"
        )));
    }
    Ok(Security::Secure {
        tls: Box::new(tls),
        auth: Box::new(AuthSettings {
            jwks,
            jwks_refresh: Duration::from_secs(a.jwks_refresh_secs.unwrap_or(300).max(10)),
            rules: TokenRules {
                issuer: required(a.issuer, "issuer")?,
                audience: required(a.audience, "audience")?,
                leeway: Duration::from_secs(leeway),
                algorithms,
            },
            client_id_claim: claim(a.client_id_claim, "client_id"),
            device_claim: claim(a.device_claim, "sub"),
            client_id_from_certificate,
        }),
    })
}

fn validate_limits(
    l: LimitsConfig,
) -> Result<(ClientLimits, crate::listener::ConnectionLimits), ConfigError> {
    let d = crate::listener::ConnectionLimits::DEFAULT;
    let bounded = |v: Option<u32>, d: u32, key: &str, range: std::ops::RangeInclusive<u32>| {
        let v = v.unwrap_or(d);
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(invalid(format!(
                "limits.{key} = {v}: must be {} to {}",
                range.start(),
                range.end()
            )))
        }
    };
    let max_connections = bounded(
        l.max_connections,
        d.max_connections,
        "max_connections",
        1..=1_000_000,
    )?;
    let connections = crate::listener::ConnectionLimits {
        max_connections,
        max_connections_per_peer: bounded(
            l.max_connections_per_peer,
            d.max_connections_per_peer.min(max_connections),
            "max_connections_per_peer",
            1..=max_connections,
        )?,
        handshake_timeout: Duration::from_millis(u64::from(bounded(
            l.handshake_timeout_ms
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
            d.handshake_timeout.as_millis() as u32,
            "handshake_timeout_ms",
            100..=60_000,
        )?)),
        max_streams_per_connection: bounded(
            l.max_streams_per_connection,
            d.max_streams_per_connection,
            "max_streams_per_connection",
            1..=10_000,
        )?,
    };
    let nonzero = |v: Option<u32>, d: u32, key: &str| {
        NonZeroU32::new(v.unwrap_or(d))
            .ok_or_else(|| invalid(format!("limits.{key} must be at least 1")))
    };
    let max_message_bytes = l.max_message_bytes.unwrap_or(65_536);
    if !(1024..=16 << 20).contains(&max_message_bytes) {
        return Err(invalid(format!(
            "limits.max_message_bytes = {max_message_bytes}: must be 1024 to 16777216"
        )));
    }
    let client = ClientLimits {
        max_active_sessions: nonzero(
            l.max_active_sessions_per_client,
            10_000,
            "max_active_sessions_per_client",
        )?
        .get(),
        max_sinks: nonzero(l.max_sinks_per_client, 16, "max_sinks_per_client")?.get(),
        max_watches: nonzero(l.max_watches_per_client, 64, "max_watches_per_client")?.get(),
        requests_per_second: nonzero(l.requests_per_second, 100, "requests_per_second")?,
        request_burst: nonzero(l.request_burst, 200, "request_burst")?,
        max_message_bytes,
    };
    Ok((client, connections))
}

fn validate_rest(r: RestConfig) -> Result<Option<RestSettings>, ConfigError> {
    let listen = match r.listen.as_deref().unwrap_or("off") {
        "" | "off" => return Ok(None),
        addr => addr.parse::<SocketAddr>().map_err(|e| {
            invalid(format!(
                "rest.listen = {addr:?}: expected \"host:port\" or \"off\" ({e})"
            ))
        })?,
    };
    let api_root = r.api_root.unwrap_or_default();
    let path_char = |c: char| c.is_ascii_alphanumeric() || "-._~/".contains(c);
    if !api_root.is_empty()
        && (!api_root.starts_with('/')
            || api_root.ends_with('/')
            || api_root.contains("//")
            || !api_root.chars().all(path_char))
    {
        return Err(invalid(format!(
            "rest.api_root = {api_root:?}: expected \"\" or a path such as \"/camara\" (no trailing '/')"
        )));
    }
    let public_url = r
        .public_url
        .map(|u| {
            let parsed = url::Url::parse(&u)
                .map_err(|e| invalid(format!("rest.public_url = {u:?} is not a URL ({e})")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(invalid(format!(
                    "rest.public_url = {u:?}: expected an http:// or https:// URL with a host"
                )));
            }
            Ok(u.trim_end_matches('/').to_owned())
        })
        .transpose()?;
    let timeout = r.request_timeout_ms.unwrap_or(10_000);
    if !(100..=300_000).contains(&timeout) {
        return Err(invalid(format!(
            "rest.request_timeout_ms = {timeout}: must be 100 to 300000"
        )));
    }
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
            return Err(invalid("listen = \"unix:\" needs a socket path"));
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    s.parse().map(Listen::Tcp).map_err(|_| {
        invalid(format!(
            "listen = {s:?}: expected host:port (e.g. 127.0.0.1:50051) or unix:/path"
        ))
    })
}

fn validate_profile(p: ProfileConfig) -> Result<QosProfile, ConfigError> {
    let p_band = p.band;
    let name = ProfileName::parse("name", &p.name)
        .map_err(|e| invalid(format!("profile {:?}: {}", p.name, e.message)))?;
    let bad = |what: String| invalid(format!("profile {name}: {what}"));
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
            return Err(bad(format!(
                "{field}.value = {} exceeds CAMARA's 1024; use a larger unit",
                r.value
            )));
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
            return Err(bad(format!(
                "{field}.value = {} must be 1 to {}",
                d.value,
                i32::MAX
            )));
        }
    }
    if let (Some(min), Some(max)) = (p.min_duration, p.max_duration)
        && min.as_duration() > max.as_duration()
    {
        return Err(bad("min_duration is longer than max_duration".into()));
    }
    if let Some(max) = p.max_duration
        && max.as_duration() < Duration::from_secs(1)
    {
        return Err(bad("max_duration is shorter than one second".into()));
    }
    if let Some(prio) = p.priority
        && !(1..=100).contains(&prio)
    {
        return Err(bad(format!("priority = {prio} must be 1 to 100")));
    }
    if let Some(per) = p.packet_error_loss_rate
        && !(1..=10).contains(&per)
    {
        return Err(bad(format!(
            "packet_error_loss_rate = {per} must be 1 to 10"
        )));
    }
    let dscp = match (p.dscp, p.service_class) {
        (Some(d), _) if d > 63 => return Err(bad(format!("dscp = {d} must be 0 to 63"))),
        (Some(d), _) => d,
        (None, Some(class)) => class.dscp(),
        (None, None) => 0,
    };
    let skb_priority = match p.skb_priority {
        None => None,
        Some(SkbPriority::Number(n)) => Some(n),
        Some(SkbPriority::Handle(h)) => Some(parse_tc_handle(&h).ok_or_else(|| {
            bad(format!(
                "skb_priority = {h:?} is not a tc handle like \"1:10\""
            ))
        })?),
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

    #[test]
    fn tc_handles_parse_like_tc() {
        assert_eq!(parse_tc_handle("1:10"), Some(0x0001_0010));
        assert_eq!(parse_tc_handle("ffff:"), Some(0xffff_0000));
        assert_eq!(parse_tc_handle("1"), None);
    }
}
