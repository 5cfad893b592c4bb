//! CAMARA's REST API (quality-on-demand 1.1.0, qos-profiles 1.1.0) beside gRPC, on its own
//! listener (`[rest]`). Each handler authenticates with the same [`Authenticator`], decodes
//! CAMARA's JSON into the shared messages (`wire`), calls the same [`Operations`] as gRPC and
//! encodes the answer; every error is CAMARA's `ErrorInfo` with its HTTP status.
//!
//! On every response, errors included, a valid `x-correlator` is echoed; an invalid one is
//! refused (400 INVALID_ARGUMENT) and not echoed. Bodies must be `application/json`, at most
//! `limits.max_message_bytes`, and arrive within `rest.request_timeout_ms`.

pub mod openapi;
pub mod serve;
pub mod wire;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{MatchedPath, Path, Request, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::Instrument as _;

use super::{Operations, correlator};
use crate::{
    auth::{Authenticator, scope},
    error::{CamaraCode, CamaraError},
    model::Caller,
};

/// What the REST edge needs.
#[derive(Clone)]
pub struct Rest(Arc<Inner>);

struct Inner {
    ops: Operations,
    auth: Authenticator,
    /// Largest request body, in bytes.
    max_body: usize,
    /// For a request's whole body to arrive.
    body_timeout: Duration,
    /// The path both APIs are under (`apiRoot`'s path), `""` or `/something`.
    api_root: String,
    docs: openapi::Documents,
}

/// The connection a request came on: the TLS client certificate, if one was presented.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub certificate: Option<Arc<Vec<u8>>>,
    pub tls: bool,
}

/// A CAMARA error as an HTTP response. The CAMARA code rides along in the response's
/// extensions for the call's metrics.
pub struct RestError(pub CamaraError);

impl From<CamaraError> for RestError {
    fn from(e: CamaraError) -> Self {
        Self(e)
    }
}

#[derive(Clone, Copy)]
struct Reason(&'static str);

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let info = wire::ErrorInfo::from(&self.0);
        let status = StatusCode::from_u16(info.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = json(status, &info);
        resp.extensions_mut().insert(Reason(self.0.code.reason()));
        resp
    }
}

type Reply = Result<Response, RestError>;

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => RestError(CamaraError::new(
            CamaraCode::Internal,
            format!("the answer cannot be encoded: {e}"),
        ))
        .into_response(),
    }
}

impl Rest {
    pub fn new(
        ops: Operations,
        auth: Authenticator,
        max_body: usize,
        body_timeout: Duration,
        api_root: String,
        docs: openapi::Documents,
    ) -> Self {
        Self(Arc::new(Inner {
            ops,
            auth,
            max_body,
            body_timeout,
            api_root,
            docs,
        }))
    }

    /// The routes under `apiRoot`, every one behind the edge (correlator, span, metrics).
    pub fn router(self) -> Router {
        let qod = format!("{}/quality-on-demand/v1", self.0.api_root);
        let profiles = format!("{}/qos-profiles/v1", self.0.api_root);
        Router::new()
            .route(&format!("{qod}/sessions"), post(create_session))
            .route(
                &format!("{qod}/sessions/{{sessionId}}"),
                get(get_session).delete(delete_session),
            )
            .route(
                &format!("{qod}/sessions/{{sessionId}}/extend"),
                post(extend),
            )
            .route(&format!("{qod}/retrieve-sessions"), post(retrieve_sessions))
            .route(
                &format!("{profiles}/retrieve-qos-profiles"),
                post(retrieve_profiles),
            )
            .route(
                &format!("{profiles}/qos-profiles/{{name}}"),
                get(get_profile),
            )
            .route(&format!("{qod}/openapi.json"), get(qod_document))
            .route(&format!("{profiles}/openapi.json"), get(profiles_document))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(self.clone(), edge))
            .with_state(self)
    }

    /// The caller, if its token grants `scope`.
    fn caller(&self, headers: &HeaderMap, peer: Option<&Peer>, scope: &str) -> Outcome<Caller> {
        let principal = self.0.auth.admit(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            || peer.and_then(|p| p.certificate.as_deref().cloned()),
        )?;
        tracing::Span::current().record("client", principal.caller.client.as_str());
        Ok(principal.require(scope)?.clone())
    }

    /// The request's JSON body as `T`: `application/json`, bounded in size and in time.
    async fn body<T: DeserializeOwned>(&self, headers: &HeaderMap, body: Body) -> Outcome<T> {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(CamaraError::invalid(
                "Content-Type",
                "the request body must be sent as application/json",
            )
            .into());
        }
        // The edge has read it already (bounded in size and time).
        let bytes = axum::body::to_bytes(body, self.0.max_body)
            .await
            .map_err(|e| CamaraError::invalid("body", format!("cannot be read ({e})")))?;
        Ok(wire::decode(&bytes)?)
    }

    /// A request's whole body, at most `max_body` bytes, within `body_timeout`.
    async fn read_body(&self, body: Body) -> Result<axum::body::Bytes, CamaraError> {
        let max = self.0.max_body;
        tokio::time::timeout(self.0.body_timeout, axum::body::to_bytes(body, max))
            .await
            .map_err(|_| {
                CamaraError::invalid(
                    "body",
                    format!(
                        "the request body did not arrive within {} ms",
                        self.0.body_timeout.as_millis()
                    ),
                )
            })?
            .map_err(|e| {
                CamaraError::invalid(
                    "body",
                    format!("the request body cannot be read or exceeds {max} bytes ({e})"),
                )
            })
    }
}

