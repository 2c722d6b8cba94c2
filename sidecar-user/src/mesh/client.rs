//! The originating half of the mesh protocol: a `CONNECT` stream to the destination
//! over a pooled HBONE connection ([`super::hbone::pool`]), once the server's proven
//! identity is one the destination may be served by; the response says whether the
//! peer's application took the connection.

use std::{net::SocketAddr, sync::Arc};

use http::{Method, Request, StatusCode};
use tracing::debug;

use super::server_identity::Required;
use super::{
    PeerIdentity,
    hbone::{H2Stream, Pool, metrics::Side},
    peer_policy::PeerPolicy,
    server_identity::Expected,
};
use crate::tls::SpiffeId;

/// Opens streams to peer sidecars and decides whether the one that answered may
/// serve the destination.
#[derive(Clone)]
pub struct MeshConnector {
    /// Pooled HBONE connections.
    pub pool: Arc<Pool>,
    /// Which identities may serve which destinations (live).
    pub policy: Arc<PeerPolicy>,
}

/// How to reach a destination over the mesh.
#[derive(Clone, Copy)]
pub struct MeshTarget<'a> {
    /// The connector and identity rules.
    pub client: &'a MeshConnector,
    /// The identity the server must have, when the service names one.
    pub expected: Option<Required<'a>>,
}

/// Why the mesh protocol failed with a peer. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The TCP connect to the peer's HBONE port failed.
    #[error("HBONE connect to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    /// The mTLS handshake failed or the server is not an HBONE server.
    #[error("mTLS to {0}: {1}")]
    Tls(SocketAddr, String),
    /// HTTP/2 failed (handshake, the connection went away, a malformed answer).
    #[error("HBONE to {0}: {1}")]
    Protocol(SocketAddr, String),
    /// The server's identity is not one the destination may be served by.
    #[error("mTLS to {addr}: server identity {got} is refused: expected {expected}")]
    WrongIdentity {
        /// The destination.
        addr: SocketAddr,
        /// The identity it presented.
        got: Box<SpiffeId>,
        /// What it had to be.
        expected: Box<Expected>,
    },
    /// The peer could not reach its application (HTTP 503).
    #[error("{0}: the peer's application refused the connection")]
    AppRefused(SocketAddr),
    /// The peer does not allow our identity (HTTP 401).
    #[error("{0}: the peer refused our identity (401)")]
    Denied(SocketAddr),
    /// The peer refused the request with another status (400: bad target).
    #[error("{0}: the peer answered {1}")]
    Rejected(SocketAddr, StatusCode),
}

/// Attempts on pooled connections that turn out to be closing (a GOAWAY raced the
/// checkout) before giving up.
const ATTEMPTS: usize = 2;

/// Opens a stream to `dst` (the address the application dialed: the peer's pod IP
/// and application port), after checking the server's identity. `client` is the
/// application's address, sent as `Forwarded: for=`.
pub async fn connect(
    dst: SocketAddr,
    mesh: MeshTarget<'_>,
    client: Option<SocketAddr>,
) -> Result<(H2Stream, PeerIdentity), MeshError> {
    let pool = &mesh.client.pool;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let (tunnel, send, slot, opened) = pool.checkout(dst.ip()).await?;
        // Before any byte: the server must be a workload the destination may be
        // served by, not merely a member of the mesh.
        if let Err(expected) =
            mesh.client
                .policy
                .check_server(dst.ip(), &tunnel.peer, mesh.expected)
        {
            return Err(MeshError::WrongIdentity {
                addr: dst,
                got: Box::new(tunnel.peer.clone()),
                expected: Box::new(expected),
            });
        }
        let request = connect_request(dst, client)?;
        let sent = async {
            let mut send = send.ready().await?;
            let (response, stream) = send.send_request(request, false)?;
            Ok::<_, h2::Error>((response.await?, stream))
        };
        match sent.await {
            Ok((response, send_stream)) => {
                let status = response.status();
                if status != StatusCode::OK {
                    pool.metrics().stream_refused(Side::Client, status.as_u16());
                    return Err(match status {
                        StatusCode::SERVICE_UNAVAILABLE => MeshError::AppRefused(dst),
                        StatusCode::UNAUTHORIZED => MeshError::Denied(dst),
                        other => MeshError::Rejected(dst, other),
                    });
                }
                let peer = PeerIdentity {
                    id: tunnel.peer.clone(),
                    handshake: opened.then(|| tunnel.handshake()),
                };
                let stream = H2Stream::new(send_stream, response.into_body(), Some(slot))
                    .with_socket(tunnel.socket().clone());
                return Ok((stream, peer));
            }
            // The connection is going away (GOAWAY, reset, I/O): never again, and
            // the stream was not processed, so another connection may take it.
            Err(error) if retryable(&error) => {
                debug!(%dst, %error, "pooled HBONE connection closing: retrying on a new one");
                pool.retire(&tunnel);
                last = Some(MeshError::Protocol(dst, error.to_string()));
            }
            Err(error) => {
                if error.is_io() || error.is_go_away() {
                    pool.retire(&tunnel);
                }
                return Err(MeshError::Protocol(dst, error.to_string()));
            }
        }
    }
    Err(last.unwrap_or_else(|| MeshError::Protocol(dst, "no connection".into())))
}

/// Whether a stream failed before the server processed it.
fn retryable(error: &h2::Error) -> bool {
    error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// `CONNECT <dst>` with `Forwarded: for="<client>"`, as ztunnel sends it.
fn connect_request(dst: SocketAddr, client: Option<SocketAddr>) -> Result<Request<()>, MeshError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string());
    if let Some(client) = client {
        request = request.header("forwarded", format!("for=\"{client}\""));
    }
    request
        .body(())
        .map_err(|e| MeshError::Protocol(dst, e.to_string()))
}
