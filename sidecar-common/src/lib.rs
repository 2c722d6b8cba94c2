//! Map layouts shared by the kernel programs (`sidecar-ebpf`) and the userspace loader
//! (`sidecar-user`). Every type here is `#[repr(C)]` with explicit padding fields, so
//! both compilers agree on every byte; flags are integers rather than `bool` because
//! `aya::Pod` must have no invalid bit patterns.
#![no_std]

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// Names of the maps, so the loader never repeats a string literal of the kernel crate.
pub mod map_names {
    /// [`crate::KernelSettings`] at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// `u16` destination port → [`crate::port_rule`] bits.
    pub const PORT_RULES: &str = "PORT_RULES";
    /// LPM trie of IPv4 destinations that are never captured.
    pub const EXCLUDED_V4: &str = "EXCLUDED_V4";
    /// LPM trie of IPv6 destinations that are never captured.
    pub const EXCLUDED_V6: &str = "EXCLUDED_V6";
    /// Socket cookie → [`crate::SockAddr`] written at connect, before the local port is known.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// [`crate::FlowKey`] → [`crate::SockAddr`], the table the proxy reads at accept.
    pub const ORIG_DST_BY_FLOW: &str = "ORIG_DST_BY_FLOW";
    /// `u16` local port → [`crate::inbound_rule`] bits, for `sk_lookup`.
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    /// SOCKMAP holding the proxy's inbound listeners, one slot per family.
    pub const INBOUND_LISTENER: &str = "INBOUND_LISTENER";
    /// Per-CPU `u64` counters indexed by [`crate::counter_index`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// Names of the programs in the object.
pub mod program_names {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "connect6";
    /// `sockops`, re-keys original destinations by 4-tuple.
    pub const SOCK_OPS: &str = "sock_ops";
    /// `sk_lookup`, steers inbound connections to the proxy's inbound listener. (Not
    /// named `sk_lookup`: that is the section name, and the symbols would clash.)
    pub const SK_LOOKUP: &str = "inbound_lookup";
}

/// Capacity of the original-destination maps. Entries live only from `connect()`
/// until the proxy accepts (or the app's socket closes), so this bounds connects in
/// flight, not open connections.
pub const ORIG_DST_MAP_CAPACITY: u32 = 32_768;
/// Capacity of the port rule map (every port could be listed).
pub const PORT_RULES_CAPACITY: u32 = 65_536;
/// Capacity of each excluded-CIDR trie.
pub const EXCLUDED_CIDRS_CAPACITY: u32 = 1_024;

/// Bits of a [`map_names::PORT_RULES`] value.
pub mod port_rule {
    /// Connections to this port are never captured.
    pub const EXCLUDE: u32 = 1;
    /// With [`crate::capture_flags::INCLUDE_PORTS_ONLY`], only ports with this bit are captured.
    pub const INCLUDE: u32 = 2;
}

/// Bits of [`KernelSettings::flags`].
pub mod capture_flags {
    /// Capture only ports marked [`crate::port_rule::INCLUDE`].
    pub const INCLUDE_PORTS_ONLY: u32 = 1;
    /// Inbound: capture every local port not marked [`crate::inbound_rule::EXCLUDE`]
    /// (without it, only ports marked [`crate::inbound_rule::CAPTURE`]).
    pub const INBOUND_ALL_PORTS: u32 = 2;
    /// Inbound: drop a captured connection when the proxy's listener is missing, rather
    /// than letting it reach the application around the proxy.
    pub const INBOUND_FAIL_CLOSED: u32 = 4;
    /// Outbound: when no proxy listens on the outbound port, leave the connect alone
    /// (it goes direct) instead of redirecting it to a refused port.
    pub const OUTBOUND_FAIL_OPEN: u32 = 8;
    /// The proxy does not serve IPv6 (`proxy.ipv6: false`): `connect6` still captures
    /// IPv4-mapped destinations, and refuses native IPv6 ones (EPERM) rather than
    /// letting them leave uncaptured.
    pub const IPV6_OFF: u32 = 16;
}

/// Bits of a [`map_names::INBOUND_PORTS`] value.
pub mod inbound_rule {
    /// Connections to this local port are steered to the proxy.
    pub const CAPTURE: u32 = 1;
    /// Connections to this local port are never steered (wins over `CAPTURE`).
    pub const EXCLUDE: u32 = 2;
}

/// The SOCKMAP slot of the IPv4 inbound listener (127.0.0.1).
pub const INBOUND_LISTENER_V4: u32 = 0;
/// The SOCKMAP slot of the IPv6 inbound listener ([::1]). A socket bound to a specific
/// IPv6 address is IPv6-only, and `bpf_sk_assign` gives IPv4 connections only to
/// IPv4 or dual-stack sockets, hence one listener per family.
pub const INBOUND_LISTENER_V6: u32 = 1;
/// Capacity of the inbound port rule map.
pub const INBOUND_PORTS_CAPACITY: u32 = 65_536;

/// Settings of the capture programs, stored at index 0 of [`map_names::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSettings {
    /// Connects made by this UID are never captured: the proxy's own upstream traffic.
    pub proxy_uid: u32,
    /// [`capture_flags`] bits.
    pub flags: u32,
    /// IPv4 address of the outbound listener, network byte order.
    pub outbound_ip4: u32,
    /// IPv6 address of the outbound listener, network byte order words.
    pub outbound_ip6: [u32; 4],
    /// Port of the outbound listener, host byte order.
    pub outbound_port: u16,
    /// Explicit padding to a multiple of 4 bytes.
    pub _pad: u16,
    /// Inbound capture is on (`sk_lookup` steers connections); 0 or 1.
    pub inbound_enabled: u32,
}

