//! The transparent proxy: accept a captured connection (outbound from the app, or
//! inbound to it), recover where it was going, connect there, copy bytes both ways.
//!
//! One outbound connection: [`outbound`] (accept, original destination, route) →
//! [`balance`] (a service's endpoint, retries) or [`upstream`] (connect, or an HBONE
//! stream through the mesh protocol's client half) → [`conn`] (metrics guard,
//! connection table, [`copy`], close reason). One inbound HBONE stream: [`tunnel`]
//! (accept on port 15008, the caps of [`gate`] on connections, the handshakes,
//! each stream's checks) → [`inbound`] (delivery to the app through [`upstream`]) →
//! [`conn`]. A direct inbound connection: [`inbound`] → [`admission`] (the port's
//! mode) → delivery → [`conn`].

pub mod addr;
pub mod admission;
pub mod balance;
pub mod conn;
pub mod connections;
pub mod copy;
pub mod gate;
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
pub mod tunnel;
pub mod upstream;

pub use addr::{ClientAddr, OrigDstAddr};
pub use labels::{CloseReason, Direction, Tls};
