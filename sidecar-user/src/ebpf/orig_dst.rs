//! The table of original destinations, keyed by the 4-tuple the proxy sees on the
//! socket it accepted. A lookup also deletes the entry, in one syscall, so the map
//! only ever holds connects that have not been accepted yet.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
};

use sidecar_common::{FlowKey, SockAddr};

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps support it since Linux 5.14).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Owner of a file descriptor of the kernel's `ORIG_DST_BY_FLOW` map.
#[derive(Debug)]
pub struct OrigDstTable {
    fd: OwnedFd,
}

/// The part of `union bpf_attr` used by map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

// === impl OrigDstTable ===

impl OrigDstTable {
    /// Wraps a descriptor of the flow map.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Takes the original destination of the connection accepted from `peer` on
    /// `local`. `Ok(None)` when the kernel recorded none (the connect was not captured,
    /// or its entry was evicted).
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> io::Result<Option<SocketAddr>> {
        let key = FlowKey {
            src: SockAddr::from_socket_addr(peer),
            dst: SockAddr::from_socket_addr(local),
        };
        let mut value = SockAddr::default();
        let attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const FlowKey as u64,
            value: &mut value as *mut SockAddr as u64,
            flags: 0,
        };
        // SAFETY: `attr` points at a live key and value of the map's exact sizes for the
        // duration of the call; the kernel writes at most `size_of::<SockAddr>()` bytes.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &attr as *const MapElemAttr,
                std::mem::size_of::<MapElemAttr>() as u32,
            )
        };
        if ret == 0 {
            return Ok(value.to_socket_addr());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for text in ["198.18.0.2:8080", "[fd00:5c::2]:443", "[::1]:15001"] {
            let addr: SocketAddr = text.parse().expect("valid address");
            assert_eq!(
                SockAddr::from_socket_addr(addr).to_socket_addr(),
                Some(addr)
            );
        }
    }

    #[test]
    fn ipv4_is_network_order_in_memory() {
        let k = SockAddr::from_socket_addr("127.0.0.1:15001".parse().expect("valid"));
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 15001);
        assert_eq!(k.family, sidecar_common::AF_INET);
    }

    #[test]
    fn mapped_ipv6_is_keyed_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:80".parse().expect("valid");
        let plain: SocketAddr = "198.18.0.2:80".parse().expect("valid");
        assert_eq!(
            SockAddr::from_socket_addr(mapped),
            SockAddr::from_socket_addr(plain)
        );
    }

    #[test]
    fn unknown_family_is_none() {
        let unknown = SockAddr {
            family: 99,
            ..Default::default()
        };
        assert_eq!(unknown.to_socket_addr(), None);
    }
}
