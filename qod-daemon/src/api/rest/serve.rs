//! The REST listener: the same connection limits as gRPC (`listener::incoming`), TLS with the
//! node's certificate (and client certificates when configured), HTTP/1.1 and HTTP/2 (ALPN),
//! headers within the request timeout, and a graceful drain at shutdown.

use std::{sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use super::Peer;
use crate::{
    config::TlsSettings,
    listener::{self, CONNECTIONS, ConnectionLimits},
};

/// Why the REST side's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS certificate or key cannot be read: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("the TLS configuration is refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the client CA cannot be used: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

/// rustls' server side from the node's TLS settings (the ones gRPC uses), offering HTTP/2 and
/// HTTP/1.1.
pub fn tls_config(tls: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots.add(c?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if tls.client_auth_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build()?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `stop`, then gives requests in flight up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    request_timeout: Duration,
    stop: CancellationToken,
    grace: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let http = Arc::new(http);
    let graceful = GracefulShutdown::new();
    let mut incoming = listener::incoming(listener, limits, stop.clone());
    while let Some(conn) = tokio::select! {
        () = stop.cancelled() => None,
        c = incoming.next() => c,
    } {
        let Ok(conn) = conn else { continue };
        let (acceptor, app, http, watcher) = (
            acceptor.clone(),
            app.clone(),
            http.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                let service = service(app, Peer::default());
                let conn = http.serve_connection_with_upgrades(TokioIo::new(conn), service);
                ended(watcher.watch(conn.into_owned()).await);
                return;
            };
            let stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(conn)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(error = %e, "REST TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        CONNECTIONS
                            .handshake_timeouts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        debug!("REST connection closed: TLS handshake timed out");
                        return;
                    }
                };
            let peer = Peer {
                certificate: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(c.as_ref().to_vec())),
                tls: true,
            };
            let service = service(app, peer);
            let conn = http.serve_connection_with_upgrades(TokioIo::new(stream), service);
            ended(watcher.watch(conn.into_owned()).await);
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "REST requests still in flight after the grace period"
        );
    }
}

/// A connection's end. A client that went away, sent what is not HTTP or sat idle past the
/// request timeout (HTTP/1.1 keep-alive connections are closed then) is logged at debug.
fn ended(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        debug!(error = %e, "REST connection ended with an error");
    }
}

/// The router as hyper's service, with the connection's [`Peer`] in every request.
fn service(
    app: axum::Router,
    peer: Peer,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send,
> {
    hyper_util::service::TowerToHyperService::new(app.map_request(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req.map(axum::body::Body::new)
        },
    ))
}
