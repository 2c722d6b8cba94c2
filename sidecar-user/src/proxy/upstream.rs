//! Opening the upstream side of a connection: plain TCP, or mTLS to a peer sidecar
//! (our ALPN, a certificate from the bundle, optionally an expected identity, then the
//! peer's status byte saying whether its application took the connection).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::AsyncReadExt,
    net::{TcpSocket, TcpStream},
    time::Instant,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{
    metrics::{CloseReason, Direction},
    proxy::{
        peer_policy::PeerPolicy,
        read_ahead::ReadAhead,
        server_identity::Expected,
        socket_opts::{self, DeadPeer},
    },
    tls::{
        ALPN, IdentityMatcher, SpiffeId,
        rustls_config::{peer_identity, resumed_with_expired_certificate},
        status,
    },
};

/// The connected side: a plain socket, or mTLS originated over one.
pub enum Upstream {
    /// Plain TCP.
    Plain(TcpStream),
    /// mTLS to a sidecar.
    Tls(Box<TlsStream<ReadAhead>>),
}

/// mTLS to a peer sidecar: who it is and how long the handshake took.
pub type PeerTls = (SpiffeId, Duration);

/// Why an upstream could not be opened. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The budget ran out.
    #[error("connecting to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Refused, unreachable, ...
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    /// The mTLS handshake failed or the server is not a sidecar.
    #[error("mTLS to {0}: {1}")]
    Tls(SocketAddr, String),
    /// The server's identity is not one the destination may be served by.
    #[error("mTLS to {addr}: server identity {got} is refused: expected {expected}")]
    WrongIdentity {
        /// The server's address.
        addr: SocketAddr,
        /// The identity it presented.
        got: Box<SpiffeId>,
        /// What it had to be.
        expected: Box<Expected>,
    },
    /// The peer sidecar could not reach its application.
    #[error("{0}: the peer sidecar's application refused the connection")]
    AppRefused(SocketAddr),
}

/// Originates mTLS to peer sidecars and decides whether the one that answered may
/// serve the destination.
#[derive(Clone)]
pub struct MeshConnector {
    /// Originates mTLS with the current identity.
    pub tls: TlsConnector,
    /// Which identities may serve which destinations (live).
    pub policy: Arc<PeerPolicy>,
}

/// How to reach a destination over mTLS.
#[derive(Clone, Copy)]
pub struct MeshTarget<'a> {
    /// The connector and identity rules.
    pub client: &'a MeshConnector,
    /// The identity the server must have, when the service names one.
    pub expected: Option<&'a IdentityMatcher>,
}

// === impl Upstream ===

impl Upstream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(tcp) => tcp,
            Upstream::Tls(tls) => tls.get_ref().0.tcp(),
        }
    }
}

// === impl UpstreamError ===

impl UpstreamError {
    /// The close reason recorded when this ends the connection.
    pub fn reason(&self) -> CloseReason {
        match self {
            UpstreamError::Timeout(..) => CloseReason::Timeout,
            UpstreamError::Connect(..) | UpstreamError::AppRefused(_) => CloseReason::Refused,
            UpstreamError::Tls(..) => CloseReason::HandshakeFailed,
            UpstreamError::WrongIdentity { .. } => CloseReason::IdentityMismatch,
        }
    }
}

