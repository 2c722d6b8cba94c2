//! Opening the upstream side of a connection: plain TCP, or a stream over the mesh
//! protocol's client half ([`crate::mesh::client`]) to a peer sidecar.

use std::{io, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use tokio::{
    net::{TcpSocket, TcpStream},
    time::Instant,
};

use crate::{
    mesh::{
        MeshError, MeshTarget, PeerIdentity, client,
        hbone::{H2Stream, tunnel::SharedSocket},
    },
    proxy::{
        CloseReason, Direction,
        socket_opts::{self, DeadPeer},
    },
};

/// The connected side: a plain socket, or an HBONE stream to a peer sidecar.
pub enum Upstream {
    /// Plain TCP.
    Plain(TcpStream),
    /// A stream on a pooled HBONE connection.
    Hbone(Box<H2Stream>),
}

/// Why an upstream could not be opened. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The budget ran out.
    #[error("connecting to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Refused, unreachable, ...
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    /// The mesh protocol with the peer sidecar failed.
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

// === impl Upstream ===

impl Upstream {
    /// The socket of this connection alone, when it has one (an HBONE stream shares
    /// its connection's).
    pub fn own_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Upstream::Plain(tcp) => Some(tcp.as_raw_fd()),
            Upstream::Hbone(_) => None,
        }
    }

    /// The socket of the pooled connection carrying this one (an HBONE stream).
    pub fn shared_socket(&self) -> Option<std::sync::Arc<SharedSocket>> {
        match self {
            Upstream::Plain(_) => None,
            Upstream::Hbone(stream) => stream.socket.clone(),
        }
    }

    /// Resets this connection: a TCP reset, or a stream reset.
    pub fn reset(&mut self) {
        match self {
            Upstream::Plain(tcp) => {
                let _ = tcp.set_zero_linger();
            }
            Upstream::Hbone(stream) => stream.reset(),
        }
    }
}

// === impl UpstreamError ===

impl UpstreamError {
    /// The close reason recorded when this ends the connection.
    pub fn reason(&self) -> CloseReason {
        match self {
            UpstreamError::Timeout(..) => CloseReason::Timeout,
            UpstreamError::Connect(..)
            | UpstreamError::Mesh(MeshError::AppRefused(_) | MeshError::Connect(..)) => {
                CloseReason::Refused
            }
            UpstreamError::Mesh(MeshError::Tls(..) | MeshError::Protocol(..)) => {
                CloseReason::HandshakeFailed
            }
            UpstreamError::Mesh(MeshError::Denied(_) | MeshError::Rejected(..)) => {
                CloseReason::PolicyDenied
            }
            UpstreamError::Mesh(MeshError::WrongIdentity { .. }) => CloseReason::IdentityMismatch,
        }
    }
}

/// Connects to `dst` before `deadline`, over HBONE when `mesh` says so (`client`, the
/// application's address, is sent along). Outbound sockets get `dead_peer`'s
/// keepalive and user timeout (when given); HBONE connections PING instead. Inbound, the
/// delivery to the application comes from [`DELIVERY_SOURCE_V4`] (IPv4) or the pod
/// IP itself (IPv6), which `sk_lookup` never steers back into the proxy.
pub async fn open(
    dst: SocketAddr,
    direction: Direction,
    deadline: Instant,
    mesh: Option<MeshTarget<'_>>,
    dead_peer: Option<&DeadPeer>,
    client: Option<SocketAddr>,
) -> Result<(Upstream, Option<PeerIdentity>), UpstreamError> {
    let budget = deadline.saturating_duration_since(Instant::now());
    if let Some(mesh) = mesh {
        return match tokio::time::timeout_at(deadline, client::connect(dst, mesh, client)).await {
            Ok(Ok((stream, server))) => Ok((Upstream::Hbone(Box::new(stream)), Some(server))),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(UpstreamError::Timeout(dst, budget)),
        };
    }
    let tcp = match tokio::time::timeout_at(deadline, tcp_connect(dst, direction)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(UpstreamError::Connect(dst, e)),
        Err(_) => return Err(UpstreamError::Timeout(dst, budget)),
    };
    if let Some(dead_peer) = dead_peer {
        dead_peer.apply(&tcp);
    }
    Ok((Upstream::Plain(tcp), None))
}

async fn tcp_connect(dst: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    let stream = connect_from(dst, direction).await?;
    // Small messages must not wait for a delayed ACK.
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
