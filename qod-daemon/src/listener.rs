//! The API's accept loop: connection limits in front of tonic.
//!
//! Every accepted connection holds one place of `max_connections` and one of its peer's
//! `max_connections_per_peer` until it closes; beyond either it is closed at once, so idle
//! connections cannot take the descriptors the daemon needs. A connection must send its first
//! bytes (a TLS ClientHello, or HTTP/2's preface) within the handshake timeout, and tonic bounds
//! the TLS handshake by the same timeout. `accept` failing for lack of descriptors (EMFILE,
//! ENFILE) backs off and carries on; it never ends the server and never touches sessions.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How many connections the API takes, and how long a new one may stay silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// For the first bytes, and for the whole TLS handshake.
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams (calls) one connection may hold.
    pub max_streams_per_connection: u32,
}

/// Descriptors kept for everything but API connections: the store, the eBPF maps and links, tc
/// and netlink, notification sinks, the metrics listener.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to what `limits` need (up to the hard limit) and returns the
/// limits that fit: when the hard limit is too low, `max_connections` shrinks to fit and a
/// warning says so.
pub fn fit_descriptors(limits: ConnectionLimits) -> ConnectionLimits {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = u64::from(limits.max_connections) + RESERVED_DESCRIPTORS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return limits;
    };
    let target = need.min(hard);
    if target > soft
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
    {
        warn!(error = %e, soft, hard, "cannot raise the descriptor limit");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((soft, hard));
    if soft >= need {
        return limits;
    }
    let fits = u32::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS).max(16)).unwrap_or(16);
    warn!(
        descriptors = soft,
        wanted = limits.max_connections,
        max_connections = fits,
        "the descriptor limit (RLIMIT_NOFILE) is too low for limits.max_connections; taking fewer connections"
    );
    ConnectionLimits {
        max_connections: fits,
        max_connections_per_peer: limits.max_connections_per_peer.min(fits),
        ..limits
    }
}

/// Connections refused, by reason, since start (for metrics).
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub open: AtomicU64,
    pub refused_total: AtomicU64,
    pub refused_per_peer: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub accept_errors: AtomicU64,
}

pub static CONNECTIONS: ConnectionStats = ConnectionStats {
    open: AtomicU64::new(0),
    refused_total: AtomicU64::new(0),
    refused_per_peer: AtomicU64::new(0),
    handshake_timeouts: AtomicU64::new(0),
    accept_errors: AtomicU64::new(0),
};

/// Open connections per peer address.
type Peers = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// An accepted connection; its places are given back when tonic drops it.
pub struct Limited<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
    peer: Option<(IpAddr, Peers)>,
}

impl<T> Drop for Limited<T> {
    fn drop(&mut self) {
        CONNECTIONS.open.fetch_sub(1, Ordering::Relaxed);
        if let Some((ip, peers)) = &self.peer {
            let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = peers.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(ip);
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A listening socket the accept loop can take connections from.
pub trait Listener: Send + 'static {
    type Io: Send + Sync + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Option<IpAddr>)>> + Send;
    /// Resolves when the connection is (perhaps spuriously) readable.
    fn readable(io: &Self::Io) -> impl Future<Output = io::Result<()>> + Send;
    /// Peeks one byte without blocking (`WouldBlock` clears the readiness).
    fn try_peek(io: &Self::Io) -> io::Result<usize>;
}

/// Waits until the connection has at least one byte to read (its first flight), without
/// consuming it: readiness alone can be spurious. Closed before sending anything is an error.
async fn first_bytes<L: Listener>(io: &L::Io) -> io::Result<()> {
    loop {
        L::readable(io).await?;
        match L::try_peek(io) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One byte peeked from a non-blocking socket (`MSG_PEEK`), or `WouldBlock`.
fn peek_fd(fd: std::os::fd::RawFd) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, Option<IpAddr>)> {
        let (s, peer) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Some(peer.ip())))
    }
    async fn readable(io: &TcpStream) -> io::Result<()> {
        io.readable().await
    }
    fn try_peek(io: &TcpStream) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        io.try_io(tokio::io::Interest::READABLE, || peek_fd(io.as_raw_fd()))
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, Option<IpAddr>)> {
        let (s, _) = UnixListener::accept(self).await?;
        Ok((s, None))
    }
    async fn readable(io: &UnixStream) -> io::Result<()> {
        io.readable().await
    }
    fn try_peek(io: &UnixStream) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        io.try_io(tokio::io::Interest::READABLE, || peek_fd(io.as_raw_fd()))
    }
}

/// Takes connections from `listener` under `limits` until `stop`; the stream is what tonic
/// serves.
pub fn incoming<L: Listener>(
    listener: L,
    limits: ConnectionLimits,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Limited<L::Io>>> {
    let (tx, rx) = mpsc::channel(64);
    let places = Arc::new(Semaphore::new(limits.max_connections as usize));
    let peers: Peers = Arc::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (io, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    CONNECTIONS.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let out_of_descriptors = matches!(
                        e.raw_os_error().map(nix::errno::Errno::from_raw),
                        Some(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)
                    );
                    warn!(error = %e, out_of_descriptors, "cannot accept a connection; backing off");
                    // The pending connection stays in the backlog and is taken once
                    // descriptors are free again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = places.clone().try_acquire_owned() else {
                CONNECTIONS.refused_total.fetch_add(1, Ordering::Relaxed);
                debug!(?peer, "connection refused: limits.max_connections reached");
                continue;
            };
            let peer = match peer {
                Some(ip) => {
                    let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
                    let n = map.entry(ip).or_insert(0);
                    if *n >= limits.max_connections_per_peer {
                        drop(map);
                        CONNECTIONS.refused_per_peer.fetch_add(1, Ordering::Relaxed);
                        debug!(%ip, "connection refused: limits.max_connections_per_peer reached");
                        continue;
                    }
                    *n += 1;
                    Some((ip, peers.clone()))
                }
                None => None,
            };
            CONNECTIONS.open.fetch_add(1, Ordering::Relaxed);
            let conn = Limited {
                io,
                _permit: permit,
                peer,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, first_bytes::<L>(&conn.io))
                    .await
                {
                    Ok(Ok(())) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(_)) => {}
                    Err(_) => {
                        CONNECTIONS
                            .handshake_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        debug!("connection closed: nothing sent within the handshake timeout");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
