//! The mesh protocol between sidecars: HBONE ([`hbone`]), HTTP/2 `CONNECT` streams over
//! pooled mTLS connections to port 15008 of the destination pod, as Istio's ztunnel
//! speaks it.
//!
//! Both sides check who the other is: [`peer_policy`] holds the live rules
//! (`inbound.allow`, `mesh.identities`), and [`server_identity`] says which identity
//! may serve a destination. [`client`] opens a stream after checking the server's
//! identity; the terminating half is [`hbone::server`].

pub mod client;
pub mod hbone;
pub mod peer_policy;
pub mod server_identity;

use std::time::Duration;

use crate::tls::SpiffeId;

pub use client::{MeshConnector, MeshError, MeshTarget};

/// A mesh peer proven by its certificate: who it is, and how long the handshake took
/// when this connection paid for one (`None`: a pooled connection was reused).
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The mTLS handshake's duration, when this connection waited for one.
    pub handshake: Option<Duration>,
}
