//! CAMARA's `x-correlator`: validated on every request, echoed on every response (errors too).
//! The same layer gives tonic's own refusals (an oversized, undecodable or missing message) their
//! CAMARA form, and opens
//! the call's span (`rpc`: method, x-correlator; the client and session are recorded into it
//! once known), so every line logged while serving a call carries them.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::error::CamaraError;

pub const HEADER: &str = "x-correlator";

/// CAMARA's pattern `^[a-zA-Z0-9-_:;.\/<>{}]{0,256}$`.
pub fn valid(v: &[u8]) -> bool {
    v.len() <= 256
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:;./<>{}".contains(b))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CorrelatorLayer;

impl<S> Layer<S> for CorrelatorLayer {
    type Service = Correlator<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Correlator { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Correlator<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Correlator<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let corr: Option<HeaderValue> = req.headers().get(HEADER).cloned();
        if let Some(v) = &corr
            && !valid(v.as_bytes())
        {
            let status: tonic::Status =
                CamaraError::invalid(HEADER, "must match ^[a-zA-Z0-9-_:;./<>{}]{0,256}$").into();
            // The invalid value is not echoed back.
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let span = tracing::info_span!(
            "rpc",
            method = req.uri().path(),
            correlator = corr.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            client = tracing::field::Empty,
            session = tracing::field::Empty,
        );
        let path = req.uri().path().to_owned();
        let started = std::time::Instant::now();
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let mut resp = fut.await?;
                if let Some(status) = refused_by_tonic(resp.headers()) {
                    resp = status.into_http();
                }
                // An error is in the headers (a trailers-only response); success ends with OK
                // in the trailers. A stream counts when it opens.
                crate::metrics::observe_call(
                    &path,
                    tonic::Status::from_header_map(resp.headers()).as_ref(),
                    started.elapsed(),
                );
                if let Some(v) = corr {
                    resp.headers_mut().insert(HEADER, v);
                }
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

/// tonic refuses some requests before any handler runs, with bare statuses: a message over the
/// configured size (OUT_OF_RANGE), one that is not valid protobuf, and a unary call without a
/// message (both INTERNAL). Each is the client's fault and is answered as the CAMARA error it
/// is: INVALID_ARGUMENT, with its ErrorInfo.
fn refused_by_tonic(headers: &http::HeaderMap) -> Option<tonic::Status> {
    let status = tonic::Status::from_header_map(headers)?;
    let message = status.message();
    let refusal = match status.code() {
        tonic::Code::OutOfRange if message.contains("decoded message length too large") => {
            let detail = message.split_once("found ").map_or("", |(_, d)| d);
            format!("the request message is too large ({detail})")
        }
        tonic::Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            format!("the request message is not valid protobuf ({message})")
        }
        tonic::Code::Internal if message.starts_with("Missing request message") => {
            "the call carried no request message".to_owned()
        }
        _ => return None,
    };
    Some(CamaraError::invalid("request", refusal).into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tonic_refusals_become_invalid_argument() {
        use tonic_types::StatusExt as _;
        for status in [
            tonic::Status::internal("failed to decode Protobuf message: invalid wire type"),
            tonic::Status::internal("Missing request message."),
            tonic::Status::out_of_range("decoded message length too large: found 70000 bytes"),
        ] {
            let resp = status.into_http::<()>();
            let mapped = super::refused_by_tonic(resp.headers()).expect("mapped");
            assert_eq!(mapped.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                mapped.get_details_error_info().expect("info").reason,
                "INVALID_ARGUMENT"
            );
        }
        let internal = tonic::Status::internal("the store failed").into_http::<()>();
        assert!(super::refused_by_tonic(internal.headers()).is_none());
    }

    #[test]
    fn pattern() {
        assert!(super::valid(b"b4333c46-49c0-4f62-80d7-f0ef930f1c46"));
        assert!(super::valid(b""));
        assert!(super::valid(b"a:b;c./<>{}_-"));
        assert!(!super::valid(b"has space"));
        assert!(!super::valid(b"quote\""));
        assert!(!super::valid(&[b'a'; 257]));
    }
}