type Outcome<T> = Result<T, RestError>;

/// A path parameter, or INVALID_ARGUMENT naming it.
fn param(p: Result<Path<String>, PathRejection>, name: &str) -> Outcome<String> {
    p.map(|Path(v)| v)
        .map_err(|e| CamaraError::invalid(name, e.body_text()).into())
}

fn peer(req: &Request) -> Option<Peer> {
    req.extensions().get::<Peer>().cloned()
}

async fn create_session(State(rest): State<Rest>, req: Request) -> Reply {
    let peer = peer(&req);
    let (parts, body) = req.into_parts();
    let caller = rest.caller(&parts.headers, peer.as_ref(), scope::SESSIONS_CREATE)?;
    let msg: wire::CreateSession = rest.body(&parts.headers, body).await?;
    let info = rest.0.ops.create(&caller, msg.into_pb()?).await?;
    let location = format!(
        "{}/quality-on-demand/v1/sessions/{}",
        rest.0.api_root, info.session_id
    );
    let mut resp = json(StatusCode::CREATED, &wire::SessionInfo::from(info));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn get_session(
    State(rest): State<Rest>,
    id: Result<Path<String>, PathRejection>,
    req: Request,
) -> Reply {
    let caller = rest.caller(req.headers(), peer(&req).as_ref(), scope::SESSIONS_READ)?;
    let id = param(id, "sessionId")?;
    let info = rest.0.ops.get(&caller, &id, false).await?;
    Ok(json(StatusCode::OK, &wire::SessionInfo::from(info)))
}

async fn delete_session(
    State(rest): State<Rest>,
    id: Result<Path<String>, PathRejection>,
    req: Request,
) -> Reply {
    let caller = rest.caller(req.headers(), peer(&req).as_ref(), scope::SESSIONS_DELETE)?;
    let id = param(id, "sessionId")?;
    rest.0.ops.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn extend(
    State(rest): State<Rest>,
    id: Result<Path<String>, PathRejection>,
    req: Request,
) -> Reply {
    let peer = peer(&req);
    let (parts, body) = req.into_parts();
    let caller = rest.caller(&parts.headers, peer.as_ref(), scope::SESSIONS_UPDATE)?;
    let id = param(id, "sessionId")?;
    let msg: wire::ExtendSessionDuration = rest.body(&parts.headers, body).await?;
    let info = rest
        .0
        .ops
        .extend(&caller, &id, msg.requested_additional_duration.into())
        .await?;
    Ok(json(StatusCode::OK, &wire::SessionInfo::from(info)))
}

async fn retrieve_sessions(State(rest): State<Rest>, req: Request) -> Reply {
    let peer = peer(&req);
    let (parts, body) = req.into_parts();
    let caller = rest.caller(
        &parts.headers,
        peer.as_ref(),
        scope::SESSIONS_RETRIEVE_BY_DEVICE,
    )?;
    let msg: wire::RetrieveSessionsInput = rest.body(&parts.headers, body).await?;
    let device = msg.device.map(Into::into);
    let sessions: Vec<wire::SessionInfo> = rest
        .0
        .ops
        .retrieve(&caller, device.as_ref())
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, &sessions))
}

async fn retrieve_profiles(State(rest): State<Rest>, req: Request) -> Reply {
    let peer = peer(&req);
    let (parts, body) = req.into_parts();
    let caller = rest.caller(&parts.headers, peer.as_ref(), scope::PROFILES_READ)?;
    let msg: wire::QosProfileDeviceRequest = rest.body(&parts.headers, body).await?;
    let profiles: Vec<wire::QosProfile> = rest
        .0
        .ops
        .retrieve_profiles(&caller, &msg.into())?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, &profiles))
}

