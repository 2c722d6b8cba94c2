//! The transparent proxy: accept a captured connection (outbound from the app, or
//! inbound to it), recover where it was going, connect there, copy bytes both ways.

pub mod addr;
pub mod connections;
pub mod copy;
pub mod detect;
pub mod forward;
pub mod inbound;
pub mod listener;
pub mod peer_policy;
pub mod pod_addrs;
pub mod read_ahead;
pub mod server_identity;
pub mod socket_opts;
pub mod splice;
#[cfg(test)]
mod test_support;
pub mod unauthenticated;
pub mod upstream;

pub use addr::{ClientAddr, OrigDstAddr};
