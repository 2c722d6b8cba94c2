//! Inbound policy: per port, `disabled` passes bytes through, `permissive` terminates
//! mTLS from sidecars and passes anything else through, `strict` accepts only mTLS from
//! a sidecar whose SPIFFE ID the allow-list admits. A refused peer is reset and
//! nothing reaches the application.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{Config, InboundMode},
    mesh::{
        peer_policy::PeerPolicy,
        server::{HandshakeError, handshake},
    },
    proxy::{
        CloseReason,
        conn::Downstream,
        detect::{Detected, detect},
    },
    tls::SpiffeId,
};

/// What inbound connections must be, per port.
pub struct InboundPolicy {
    default_mode: InboundMode,
    port_modes: BTreeMap<u16, InboundMode>,
    /// Who may connect (`inbound.allow`, live).
    peers: Arc<PeerPolicy>,
    detect_timeout: Duration,
    acceptor: Option<TlsAcceptor>,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A strict port got something other than mTLS from a sidecar.
    #[error("strict port: the client did not start sidecar mTLS ({0:?})")]
    NotMtls(Detected),
    /// The client sent nothing (or not enough) in time.
    #[error("no ClientHello or bytes within {0:?}")]
    Silent(Duration),
    /// The client closed before sending anything.
    #[error("the client closed before sending anything")]
    Closed,
    /// The TLS handshake failed (bad, expired or missing certificate, ...).
    #[error("mTLS handshake failed: {0}")]
    Handshake(String),
    /// The peer's identity is not on the allow-list.
    #[error("peer {0} is not allowed by inbound.allow (empty: the local trust domain only)")]
    NotAllowed(SpiffeId),
}

impl Refusal {
    /// The close reason recorded in metrics.
    pub fn reason(&self) -> CloseReason {
        match self {
            Refusal::NotMtls(_) | Refusal::NotAllowed(_) => CloseReason::PolicyDenied,
            Refusal::Silent(_) => CloseReason::Timeout,
            Refusal::Closed => CloseReason::Normal,
            Refusal::Handshake(_) => CloseReason::HandshakeFailed,
        }
    }

    /// The peer's identity, when the handshake got that far.
    pub fn identity(&self) -> Option<&SpiffeId> {
        match self {
            Refusal::NotAllowed(id) => Some(id),
            _ => None,
        }
    }
}

// === impl InboundPolicy ===

impl InboundPolicy {
    /// The policy of `config`; `acceptor` terminates mTLS (needed unless every port is
    /// `disabled`, which config validation guarantees); `peers` says who may connect.
    pub fn new(config: &Config, acceptor: Option<TlsAcceptor>, peers: Arc<PeerPolicy>) -> Self {
        Self {
            default_mode: config.inbound_default_mode(),
            port_modes: config.inbound.port_modes.clone(),
            peers,
            detect_timeout: config.inbound.detect_timeout,
            acceptor,
        }
    }

    /// The mode of local `port`.
    pub fn mode(&self, port: u16) -> InboundMode {
        self.port_modes
            .get(&port)
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// Whether connections to local `port` go through detection and a handshake
    /// before they are relayed (strict and permissive ports, with an identity).
    pub fn authenticates(&self, port: u16) -> bool {
        self.acceptor.is_some() && self.mode(port) != InboundMode::Disabled
    }

    /// Applies the port's mode to a new connection. On refusal the socket comes back
    /// with the reason (when it still exists), so the caller can reset it.
    pub async fn admit(
        &self,
        port: u16,
        client: TcpStream,
    ) -> Result<Downstream, (Refusal, Option<TcpStream>)> {
        let mode = self.mode(port);
        let acceptor = match (&self.acceptor, mode) {
            (Some(acceptor), InboundMode::Strict | InboundMode::Permissive) => acceptor,
            _ => return Ok(Downstream::Plain(client)),
        };
        let detected = match detect(&client, self.detect_timeout).await {
            Ok(d) => d,
            Err(e) => return Err((Refusal::Handshake(e.to_string()), Some(client))),
        };
        match detected {
            Detected::SidecarTls => {}
            Detected::Plaintext | Detected::OtherTls if mode == InboundMode::Permissive => {
                return Ok(Downstream::Plain(client));
            }
            Detected::Plaintext | Detected::OtherTls => {
                return Err((Refusal::NotMtls(detected), Some(client)));
            }
            Detected::TimedOut => return Err((Refusal::Silent(self.detect_timeout), Some(client))),
            Detected::Closed => return Err((Refusal::Closed, Some(client))),
        }
        // The handshake gets the same budget: a client that stalls mid-handshake must
        // not hold a task forever.
        match handshake(acceptor, client, self.detect_timeout, &self.peers).await {
            Ok((tls, peer)) => Ok(Downstream::Mtls(tls, peer)),
            Err((error, io)) => Err((
                match error {
                    HandshakeError::Failed(reason) => Refusal::Handshake(reason),
                    HandshakeError::Timeout(budget) => Refusal::Silent(budget),
                    HandshakeError::NotAllowed(id) => Refusal::NotAllowed(id),
                },
                io,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &str) -> Arc<PeerPolicy> {
        let config = Config::from_yaml(&format!("inbound:\n  allow: {allow}\n"), "t", Vec::new())
            .expect("config");
        PeerPolicy::new(&config, "td")
    }

    #[test]
    fn an_empty_allow_list_admits_the_local_trust_domain_only() {
        let local: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let federated: SpiffeId = "spiffe://partner/ns/a/sa/b".parse().expect("id");
        let empty = policy("[]");
        assert!(empty.allows_client(&local));
        assert!(!empty.allows_client(&federated));
        let listed = policy("['spiffe://partner/*']");
        assert!(listed.allows_client(&federated));
        assert!(!listed.allows_client(&local));
    }
}
