//! Address newtypes, so the app's address and its original destination cannot be mixed
//! up, and the one place IPv4-mapped addresses become plain IPv4.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for IPv4 peers) as
/// plain IPv4.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap_ip(addr.ip()), addr.port())
}

/// [`unmap`] for an IP address.
pub fn unmap_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

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
