//! Workload identity and mTLS between sidecars: SPIFFE IDs, certificates read from files
//! (as Kubernetes mounts Secrets) and rotated without restart, rustls configurations that
//! verify peers by SPIFFE ID, and a throwaway CA for demos and tests.

pub mod certs;
pub mod dev_ca;
pub mod identity;
pub mod metrics;
pub mod read_ahead;
pub mod resumption;
pub mod rustls_config;
#[cfg(test)]
mod tests;

pub use certs::{CertError, Identity, IdentityFiles, IdentityStore};
pub use identity::{IdentityMatcher, SpiffeId};
