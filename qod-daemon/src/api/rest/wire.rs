//! CAMARA's JSON, decoded into and encoded from the CAMARA messages both edges share
//! (`qod.v1`). Field for field: what a rule decides (a port's range, an identifier's form, a
//! duration's bounds) is decided once, in `api::convert` and the core. Only what JSON can say
//! and protobuf cannot is checked here: a required property missing, an unknown one (strict
//! bodies, CAMARA r4.1: 400 INVALID_ARGUMENT), a `null`, an empty array where the schema sets
//! `minItems: 1`, a date-time's text.

use qod_proto::v1 as pb;
use serde::{Deserialize, Deserializer, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::error::CamaraError;

/// An optional property that, when present, must hold a value: CAMARA's schemas are not
/// nullable, so `null` is refused as any other wrong type is.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A request body: `bytes` as `T`, or INVALID_ARGUMENT naming the property at fault.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, CamaraError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(CamaraError::invalid("body", "the request body is required"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        CamaraError::invalid(field, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| CamaraError::invalid("body", format!("trailing characters: {e}")))?;
    Ok(value)
}

/// `minItems: 1`.
fn not_empty<T>(field: &str, v: Option<Vec<T>>) -> Result<Vec<T>, CamaraError> {
    match v {
        Some(v) if v.is_empty() => Err(CamaraError::invalid(field, "must not be an empty array")),
        v => Ok(v.unwrap_or_default()),
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub phone_number: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub network_access_identifier: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<DeviceIpv4Addr>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceIpv4Addr {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub public_address: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub private_address: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub public_port: Option<u32>,
}

impl From<Device> for pb::Device {
    fn from(d: Device) -> Self {
        Self {
            phone_number: d.phone_number,
            network_access_identifier: d.network_access_identifier,
            ipv4_address: d.ipv4_address.map(|a| pb::DeviceIpv4Addr {
                public_address: a.public_address,
                private_address: a.private_address,
                public_port: a.public_port,
            }),
            ipv6_address: d.ipv6_address,
        }
    }
}

impl From<pb::Device> for Device {
    fn from(d: pb::Device) -> Self {
        Self {
            phone_number: d.phone_number,
            network_access_identifier: d.network_access_identifier,
            ipv4_address: d.ipv4_address.map(|a| DeviceIpv4Addr {
                public_address: a.public_address,
                private_address: a.private_address,
                public_port: a.public_port,
            }),
            ipv6_address: d.ipv6_address,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationServer {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub from: u32,
    pub to: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortsSpec {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ranges: Option<Vec<PortRange>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ports: Option<Vec<u32>>,
}

impl PortsSpec {
    fn into_pb(self, field: &str) -> Result<pb::PortsSpec, CamaraError> {
        Ok(pb::PortsSpec {
            ranges: not_empty(&format!("{field}.ranges"), self.ranges)?
                .into_iter()
                .map(|r| pb::PortRange {
                    from: r.from,
                    to: r.to,
                })
                .collect(),
            ports: not_empty(&format!("{field}.ports"), self.ports)?,
        })
    }
}

impl From<pb::PortsSpec> for PortsSpec {
    fn from(p: pb::PortsSpec) -> Self {
        Self {
            ranges: (!p.ranges.is_empty()).then(|| {
                p.ranges
                    .into_iter()
                    .map(|r| PortRange {
                        from: r.from,
                        to: r.to,
                    })
                    .collect()
            }),
            ports: (!p.ports.is_empty()).then_some(p.ports),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub enum CredentialType {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "ACCESSTOKEN")]
    AccessToken,
    #[serde(rename = "REFRESHTOKEN")]
    RefreshToken,
}

/// CAMARA `SinkCredential` with the properties of each of its variants (PLAIN, ACCESSTOKEN,
/// REFRESHTOKEN), so that a well-formed credential of a type qodd does not take is refused as
/// such (INVALID_CREDENTIAL), not as an unknown property.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkCredential {
    pub credential_type: CredentialType,
    #[serde(default, deserialize_with = "present")]
    pub access_token: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub access_token_expires_utc: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub access_token_type: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub identifier: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub secret: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub refresh_token: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub refresh_token_endpoint: Option<String>,
}

/// An `accessTokenType` that is not one protobuf can name (anything but `bearer`): the shared
/// rule refuses it as INVALID_TOKEN.
const UNKNOWN_TOKEN_TYPE: i32 = i32::MAX;

impl SinkCredential {
    fn into_pb(self) -> Result<pb::SinkCredential, CamaraError> {
        let expires = self
            .access_token_expires_utc
            .map(|t| date_time("sinkCredential.accessTokenExpiresUtc", &t))
            .transpose()?;
        Ok(pb::SinkCredential {
            credential_type: match self.credential_type {
                CredentialType::Plain => pb::CredentialType::Plain,
                CredentialType::AccessToken => pb::CredentialType::Accesstoken,
                CredentialType::RefreshToken => pb::CredentialType::Refreshtoken,
            }
            .into(),
            access_token: self.access_token,
            access_token_expires_utc: expires.map(super::super::convert::timestamp),
            access_token_type: match self.access_token_type.as_deref() {
                None => pb::AccessTokenType::Unspecified.into(),
                Some("bearer") => pb::AccessTokenType::Bearer.into(),
                Some(_) => UNKNOWN_TOKEN_TYPE,
            },
        })
    }
}

/// An RFC 3339 date-time with its time zone.
fn date_time(field: &str, s: &str) -> Result<OffsetDateTime, CamaraError> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        CamaraError::invalid(
            field,
            format!("{s:?} is not an RFC 3339 date-time with a time zone ({e})"),
        )
    })
}

/// CAMARA `CreateSession`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    #[serde(default, deserialize_with = "present")]
    pub device: Option<Device>,
    pub application_server: ApplicationServer,
    #[serde(default, deserialize_with = "present")]
    pub device_ports: Option<PortsSpec>,
    #[serde(default, deserialize_with = "present")]
    pub application_server_ports: Option<PortsSpec>,
    pub qos_profile: String,
    #[serde(default, deserialize_with = "present")]
    pub sink: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub sink_credential: Option<SinkCredential>,
    pub duration: i32,
}

impl CreateSession {
    pub fn into_pb(self) -> Result<pb::CreateSessionRequest, CamaraError> {
        Ok(pb::CreateSessionRequest {
            device: self.device.map(Into::into),
            application_server: Some(pb::ApplicationServer {
                ipv4_address: self.application_server.ipv4_address,
                ipv6_address: self.application_server.ipv6_address,
            }),
            device_ports: self
                .device_ports
                .map(|p| p.into_pb("devicePorts"))
                .transpose()?,
            application_server_ports: self
                .application_server_ports
                .map(|p| p.into_pb("applicationServerPorts"))
                .transpose()?,
            qos_profile: self.qos_profile,
            sink: self.sink,
            sink_credential: self
                .sink_credential
                .map(SinkCredential::into_pb)
                .transpose()?,
            duration: self.duration,
        })
    }
}

/// CAMARA `ExtendSessionDuration`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendSessionDuration {
    pub requested_additional_duration: i32,
}

/// CAMARA `RetrieveSessionsInput`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrieveSessionsInput {
    #[serde(default, deserialize_with = "present")]
    pub device: Option<Device>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProfileStatus {
    Active,
    Inactive,
    Deprecated,
}

/// CAMARA `QosProfileDeviceRequest`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QosProfileDeviceRequest {
    #[serde(default, deserialize_with = "present")]
    pub device: Option<Device>,
    #[serde(default, deserialize_with = "present")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub status: Option<ProfileStatus>,
}

