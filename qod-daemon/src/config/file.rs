//! The configuration file's shape, and how its layers are merged.
//!
//! Every default lives in one place, the embedded `qodd.toml`: the user's file and the flags are
//! merged over it key by key ([`layered`]) before anything is validated, so validation reads
//! each key from the merged table and holds no default of its own. Keys whose value is one of a
//! few words are serde enums, so a wrong word is refused by the parser with the key, the line
//! and the choices.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    Cli, ConfigError, DEFAULT_CONFIG, IncompatiblePins, LogFormat,
    error::ConfigError::{Flag, Parse},
};
use crate::{
    dataplane::{AttachMode, Side},
    profile::{
        Band, CamaraDuration, CountryAvailability, L4sQueueType, ProfileStatus, Rate, ServiceClass,
    },
};

/// The file's shape. Every field is optional so a user file names only what it changes; once
/// merged over the built-in defaults every key those set is present.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<LogFormat>,
    pub interfaces: Option<Vec<InterfaceEntry>>,
    pub on_exit: Option<OnExit>,
    pub pin_path: Option<PathBuf>,
    pub incompatible_pins: Option<IncompatiblePins>,
    pub attach: Option<AttachMode>,
    pub bpffs: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_sessions: Option<u32>,
    pub unavailable_retention_secs: Option<u64>,
    pub link_resync_secs: Option<u64>,
    pub policer_burst_ms: Option<u64>,
    pub event_log_retention: Option<u64>,
    pub profiles: Option<Vec<ProfileConfig>>,
    pub ue_pools: Option<Vec<String>>,
    pub devices: Option<Vec<DeviceEntry>>,
    pub duration_out_of_range: Option<DurationOutOfRange>,
    pub notifications: Option<NotificationsConfig>,
    pub tls: Option<TlsConfig>,
    pub auth: Option<AuthConfig>,
    pub limits: Option<LimitsConfig>,
    pub rest: Option<RestConfig>,
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: etcd, and this node's place among the others.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterConfig {
    pub etcd: Option<Vec<String>>,
    pub node_id: Option<String>,
    pub role: Option<crate::cluster::Role>,
    pub advertise: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub lease_ttl_secs: Option<u64>,
    pub etcd_timeout_ms: Option<u64>,
    pub etcd_allow_http: Option<bool>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub peer_ca: Option<PathBuf>,
    pub record_key_file: Option<PathBuf>,
    pub away_grace_secs: Option<u64>,
    pub install_wait_ms: Option<u64>,
}

/// `on_exit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum OnExit {
    Keep,
    Teardown,
}

/// `duration_out_of_range`: the code a duration outside the profile's bounds answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum DurationOutOfRange {
    Camara,
    InvalidArgument,
}

