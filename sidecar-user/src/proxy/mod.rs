//! The transparent proxy: accept a captured connection (outbound from the app, or
//! inbound to it), recover where it was going, connect there, copy bytes both ways.
//!
//! One outbound connection: [`outbound`] (accept, original destination, route) →
//! [`balance`] (a service's endpoint, retries) or [`upstream`] (connect, the mesh
//! protocol's client half) → [`conn`] (metrics guard, connection table, [`copy`],
//! close reason). One inbound mTLS connection: [`inbound`] (accept, the cap on
//! [`unauthenticated`] connections) → [`admission`] ([`detect`], the mesh protocol's
//! server half) → [`upstream`] (delivery to the app) → [`conn`].

pub mod addr;
pub mod admission;
pub mod balance;
pub mod conn;
pub mod connections;
pub mod copy;
pub mod detect;
pub mod inbound;
pub mod labels;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod pod_addrs;
pub mod socket_opts;
pub mod splice;
#[cfg(test)]
pub(crate) mod test_support;
pub mod unauthenticated;
pub mod upstream;

pub use addr::{ClientAddr, OrigDstAddr};
pub use labels::{CloseReason, Direction, Tls};