impl From<QosProfileDeviceRequest> for pb::RetrieveQosProfilesRequest {
    fn from(r: QosProfileDeviceRequest) -> Self {
        Self {
            device: r.device.map(Into::into),
            name: r.name,
            status: match r.status {
                None => pb::QosProfileStatus::Unspecified,
                Some(ProfileStatus::Active) => pb::QosProfileStatus::Active,
                Some(ProfileStatus::Inactive) => pb::QosProfileStatus::Inactive,
                Some(ProfileStatus::Deprecated) => pb::QosProfileStatus::Deprecated,
            }
            .into(),
        }
    }
}

/// CAMARA `ErrorInfo`.
#[derive(Debug, Serialize)]
pub struct ErrorInfo {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl From<&CamaraError> for ErrorInfo {
    fn from(e: &CamaraError) -> Self {
        Self {
            status: e.code.http_status(),
            code: e.code.reason(),
            message: crate::error::sanitized(&e.message, crate::error::MAX_MESSAGE_BYTES),
        }
    }
}

fn rfc3339(t: &prost_types::Timestamp) -> Option<String> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// CAMARA `SessionInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    pub application_server: ApplicationServer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_ports: Option<PortsSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_server_ports: Option<PortsSpec>,
    pub qos_profile: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    pub duration: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub qos_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_info: Option<&'static str>,
}