async fn get_profile(
    State(rest): State<Rest>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Reply {
    let caller = rest.caller(req.headers(), peer(&req).as_ref(), scope::PROFILES_READ)?;
    let name = param(name, "name")?;
    let profile = rest.0.ops.get_profile(&caller, &name)?;
    Ok(json(StatusCode::OK, &wire::QosProfile::from(profile)))
}

async fn qod_document(State(rest): State<Rest>, req: Request) -> Response {
    let base = base_url(&rest, &req);
    json(StatusCode::OK, &rest.0.docs.quality_on_demand(&base))
}

async fn profiles_document(State(rest): State<Rest>, req: Request) -> Response {
    let base = base_url(&rest, &req);
    json(StatusCode::OK, &rest.0.docs.qos_profiles(&base))
}

/// `apiRoot` as this request reached it: the configured public URL, else the scheme and the
/// request's host.
fn base_url(rest: &Rest, req: &Request) -> String {
    if let Some(url) = rest.0.docs.public_url() {
        return url.to_owned();
    }
    let tls = peer(req).is_some_and(|p| p.tls);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    format!(
        "{}://{host}{}",
        if tls { "https" } else { "http" },
        rest.0.api_root
    )
}

async fn not_found(req: Request) -> RestError {
    CamaraError::new(
        CamaraCode::NotFound,
        format!(
            "no such resource: {}",
            crate::error::sanitized(req.uri().path(), 256)
        ),
    )
    .into()
}

async fn method_not_allowed(req: Request) -> Response {
    let mut resp = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &wire::ErrorInfo {
            status: 405,
            code: "METHOD_NOT_ALLOWED",
            message: format!("{} is not served on this path", req.method()),
        },
    );
    resp.extensions_mut().insert(Reason("METHOD_NOT_ALLOWED"));
    resp
}

/// CAMARA's operationId of a route, for spans and metrics.
fn operation(method: &axum::http::Method, route: Option<&str>) -> &'static str {
    use axum::http::Method;
    let Some(route) = route else {
        return "unknown";
    };
    let m = method.clone();
    match () {
        () if route.ends_with("/sessions/{sessionId}/extend") => "extendQosSessionDuration",
        () if route.ends_with("/sessions/{sessionId}") && m == Method::GET => "getSession",
        () if route.ends_with("/sessions/{sessionId}") && m == Method::DELETE => "deleteSession",
        () if route.ends_with("/sessions") => "createSession",
        () if route.ends_with("/retrieve-sessions") => "retrieveSessionsByDevice",
        () if route.ends_with("/retrieve-qos-profiles") => "retrieveQoSProfiles",
        () if route.ends_with("/qos-profiles/{name}") => "getQosProfile",
        () if route.ends_with("/openapi.json") => "openapi",
        () => "unknown",
    }
}

/// Every request: its body read whole first, `x-correlator` checked and echoed, the call's
/// span opened (as gRPC's `rpc` span), the call counted.
///
/// The body is read whatever the answer will be: an HTTP/1.1 connection whose request body was
/// left unread cannot carry the next request, so hyper closes it, and a client that sent its next
/// request at once finds the connection gone under it. A body too large or too slow to read is
/// refused with `Connection: close`.
async fn edge(
    State(rest): State<Rest>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let corr = req
        .headers()
        .get(correlator::HEADER)
        .filter(|v| correlator::valid(v.as_bytes()))
        .cloned();
    let invalid_corr = corr.is_none() && req.headers().contains_key(correlator::HEADER);
    let op = operation(req.method(), matched.as_ref().map(MatchedPath::as_str));
    let span = tracing::info_span!(
        "rpc",
        method = format!("rest/{op}"),
        correlator = corr.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
        client = tracing::field::Empty,
        session = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let mut resp = async {
        let (parts, body) = req.into_parts();
        let bytes = match rest.read_body(body).await {
            Ok(b) => b,
            Err(e) => {
                let mut resp = RestError(e).into_response();
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        if invalid_corr {
            // The invalid value is not echoed back.
            return RestError(CamaraError::invalid(
                correlator::HEADER,
                "must match ^[a-zA-Z0-9-_:;./<>{}]{0,256}$",
            ))
            .into_response();
        }
        next.run(Request::from_parts(parts, Body::from(bytes)))
            .await
    }
    .instrument(span)
    .await;
    let reason = resp.extensions().get::<Reason>().map_or("", |r| r.0);
    crate::metrics::observe_rest(op, resp.status().as_u16(), reason, started.elapsed());
    if let Some(v) = corr {
        resp.headers_mut().insert(correlator::HEADER, v);
    }
    resp
}
