//! The sidecar-to-sidecar protocol, both halves in one place.
//!
//! Today: one TLS 1.3 connection per application connection, with the ALPN [`ALPN`];
//! the server sidecar tries its application, then sends one [`status`] byte before any
//! data, so the client sidecar learns whether the application took the connection
//! (and retries another endpoint when it did not). Both sides check who the other is:
//! [`peer_policy`] holds the live rules (`inbound.allow`, `mesh.identities`), and
//! [`server_identity`] says which identity may serve a destination.
//!
//! [`client`] is the originating half (handshake, identity checks, status byte read);
//! [`server`] the terminating half (ALPN recognised at detection, status byte sent).

pub mod client;
pub mod peer_policy;
pub mod server;
pub mod server_identity;

use std::time::Duration;

use crate::tls::SpiffeId;

pub use client::{MeshConnector, MeshError, MeshTarget};

/// A mesh peer proven by its certificate: who it is, and how long the handshake took.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The mTLS handshake's duration.
    pub handshake: Duration,
}

/// The ALPN protocol sidecars speak to each other, so an inbound sidecar can tell a
/// peer sidecar from any other TLS client.
pub const ALPN: &[u8] = b"sidecar-mtls/1";

/// The status byte a server sidecar sends right after the mTLS handshake, once it has
/// tried the application: a connect to a sidecar always succeeds, so this is how the
/// client side learns whether the app behind it took the connection. Nothing else is
/// sent before it.
pub mod status {
    /// The application accepted; bytes follow.
    pub const READY: u8 = 0;
    /// The application refused or was unreachable; the server closes next.
    pub const APP_REFUSED: u8 = 1;
}