/// The JSON of a shared `SessionInfo`. `sinkCredential` is left out: its one non-secret part,
/// the type, cannot be echoed alone (CAMARA's ACCESSTOKEN schema requires the token, which is
/// write-only), and the counters are gRPC's.
impl From<pb::SessionInfo> for SessionInfo {
    fn from(s: pb::SessionInfo) -> Self {
        let status = pb::QosStatus::try_from(s.qos_status).unwrap_or_default();
        Self {
            session_id: s.session_id,
            device: s.device.map(Into::into),
            application_server: s.application_server.map_or(
                ApplicationServer {
                    ipv4_address: None,
                    ipv6_address: None,
                },
                |a| ApplicationServer {
                    ipv4_address: a.ipv4_address,
                    ipv6_address: a.ipv6_address,
                },
            ),
            device_ports: s.device_ports.map(Into::into),
            application_server_ports: s.application_server_ports.map(Into::into),
            qos_profile: s.qos_profile,
            sink: s.sink,
            duration: s.duration,
            // CAMARA: neither while REQUESTED.
            started_at: (status != pb::QosStatus::Requested)
                .then(|| s.started_at.as_ref().and_then(rfc3339))
                .flatten(),
            expires_at: (status != pb::QosStatus::Requested)
                .then(|| s.expires_at.as_ref().and_then(rfc3339))
                .flatten(),
            qos_status: match status {
                pb::QosStatus::Requested | pb::QosStatus::Unspecified => "REQUESTED",
                pb::QosStatus::Available => "AVAILABLE",
                pb::QosStatus::Unavailable => "UNAVAILABLE",
            },
            status_info: match pb::StatusInfo::try_from(s.status_info).unwrap_or_default() {
                pb::StatusInfo::Unspecified => None,
                pb::StatusInfo::DurationExpired => Some("DURATION_EXPIRED"),
                pb::StatusInfo::NetworkTerminated => Some("NETWORK_TERMINATED"),
                pb::StatusInfo::DeleteRequested => Some("DELETE_REQUESTED"),
            },
        }
    }
}

/// CAMARA `Rate` and `Duration`: `{value, unit}`.
#[derive(Debug, Serialize)]
pub struct Quantity {
    pub value: i32,
    pub unit: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CountryAvailability {
    pub country_name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
}

/// CAMARA `QosProfile`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QosProfile {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub status: ProfileStatus,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub country_availability: Vec<CountryAvailability>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_min_upstream_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upstream_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upstream_burst_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_min_downstream_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_downstream_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_downstream_burst_rate: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_duration: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_delay_budget: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_error_loss_rate: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l4s_queue_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_class: Option<String>,
}

fn rate(r: Option<pb::Rate>) -> Option<Quantity> {
    r.map(|r| Quantity {
        value: r.value,
        unit: match pb::RateUnit::try_from(r.unit).unwrap_or_default() {
            pb::RateUnit::Unspecified | pb::RateUnit::Bps => "bps",
            pb::RateUnit::Kbps => "kbps",
            pb::RateUnit::Mbps => "Mbps",
            pb::RateUnit::Gbps => "Gbps",
            pb::RateUnit::Tbps => "Tbps",
        },
    })
}

fn duration(d: Option<pb::Duration>) -> Option<Quantity> {
    d.map(|d| Quantity {
        value: d.value,
        unit: match pb::TimeUnit::try_from(d.unit).unwrap_or_default() {
            pb::TimeUnit::Unspecified | pb::TimeUnit::Seconds => "Seconds",
            pb::TimeUnit::Days => "Days",
            pb::TimeUnit::Hours => "Hours",
            pb::TimeUnit::Minutes => "Minutes",
            pb::TimeUnit::Milliseconds => "Milliseconds",
            pb::TimeUnit::Microseconds => "Microseconds",
            pb::TimeUnit::Nanoseconds => "Nanoseconds",
        },
    })
}

