//! The terminating half of HBONE: the mTLS handshake (a client certificate from the
//! bundle is required), the HTTP/2 handshake, and what each `CONNECT` asks for. Who
//! may connect, and delivering the stream, are the proxy's (per stream: a peer not
//! allowed gets 401, an application that refuses 503).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::Settings;
use crate::{
    mesh::PeerIdentity,
    tls::{
        read_ahead::ReadAhead,
        rustls_config::{peer_identity, resumed_with_expired_certificate},
    },
};

/// An inbound HTTP/2 connection.
pub type Connection = h2::server::Connection<TlsStream<ReadAhead>, Bytes>;

/// Why a client failed the handshakes.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Bad, expired or missing certificate, no SPIFFE ID, a broken handshake, ...
    #[error("mTLS handshake failed: {0}")]
    Tls(String),
    /// The HTTP/2 preface or settings were wrong.
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(String),
    /// The handshakes did not finish within their budget.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
}

/// Terminates mTLS and HTTP/2 from a client within `budget`: the connection, who
/// the client proved to be, and when its certificate expires (seconds since the
/// epoch).
pub async fn handshake(
    acceptor: &TlsAcceptor,
    client: TcpStream,
    settings: &Settings,
    budget: Duration,
) -> Result<(Connection, PeerIdentity, i64), HandshakeError> {
    let started = std::time::Instant::now();
    let both = async {
        let tls = acceptor
            .accept(ReadAhead::new(client))
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let (_, conn) = tls.get_ref();
        let Some(id) = peer_identity(conn) else {
            return Err(HandshakeError::Tls(
                "the peer certificate has no SPIFFE ID".into(),
            ));
        };
        if let Some(reason) = resumed_with_expired_certificate(conn) {
            return Err(HandshakeError::Tls(reason));
        }
        // rustls verified the chain at this moment; its leaf says until when.
        let not_after = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf.as_ref()).ok())
            .map(|(_, leaf)| leaf.validity().not_after.timestamp())
            .ok_or_else(|| HandshakeError::Tls("the peer certificate has no expiry".into()))?;
        let connection = settings
            .server()
            .handshake(tls)
            .await
            .map_err(|e| HandshakeError::Http2(e.to_string()))?;
        Ok((connection, id, not_after))
    };
    let (connection, id, not_after) = tokio::time::timeout(budget, both)
        .await
        .map_err(|_| HandshakeError::Timeout(budget))??;
    let peer = PeerIdentity {
        id,
        handshake: Some(started.elapsed()),
    };
    Ok((connection, peer, not_after))
}

/// A request that cannot be served, and the status that says so.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Reject {
    /// 400 for a malformed request, 401, 503.
    pub status: StatusCode,
    /// Why, for the log.
    pub reason: String,
}

impl Reject {
    /// A 400.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// Where a `CONNECT` goes: its `:authority`, which must be an `ip:port` of the
/// address the connection arrived on (`local`). Anything else is a 400.
pub fn target(request: &Request<RecvStream>, local: IpAddr) -> Result<SocketAddr, Reject> {
    if request.method() != Method::CONNECT {
        return Err(Reject::bad_request(format!(
            "method {} (only CONNECT)",
            request.method()
        )));
    }
    let Some(authority) = request.uri().authority() else {
        return Err(Reject::bad_request("no :authority"));
    };
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Reject::bad_request(format!("authority {authority} is not ip:port")))?;
    let ip = target.ip().to_canonical();
    if ip != local.to_canonical() {
        return Err(Reject::bad_request(format!(
            "authority {target} is not this pod's address {local}"
        )));
    }
    Ok(SocketAddr::new(ip, target.port()))
}

/// Answers a request with `status` and no body: an error ends the stream.
pub fn respond(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
) -> Result<SendStream<Bytes>, h2::Error> {
    let response = Response::builder()
        .status(status)
        .body(())
        .map_err(|_| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
    respond.send_response(response, status != StatusCode::OK)
}
