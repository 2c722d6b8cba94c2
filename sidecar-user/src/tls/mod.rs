//! Workload identity and mTLS between sidecars: SPIFFE IDs, certificates read from files
//! (as Kubernetes mounts Secrets) and rotated without restart, rustls configurations that
//! verify peers by SPIFFE ID, and a throwaway CA for demos and tests.

pub mod certs;
pub mod dev_ca;
pub mod identity;
pub mod metrics;
pub mod resumption;
pub mod rustls_config;
#[cfg(test)]
mod tests;

pub use certs::{CertError, Identity, IdentityFiles, IdentityStore};
pub use identity::{IdentityMatcher, SpiffeId};

/// The ALPN protocol sidecars speak to each other, so an inbound sidecar can tell a
/// peer sidecar from any other TLS client.
pub const ALPN: &[u8] = b"sidecar-mtls/1";

/// The status byte a server sidecar sends right after the mTLS handshake, once it has
/// tried the application: a connect to a sidecar always succeeds, so this is how the
/// client side learns whether the app behind it took the connection (and retries
/// another endpoint when it did not). Nothing else is sent before it.
pub mod status {
    /// The application accepted; bytes follow.
    pub const READY: u8 = 0;
    /// The application refused or was unreachable; the server closes next.
    pub const APP_REFUSED: u8 = 1;
}
