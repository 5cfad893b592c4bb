//! Proto ↔ domain conversion, done once at the API edge. Every check a request field needs
//! happens here and names the field in its error.

use ipnetwork::{Ipv4Network, Ipv6Network};
use qod_proto::v1 as pb;
use time::OffsetDateTime;

use crate::{
    core::{Event, SessionState, SessionView},
    error::{CamaraCode, CamaraError},
    model::{
        AccessToken, ApplicationServer, Caller, DeviceGiven, DeviceId, Ipv4Given, Ports,
        ProfileName, QosStatus, SessionId, SessionRequest, StatusInfo, port,
    },
    notify::SinkRules,
    profile::{self, QosProfile},
};

/// Builds a validated [`SessionRequest`] from a `CreateSession` message of `caller`.
pub fn session_request(
    req: pb::CreateSessionRequest,
    caller: &Caller,
    sinks: &SinkRules,
) -> Result<SessionRequest, CamaraError> {
    let server = application_server(req.application_server.as_ref())?;
    let device = caller_device(req.device.as_ref(), caller, |family| {
        server.network(family).is_some()
    })?;
    let device_ports = req
        .device_ports
        .as_ref()
        .map(|p| ports("devicePorts", p).map(Box::new))
        .transpose()?;
    let server_ports = req
        .application_server_ports
        .as_ref()
        .map(|p| ports("applicationServerPorts", p).map(Box::new))
        .transpose()?;
    if req.qos_profile.is_empty() {
        return Err(CamaraError::invalid("qosProfile", "is required"));
    }
    let profile = ProfileName::parse("qosProfile", &req.qos_profile)?;
    let duration = u32::try_from(req.duration)
        .ok()
        .filter(|d| *d >= 1)
        .ok_or_else(|| {
            CamaraError::invalid(
                "duration",
                format!("{} must be at least 1 second", req.duration),
            )
        })?;
    let sink = req.sink.map(|s| sink(&s, sinks).map(|()| s)).transpose()?;
    let sink_credential = req
        .sink_credential
        .as_ref()
        .map(|c| sink_credential(c).map(Box::new))
        .transpose()?;
    if sink_credential.is_some() && sink.is_none() {
        return Err(CamaraError::invalid(
            "sinkCredential",
            "is given without a sink",
        ));
    }
    // The one identifier whose text can differ from its canonical form is an IPv6 address.
    let device_given = match (&device, req.device.as_ref()) {
        (
            DeviceId::Ipv6(a),
            Some(pb::Device {
                ipv6_address: Some(text),
                ..
            }),
        ) if *text != a.to_string() => Some(text.clone()),
        _ => None,
    };
    Ok(SessionRequest {
        device,
        device_given,
        server,
        device_ports,
        server_ports,
        profile,
        sink,
        sink_credential,
        duration,
        owner: caller.client.as_str().into(),
        subject: caller.subject.clone(),
    })
}

/// The device a call is about: the request's (two-legged token) or the token's (three-legged),
/// never both (CAMARA: `UNNECESSARY_IDENTIFIER`, even for the same device) and never neither
/// (`MISSING_IDENTIFIER`).
pub fn caller_device(
    given: Option<&pb::Device>,
    caller: &Caller,
    usable: impl Fn(u32) -> bool,
) -> Result<DeviceId, CamaraError> {
    match (given, &caller.subject) {
        (Some(_), Some(_)) => Err(CamaraError::field(
            CamaraCode::UnnecessaryIdentifier,
            "device",
            "the device is already identified by the access token; `device` must not be given",
        )),
        (None, Some(subject)) => Ok(subject.clone()),
        (Some(d), None) => device(d, usable),
        (None, None) => Err(CamaraError::field(
            CamaraCode::MissingIdentifier,
            "device",
            "the device cannot be identified from the access token, so `device` is required",
        )),
    }
}

/// Validates every identifier present and picks one (see [`DeviceGiven::resolve`]).
pub fn device(d: &pb::Device, usable: impl Fn(u32) -> bool) -> Result<DeviceId, CamaraError> {
    DeviceGiven {
        phone_number: d.phone_number.clone(),
        ipv4: d.ipv4_address.as_ref().map(|a| Ipv4Given {
            public_address: a.public_address.clone(),
            private_address: a.private_address.clone(),
            public_port: a.public_port,
        }),
        ipv6_address: d.ipv6_address.clone(),
        network_access_identifier: d.network_access_identifier.clone(),
    }
    .resolve(usable)
}