impl From<pb::QosProfile> for QosProfile {
    fn from(p: pb::QosProfile) -> Self {
        Self {
            name: p.name,
            description: (!p.description.is_empty()).then_some(p.description),
            status: match pb::QosProfileStatus::try_from(p.status).unwrap_or_default() {
                pb::QosProfileStatus::Active | pb::QosProfileStatus::Unspecified => {
                    ProfileStatus::Active
                }
                pb::QosProfileStatus::Inactive => ProfileStatus::Inactive,
                pb::QosProfileStatus::Deprecated => ProfileStatus::Deprecated,
            },
            country_availability: p
                .country_availability
                .into_iter()
                .map(|c| CountryAvailability {
                    country_name: c.country_name,
                    networks: c.networks,
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
            priority: p.priority,
            packet_delay_budget: duration(p.packet_delay_budget),
            jitter: duration(p.jitter),
            packet_error_loss_rate: p.packet_error_loss_rate,
            l4s_queue_type: match pb::L4sQueueType::try_from(p.l4s_queue_type).unwrap_or_default() {
                pb::L4sQueueType::Unspecified => None,
                pb::L4sQueueType::NonL4sQueue => Some("non-l4s-queue"),
                pb::L4sQueueType::L4sQueue => Some("l4s-queue"),
                pb::L4sQueueType::MixedQueue => Some("mixed-queue"),
            },
            service_class: (!p.service_class.is_empty()).then_some(p.service_class),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CamaraCode;

    #[test]
    fn bodies_are_strict() {
        let e = decode::<CreateSession>(
            br#"{"applicationServer":{"ipv4Address":"10.0.0.1"},"qosProfile":"QOS_E","duration":10,"extra":1}"#,
        )
        .expect_err("unknown property");
        assert_eq!(e.code, CamaraCode::InvalidArgument);
        assert!(e.message.contains("unknown field `extra`"), "{}", e.message);
        let e = decode::<CreateSession>(
            br#"{"applicationServer":{"ipv4Address":"10.0.0.1","x":1},"qosProfile":"QOS_E","duration":10}"#,
        )
        .expect_err("nested unknown property");
        assert_eq!(e.field.as_deref(), Some("applicationServer.x"), "{e:?}");
        let e = decode::<CreateSession>(
            br#"{"applicationServer":{"ipv4Address":"10.0.0.1"},"qosProfile":"QOS_E","duration":10,"sink":null}"#,
        )
        .expect_err("null");
        assert_eq!(e.field.as_deref(), Some("sink"), "{e:?}");
        let e = decode::<CreateSession>(br#"{"applicationServer":{},"qosProfile":"QOS_E"}"#)
            .expect_err("missing duration");
        assert!(
            e.message.contains("missing field `duration`"),
            "{}",
            e.message
        );
        let e = decode::<CreateSession>(b"").expect_err("no body");
        assert_eq!(e.field.as_deref(), Some("body"));
        let e = decode::<CreateSession>(
            br#"{"applicationServer":{"ipv4Address":"10.0.0.1"},"qosProfile":"QOS_E","duration":2147483648}"#,
        )
        .expect_err("int32");
        assert_eq!(e.field.as_deref(), Some("duration"), "{e:?}");
        let ok = decode::<CreateSession>(
            br#"{"applicationServer":{"ipv4Address":"10.0.0.1"},"devicePorts":{"ports":[]},"qosProfile":"QOS_E","duration":10}"#,
        )
        .expect("schema types")
        .into_pb()
        .expect_err("minItems");
        assert_eq!(ok.field.as_deref(), Some("devicePorts.ports"));
    }

    #[test]
    fn credentials_of_other_types_reach_the_shared_rule() {
        let c: SinkCredential =
            decode(br#"{"credentialType":"PLAIN","identifier":"a","secret":"b"}"#).expect("plain");
        assert_eq!(
            c.into_pb().expect("pb").credential_type,
            i32::from(pb::CredentialType::Plain)
        );
        let c: SinkCredential = decode(
            br#"{"credentialType":"ACCESSTOKEN","accessToken":"t","accessTokenExpiresUtc":"2030-01-01T00:00:00Z","accessTokenType":"mac"}"#,
        )
        .expect("access token");
        let pb = c.into_pb().expect("pb");
        assert_eq!(pb.access_token_type, UNKNOWN_TOKEN_TYPE);
        assert!(pb.access_token_expires_utc.is_some());
        let c: SinkCredential = decode(
            br#"{"credentialType":"ACCESSTOKEN","accessToken":"t","accessTokenExpiresUtc":"2030-01-01T00:00:00","accessTokenType":"bearer"}"#,
        )
        .expect("types");
        assert!(c.into_pb().is_err(), "a date-time without a zone");
    }
}
