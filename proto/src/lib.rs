//! Generated gRPC code for the qod API (`qod.v1`).

/// `qod.v1`: sessions, QoS profiles and their shared types.
pub mod v1 {
    tonic::include_proto!("qod.v1");
}

/// Encoded `FileDescriptorSet` of `qod.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qod_descriptor");

/// Connecting to `qodd`.
pub mod client {
    use hyper_util::rt::TokioIo;
    use tonic::transport::{Channel, Endpoint};

    /// Opens a channel to `addr`: `unix:/path/to.sock`, `host:port`, or an `http://` URL.
    pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(path) = addr.strip_prefix("unix:") {
            let path = path.to_owned();
            // The URI is required by the API but unused: the connector below picks the socket.
            Endpoint::from_static("http://qodd.local")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
        } else if addr.contains("://") {
            Endpoint::from_shared(addr.to_owned())?.connect().await
        } else {
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
    }
}
