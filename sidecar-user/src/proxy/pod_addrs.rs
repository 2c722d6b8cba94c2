//! The pod's own addresses, read once from the interfaces of its network namespace.
//!
//! Two decisions need them. A destination that is the pod itself never leaves the pod,
//! so it is reached in plaintext even when it lies in `mesh.cidrs` (the inbound
//! program lets a connection whose two ends share an address go straight to the
//! application, which would otherwise receive a ClientHello). And an outbound
//! connection reaches the proxy from loopback (the connect was rewritten to it), so
//! affinity hashing uses the address the application's connection would have had
//! without capture: the pod IP of the destination's family.
//!
//! Pod IPs do not change for the life of a pod, so they are read at start only.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

/// The pod's addresses (every address of a non-loopback interface, IPv6 link-local
/// ones excepted).
#[derive(Clone, Debug, Default)]
pub struct PodAddrs {
    addrs: Vec<IpAddr>,
}

impl PodAddrs {
    /// Reads the addresses of the network namespace this thread is in.
    pub fn detect() -> io::Result<Self> {
        let mut addrs = Vec::new();
        for ifaddr in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(storage) = ifaddr.address else {
                continue;
            };
            let ip = if let Some(v4) = storage.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = storage.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if ip.is_loopback() || link_local || addrs.contains(&ip) {
                continue;
            }
            addrs.push(ip);
        }
        Ok(Self { addrs })
    }

    /// A fixed set, for tests.
    pub fn from_addrs(addrs: Vec<IpAddr>) -> Self {
        Self { addrs }
    }

    /// Whether `ip` is the pod itself: one of its addresses, loopback, or the
    /// unspecified address (which the kernel dials as the local host).
    pub fn is_self(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || self.addrs.contains(&ip)
    }

    /// The address the application's connection would have had without capture:
    /// `accepted` itself unless it is loopback (an outbound connection rewritten to the
    /// proxy), else the pod's first address of `dst`'s family (or of any family), with
    /// the application's port.
    pub fn app_addr(&self, accepted: SocketAddr, dst: SocketAddr) -> SocketAddr {
        if !accepted.ip().to_canonical().is_loopback() {
            return accepted;
        }
        let same_family = |ip: &&IpAddr| ip.is_ipv4() == dst.ip().to_canonical().is_ipv4();
        match self
            .addrs
            .iter()
            .find(same_family)
            .or_else(|| self.addrs.first())
        {
            Some(ip) => SocketAddr::new(*ip, accepted.port()),
            None => accepted,
        }
    }

    /// Every address, for logs.
    pub fn all(&self) -> &[IpAddr] {
        &self.addrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodAddrs {
        PodAddrs::from_addrs(vec![
            "10.1.2.3".parse().expect("ip"),
            "fd00::3".parse().expect("ip"),
        ])
    }

    #[test]
    fn loopback_peers_become_the_pod_ip_of_the_destination_family() {
        let pod = pod();
        let v4_dst: SocketAddr = "10.9.9.9:80".parse().expect("addr");
        let v6_dst: SocketAddr = "[fd00::9]:80".parse().expect("addr");
        let lo4: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:40001".parse().expect("addr");
        assert_eq!(
            pod.app_addr(lo4, v4_dst),
            "10.1.2.3:40000".parse().expect("addr")
        );
        assert_eq!(
            pod.app_addr(lo6, v6_dst),
            "[fd00::3]:40001".parse().expect("addr")
        );
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40002".parse().expect("addr");
        assert_eq!(
            pod.app_addr(mapped, v4_dst),
            "10.1.2.3:40002".parse().expect("addr")
        );
        // A real peer (inbound) stays as it is.
        let remote: SocketAddr = "10.7.7.7:5000".parse().expect("addr");
        assert_eq!(pod.app_addr(remote, v4_dst), remote);
        // Without addresses, nothing better is known.
        assert_eq!(PodAddrs::default().app_addr(lo4, v4_dst), lo4);
    }

    #[test]
    fn self_is_the_pod_ips_loopback_and_unspecified() {
        let pod = pod();
        for ip in ["10.1.2.3", "fd00::3", "127.0.0.1", "::1", "0.0.0.0", "::"] {
            assert!(pod.is_self(ip.parse().expect("ip")), "{ip}");
        }
        assert!(pod.is_self("::ffff:10.1.2.3".parse().expect("ip")));
        for ip in ["10.1.2.4", "fd00::4"] {
            assert!(!pod.is_self(ip.parse().expect("ip")), "{ip}");
        }
    }
}
