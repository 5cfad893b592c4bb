//! Generated gRPC code for the qod API (`qod.v1`).

/// `qod.v1`: sessions, QoS profiles and their shared types.
pub mod v1 {
    tonic::include_proto!("qod.v1");
}

/// Encoded `FileDescriptorSet` of `qod.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qod_descriptor");

/// Connecting to `qodd`: over TCP or a Unix socket, plain or TLS (optionally with a client
/// certificate), with a bearer access token on every call.
pub mod client {
    use hyper_util::rt::TokioIo;
    use tonic::{
        Request, Status,
        metadata::{Ascii, MetadataValue},
        service::{Interceptor, interceptor::InterceptedService},
        transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    };

    /// What a connection needs beyond the address.
    #[derive(Clone, Debug, Default)]
    pub struct Options {
        /// The access token sent as `authorization: Bearer …` on every call.
        pub token: Option<String>,
        /// PEM CA certificates that verify the server: with them the channel uses TLS.
        pub ca_pem: Option<Vec<u8>>,
        /// PEM client certificate chain and private key, for mutual TLS.
        pub identity: Option<(Vec<u8>, Vec<u8>)>,
        /// The name the server's certificate must carry; default: the address's host, or
        /// `localhost` for a Unix socket.
        pub server_name: Option<String>,
    }

    /// Adds the bearer token to each call.
    #[derive(Clone, Debug)]
    pub struct Bearer(Option<MetadataValue<Ascii>>);

    impl Interceptor for Bearer {
        fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
            if let Some(v) = &self.0 {
                request.metadata_mut().insert("authorization", v.clone());
            }
            Ok(request)
        }
    }

    /// A channel to `qodd` that carries the caller's token.
    pub type QodChannel = InterceptedService<Channel, Bearer>;

    /// Why a connection could not be opened.
    pub type Error = Box<dyn std::error::Error + Send + Sync>;

    /// Opens a channel to `addr`: `unix:/path/to.sock`, `host:port`, or an `http://` /
    /// `https://` URL. TLS is used when `options.ca_pem` is set or the URL is `https://`.
    pub async fn connect(addr: &str, options: &Options) -> Result<QodChannel, Error> {
        connect_via(addr, options, None).await
    }

    /// Opens a TCP connection for a channel (e.g. from inside another network namespace).
    pub type Dial = std::sync::Arc<
        dyn Fn() -> std::pin::Pin<
                Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>,
            > + Send
            + Sync,
    >;

    /// As [`connect`]; a TCP address is reached through `dial` when given.
    pub async fn connect_via(
        addr: &str,
        options: &Options,
        dial: Option<Dial>,
    ) -> Result<QodChannel, Error> {
        let bearer = Bearer(
            options
                .token
                .as_deref()
                .map(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())))
                .transpose()
                .map_err(|_| "the access token contains characters not allowed in a header")?,
        );
        let tls = options.ca_pem.is_some() || addr.starts_with("https://");
        let scheme = if tls { "https" } else { "http" };
        let (unix, url) = match addr.strip_prefix("unix:") {
            Some(path) => (Some(path.to_owned()), format!("{scheme}://localhost")),
            None if addr.contains("://") => (None, addr.to_owned()),
            None => (None, format!("{scheme}://{addr}")),
        };
        let mut endpoint = Endpoint::from_shared(url)?;
        if tls {
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = &options.ca_pem {
                config = config.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            let name = options.server_name.clone().or_else(|| {
                let host = endpoint.uri().host().unwrap_or("localhost");
                Some(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
            });
            if let Some(name) = name {
                config = config.domain_name(name);
            }
            endpoint = endpoint.tls_config(config)?;
        }
        let channel = match unix {
            // The URI only names the TLS server; the connector picks the socket.
            Some(path) => {
                endpoint
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
                    .await?
            }
            None => match dial {
                Some(dial) => {
                    endpoint
                        .connect_with_connector(tower::service_fn(move |_| {
                            let dial = dial.clone();
                            async move { dial().await.map(TokioIo::new) }
                        }))
                        .await?
                }
                None => endpoint.connect().await?,
            },
        };
        Ok(InterceptedService::new(channel, bearer))
    }
}