fn application_server(s: Option<&pb::ApplicationServer>) -> Result<ApplicationServer, CamaraError> {
    let Some(s) = s else {
        return Err(CamaraError::invalid("applicationServer", "is required"));
    };
    if s.ipv4_address.is_none() && s.ipv6_address.is_none() {
        return Err(CamaraError::invalid(
            "applicationServer",
            "must contain ipv4Address or ipv6Address",
        ));
    }
    // ipnetwork also reads a dotted netmask (a.b.c.d/255.255.255.0); CAMARA's form is a prefix.
    let prefix_form = |a: &str| {
        a.split_once('/').is_none_or(|(_, p)| {
            !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let ipv4 = s
        .ipv4_address
        .as_deref()
        .map(|a| {
            Some(a)
                .filter(|a| prefix_form(a))
                .and_then(|a| a.parse::<Ipv4Network>().ok())
                .ok_or_else(|| {
                    CamaraError::invalid(
                        "applicationServer.ipv4Address",
                        format!(
                            "{a:?} is not an IPv4 address or network (a.b.c.d or a.b.c.d/0-32)"
                        ),
                    )
                })
        })
        .transpose()?;
    let ipv6 = s
        .ipv6_address
        .as_deref()
        .map(|a| {
            Some(a)
                .filter(|a| prefix_form(a))
                .and_then(|a| a.parse::<Ipv6Network>().ok())
                .ok_or_else(|| {
                    CamaraError::invalid(
                        "applicationServer.ipv6Address",
                        format!("{a:?} is not an IPv6 address or network (x:y::z or x:y::/0-128)"),
                    )
                })
        })
        .transpose()?;
    Ok(ApplicationServer::new(
        ipv4,
        ipv6,
        (s.ipv4_address.clone(), s.ipv6_address.clone()),
    ))
}

fn ports(field: &str, p: &pb::PortsSpec) -> Result<Ports, CamaraError> {
    if p.ports.is_empty() && p.ranges.is_empty() {
        return Err(CamaraError::invalid(field, "must contain ports or ranges"));
    }
    let ranges = p
        .ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let from = port(&format!("{field}.ranges[{i}].from"), r.from)?;
            let to = port(&format!("{field}.ranges[{i}].to"), r.to)?;
            if from > to {
                return Err(CamaraError::invalid(
                    format!("{field}.ranges[{i}]"),
                    format!("from {from} is greater than to {to}"),
                ));
            }
            Ok((from, to))
        })
        .collect::<Result<_, _>>()?;
    let ports = p
        .ports
        .iter()
        .enumerate()
        .map(|(i, &n)| port(&format!("{field}.ports[{i}]"), n))
        .collect::<Result<_, _>>()?;
    Ok(Ports { ranges, ports })
}

/// CAMARA: an `https://` URL. Plain `http://` only to hosts the configuration allows (labs). A
/// literal address must be one sinks may use (a host name is checked at each connection).
fn sink(s: &str, rules: &SinkRules) -> Result<(), CamaraError> {
    let bad =
        |why: &str| CamaraError::field(CamaraCode::InvalidSink, "sink", format!("{s:?} {why}"));
    if s.len() > 2048 {
        return Err(bad("is longer than 2048 characters"));
    }
    let url = url::Url::parse(s).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("has no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials; use sinkCredential"));
    }
    if let Some(Err(why)) = crate::notify::literal_address(&url).map(|ip| rules.addresses.check(ip))
    {
        return Err(bad(&format!("is refused: {why}")));
    }
    match url.scheme() {
        "https" => Ok(()),
        "http"
            if rules
                .http_hosts
                .iter()
                .any(|h| h.trim_matches(['[', ']']) == host.trim_matches(['[', ']'])) =>
        {
            Ok(())
        }
        _ => Err(bad("is not an https:// URL")),
    }
}

fn sink_credential(c: &pb::SinkCredential) -> Result<AccessToken, CamaraError> {
    match pb::CredentialType::try_from(c.credential_type) {
        Ok(pb::CredentialType::Accesstoken) => {}
        // A required property missing is the caller's malformed request, not an unsupported
        // credential (CAMARA keeps INVALID_CREDENTIAL for PLAIN and REFRESHTOKEN).
        Ok(pb::CredentialType::Unspecified) => {
            return Err(CamaraError::invalid(
                "sinkCredential.credentialType",
                "is required",
            ));
        }
        _ => {
            return Err(CamaraError::field(
                CamaraCode::InvalidCredential,
                "sinkCredential.credentialType",
                "only ACCESSTOKEN is supported",
            ));
        }
    }
    match pb::AccessTokenType::try_from(c.access_token_type) {
        Ok(pb::AccessTokenType::Bearer) => {}
        Ok(pb::AccessTokenType::Unspecified) => {
            return Err(CamaraError::invalid(
                "sinkCredential.accessTokenType",
                "is required",
            ));
        }
        Err(_) => {
            return Err(CamaraError::field(
                CamaraCode::InvalidToken,
                "sinkCredential.accessTokenType",
                "only bearer is supported",
            ));
        }
    }
    let token = c
        .access_token
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| CamaraError::invalid("sinkCredential.accessToken", "is required"))?;
    if token.len() > 4096 {
        return Err(CamaraError::invalid(
            "sinkCredential.accessToken",
            "is longer than 4096 characters",
        ));
    }
    let expires = expiry_time(c.access_token_expires_utc.as_ref())?;
    Ok(AccessToken { token, expires })
}

