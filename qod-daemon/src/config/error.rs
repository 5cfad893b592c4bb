//! Why a configuration was refused: one variant per kind of mistake, each naming the key, the
//! value and what was expected, and keeping the underlying error as its source.

use std::{net::AddrParseError, path::PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, a value of the wrong type or not one of a key's choices (toml
    /// names the key, the line and the choices).
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{flag} {value:?}: expected {expected}")]
    Flag {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A key the built-in defaults must set is missing from them (a broken build, not a user's
    /// mistake).
    #[error("the built-in configuration sets no {key}")]
    NoDefault { key: &'static str },
    #[error("{key} is required: {why}")]
    Required {
        key: &'static str,
        why: &'static str,
    },
    #[error("{key} = {value}: must be {min} to {max}")]
    OutOfRange {
        key: String,
        value: String,
        min: String,
        max: String,
    },
    #[error("{key} = {value:?}: expected {expected}")]
    Value {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{key} = {value:?}: expected {expected}")]
    Address {
        key: &'static str,
        value: String,
        expected: &'static str,
        #[source]
        source: AddrParseError,
    },
    #[error("{key}: {value:?} is not an address or CIDR network like 10.0.0.0/8")]
    Network {
        key: &'static str,
        value: String,
        #[source]
        source: ipnetwork::IpNetworkError,
    },
    #[error("{key} = {value:?} is not a URL")]
    Url {
        key: &'static str,
        value: String,
        #[source]
        source: url::ParseError,
    },
    #[error("{what} {name:?} is listed twice")]
    Duplicate { what: &'static str, name: String },
    #[error("no managed interface: set `interfaces` in the config file or pass --interface")]
    NoInterface,
    #[error(
        "{count} profiles: at most {max} (each holds an entry of the classifier's profile table, which a reload's retiring profiles share)"
    )]
    TooManyProfiles { count: usize, max: usize },
    #[error("{count} managed interfaces: at most {max} (each has its own classifier counters)")]
    TooManyInterfaces { count: usize, max: usize },
    #[error("interface {name:?}: {problem}")]
    Interface {
        name: String,
        problem: InterfaceProblem,
    },
    #[error("profile {name}: {problem}")]
    Profile {
        name: String,
        problem: ProfileProblem,
    },
    #[error("devices: {entry}: {problem}")]
    Device {
        entry: String,
        problem: DeviceProblem,
    },
    #[error("{key} {path} cannot be read; configure it, or run a lab with --insecure")]
    File {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tls: the key {key} does not belong to the certificate {cert} (their public keys differ)"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: the certificate {cert}, key {key} or client CA is not usable")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("auth.jwks_file {path}: {reason}")]
    Jwks { path: PathBuf, reason: String },
    #[error("auth.algorithms: {name:?} is not one of RS256, ES256, EdDSA")]
    Algorithm { name: String },
    #[error(
        "auth.jwks_url = {url:?} is plain http, which lets anyone on the path replace the keys tokens are trusted with; use https, or set auth.jwks_allow_http = true in a lab"
    )]
    PlainHttpJwks { url: String },
    #[error("{0}")]
    Conflict(Conflict),
}

/// Keys that cannot be set together, or one that needs another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("auth: set jwks_file or jwks_url, not both")]
    JwksFileAndUrl,
    #[error("auth.client_id_from_certificate needs tls.client_ca with client_auth = \"required\"")]
    CertificateIdWithoutMutualTls,
}

/// What is wrong with a managed interface.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceProblem {
    #[error("not a valid Linux interface name (1 to 15 bytes, no '/', ' ', ':' or NUL)")]
    BadName,
    #[error("does not exist in this network namespace")]
    Missing(#[source] nix::Error),
    #[error("capacity_mbit = {0} must be at least 0.1")]
    Capacity(f64),
    #[error("a capacity needs side = \"device\" or \"server\" (which direction's rates apply)")]
    CapacityOnBothSides,
    #[error("{key} = {value} must be between 0 and 1")]
    Share { key: &'static str, value: f64 },
    #[error("low_latency_share + guaranteed_share must leave at least 5% to best effort")]
    NoBestEffort,
}

/// What is wrong with a QoS profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileProblem {
    #[error("{0}")]
    Name(String),
    #[error("{field}.value = {value} exceeds CAMARA's 1024; use a larger unit")]
    Rate { field: &'static str, value: u16 },
    #[error("{field}.value = {value} must be 1 to {max}")]
    Duration {
        field: &'static str,
        value: u32,
        max: u32,
    },
    #[error("min_duration is longer than max_duration")]
    MinOverMax,
    #[error("max_duration is shorter than one second")]
    MaxUnderOneSecond,
    #[error("priority = {0} must be 1 to 100")]
    Priority(u8),
    #[error("packet_error_loss_rate = {0} must be 1 to 10")]
    PacketErrorLossRate(u8),
    #[error("dscp = {0} must be 0 to 63")]
    Dscp(u8),
    #[error("skb_priority = {0:?} is not a tc handle like \"1:10\"")]
    SkbPriority(String),
}

/// What is wrong with a device directory entry.
#[derive(Debug, thiserror::Error)]
pub enum DeviceProblem {
    #[error("{0}")]
    PhoneNumber(String),
    #[error("{value:?} is not an {family} address")]
    Address {
        family: &'static str,
        value: String,
        #[source]
        source: AddrParseError,
    },
    #[error("has no ipv4_address or ipv6_address")]
    NoAddress,
}

/// `key = value` outside `range`.
pub(super) fn out_of_range<T: std::fmt::Display>(
    key: impl Into<String>,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> ConfigError {
    ConfigError::OutOfRange {
        key: key.into(),
        value: value.to_string(),
        min: range.start().to_string(),
        max: range.end().to_string(),
    }
}

/// `value` if it is within `range`, else the error naming `key`.
pub(super) fn within<T: PartialOrd + std::fmt::Display + Copy>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(out_of_range(key, value, range))
    }
}
