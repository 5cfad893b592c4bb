//! The session record as stored since schema 3: protobuf (prost), so it is compact, fast to
//! read back at start, and can gain fields without a migration (unknown fields are skipped,
//! absent ones take their defaults). Schemas 1 and 2 were JSON; a record is told apart by its
//! first byte (`{` for JSON; protobuf starts with field 1's tag, `0x08`).
//!
//! Times are Unix nanoseconds, addresses their bytes, the session id its 16 bytes.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use prost::Message as _;
use time::OffsetDateTime;

use super::{Ended, StoredSession};
use crate::model::{
    AccessToken, ApplicationServer, DeviceId, PhoneNumber, Ports, ProfileName, SessionId,
    SessionRequest, StatusInfo,
};

/// The schema of the binary session record.
pub const SCHEMA: u32 = 3;

#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(uint32, tag = "1")]
    schema: u32,
    #[prost(bytes = "vec", tag = "2")]
    id: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    device: Option<Device>,
    #[prost(string, optional, tag = "4")]
    device_given: Option<String>,
    #[prost(message, optional, tag = "5")]
    server_v4: Option<Network>,
    #[prost(message, optional, tag = "6")]
    server_v6: Option<Network>,
    #[prost(string, optional, tag = "7")]
    server_v4_given: Option<String>,
    #[prost(string, optional, tag = "8")]
    server_v6_given: Option<String>,
    #[prost(message, optional, tag = "9")]
    device_ports: Option<PortSet>,
    #[prost(message, optional, tag = "10")]
    server_ports: Option<PortSet>,
    #[prost(string, tag = "11")]
    profile: String,
    #[prost(string, optional, tag = "12")]
    sink: Option<String>,
    #[prost(message, optional, tag = "13")]
    sink_credential: Option<Credential>,
    /// Requested seconds.
    #[prost(uint32, tag = "14")]
    requested: u32,
    #[prost(string, tag = "15")]
    owner: String,
    #[prost(message, optional, tag = "16")]
    subject: Option<Device>,
    #[prost(int64, tag = "17")]
    started_at_ns: i64,
    /// Granted seconds, extensions included.
    #[prost(uint32, tag = "18")]
    duration: u32,
    #[prost(message, optional, tag = "19")]
    ended: Option<End>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Device {
    #[prost(oneof = "DeviceKind", tags = "1, 2, 3")]
    kind: Option<DeviceKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum DeviceKind {
    #[prost(message, tag = "1")]
    Ipv4(V4Device),
    #[prost(bytes = "vec", tag = "2")]
    Ipv6(Vec<u8>),
    #[prost(string, tag = "3")]
    PhoneNumber(String),
}

#[derive(Clone, PartialEq, prost::Message)]
struct V4Device {
    #[prost(fixed32, tag = "1")]
    public: u32,
    #[prost(fixed32, optional, tag = "2")]
    private: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    public_port: Option<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Network {
    #[prost(bytes = "vec", tag = "1")]
    addr: Vec<u8>,
    #[prost(uint32, tag = "2")]
    prefix: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PortSet {
    /// Ranges as (from, to) pairs, flattened.
    #[prost(uint32, repeated, tag = "1")]
    ranges: Vec<u32>,
    #[prost(uint32, repeated, tag = "2")]
    ports: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Credential {
    #[prost(string, tag = "1")]
    token: String,
    #[prost(int64, tag = "2")]
    expires_ns: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct End {
    /// 1 DURATION_EXPIRED, 2 NETWORK_TERMINATED, 3 DELETE_REQUESTED.
    #[prost(uint32, tag = "1")]
    info: u32,
    #[prost(int64, tag = "2")]
    at_ns: i64,
}

fn ns(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

fn time(ns: i64) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).map_err(|e| format!("time: {e}"))
}

fn device(d: &DeviceId) -> Device {
    Device {
        kind: Some(match d {
            DeviceId::Ipv4 {
                public,
                private,
                public_port,
            } => DeviceKind::Ipv4(V4Device {
                public: u32::from(*public),
                private: private.map(u32::from),
                public_port: public_port.map(u32::from),
            }),
            DeviceId::Ipv6(a) => DeviceKind::Ipv6(a.octets().to_vec()),
            DeviceId::PhoneNumber(p) => DeviceKind::PhoneNumber(p.as_str().to_owned()),
        }),
    }
}

fn device_id(d: Device) -> Result<DeviceId, String> {
    Ok(match d.kind.ok_or("device: none")? {
        DeviceKind::Ipv4(v4) => DeviceId::Ipv4 {
            public: Ipv4Addr::from(v4.public),
            private: v4.private.map(Ipv4Addr::from),
            public_port: v4
                .public_port
                .map(|p| u16::try_from(p).map_err(|_| format!("port {p}")))
                .transpose()?,
        },
        DeviceKind::Ipv6(b) => DeviceId::Ipv6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b.as_slice()).map_err(|_| "device: not an IPv6 address")?,
        )),
        DeviceKind::PhoneNumber(p) => {
            DeviceId::PhoneNumber(PhoneNumber::parse("phoneNumber", &p).map_err(|e| e.message)?)
        }
    })
}

/// A stored network's address (`N` bytes) and prefix length.
fn network<const N: usize>(n: Network) -> Result<([u8; N], u8), String> {
    let addr = <[u8; N]>::try_from(n.addr.as_slice())
        .map_err(|_| format!("server: {} address bytes, not {N}", n.addr.len()))?;
    let prefix = u8::try_from(n.prefix).map_err(|_| format!("prefix {}", n.prefix))?;
    Ok((addr, prefix))
}

fn port_set(p: &Ports) -> PortSet {
    PortSet {
        ranges: p
            .ranges
            .iter()
            .flat_map(|&(a, b)| [u32::from(a), u32::from(b)])
            .collect(),
        ports: p.ports.iter().map(|&p| u32::from(p)).collect(),
    }
}

fn ports(p: PortSet) -> Result<Ports, String> {
    let port = |p: u32| u16::try_from(p).map_err(|_| format!("port {p}"));
    if !p.ranges.len().is_multiple_of(2) {
        return Err("ports: a range without its end".into());
    }
    Ok(Ports {
        ranges: p
            .ranges
            .chunks(2)
            .map(|r| Ok((port(r[0])?, port(r[1])?)))
            .collect::<Result<_, String>>()?,
        ports: p.ports.into_iter().map(port).collect::<Result<_, _>>()?,
    })
}

fn info_code(i: StatusInfo) -> u32 {
    match i {
        StatusInfo::DurationExpired => 1,
        StatusInfo::NetworkTerminated => 2,
        StatusInfo::DeleteRequested => 3,
    }
}

fn info(code: u32) -> Result<StatusInfo, String> {
    match code {
        1 => Ok(StatusInfo::DurationExpired),
        2 => Ok(StatusInfo::NetworkTerminated),
        3 => Ok(StatusInfo::DeleteRequested),
        other => Err(format!("statusInfo {other}")),
    }
}

/// `s` as a schema-3 record.
pub fn encode(s: &StoredSession) -> Vec<u8> {
    let r = &s.request;
    Record {
        schema: SCHEMA,
        id: s.id.as_bytes().to_vec(),
        device: Some(device(&r.device)),
        device_given: r.device_given.clone(),
        server_v4: r.server.ipv4.map(|n| Network {
            addr: n.ip().octets().to_vec(),
            prefix: u32::from(n.prefix()),
        }),
        server_v6: r.server.ipv6.map(|n| Network {
            addr: n.ip().octets().to_vec(),
            prefix: u32::from(n.prefix()),
        }),
        // The caller's text always (see `ApplicationServer`): older versions echo it as read.
        server_v4_given: r.server.given_v4(),
        server_v6_given: r.server.given_v6(),
        device_ports: r.device_ports.as_deref().map(port_set),
        server_ports: r.server_ports.as_deref().map(port_set),
        profile: r.profile.as_str().to_owned(),
        sink: r.sink.clone(),
        sink_credential: r.sink_credential.as_ref().map(|c| Credential {
            token: c.token.clone(),
            expires_ns: ns(c.expires),
        }),
        requested: r.duration,
        owner: r.owner.to_string(),
        subject: r.subject.as_ref().map(device),
        started_at_ns: ns(s.started_at),
        duration: s.duration,
        ended: s.ended.map(|e| End {
            info: info_code(e.info),
            at_ns: ns(e.at),
        }),
    }
    .encode_to_vec()
}

/// A schema-3 record read back (`slot` is kept in a table of its own).
pub fn decode(bytes: &[u8]) -> Result<StoredSession, String> {
    let r = Record::decode(bytes).map_err(|e| format!("not a session record: {e}"))?;
    if r.schema != SCHEMA {
        return Err(format!(
            "schema {} is not one this qodd reads (it writes {SCHEMA})",
            r.schema
        ));
    }
    let server_v4 = r
        .server_v4
        .map(|n| {
            let (addr, prefix) = network::<4>(n)?;
            Ipv4Network::new(Ipv4Addr::from(addr), prefix).map_err(|e| e.to_string())
        })
        .transpose()?;
    let server_v6 = r
        .server_v6
        .map(|n| {
            let (addr, prefix) = network::<16>(n)?;
            Ipv6Network::new(Ipv6Addr::from(addr), prefix).map_err(|e| e.to_string())
        })
        .transpose()?;
    Ok(StoredSession {
        id: SessionId::from_bytes(
            <[u8; 16]>::try_from(r.id.as_slice()).map_err(|_| "id: not 16 bytes")?,
        ),
        request: SessionRequest {
            device: device_id(r.device.ok_or("device: none")?)?,
            device_given: r.device_given,
            server: ApplicationServer::new(
                server_v4,
                server_v6,
                (r.server_v4_given, r.server_v6_given),
            ),
            device_ports: r.device_ports.map(ports).transpose()?.map(Box::new),
            server_ports: r.server_ports.map(ports).transpose()?.map(Box::new),
            profile: ProfileName::parse("qosProfile", &r.profile).map_err(|e| e.message)?,
            sink: r.sink,
            sink_credential: r
                .sink_credential
                .map(|c| {
                    Ok::<_, String>(Box::new(AccessToken {
                        token: c.token,
                        expires: time(c.expires_ns)?,
                    }))
                })
                .transpose()?,
            duration: r.requested,
            owner: r.owner.into(),
            subject: r.subject.map(device_id).transpose()?,
        },
        started_at: time(r.started_at_ns)?,
        duration: r.duration,
        ended: r
            .ended
            .map(|e| {
                Ok::<_, String>(Ended {
                    info: info(e.info)?,
                    at: time(e.at_ns)?,
                })
            })
            .transpose()?,
        slot: None,
    })
}
