//! The terminating half of the mesh protocol: recognising a peer sidecar's offer, the
//! handshake with the checks on who the client is, and telling it whether the
//! application took the connection.

use std::time::Duration;

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::debug;

use super::{ALPN, PeerIdentity, peer_policy::PeerPolicy, status};
use crate::tls::{
    SpiffeId,
    read_ahead::ReadAhead,
    rustls_config::{peer_identity, resumed_with_expired_certificate},
};

/// Why a client failed the server half's handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Bad, expired or missing certificate, no SPIFFE ID, a broken handshake, ...
    #[error("mTLS handshake failed: {0}")]
    Failed(String),
    /// The handshake did not finish within its budget.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// The client's identity is not on the allow-list.
    #[error("peer {0} is not allowed by inbound.allow (empty: the local trust domain only)")]
    NotAllowed(SpiffeId),
}

/// Terminates mTLS from a client sidecar within `budget` and checks who it is. On
/// failure the socket comes back with the reason (when it still exists), so the
/// caller can reset it.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    client: TcpStream,
    budget: Duration,
    peers: &PeerPolicy,
) -> Result<(Box<TlsStream<ReadAhead>>, PeerIdentity), (HandshakeError, Option<TcpStream>)> {
    let started = std::time::Instant::now();
    let accept = acceptor.accept(ReadAhead::new(client)).into_fallible();
    let tls = match tokio::time::timeout(budget, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, io))) => {
            return Err((HandshakeError::Failed(e.to_string()), Some(io.into_inner())));
        }
        Err(_) => return Err((HandshakeError::Timeout(budget), None)),
    };
    let refuse =
        |tls: TlsStream<ReadAhead>, error| Err((error, Some(tls.into_inner().0.into_inner())));
    let Some(id) = peer_identity(tls.get_ref().1) else {
        return refuse(
            tls,
            HandshakeError::Failed("the peer certificate has no SPIFFE ID".into()),
        );
    };
    if let Some(reason) = resumed_with_expired_certificate(tls.get_ref().1) {
        return refuse(tls, HandshakeError::Failed(reason));
    }
    if !peers.allows_client(&id) {
        return refuse(tls, HandshakeError::NotAllowed(id));
    }
    let peer = PeerIdentity {
        id,
        handshake: started.elapsed(),
    };
    Ok((Box::new(tls), peer))
}

/// Whether a ClientHello's ALPN list offers the mesh protocol.
pub fn offers_mesh<'a>(mut protocols: impl Iterator<Item = &'a [u8]>) -> bool {
    protocols.any(|p| p == ALPN)
}

/// Sends the status byte: whether the application took the connection. A client
/// sidecar waits for it before sending anything; one that already left is only logged.
pub async fn send_status<S: AsyncWrite + Unpin>(tls: &mut S, app_accepted: bool) {
    let byte = if app_accepted {
        status::READY
    } else {
        status::APP_REFUSED
    };
    let sent = async {
        tls.write_all(&[byte]).await?;
        tls.flush().await
    };
    if let Err(error) = sent.await {
        debug!(%error, "peer sidecar left before the status byte");
    }
}
