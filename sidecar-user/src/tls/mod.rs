//! Workload identity and mTLS between sidecars: SPIFFE IDs, certificates read from files
//! (as Kubernetes mounts Secrets) and rotated without restart, rustls configurations that
//! verify peers by SPIFFE ID, and a throwaway CA for demos and tests.

pub mod certs;
pub mod dev_ca;
pub mod identity;
pub mod rustls_config;
#[cfg(test)]
mod tests;

pub use certs::{CertError, Identity, IdentityFiles, IdentityStore};
pub use identity::{IdentityMatcher, SpiffeId};

/// The ALPN protocol sidecars speak to each other, so an inbound sidecar can tell a
/// peer sidecar from any other TLS client.
pub const ALPN: &[u8] = b"sidecar-mtls/1";
