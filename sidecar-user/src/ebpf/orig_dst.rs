//! The table of original destinations, keyed by the 4-tuple the proxy sees on the
//! socket it accepted. A lookup also deletes the entry, in one syscall, so the map
//! only ever holds connects that have not been accepted yet.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

use sidecar_common::{AF_INET, AF_INET6, FlowKey, SockAddr};

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
            src: to_kernel(peer),
            dst: to_kernel(local),
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
            return Ok(from_kernel(&value));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

/// A socket address in the kernel maps' layout. IPv4-mapped IPv6 addresses become
/// IPv4, as the kernel side keys them.
pub fn to_kernel(addr: SocketAddr) -> SockAddr {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), addr.port()),
        IpAddr::V6(v6) => SockAddr::v6(words(v6.octets()), addr.port()),
    }
}

/// Network-order words of an IPv6 address, as the kernel stores them.
pub fn words(octets: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// A kernel socket address back as a `SocketAddr`; `None` for an unknown family.
pub fn from_kernel(addr: &SockAddr) -> Option<SocketAddr> {
    let ip = match addr.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(addr.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (i, word) in addr.addr.iter().enumerate() {
                octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, addr.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for text in ["198.18.0.2:8080", "[fd00:5c::2]:443", "[::1]:15001"] {
            let addr: SocketAddr = text.parse().expect("valid address");
            assert_eq!(from_kernel(&to_kernel(addr)), Some(addr));
        }
    }

    #[test]
    fn ipv4_is_network_order_in_memory() {
        let k = to_kernel("127.0.0.1:15001".parse().expect("valid"));
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 15001);
        assert_eq!(k.family, AF_INET);
    }

    #[test]
    fn mapped_ipv6_is_keyed_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:80".parse().expect("valid");
        let plain: SocketAddr = "198.18.0.2:80".parse().expect("valid");
        assert_eq!(to_kernel(mapped), to_kernel(plain));
    }

    #[test]
    fn unknown_family_is_none() {
        assert_eq!(
            from_kernel(&SockAddr {
                family: 99,
                ..Default::default()
            }),
            None
        );
    }
}