/// `tls.client_auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ClientAuth {
    Required,
    Optional,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RestConfig {
    pub listen: Option<String>,
    pub api_root: Option<String>,
    pub public_url: Option<String>,
    pub request_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthConfig {
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub jwks_allow_http: Option<bool>,
    pub jwks_refresh_secs: Option<u64>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: Option<u64>,
    pub algorithms: Option<Vec<String>>,
    pub client_id_claim: Option<String>,
    pub device_claim: Option<String>,
    pub client_id_from_certificate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsConfig {
    pub max_active_sessions_per_client: Option<u32>,
    pub max_sinks_per_client: Option<u32>,
    pub max_watches_per_client: Option<u32>,
    pub requests_per_second: Option<u32>,
    pub request_burst: Option<u32>,
    pub max_message_bytes: Option<usize>,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub handshake_timeout_ms: Option<u64>,
    pub max_streams_per_connection: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NotificationsConfig {
    pub event_type: Option<String>,
    pub source: Option<String>,
    pub allow_http_hosts: Option<Vec<String>>,
    pub allow_sink_ranges: Option<Vec<String>>,
    pub deny_sink_ranges: Option<Vec<String>>,
    pub queue: Option<usize>,
    pub timeout_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
}

/// An `interfaces` entry: a name (marking only, both directions), or a table.
#[derive(Debug)]
pub(super) enum InterfaceEntry {
    Name(String),
    Table(InterfaceTable),
}

impl<'de> Deserialize<'de> for InterfaceEntry {
    // By hand rather than `untagged`, so a mistake inside a table is reported as itself (the
    // key and its choices), not as "matched no variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = InterfaceEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an interface name, or a table such as { name = \"eth0\", side = \"device\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InterfaceEntry::Name(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                InterfaceTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(InterfaceEntry::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// Per-entry defaults of an interface table (an array's entries have no place in the defaults
/// file): marking on both sides; with a capacity, these shares.
pub(super) const DEFAULT_LOW_LATENCY_SHARE: f64 = 0.1;
pub(super) const DEFAULT_GUARANTEED_SHARE: f64 = 0.8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InterfaceTable {
    pub name: String,
    /// `device` (egress carries downlink), `server` (uplink) or `both`.
    #[serde(default = "both")]
    pub side: Side,
    /// Capacity in Mbit/s: qodd then owns the egress scheduling.
    pub capacity_mbit: Option<f64>,
    #[serde(default = "low_latency_share")]
    pub low_latency_share: f64,
    #[serde(default = "guaranteed_share")]
    pub guaranteed_share: f64,
    /// Let qodd replace a root qdisc that is not its own (default: refuse to start).
    #[serde(default)]
    pub replace_foreign_root: bool,
}

fn both() -> Side {
    Side::Both
}
fn low_latency_share() -> f64 {
    DEFAULT_LOW_LATENCY_SHARE
}
fn guaranteed_share() -> f64 {
    DEFAULT_GUARANTEED_SHARE
}

impl InterfaceTable {
    pub fn named(name: String) -> Self {
        Self {
            name,
            side: both(),
            capacity_mbit: None,
            low_latency_share: DEFAULT_LOW_LATENCY_SHARE,
            guaranteed_share: DEFAULT_GUARANTEED_SHARE,
            replace_foreign_root: false,
        }
    }
}

/// A device directory entry: a phone number and the addresses the device uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceEntry {
    pub phone_number: String,
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProfileConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub status: ProfileStatus,
    #[serde(default)]
    pub country_availability: Vec<CountryAvailability>,
    pub target_min_upstream_rate: Option<Rate>,
    pub max_upstream_rate: Option<Rate>,
    pub max_upstream_burst_rate: Option<Rate>,
    pub target_min_downstream_rate: Option<Rate>,
    pub max_downstream_rate: Option<Rate>,
    pub max_downstream_burst_rate: Option<Rate>,
    pub min_duration: Option<CamaraDuration>,
    pub max_duration: Option<CamaraDuration>,
    pub priority: Option<u8>,
    pub packet_delay_budget: Option<CamaraDuration>,
    pub jitter: Option<CamaraDuration>,
    pub packet_error_loss_rate: Option<u8>,
    pub l4s_queue_type: Option<L4sQueueType>,
    pub service_class: Option<ServiceClass>,
    pub dscp: Option<u8>,
    pub skb_priority: Option<SkbPriority>,
    pub band: Option<Band>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum SkbPriority {
    Number(u32),
    Handle(String),
}

/// Keys of one table that exclude each other: a layer that sets one of them removes the others
/// from the layers below (a file's `jwks_url` replaces the default `jwks_file`).
const EXCLUSIVE: &[(&str, &[&str])] = &[("auth", &["jwks_file", "jwks_url"])];

/// `over` merged into `base`: tables key by key, anything else (arrays too) replaced whole.
fn merge(base: &mut toml::Table, over: toml::Table, table: &str) {
    if let Some((_, group)) = EXCLUSIVE.iter().find(|(t, _)| *t == table)
        && group.iter().any(|k| over.contains_key(*k))
    {
        for k in *group {
            base.remove(*k);
        }
    }
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &key),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `NAME[:SIDE[:MBIT]]` of `--interface`, as the table a file would hold.
fn cli_interface(spec: &str) -> Result<toml::Value, ConfigError> {
    let bad = |expected| Flag {
        flag: "--interface",
        value: spec.to_owned(),
        expected,
    };
    let mut parts = spec.split(':');
    let mut entry = toml::Table::new();
    entry.insert("name".into(), parts.next().unwrap_or_default().into());
    if let Some(side) = parts.next() {
        entry.insert("side".into(), side.into());
    }
    if let Some(mbit) = parts.next() {
        let mbit: f64 = mbit
            .parse()
            .map_err(|_| bad("NAME[:SIDE[:MBIT]] with MBIT a number of Mbit/s"))?;
        entry.insert("capacity_mbit".into(), mbit.into());
    }
    if parts.next().is_some() {
        return Err(bad("NAME[:SIDE[:MBIT]]"));
    }
    InterfaceTable::deserialize(entry.clone())
        .map_err(|_| bad("NAME[:SIDE[:MBIT]] with SIDE one of device, server, both"))?;
    Ok(entry.into())
}

/// The built-in defaults, the file's keys over them, the flags over both: the configuration
/// qodd runs with, before validation (and what `--check-config` prints).
pub(super) fn layered(file: Option<(&Path, &str)>, cli: &Cli) -> Result<toml::Table, ConfigError> {
    let table = |path: &Path, text: &str| {
        // Read as the typed shape first: unknown keys, wrong types and wrong words are
        // reported against the user's own file, with its line.
        toml::from_str::<FileConfig>(text)
            .and_then(|_| text.parse::<toml::Table>())
            .map_err(|source| Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })
    };
    let mut merged = table(Path::new("<built-in defaults>"), DEFAULT_CONFIG)?;
    if let Some((path, text)) = file {
        merge(&mut merged, table(path, text)?, "");
    }
    let mut flags = toml::Table::new();
    if let Some(listen) = &cli.listen {
        flags.insert("listen".into(), listen.clone().into());
    }
    if let Some(attach) = &cli.attach {
        flags.insert("attach".into(), attach.clone().into());
    }
    if let Some(max) = cli.max_sessions {
        flags.insert("max_sessions".into(), i64::from(max).into());
    }
    if let Some(listen) = &cli.rest_listen {
        let mut rest = toml::Table::new();
        rest.insert("listen".into(), listen.clone().into());
        flags.insert("rest".into(), rest.into());
    }
    if !cli.interfaces.is_empty() {
        let list = cli
            .interfaces
            .iter()
            .map(|i| cli_interface(i))
            .collect::<Result<Vec<_>, _>>()?;
        flags.insert("interfaces".into(), list.into());
    }
    merge(&mut merged, flags, "");
    Ok(merged)
}

/// The merged table as the typed shape.
pub(super) fn typed(merged: toml::Table) -> Result<FileConfig, ConfigError> {
    // The file was read as this shape already, so only a flag's value can fail here.
    toml::Value::Table(merged)
        .try_into()
        .map_err(|source| Parse {
            path: PathBuf::from("<command line>"),
            source: Box::new(source),
        })
}