/// An IPv4 or IPv6 socket address as the kernel hands it out: address words in network
/// byte order (IPv4 in `addr[0]`, the rest zero), port in host byte order. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    /// Address words, network byte order.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

impl SockAddr {
    /// An IPv4 address from its network-order word and a host-order port.
    pub const fn v4(addr: u32, port: u16) -> Self {
        Self {
            addr: [addr, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    /// An IPv6 address from its network-order words and a host-order port.
    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
        }
    }

    /// A socket address in this layout. IPv4-mapped IPv6 addresses become IPv4, as
    /// the kernel programs key them.
    pub fn from_socket_addr(addr: core::net::SocketAddr) -> Self {
        let ip = match addr.ip() {
            core::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => core::net::IpAddr::V4(v4),
                None => core::net::IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match ip {
            core::net::IpAddr::V4(v4) => Self::v4(u32::from_ne_bytes(v4.octets()), addr.port()),
            core::net::IpAddr::V6(v6) => Self::v6(ipv6_words(v6.octets()), addr.port()),
        }
    }

    /// Back to a socket address; `None` for an unknown family.
    pub fn to_socket_addr(&self) -> Option<core::net::SocketAddr> {
        let ip = match self.family {
            AF_INET => core::net::IpAddr::V4(self.addr[0].to_ne_bytes().into()),
            AF_INET6 => {
                let mut octets = [0u8; 16];
                for (i, word) in self.addr.iter().enumerate() {
                    octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
                }
                core::net::IpAddr::V6(octets.into())
            }
            _ => return None,
        };
        Some(core::net::SocketAddr::new(ip, self.port))
    }
}

/// Network-order words of an IPv6 address, as the kernel stores them.
pub fn ipv6_words(octets: [u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The 4-tuple of a captured connection as seen from the application's socket: `src` is
/// the app's local address, `dst` the proxy listener it was redirected to. The proxy's
/// accepted socket sees the same pair as (peer, local). 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The application's end.
    pub src: SockAddr,
    /// The proxy listener's end.
    pub dst: SockAddr,
}

/// The programs that count events; part of the counter index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `cgroup/connect4`.
    Connect4 = 0,
    /// `cgroup/connect6`.
    Connect6,
    /// `sockops`.
    SockOps,
    /// `sk_lookup`.
    SkLookup,
}

impl Program {
    /// Every program, in index order.
    pub const ALL: [Program; 4] = [
        Program::Connect4,
        Program::Connect6,
        Program::SockOps,
        Program::SkLookup,
    ];

    /// The program's name in the object (also a metric label).
    pub const fn name(self) -> &'static str {
        match self {
            Program::Connect4 => program_names::CONNECT4,
            Program::Connect6 => program_names::CONNECT6,
            Program::SockOps => program_names::SOCK_OPS,
            Program::SkLookup => program_names::SK_LOOKUP,
        }
    }
}

/// Slots in the counter array: one per (program, counter) pair.
pub const COUNTER_SLOTS: u32 = Program::ALL.len() as u32 * Counter::COUNT;

/// Index of `counter` as counted by `program` in [`map_names::COUNTERS`].
pub const fn counter_index(program: Program, counter: Counter) -> u32 {
    program as u32 * Counter::COUNT + counter as u32
}

/// Kernel-side events; with [`Program`], the index into [`map_names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP connects redirected to the outbound listener.
    Captured = 0,
    /// Connects skipped because the socket is not TCP (UDP `connect()`, ...).
    SkippedNotTcp,
    /// Connects skipped because the proxy made them.
    SkippedProxy,
    /// Connects skipped because the destination is loopback.
    SkippedLoopback,
    /// Connects skipped by a port rule (excluded, or not included).
    ExcludedPort,
    /// Connects skipped because the destination is in an excluded CIDR.
    ExcludedCidr,
    /// A captured connect whose original destination could not be stored.
    OrigDstStoreFailed,
    /// Original destinations moved from cookie to 4-tuple key by `sock_ops`.
    OrigDstRekeyed,
    /// A `sock_ops` re-key whose insert failed.
    OrigDstRekeyFailed,
    /// Inbound: a captured connection dropped because the proxy's listener was missing
    /// (fail closed).
    ListenerMissingDropped,
    /// Inbound: a captured connection let through to the application because the
    /// proxy's listener was missing (fail open).
    ListenerMissingPassed,
    /// A native IPv6 connect refused because the proxy does not serve IPv6.
    RefusedIpv6Off,
    /// A redirected connect whose cookie entry was gone at re-key (evicted from the
    /// LRU cookie map): the proxy will find no destination and refuse it.
    OrigDstRekeyMissing,
    /// An entry removed from the flow map because its app socket closed before the
    /// proxy took it (a connect aborted before accept).
    OrigDstAbandoned,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 14] = [
        Counter::Captured,
        Counter::SkippedNotTcp,
        Counter::SkippedProxy,
        Counter::SkippedLoopback,
        Counter::ExcludedPort,
        Counter::ExcludedCidr,
        Counter::OrigDstStoreFailed,
        Counter::OrigDstRekeyed,
        Counter::OrigDstRekeyFailed,
        Counter::ListenerMissingDropped,
        Counter::ListenerMissingPassed,
        Counter::RefusedIpv6Off,
        Counter::OrigDstRekeyMissing,
        Counter::OrigDstAbandoned,
    ];
    /// Number of counters, the size of the counter array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Captured => "captured",
            Counter::SkippedNotTcp => "skipped_not_tcp",
            Counter::SkippedProxy => "skipped_proxy",
            Counter::SkippedLoopback => "skipped_loopback",
            Counter::ExcludedPort => "excluded_port",
            Counter::ExcludedCidr => "excluded_cidr",
            Counter::OrigDstStoreFailed => "orig_dst_store_failed",
            Counter::OrigDstRekeyed => "orig_dst_rekeyed",
            Counter::OrigDstRekeyFailed => "orig_dst_rekey_failed",
            Counter::ListenerMissingDropped => "listener_missing_dropped",
            Counter::ListenerMissingPassed => "listener_missing_passed",
            Counter::RefusedIpv6Off => "refused_ipv6_off",
            Counter::OrigDstRekeyMissing => "orig_dst_rekey_missing",
            Counter::OrigDstAbandoned => "orig_dst_abandoned",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
}

// Layout checks: a size change here is a change of the kernel ABI between the crates.
const _: () = assert!(core::mem::size_of::<KernelSettings>() == 36);
const _: () = assert!(core::mem::size_of::<SockAddr>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