/// Connects to `dst` before `deadline`, over mTLS when `mesh` says so. Outbound
/// sockets get `dead_peer`'s keepalive and user timeout (when given). Inbound, the
/// delivery to the application comes from [`DELIVERY_SOURCE_V4`] (IPv4) or the pod
/// IP itself (IPv6), which `sk_lookup` never steers back into the proxy.
pub async fn open(
    dst: SocketAddr,
    direction: Direction,
    deadline: Instant,
    mesh: Option<MeshTarget<'_>>,
    dead_peer: Option<&DeadPeer>,
) -> Result<(Upstream, Option<PeerTls>), UpstreamError> {
    let budget = deadline.saturating_duration_since(Instant::now());
    let tcp = match tokio::time::timeout_at(deadline, tcp_connect(dst, direction)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(UpstreamError::Connect(dst, e)),
        Err(_) => return Err(UpstreamError::Timeout(dst, budget)),
    };
    if let Some(dead_peer) = dead_peer {
        dead_peer.apply(&tcp);
    }
    let Some(mesh) = mesh else {
        return Ok((Upstream::Plain(tcp), None));
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout_at(deadline, handshake(dst, tcp, mesh)).await {
        Ok(Ok((tls, id))) => Ok((Upstream::Tls(Box::new(tls)), Some((id, started.elapsed())))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout(dst, budget)),
    }
}

async fn tcp_connect(dst: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    let stream = connect_from(dst, direction).await?;
    // Before the handshake: small TLS records (Finished, the status byte) must not
    // wait for a delayed ACK.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Source address of inbound deliveries over IPv4, as Istio uses it: a loopback
/// address, so the delivery socket's TIME_WAIT (it closes first whenever the remote
/// client does) can be reused after a second (`tcp_tw_reuse`'s default applies to
/// loopback), and not 127.0.0.1, which applications often trust as "this host".
pub const DELIVERY_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

async fn connect_from(dst: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    if direction == Direction::Outbound {
        return TcpStream::connect(dst).await;
    }
    // IPv6 has no loopback address but ::1, which applications trust like 127.0.0.1:
    // deliver from the pod IP there (the same-address rule of `sk_lookup`).
    let (socket, source) = match dst {
        SocketAddr::V4(_) => (TcpSocket::new_v4()?, DELIVERY_SOURCE_V4.into()),
        SocketAddr::V6(v6) => (TcpSocket::new_v6()?, std::net::IpAddr::V6(*v6.ip())),
    };
    // The port is chosen at connect, per 4-tuple, not reserved exclusively at bind:
    // only then can a port in TIME_WAIT be reused for the same destination.
    // (IP_BIND_ADDRESS_NO_PORT, Linux 4.2; an IPPROTO_IP option that IPv6 sockets honour.)
    socket_opts::set_int(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(dst).await
}

/// The handshake, the identity checks and the peer's status byte.
async fn handshake(
    dst: SocketAddr,
    tcp: TcpStream,
    mesh: MeshTarget<'_>,
) -> Result<(TlsStream<ReadAhead>, SpiffeId), UpstreamError> {
    let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
    let mut tls = mesh
        .client
        .tls
        .connect(name, ReadAhead::new(tcp))
        .await
        .map_err(|e| UpstreamError::Tls(dst, e.to_string()))?;
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(UpstreamError::Tls(
            dst,
            "the server is not a sidecar (no sidecar-mtls/1 ALPN)".into(),
        ));
    }
    let Some(id) = peer_identity(conn) else {
        return Err(UpstreamError::Tls(
            dst,
            "the server certificate has no SPIFFE ID".into(),
        ));
    };
    if let Some(reason) = resumed_with_expired_certificate(conn) {
        return Err(UpstreamError::Tls(dst, reason));
    }
    // Before any application byte: the server must be a workload the destination
    // may be served by, not merely a member of the mesh.
    if let Err(expected) = mesh
        .client
        .policy
        .check_server(dst.ip(), &id, mesh.expected)
    {
        return Err(UpstreamError::WrongIdentity {
            addr: dst,
            got: Box::new(id),
            expected: Box::new(expected),
        });
    }
    let mut byte = [0u8; 1];
    match tls.read_exact(&mut byte).await {
        Ok(_) if byte[0] == status::READY => Ok((tls, id)),
        Ok(_) => Err(UpstreamError::AppRefused(dst)),
        // The peer closed (or reset) without a status: its app was not reached.
        Err(_) => Err(UpstreamError::AppRefused(dst)),
    }
}
