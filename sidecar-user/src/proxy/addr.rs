//! Address newtypes, so the app's address and its original destination cannot be mixed up.

use std::{fmt, net::SocketAddr};

/// The destination the application dialed, recovered after redirection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// The remote end of an accepted connection (the application's socket).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

// === impl OrigDstAddr ===

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === impl ClientAddr ===

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
