//! Domain types. Each is valid by construction: the API edge (`api::convert`) builds them from
//! proto messages and rejects anything else, so the core never sees an unchecked value.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use qod_common::{
    DeviceKey, FAMILY_IPV4, FAMILY_IPV6, IPV6_DEVICE_PREFIX_LEN, MAX_PORT_RANGES, PortRange,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{CamaraCode, CamaraError};

/// A session's id: a UUID, as CAMARA's `sessionId`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SessionId(Uuid);

impl SessionId {
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl FromStr for SessionId {
    type Err = CamaraError;
    fn from_str(s: &str) -> Result<Self, CamaraError> {
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| CamaraError::invalid("sessionId", format!("{s:?} is not a UUID")))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// CAMARA `QosProfileName`: 3..=256 characters of `[a-zA-Z0-9_.-]`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ProfileName(std::sync::Arc<str>);

impl ProfileName {
    pub fn parse(field: &str, s: &str) -> Result<Self, CamaraError> {
        if !(3..=256).contains(&s.len()) {
            return Err(CamaraError::invalid(
                field,
                format!("{s:?} must be 3 to 256 characters long"),
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
        {
            return Err(CamaraError::invalid(
                field,
                format!("{s:?} contains {c:?}; only letters, digits, '_', '.' and '-' are allowed"),
            ));
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CAMARA `phoneNumber`: `^\+[1-9][0-9]{4,14}$`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(field: &str, s: &str) -> Result<Self, CamaraError> {
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok = digits.len() >= 5
            && digits.len() <= 15
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if !ok {
            return Err(CamaraError::invalid(
                field,
                format!(
                    "{s:?} is not an E.164 number ('+' then 5 to 15 digits, not starting with 0)"
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The one device identifier a session was created with (CAMARA: the provider picks one).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceId {
    /// CAMARA `DeviceIpv4Addr`: the public address plus the private address and/or public port.
    Ipv4 {
        public: Ipv4Addr,
        private: Option<Ipv4Addr>,
        public_port: Option<u16>,
    },
    /// Any address of the device's IPv6 prefix.
    Ipv6(Ipv6Addr),
    PhoneNumber(PhoneNumber),
}

impl DeviceId {
    /// The address family of an address identifier; `None` for a phone number.
    pub fn family(&self) -> Option<u32> {
        match self {
            Self::Ipv4 { .. } => Some(FAMILY_IPV4),
            Self::Ipv6(_) => Some(FAMILY_IPV6),
            Self::PhoneNumber(_) => None,
        }
    }
}

pub fn ipv4_key(addr: Ipv4Addr) -> DeviceKey {
    DeviceKey {
        family: FAMILY_IPV4,
        addr: [u32::from_ne_bytes(addr.octets()), 0, 0, 0],
    }
}

pub fn ipv6_key(addr: Ipv6Addr) -> DeviceKey {
    let prefix = Ipv6Network::new(addr, IPV6_DEVICE_PREFIX_LEN)
        .map(|n| n.network())
        .unwrap_or(addr);
    DeviceKey {
        family: FAMILY_IPV6,
        addr: words(prefix.octets()),
    }
}

/// The address held in `words` (network order, as in [`DeviceKey`] and [`network_words`]):
/// IPv4 in the first word, IPv6 in all four.
pub fn words_ip(family: u32, words: &[u32; 4]) -> std::net::IpAddr {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if family == FAMILY_IPV4 {
        Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
    } else {
        Ipv6Addr::from(b).into()
    }
}

fn words(b: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// CAMARA `PortsSpec`, validated: every port in 1..=65535, every range ordered, not empty.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ports {
    pub ranges: Vec<(u16, u16)>,
    pub ports: Vec<u16>,
}

impl Ports {
    /// Ports and ranges merged into the fewest sorted ranges.
    pub fn merged(&self) -> Vec<PortRange> {
        let mut all: Vec<(u16, u16)> = self
            .ranges
            .iter()
            .copied()
            .chain(self.ports.iter().map(|&p| (p, p)))
            .collect();
        all.sort_unstable();
        let mut out: Vec<PortRange> = Vec::with_capacity(all.len());
        for (from, to) in all {
            match out.last_mut() {
                Some(last) if u32::from(from) <= u32::from(last.to) + 1 => {
                    last.to = last.to.max(to)
                }
                _ => out.push(PortRange { from, to }),
            }
        }
        out
    }
}

/// CAMARA `ApplicationServer`: an IPv4 and/or an IPv6 address or network.
///
/// Written (JSON: the cluster's copies; the store's records) with the caller's text always, as
/// versions that keep it whole read it, and read back through [`ApplicationServer::new`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "ServerRecord", from = "ServerRecord")]
pub struct ApplicationServer {
    pub ipv4: Option<Ipv4Network>,
    pub ipv6: Option<Ipv6Network>,
    /// The addresses as the caller wrote them, echoed back unchanged: kept only where they
    /// differ from the parsed address's own text (see [`ApplicationServer::new`]).
    pub given: (Option<String>, Option<String>),
}

impl ApplicationServer {
    /// The server the caller wrote as `given`, parsed as `ipv4` / `ipv6`. Most write an address
    /// as it prints (`192.0.2.1`, `192.0.2.0/24`): then no copy of their text is kept (a
    /// million sessions would hold a million of them), and the echo prints the address.
    pub fn new(
        ipv4: Option<Ipv4Network>,
        ipv6: Option<Ipv6Network>,
        given: (Option<String>, Option<String>),
    ) -> Self {
        let (v4, v6) = given;
        Self {
            given: (
                unless_printed(v4, ipv4.map(IpNetwork::V4)),
                unless_printed(v6, ipv6.map(IpNetwork::V6)),
            ),
            ipv4,
            ipv6,
        }
    }

    /// The IPv4 address or network as the caller wrote it.
    pub fn given_v4(&self) -> Option<String> {
        as_written(&self.given.0, self.ipv4.map(IpNetwork::V4))
    }

    /// The IPv6 address or network as the caller wrote it.
    pub fn given_v6(&self) -> Option<String> {
        as_written(&self.given.1, self.ipv6.map(IpNetwork::V6))
    }

    pub fn network(&self, family: u32) -> Option<IpNetwork> {
        match family {
            FAMILY_IPV4 => self.ipv4.map(IpNetwork::V4),
            FAMILY_IPV6 => self.ipv6.map(IpNetwork::V6),
            _ => None,
        }
    }
}

/// [`ApplicationServer`] as written: the same fields, the text filled in.
#[derive(serde::Serialize, serde::Deserialize)]
struct ServerRecord {
    ipv4: Option<Ipv4Network>,
    ipv6: Option<Ipv6Network>,
    given: (Option<String>, Option<String>),
}

impl From<ApplicationServer> for ServerRecord {
    fn from(s: ApplicationServer) -> Self {
        Self {
            given: (s.given_v4(), s.given_v6()),
            ipv4: s.ipv4,
            ipv6: s.ipv6,
        }
    }
}

impl From<ServerRecord> for ApplicationServer {
    fn from(r: ServerRecord) -> Self {
        Self::new(r.ipv4, r.ipv6, r.given)
    }
}

/// `given` unless it is how `net` prints.
fn unless_printed(given: Option<String>, net: Option<IpNetwork>) -> Option<String> {
    given.filter(|g| net.map(network_text).as_ref() != Some(g))
}

/// The text `given` for `net`, or how `net` prints where none is kept.
fn as_written(given: &Option<String>, net: Option<IpNetwork>) -> Option<String> {
    given.clone().or_else(|| net.map(network_text))
}

/// An address as it prints (a single address without its prefix length), or a network.
fn network_text(n: IpNetwork) -> String {
    let full = if n.is_ipv4() { 32 } else { 128 };
    if n.prefix() == full {
        n.ip().to_string()
    } else {
        n.to_string()
    }
}

/// CAMARA `SinkCredential` of type ACCESSTOKEN (the only one accepted).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessToken {
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

/// What a caller asked for, validated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRequest {
    pub device: DeviceId,
    /// The device's address as the caller wrote it, where that differs from its canonical form
    /// (`FD00:1:0:2:0:0:0:2` for `fd00:1:0:2::2`): CAMARA echoes the device as provided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_given: Option<String>,
    pub server: ApplicationServer,
    /// (Boxed, as the credential: most sessions have none, and a million are kept.)
    pub device_ports: Option<Box<Ports>>,
    pub server_ports: Option<Box<Ports>>,
    pub profile: ProfileName,
    pub sink: Option<String>,
    pub sink_credential: Option<Box<AccessToken>>,
    /// Requested seconds, >= 1.
    pub duration: u32,
    /// The API client that created the session (from its access token). Shared: a node's
    /// sessions hold one copy of each client's name.
    #[serde(default)]
    pub owner: std::sync::Arc<str>,
    /// The device of the three-legged token it was created with (then `device` is that device
    /// and is not echoed back).
    #[serde(default)]
    pub subject: Option<DeviceId>,
}

/// Whose quota a session counts in: its API client, and the sink it notifies (a client's live
/// sessions may notify a bounded number of distinct sinks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub client: String,
    pub sink: Option<String>,
}

impl Holder {
    pub fn of(req: &SessionRequest) -> Self {
        Self {
            client: req.owner.to_string(),
            sink: req.sink.clone(),
        }
    }
}

/// Who is calling: the API client named by its access token and, for a three-legged token, the
/// device the token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub client: String,
    pub subject: Option<DeviceId>,
    /// Sees every session (insecure local mode only).
    pub operator: bool,
    /// The access token the call came with: a cluster node passes the call on with it to the
    /// node that serves the device, which verifies it itself.
    pub credential: Option<Credential>,
    /// Passed on by another cluster node: served here, never passed on again.
    pub relayed: bool,
    /// A create passed on by another cluster node: the id that node gave the session (it
    /// answers REQUESTED under it if this node is slow to answer, and hands it over).
    pub assigned: Option<SessionId>,
}

/// An access token as it came, never shown in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(pub std::sync::Arc<str>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(…)")
    }
}

impl Caller {
    /// CAMARA: a session is the API consumer's that created it; with a three-legged token the
    /// subject must match too.
    pub fn may_access(&self, req: &SessionRequest) -> bool {
        self.may_see(&req.owner, req.subject.as_ref())
    }

    /// [`Caller::may_access`] for a session created by `owner` with token subject `subject`.
    pub fn may_see(&self, owner: &str, subject: Option<&DeviceId>) -> bool {
        self.operator
            || (owner == self.client && self.subject.as_ref().is_none_or(|d| subject == Some(d)))
    }
}

/// The App-Flow as the classifier matches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppFlow {
    pub device: DeviceKey,
    pub server: IpNetwork,
    pub device_ports: Vec<PortRange>,
    pub server_ports: Vec<PortRange>,
}

impl AppFlow {
    /// Builds the flow the request describes for the device known by `device` (see
    /// `Policy::resolve`: the private IPv4 address when given, what an edge host in front of the
    /// NAT sees, else the public one; for IPv6 the /64).
    pub fn from_request(req: &SessionRequest, device: DeviceKey) -> Result<Self, CamaraError> {
        let server = req.server.network(device.family).ok_or_else(|| {
            CamaraError::invalid(
                "applicationServer",
                "has no address of the device's address family",
            )
        })?;
        let mut device_ports = req
            .device_ports
            .as_deref()
            .map(Ports::merged)
            .unwrap_or_default();
        if let DeviceId::Ipv4 {
            private: None,
            public_port: Some(port),
            ..
        } = req.device
        {
            // Behind a NAT with only the public side known, the public port is the device port.
            if !device_ports.is_empty() && !device_ports.iter().any(|r| r.contains(port)) {
                return Err(CamaraError::invalid(
                    "devicePorts",
                    format!("does not include device.ipv4Address.publicPort {port}"),
                ));
            }
            device_ports = vec![PortRange {
                from: port,
                to: port,
            }];
        }
        let server_ports = req
            .server_ports
            .as_deref()
            .map(Ports::merged)
            .unwrap_or_default();
        for (field, ranges) in [
            ("devicePorts", &device_ports),
            ("applicationServerPorts", &server_ports),
        ] {
            if ranges.len() > MAX_PORT_RANGES {
                return Err(CamaraError::field(
                    CamaraCode::OutOfRange,
                    field,
                    format!(
                        "{} disjoint port ranges after merging; at most {MAX_PORT_RANGES} are supported",
                        ranges.len()
                    ),
                ));
            }
        }
        Ok(Self {
            device,
            server,
            device_ports,
            server_ports,
        })
    }
}

impl AppFlow {
    /// Whether a packet could belong to both flows: same device, intersecting server networks
    /// and intersecting device and server port sets (no ports meaning every port).
    pub fn overlaps(&self, other: &AppFlow) -> bool {
        let nets = match (self.server, other.server) {
            (IpNetwork::V4(a), IpNetwork::V4(b)) => {
                a.contains(b.network()) || b.contains(a.network())
            }
            (IpNetwork::V6(a), IpNetwork::V6(b)) => {
                a.contains(b.network()) || b.contains(a.network())
            }
            _ => false,
        };
        let ports = |a: &[PortRange], b: &[PortRange]| {
            a.is_empty()
                || b.is_empty()
                || a.iter()
                    .any(|x| b.iter().any(|y| x.from <= y.to && y.from <= x.to))
        };
        self.device == other.device
            && nets
            && ports(&self.device_ports, &other.device_ports)
            && ports(&self.server_ports, &other.server_ports)
    }
}

/// The server network as (address, mask) words in network byte order, address masked.
pub fn network_words(net: IpNetwork) -> ([u32; 4], [u32; 4]) {
    match net {
        IpNetwork::V4(n) => (
            [u32::from_ne_bytes(n.network().octets()), 0, 0, 0],
            [u32::from_ne_bytes(n.mask().octets()), 0, 0, 0],
        ),
        IpNetwork::V6(n) => (words(n.network().octets()), words(n.mask().octets())),
    }
}

/// CAMARA `qosStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QosStatus {
    Requested,
    Available,
    Unavailable,
}

/// CAMARA `statusInfo`: why a session became UNAVAILABLE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StatusInfo {
    DurationExpired,
    NetworkTerminated,
    DeleteRequested,
}

/// Seconds as a `Duration`, for CAMARA's integer `duration` fields.
pub fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// What is left until `end` by the wall clock (zero once it has passed), to the nanosecond.
pub fn time_left(end: OffsetDateTime) -> Duration {
    let left = (end - OffsetDateTime::now_utc()).whole_nanoseconds();
    Duration::from_nanos(u64::try_from(left.max(0)).unwrap_or(u64::MAX))
}

/// One status change to tell a sink about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notification {
    /// Stable across retries and restarts: receivers deduplicate on it.
    pub event_id: uuid::Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub time: time::OffsetDateTime,
    pub sink: String,
    pub credential: Option<AccessToken>,
    pub session_id: SessionId,
    pub status: QosStatus,
    pub info: Option<StatusInfo>,
}

/// A CAMARA `Device` object as given, before validation: what the gRPC API, a token's `sub` (and
/// any other edge) carry alike, so one set of rules checks them all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceGiven {
    pub phone_number: Option<String>,
    pub ipv4: Option<Ipv4Given>,
    pub ipv6_address: Option<String>,
    pub network_access_identifier: Option<String>,
}

/// CAMARA `DeviceIpv4Addr` as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Given {
    pub public_address: Option<String>,
    pub private_address: Option<String>,
    pub public_port: Option<u32>,
}

impl DeviceGiven {
    /// Validates every identifier present and picks one: IPv4, then IPv6, then the phone
    /// number, preferring an address family for which `usable` holds.
    pub fn resolve(&self, usable: impl Fn(u32) -> bool) -> Result<DeviceId, CamaraError> {
        resolve_device(self, usable)
    }
}

/// For look-ups, an address of either family is usable.
pub fn any_family(f: u32) -> bool {
    f == FAMILY_IPV4 || f == FAMILY_IPV6
}

/// Validates every identifier present and picks one: IPv4, then IPv6, then the phone number,
/// preferring an address family for which `usable` holds.
fn resolve_device(d: &DeviceGiven, usable: impl Fn(u32) -> bool) -> Result<DeviceId, CamaraError> {
    let mut candidates = Vec::new();
    if let Some(v4) = &d.ipv4 {
        candidates.push(ipv4_device(v4)?);
    }
    if let Some(v6) = &d.ipv6_address {
        let addr: Ipv6Addr = v6.parse().map_err(|_| {
            CamaraError::invalid(
                "device.ipv6Address",
                format!("{v6:?} is not an IPv6 address"),
            )
        })?;
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
            return Err(CamaraError::invalid(
                "device.ipv6Address",
                "must be a unicast address of a device (not unspecified, loopback or multicast)",
            ));
        }
        candidates.push(DeviceId::Ipv6(addr));
    }
    if let Some(p) = &d.phone_number {
        candidates.push(DeviceId::PhoneNumber(PhoneNumber::parse(
            "device.phoneNumber",
            p,
        )?));
    }
    if candidates.is_empty() {
        return Err(if d.network_access_identifier.is_some() {
            CamaraError::field(
                CamaraCode::UnsupportedIdentifier,
                "device.networkAccessIdentifier",
                "is not supported; identify the device by phoneNumber, ipv4Address or ipv6Address",
            )
        } else {
            CamaraError::invalid("device", "must contain at least one identifier")
        });
    }
    let pick = candidates
        .iter()
        .position(|c| c.family().is_some_and(&usable))
        .unwrap_or(0);
    Ok(candidates.swap_remove(pick))
}

fn ipv4_device(v4: &Ipv4Given) -> Result<DeviceId, CamaraError> {
    let addr = |field: &str, s: &str| {
        let a = s.parse::<Ipv4Addr>().map_err(|_| {
            CamaraError::invalid(
                field,
                format!("{s:?} is not an IPv4 address (no mask allowed)"),
            )
        })?;
        if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
            return Err(CamaraError::invalid(
                field,
                "must be a unicast address of a device (not unspecified, loopback, multicast or broadcast)",
            ));
        }
        Ok(a)
    };
    let public = match &v4.public_address {
        Some(s) => addr("device.ipv4Address.publicAddress", s)?,
        None => {
            return Err(CamaraError::invalid(
                "device.ipv4Address.publicAddress",
                "is required",
            ));
        }
    };
    let private = v4
        .private_address
        .as_deref()
        .map(|s| addr("device.ipv4Address.privateAddress", s))
        .transpose()?;
    let public_port = v4
        .public_port
        .map(|p| port("device.ipv4Address.publicPort", p))
        .transpose()?;
    if private.is_none() && public_port.is_none() {
        return Err(CamaraError::invalid(
            "device.ipv4Address",
            "publicAddress alone is not enough: add privateAddress (equal to publicAddress without NAT) or publicPort",
        ));
    }
    Ok(DeviceId::Ipv4 {
        public,
        private,
        public_port,
    })
}