/// `accessTokenExpiresUtc`: a valid RFC 3339 instant (years 1 to 9999) still in the future. A
/// token already expired would silently never notify.
fn expiry_time(t: Option<&prost_types::Timestamp>) -> Result<OffsetDateTime, CamaraError> {
    const FIELD: &str = "sinkCredential.accessTokenExpiresUtc";
    let t = t.ok_or_else(|| CamaraError::invalid(FIELD, "is required"))?;
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(CamaraError::invalid(
            FIELD,
            format!("nanos = {} must be 0 to 999999999", t.nanos),
        ));
    }
    let at = OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
    )
    .ok()
    .filter(|at| at.year() >= 1)
    .ok_or_else(|| {
        CamaraError::invalid(
            FIELD,
            format!(
                "seconds = {} is outside the years 0001 to 9999 that RFC 3339 can write",
                t.seconds
            ),
        )
    })?;
    if at <= OffsetDateTime::now_utc() {
        return Err(CamaraError::invalid(
            FIELD,
            "is in the past: a sink would never be notified with an expired token",
        ));
    }
    Ok(at)
}

/// A device given to look sessions or profiles up with: any address family will do.
pub fn lookup_device(d: &pb::Device) -> Result<DeviceId, CamaraError> {
    device(d, any_family)
}

pub use crate::model::any_family;

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn device_proto(d: &DeviceId) -> pb::Device {
    match d {
        DeviceId::Ipv4 {
            public,
            private,
            public_port,
        } => pb::Device {
            ipv4_address: Some(pb::DeviceIpv4Addr {
                public_address: Some(public.to_string()),
                private_address: private.map(|a| a.to_string()),
                public_port: public_port.map(u32::from),
            }),
            ..Default::default()
        },
        DeviceId::Ipv6(a) => pb::Device {
            ipv6_address: Some(a.to_string()),
            ..Default::default()
        },
        DeviceId::PhoneNumber(p) => pb::Device {
            phone_number: Some(p.as_str().to_owned()),
            ..Default::default()
        },
    }
}

fn ports_proto(p: &Ports) -> pb::PortsSpec {
    pb::PortsSpec {
        ranges: p
            .ranges
            .iter()
            .map(|&(from, to)| pb::PortRange {
                from: from.into(),
                to: to.into(),
            })
            .collect(),
        ports: p.ports.iter().map(|&n| n.into()).collect(),
    }
}

pub fn qos_status(s: QosStatus) -> pb::QosStatus {
    match s {
        QosStatus::Requested => pb::QosStatus::Requested,
        QosStatus::Available => pb::QosStatus::Available,
        QosStatus::Unavailable => pb::QosStatus::Unavailable,
    }
}

fn status_info(s: StatusInfo) -> pb::StatusInfo {
    match s {
        StatusInfo::DurationExpired => pb::StatusInfo::DurationExpired,
        StatusInfo::NetworkTerminated => pb::StatusInfo::NetworkTerminated,
        StatusInfo::DeleteRequested => pb::StatusInfo::DeleteRequested,
    }
}

pub fn session_info(v: &SessionView) -> pb::SessionInfo {
    let s = &v.session;
    let (expires_at, info) = match s.state {
        SessionState::Available { expires_at, .. } => (expires_at, pb::StatusInfo::Unspecified),
        SessionState::Unavailable { info, ended_at, .. } => (ended_at, status_info(info)),
    };
    pb::SessionInfo {
        duration: i32::try_from(v.duration()).unwrap_or(i32::MAX),
        started_at: Some(timestamp(s.started_at)),
        expires_at: Some(timestamp(expires_at)),
        qos_status: qos_status(s.qos_status()).into(),
        status_info: info.into(),
        counters: Some(pb::SessionCounters {
            uplink_packets: v.counters.up_packets,
            uplink_bytes: v.counters.up_bytes,
            downlink_packets: v.counters.down_packets,
            downlink_bytes: v.counters.down_bytes,
            uplink_dropped: v.counters.up_dropped,
            downlink_dropped: v.counters.down_dropped,
            uplink: None,
            downlink: None,
        }),
        ..request_info(s.id, &s.request)
    }
}

