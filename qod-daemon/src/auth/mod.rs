//! Who may call: bearer access tokens (JWT), CAMARA scopes per operation, per-client limits and,
//! with mutual TLS, the client certificate.
//!
//! [`Authenticator`] runs before every call of the QoD and profile services: it verifies the
//! token, applies the client's request rate and leaves a [`Principal`] in the request's
//! extensions. Each handler then asks [`authorize`] for the scope its operation needs and gets
//! the [`Caller`] whose sessions it may touch.

pub mod jwt;

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value};
use tonic::{Request, Status, service::Interceptor};

use crate::{
    error::{CamaraCode, CamaraError},
    model::{Caller, DeviceGiven, DeviceId, Ipv4Given, PhoneNumber, any_family},
};

pub use jwt::{JwksSource, TokenRules, Verifier};

/// CAMARA's scopes, one per operation.
pub mod scope {
    pub const SESSIONS_CREATE: &str = "quality-on-demand:sessions:create";
    pub const SESSIONS_READ: &str = "quality-on-demand:sessions:read";
    pub const SESSIONS_DELETE: &str = "quality-on-demand:sessions:delete";
    pub const SESSIONS_UPDATE: &str = "quality-on-demand:sessions:update";
    pub const SESSIONS_RETRIEVE_BY_DEVICE: &str = "quality-on-demand:sessions:retrieve-by-device";
    pub const PROFILES_READ: &str = "qos-profiles:read";
    /// The operator's view of the node (`qod.v1.QodNode`): every client's sessions, the kernel
    /// state. Not CAMARA's, and not in [`ALL`]: grant it to operators only.
    pub const ADMIN: &str = "qod:admin";
    /// Every scope qodd knows, for tools that mint full-access tokens.
    pub const ALL: [&str; 6] = [
        SESSIONS_CREATE,
        SESSIONS_READ,
        SESSIONS_DELETE,
        SESSIONS_UPDATE,
        SESSIONS_RETRIEVE_BY_DEVICE,
        PROFILES_READ,
    ];
}

/// The token settings of a validated configuration.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub jwks: JwksSource,
    /// How often the key set is read again.
    pub jwks_refresh: Duration,
    pub rules: TokenRules,
    /// The claim naming the API client (`client_id`, RFC 9068).
    pub client_id_claim: String,
    /// The claim whose value, when it identifies a device, makes a token three-legged.
    pub device_claim: String,
    /// The client id is the client certificate's subject CN (mutual TLS); a token naming
    /// another client is refused.
    pub client_id_from_certificate: bool,
}

/// Per-client limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Sessions a client may hold AVAILABLE at once.
    pub max_active_sessions: u32,
    /// Distinct sink origins a client's active sessions may notify.
    pub max_sinks: u32,
    /// Watch streams a client may hold open at once.
    pub max_watches: u32,
    pub requests_per_second: NonZeroU32,
    pub request_burst: NonZeroU32,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
}

/// What an authenticated call may do.
#[derive(Clone, Debug)]
pub struct Principal {
    pub caller: Caller,
    /// `None`: every scope (insecure mode only).
    scopes: Option<Vec<String>>,
    /// The token's `exp` (Unix seconds): a stream ends then.
    expires_at: Option<u64>,
}

impl Principal {
    /// The caller, if the token grants `scope`.
    pub fn require(&self, scope: &str) -> Result<&Caller, CamaraError> {
        match &self.scopes {
            Some(s) if !s.iter().any(|s| s == scope) => Err(CamaraError::new(
                CamaraCode::PermissionDenied,
                format!("the access token does not grant the scope {scope}"),
            )),
            _ => Ok(&self.caller),
        }
    }

    /// The local, unauthenticated caller of insecure mode: all scopes, all sessions.
    pub fn insecure() -> Self {
        Self {
            caller: Caller {
                client: INSECURE_CLIENT.to_owned(),
                subject: None,
                operator: true,
                credential: None,
                relayed: false,
                assigned: None,
            },
            scopes: None,
            expires_at: None,
        }
    }
}

/// The metadata a cluster node marks a call it passes on to another with (its node id).
pub const RELAYED_BY: &str = "x-qod-relayed-by";
/// With [`RELAYED_BY`] on a create: the session id the passing node chose.
pub const ASSIGNED_ID: &str = "x-qod-session-id";

/// The client id sessions get in insecure mode.
pub const INSECURE_CLIENT: &str = "insecure-local";

/// The caller of `request` if its token grants `scope`.
/// The client is recorded into the call's span.
pub fn authorize<T>(request: &Request<T>, scope: &str) -> Result<Caller, CamaraError> {
    let principal = request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| unauthenticated("the call was not authenticated"))?;
    tracing::Span::current().record("client", principal.caller.client.as_str());
    principal.require(scope).cloned()
}