pub fn port(field: &str, p: u32) -> Result<u16, CamaraError> {
    u16::try_from(p).ok().filter(|p| *p >= 1).ok_or_else(|| {
        CamaraError::field(
            CamaraCode::OutOfRange,
            field,
            format!("port {p} is outside 1..=65535"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_echoed_as_written_and_its_text_kept_only_when_it_differs() {
        let server = |v4: &str, v6: &str| {
            ApplicationServer::new(
                Some(v4.parse().expect("v4")),
                Some(v6.parse().expect("v6")),
                (Some(v4.into()), Some(v6.into())),
            )
        };
        for (v4, v6) in [
            ("192.0.2.1", "2001:db8::1"),
            ("192.0.2.0/24", "2001:db8::/32"),
        ] {
            let s = server(v4, v6);
            assert_eq!(s.given, (None, None), "{v4} {v6} print as written");
            assert_eq!(s.given_v4().as_deref(), Some(v4));
            assert_eq!(s.given_v6().as_deref(), Some(v6));
        }
        for (v4, v6) in [
            ("192.0.2.1/32", "2001:DB8::1"),
            ("192.0.2.1/24", "2001:db8::1/128"),
        ] {
            let s = server(v4, v6);
            assert_eq!(s.given_v4().as_deref(), Some(v4));
            assert_eq!(s.given_v6().as_deref(), Some(v6));
        }
        // Written whole (older versions echo the text as read), read back compact.
        let s = server("192.0.2.1", "2001:db8::1");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["given"][0], "192.0.2.1");
        assert_eq!(json["given"][1], "2001:db8::1");
        let back: ApplicationServer = serde_json::from_value(json).expect("back");
        assert_eq!(back, s);
        let none =
            ApplicationServer::new(Some("192.0.2.1".parse().expect("v4")), None, (None, None));
        assert_eq!(none.given_v6(), None);
    }

    #[test]
    fn ports_merge_into_fewest_ranges() {
        let p = Ports {
            ranges: vec![(10, 20), (21, 25), (100, 200)],
            ports: vec![5, 6, 150, 300],
        };
        let m: Vec<_> = p.merged().iter().map(|r| (r.from, r.to)).collect();
        assert_eq!(m, vec![(5, 6), (10, 25), (100, 200), (300, 300)]);
    }

    #[test]
    fn ipv6_devices_key_by_their_prefix() {
        let a = ipv6_key("2001:db8:1:2::5".parse().expect("addr"));
        let b = ipv6_key("2001:db8:1:2:ffff::1".parse().expect("addr"));
        assert_eq!(a, b);
        let prefix: Ipv6Addr = "2001:db8:1:2::".parse().expect("addr");
        assert_eq!(a.addr, words(prefix.octets()), "the key is the /64 itself");
    }

    #[test]
    fn names_and_numbers_are_checked() {
        assert!(ProfileName::parse("q", "QOS_E").is_ok());
        assert!(ProfileName::parse("q", "QO").is_err());
        assert!(ProfileName::parse("q", "QOS E").is_err());
        assert!(PhoneNumber::parse("p", "+34600000000").is_ok());
        assert!(PhoneNumber::parse("p", "34600000000").is_err());
        assert!(PhoneNumber::parse("p", "+0123456").is_err());
        assert!("not-a-uuid".parse::<SessionId>().is_err());
    }
}

/// Fixtures for unit tests.
#[cfg(test)]
pub mod testing {
    use std::net::Ipv4Addr;

    use super::*;

    /// A request of `client-a` for device `device` to 192.0.2.0/24 ports 443 and 8000–8010,
    /// QOS_E, `duration` seconds.
    pub fn request(device: [u8; 4], duration: u32) -> SessionRequest {
        let ip = Ipv4Addr::from(device);
        SessionRequest {
            device: DeviceId::Ipv4 {
                public: ip,
                private: Some(ip),
                public_port: None,
            },
            server: ApplicationServer {
                ipv4: Some("192.0.2.0/24".parse().expect("net")),
                ipv6: None,
                given: (Some("192.0.2.0/24".into()), None),
            },
            device_ports: None,
            server_ports: Some(Box::new(Ports {
                ranges: vec![(8000, 8010)],
                ports: vec![443],
            })),
            profile: ProfileName::parse("qosProfile", "QOS_E").expect("name"),
            sink: None,
            sink_credential: None,
            duration,
            device_given: None,
            owner: "client-a".into(),
            subject: None,
        }
    }
}
