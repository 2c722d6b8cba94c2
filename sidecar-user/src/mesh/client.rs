//! The originating half of the mesh protocol: the mTLS handshake with a peer sidecar
//! (our ALPN, a certificate from the bundle), the check that the server is a workload
//! the destination may be served by, and the peer's status byte.

use std::{net::SocketAddr, sync::Arc};

use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{ALPN, peer_policy::PeerPolicy, server_identity::Expected, status};
use crate::tls::{
    IdentityMatcher, SpiffeId,
    read_ahead::ReadAhead,
    rustls_config::{peer_identity, resumed_with_expired_certificate},
};

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

/// Why the mesh protocol failed with a peer. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
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

/// The handshake over `tcp` (connected to `dst`), the identity checks and the peer's
/// status byte.
pub async fn handshake(
    dst: SocketAddr,
    tcp: TcpStream,
    mesh: MeshTarget<'_>,
) -> Result<(TlsStream<ReadAhead>, SpiffeId), MeshError> {
    let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
    let mut tls = mesh
        .client
        .tls
        .connect(name, ReadAhead::new(tcp))
        .await
        .map_err(|e| MeshError::Tls(dst, e.to_string()))?;
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(MeshError::Tls(
            dst,
            "the server is not a sidecar (no sidecar-mtls/1 ALPN)".into(),
        ));
    }
    let Some(id) = peer_identity(conn) else {
        return Err(MeshError::Tls(
            dst,
            "the server certificate has no SPIFFE ID".into(),
        ));
    };
    if let Some(reason) = resumed_with_expired_certificate(conn) {
        return Err(MeshError::Tls(dst, reason));
    }
    // Before any application byte: the server must be a workload the destination
    // may be served by, not merely a member of the mesh.
    if let Err(expected) = mesh
        .client
        .policy
        .check_server(dst.ip(), &id, mesh.expected)
    {
        return Err(MeshError::WrongIdentity {
            addr: dst,
            got: Box::new(id),
            expected: Box::new(expected),
        });
    }
    let mut byte = [0u8; 1];
    match tls.read_exact(&mut byte).await {
        Ok(_) if byte[0] == status::READY => Ok((tls, id)),
        Ok(_) => Err(MeshError::AppRefused(dst)),
        // The peer closed (or reset) without a status: its app was not reached.
        Err(_) => Err(MeshError::AppRefused(dst)),
    }
}