/// How long the caller's token stays valid (`None`: no end, insecure mode).
pub fn time_left<T>(request: &Request<T>) -> Option<Duration> {
    let exp = request.extensions().get::<Principal>()?.expires_at?;
    let now = jsonwebtoken::get_current_timestamp();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

fn unauthenticated(msg: impl Into<String>) -> CamaraError {
    CamaraError::new(CamaraCode::Unauthenticated, msg)
}

/// Authenticates every call and applies the per-client request rate.
#[derive(Clone)]
pub struct Authenticator(Arc<Inner>);

struct Inner {
    /// `None`: insecure mode.
    tokens: Option<(AuthSettings, Arc<Verifier>)>,
    limiter: DefaultKeyedRateLimiter<String>,
    /// Cleared while the store is being restored: calls are refused with UNAVAILABLE.
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Authenticator {
    pub fn new(tokens: Option<(AuthSettings, Arc<Verifier>)>, limits: &ClientLimits) -> Self {
        let quota = Quota::per_second(limits.requests_per_second).allow_burst(limits.request_burst);
        Self(Arc::new(Inner {
            tokens,
            limiter: RateLimiter::keyed(quota),
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }))
    }

    /// The switch that opens the API once the store is restored.
    pub fn gate(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.0.ready.clone()
    }

    /// Admits one call, whichever API it came by: the API is open (the store is restored), its
    /// `authorization` header (raw) carries a valid token (and, where the client id comes from
    /// the certificate, `certificate` gives the connection's client certificate, DER), and the
    /// client is within its request rate. Refusals are counted by reason.
    pub fn admit(
        &self,
        authorization: Option<&[u8]>,
        certificate: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Principal, CamaraError> {
        if !self.0.ready.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CamaraError::new(
                CamaraCode::Unavailable,
                "qodd is restoring its sessions; try again shortly",
            ));
        }
        let principal = self
            .authenticate(authorization, certificate)
            .inspect_err(|e| {
                crate::metrics::METRICS
                    .token_refusals
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: refusal_reason(&e.message),
                    })
                    .inc();
            })?;
        self.rate_limit(&principal.caller.client)?;
        Ok(principal)
    }

    fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Principal, CamaraError> {
        let Some((settings, verifier)) = &self.0.tokens else {
            return Ok(Principal::insecure());
        };
        let header = authorization.ok_or_else(|| {
            unauthenticated("no access token: send `authorization: Bearer <token>`")
        })?;
        let header = std::str::from_utf8(header)
            .ok()
            .filter(|h| h.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
            .ok_or_else(|| unauthenticated("the authorization header is not text"))?;
        // RFC 6750 / 7235: the scheme is case-insensitive.
        let token = header
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("the authorization header is not `Bearer <token>`"))?;
        let claims = verifier.verify(token).map_err(unauthenticated)?;
        let token_client = claims
            .get(&settings.client_id_claim)
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty());
        let client = if settings.client_id_from_certificate {
            let cert = certificate_client(certificate())?;
            // The token must name the certificate's client (its client id, or else its
            // subject): a token naming no client would work with any certificate.
            let named = token_client
                .or_else(|| claims.get("sub").and_then(Value::as_str))
                .ok_or_else(|| unauthenticated("the access token names no client"))?;
            if named != cert {
                return Err(unauthenticated(
                    "the access token was issued to another client than the certificate's",
                ));
            }
            cert
        } else {
            token_client
                .ok_or_else(|| {
                    unauthenticated(format!(
                        "the access token has no `{}` claim naming the client",
                        settings.client_id_claim
                    ))
                })?
                .to_owned()
        };
        let subject = match claims.get(&settings.device_claim) {
            None => None,
            // A two-legged token's subject is the client itself (RFC 9068).
            Some(Value::String(s)) if *s == client => None,
            Some(v) => Some(subject_device(v)?.ok_or_else(|| {
                // An opaque subject may stand for a user's device this node cannot identify:
                // treating the token as two-legged would open every session of the client.
                unauthenticated(format!(
                    "the access token's `{}` is neither the client nor a device this node can identify",
                    settings.device_claim
                ))
            })?),
        };
        Ok(Principal {
            caller: Caller {
                client,
                subject,
                operator: false,
                credential: Some(crate::model::Credential(token.into())),
                relayed: false,
                assigned: None,
            },
            scopes: Some(scopes(&claims)),
            expires_at: jwt::numeric_date(claims.get("exp")),
        })
    }

    fn rate_limit(&self, client: &str) -> Result<(), CamaraError> {
        let limiter = &self.0.limiter;
        // Forget idle clients now and then so the table stays small.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        limiter.check_key(&client.to_owned()).map_err(|_| {
            CamaraError::new(
                CamaraCode::TooManyRequests,
                "rate limit reached for this client; retry later",
            )
        })
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        let mut principal = self.admit(authorization.as_deref(), || grpc_certificate(&request))?;
        principal.caller.relayed = request.metadata().contains_key(RELAYED_BY);
        principal.caller.assigned = principal
            .caller
            .relayed
            .then(|| {
                request
                    .metadata()
                    .get(ASSIGNED_ID)?
                    .to_str()
                    .ok()?
                    .parse()
                    .ok()
            })
            .flatten();
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The `reason` label of a refusal at authentication, from its message (the messages above and
/// in `jwt.rs`).
fn refusal_reason(message: &str) -> &'static str {
    let has = |s: &str| message.contains(s);
    if has("no access token") {
        "missing"
    } else if has("authorization header") {
        "malformed_header"
    } else if has("has expired") {
        "expired"
    } else if has("not valid yet") {
        "not_yet_valid"
    } else if has("issuer") {
        "issuer"
    } else if has("audience") {
        "audience"
    } else if has("algorithm") {
        "algorithm"
    } else if has("not trusted") || has("no usable key") || has("key") {
        "key"
    } else if has("certificate") {
        "certificate"
    } else if has("client") {
        "client"
    } else if has("device claim") || has("neither the client") {
        "subject"
    } else {
        "invalid"
    }
}