/// A create handed over to the node that serves its device and not installed there yet
/// (`cluster::pending`): REQUESTED, its duration the one requested, and (CAMARA) no
/// `startedAt` or `expiresAt`.
pub fn requested_info(id: SessionId, r: &SessionRequest) -> pb::SessionInfo {
    pb::SessionInfo {
        duration: i32::try_from(r.duration).unwrap_or(i32::MAX),
        qos_status: pb::QosStatus::Requested.into(),
        ..request_info(id, r)
    }
}

/// What a session's info echoes of its request.
fn request_info(id: SessionId, r: &SessionRequest) -> pb::SessionInfo {
    pb::SessionInfo {
        session_id: id.to_string(),
        // A three-legged token's device is never echoed (CAMARA).
        device: r.subject.is_none().then(|| {
            let mut d = device_proto(&r.device);
            if d.ipv6_address.is_some() && r.device_given.is_some() {
                d.ipv6_address.clone_from(&r.device_given);
            }
            d
        }),
        application_server: Some(pb::ApplicationServer {
            ipv4_address: r.server.given_v4(),
            ipv6_address: r.server.given_v6(),
        }),
        device_ports: r.device_ports.as_deref().map(ports_proto),
        application_server_ports: r.server_ports.as_deref().map(ports_proto),
        qos_profile: r.profile.to_string(),
        sink: r.sink.clone(),
        // The access token is write-only: only its type is echoed.
        sink_credential: r.sink_credential.as_ref().map(|_| pb::SinkCredential {
            credential_type: pb::CredentialType::Accesstoken.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`session_info`] with each direction's delivery (GetSession).
pub fn session_info_with_delivery(
    v: &SessionView,
    delivery: Option<&crate::core::Delivery>,
) -> pb::SessionInfo {
    let mut info = session_info(v);
    if let (Some(d), Some(c)) = (delivery, info.counters.as_mut()) {
        let f = &v.counters;
        c.uplink = Some(direction_report(
            &d.up,
            [f.up_packets, f.up_bytes],
            [f.up_dropped, f.up_dropped_bytes],
        ));
        c.downlink = Some(direction_report(
            &d.down,
            [f.down_packets, f.down_bytes],
            [f.down_dropped, f.down_dropped_bytes],
        ));
    }
    info
}

/// One direction's report from its delivery and the classifier's [packets, bytes] let through
/// and dropped by the policer.
fn direction_report(
    d: &crate::core::DirectionReport,
    passed: [u64; 2],
    dropped: [u64; 2],
) -> pb::DirectionReport {
    pb::DirectionReport {
        matched_packets: passed[0] + dropped[0],
        matched_bytes: passed[1] + dropped[1],
        policer_dropped_packets: dropped[0],
        policer_dropped_bytes: dropped[1],
        class: d.class.map(|c| pb::ClassReport {
            delivered_packets: c.packets,
            delivered_bytes: c.bytes,
            queue_dropped_packets: c.drops,
            backlog_packets: c.backlog_packets,
            backlog_bytes: c.backlog_bytes,
        }),
        achieved_bps: d.achieved_bps,
        achieved_interval_ms: d
            .interval
            .map(|i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX)),
        granted_min_bps: d.granted_min_bps,
        granted_max_bps: d.granted_max_bps,
    }
}

pub fn event(e: &Event) -> pb::SessionEvent {
    let info = session_info(&e.session);
    pb::SessionEvent {
        event_id: e.id.to_string(),
        time: Some(timestamp(e.time)),
        observed_time: Some(timestamp(e.observed)),
        revision: e.revision,
        kind: Some(pb::session_event::Kind::QosStatusChanged(
            pb::QosStatusChanged {
                session_id: info.session_id.clone(),
                qos_status: info.qos_status,
                status_info: info.status_info,
                session: Some(info),
            },
        )),
    }
}

fn rate(r: Option<profile::Rate>) -> Option<pb::Rate> {
    r.map(|r| pb::Rate {
        value: r.value.into(),
        unit: match r.unit {
            profile::RateUnit::Bps => pb::RateUnit::Bps,
            profile::RateUnit::Kbps => pb::RateUnit::Kbps,
            profile::RateUnit::Mbps => pb::RateUnit::Mbps,
            profile::RateUnit::Gbps => pb::RateUnit::Gbps,
            profile::RateUnit::Tbps => pb::RateUnit::Tbps,
        }
        .into(),
    })
}

fn duration(d: Option<profile::CamaraDuration>) -> Option<pb::Duration> {
    use profile::TimeUnit as T;
    d.map(|d| pb::Duration {
        value: i32::try_from(d.value).unwrap_or(i32::MAX),
        unit: match d.unit {
            T::Days => pb::TimeUnit::Days,
            T::Hours => pb::TimeUnit::Hours,
            T::Minutes => pb::TimeUnit::Minutes,
            T::Seconds => pb::TimeUnit::Seconds,
            T::Milliseconds => pb::TimeUnit::Milliseconds,
            T::Microseconds => pb::TimeUnit::Microseconds,
            T::Nanoseconds => pb::TimeUnit::Nanoseconds,
        }
        .into(),
    })
}

pub fn profile_status(s: profile::ProfileStatus) -> pb::QosProfileStatus {
    match s {
        profile::ProfileStatus::Active => pb::QosProfileStatus::Active,
        profile::ProfileStatus::Inactive => pb::QosProfileStatus::Inactive,
        profile::ProfileStatus::Deprecated => pb::QosProfileStatus::Deprecated,
    }
}

pub fn qos_profile(p: &QosProfile) -> pb::QosProfile {
    pb::QosProfile {
        name: p.name.to_string(),
        description: p.description.clone(),
        status: profile_status(p.status).into(),
        country_availability: p
            .country_availability
            .iter()
            .map(|c| pb::CountryAvailability {
                country_name: c.country_name.clone(),
                networks: c.networks.clone(),
            })
            .collect(),
        target_min_upstream_rate: rate(p.target_min_upstream_rate),
        max_upstream_rate: rate(p.max_upstream_rate),
        max_upstream_burst_rate: rate(p.max_upstream_burst_rate),
        target_min_downstream_rate: rate(p.target_min_downstream_rate),
        max_downstream_rate: rate(p.max_downstream_rate),
        max_downstream_burst_rate: rate(p.max_downstream_burst_rate),
        min_duration: duration(p.min_duration),
        max_duration: duration(p.max_duration),
        priority: p.priority.map(i32::from),
        packet_delay_budget: duration(p.packet_delay_budget),
        jitter: duration(p.jitter),
        packet_error_loss_rate: p.packet_error_loss_rate.map(i32::from),
        l4s_queue_type: match p.l4s_queue_type {
            None => pb::L4sQueueType::Unspecified,
            Some(profile::L4sQueueType::NonL4sQueue) => pb::L4sQueueType::NonL4sQueue,
            Some(profile::L4sQueueType::L4sQueue) => pb::L4sQueueType::L4sQueue,
            Some(profile::L4sQueueType::MixedQueue) => pb::L4sQueueType::MixedQueue,
        }
        .into(),
        service_class: p
            .service_class
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(addr: &str) -> pb::Device {
        pb::Device {
            ipv4_address: Some(pb::DeviceIpv4Addr {
                public_address: Some(addr.into()),
                private_address: Some(addr.into()),
                public_port: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_unicast_device_addresses_are_served() {
        assert!(device(&v4("10.0.1.2"), |_| true).is_ok());
        for odd in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            let e = device(&v4(odd), |_| true).expect_err(odd);
            assert_eq!(e.code, CamaraCode::InvalidArgument, "{odd}");
        }
        for odd in ["::", "::1", "ff02::1"] {
            let d = pb::Device {
                ipv6_address: Some(odd.into()),
                ..Default::default()
            };
            let e = device(&d, |_| true).expect_err(odd);
            assert_eq!(e.code, CamaraCode::InvalidArgument, "{odd}");
        }
    }

    #[test]
    fn server_networks_take_a_prefix_length_not_a_netmask() {
        let server = |v4: &str| {
            application_server(Some(&pb::ApplicationServer {
                ipv4_address: Some(v4.into()),
                ipv6_address: None,
            }))
        };
        assert!(server("10.0.2.0/24").is_ok());
        assert!(server("10.0.2.2").is_ok());
        for bad in ["10.0.2.0/255.255.255.0", "10.0.2.0/", "10.0.2.0/033"] {
            let e = server(bad).expect_err(bad);
            assert_eq!(e.code, CamaraCode::InvalidArgument, "{bad}");
        }
        let v6 = application_server(Some(&pb::ApplicationServer {
            ipv4_address: None,
            ipv6_address: Some("fd00:2::/64".into()),
        }));
        assert!(v6.is_ok());
    }
}