/// OAuth scopes: the space-separated `scope` string, or an `scp` array.
fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => s.split_whitespace().map(str::to_owned).collect(),
        (_, Some(Value::Array(a))) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        (_, Some(Value::String(s))) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// The device a three-legged token speaks for: a CAMARA `Device` object, or a string
/// `tel:+E164` / `+E164`, `ipv4:ADDR`, `ipv6:ADDR`. Any other string is no device (the caller
/// accepts it only as the client's own id).
pub fn subject_device(v: &Value) -> Result<Option<DeviceId>, CamaraError> {
    let bad = |why: &str| unauthenticated(format!("the access token's device claim {why}"));
    match v {
        Value::String(s) => {
            if let Some(n) = s
                .strip_prefix("tel:")
                .or(s.starts_with('+').then_some(s.as_str()))
            {
                return PhoneNumber::parse("device", n)
                    .map(|p| Some(DeviceId::PhoneNumber(p)))
                    .map_err(|_| bad("is not an E.164 phone number"));
            }
            if let Some(a) = s.strip_prefix("ipv4:") {
                let a = a.parse().map_err(|_| bad("is not an IPv4 address"))?;
                return Ok(Some(DeviceId::Ipv4 {
                    public: a,
                    private: Some(a),
                    public_port: None,
                }));
            }
            if let Some(a) = s.strip_prefix("ipv6:") {
                return Ok(Some(DeviceId::Ipv6(
                    a.parse().map_err(|_| bad("is not an IPv6 address"))?,
                )));
            }
            Ok(None)
        }
        Value::Object(o) => {
            let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
            let ipv4 = o.get("ipv4Address").map(|a| Ipv4Given {
                public_address: text(a.get("publicAddress")),
                private_address: text(a.get("privateAddress")),
                public_port: a
                    .get("publicPort")
                    .and_then(Value::as_u64)
                    .and_then(|p| u32::try_from(p).ok()),
            });
            let device = DeviceGiven {
                phone_number: text(o.get("phoneNumber")),
                ipv4,
                ipv6_address: text(o.get("ipv6Address")),
                network_access_identifier: text(o.get("networkAccessIdentifier")),
            };
            device
                .resolve(any_family)
                .map(Some)
                .map_err(|e| bad(&format!("is not a valid device: {}", e.message)))
        }
        _ => Err(bad("is neither a string nor a device object")),
    }
}

/// The leaf client certificate (DER) of a gRPC call's TLS connection.
fn grpc_certificate(request: &Request<()>) -> Option<Vec<u8>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
    let ext = request.extensions();
    let certs = ext
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .or_else(|| {
            ext.get::<TlsConnectInfo<UdsConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
        })?;
    certs.first().map(|c| c.as_ref().to_vec())
}

/// The client id a client certificate (DER) carries: its subject's common name.
fn certificate_client(leaf: Option<Vec<u8>>) -> Result<String, CamaraError> {
    let leaf = leaf.ok_or_else(|| unauthenticated("a client certificate is required"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|_| unauthenticated("the client certificate cannot be parsed"))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| unauthenticated("the client certificate has no subject CN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_claims_name_devices_or_nothing() {
        let d = |v: Value| subject_device(&v);
        assert!(matches!(
            d(Value::from("tel:+4915112345678")),
            Ok(Some(DeviceId::PhoneNumber(_)))
        ));
        assert!(matches!(
            d(Value::from("ipv4:10.0.0.1")),
            Ok(Some(DeviceId::Ipv4 { .. }))
        ));
        assert!(matches!(d(Value::from("my-app")), Ok(None)));
        assert!(d(Value::from("ipv4:nope")).is_err());
        let obj = serde_json::json!({"ipv4Address": {"publicAddress": "10.0.0.1", "privateAddress": "10.0.0.1"}});
        assert!(matches!(d(obj), Ok(Some(DeviceId::Ipv4 { .. }))));
        assert!(d(serde_json::json!({})).is_err());
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let m = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(scopes(&m(serde_json::json!({"scope": "a b"}))), ["a", "b"]);
        assert_eq!(scopes(&m(serde_json::json!({"scp": ["a"]}))), ["a"]);
        assert!(scopes(&m(serde_json::json!({}))).is_empty());
    }
}
