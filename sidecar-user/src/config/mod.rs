//! The sidecar's configuration: one typed [`Config`] read from YAML (a Kubernetes
//! ConfigMap fits), overridden by `SIDECAR__SECTION__FIELD` environment variables, and
//! validated before anything binds or attaches. Every field has a default, so an empty
//! file (or no file) is a working configuration.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

mod env;
mod error;
mod inbound;
mod kubernetes;
mod mesh;
mod services;
#[cfg(test)]
mod tests;
mod validate;

pub use error::ConfigError;
pub use inbound::AllowEntry;
pub use kubernetes::{DiscoveryLimits, KubernetesConfig, PlaintextPolicy};
pub use mesh::{HboneConfig, MeshConfig, MeshIdentityRule};
pub use services::{
    DnsConfig, DnsTarget, EndpointConfig, HashKey, HealthCheckConfig, LbPolicy, LimitsConfig,
    OutboundConfig, OutboundPolicy, OutlierConfig, ServiceConfig,
};

/// Prefix of environment variables that override config fields; `__` separates path
/// segments: `SIDECAR__PROXY__CONNECT_TIMEOUT=2s`, `SIDECAR__CAPTURE__EXCLUDE_PORTS=[22,443]`.
pub const ENV_PREFIX: &str = "SIDECAR__";

/// The health listener's port: kubelet probes, `/metrics`, rewritten app probes.
pub const HEALTH_PORT: u16 = 15020;

/// Default port of the HBONE listener (`mesh.hbone.port`), ztunnel's too.
pub const HBONE_PORT: u16 = 15008;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transparent proxy.
    pub proxy: ProxyConfig,
    /// Which connects the kernel programs capture.
    pub capture: CaptureConfig,
    /// Inbound capture (`sk_lookup`) and delivery to the application.
    pub inbound: InboundConfig,
    /// The loopback-only debug listener.
    pub admin: AdminConfig,
    /// The pod-IP listener for the kubelet and Prometheus.
    pub health: HealthConfig,
    /// Metric label limits.
    pub metrics: MetricsConfig,
    /// The workload's certificate, key and trust bundle; mTLS needs them.
    pub identity: Option<IdentityConfig>,
    /// Outbound destinations that have a sidecar: reached over mTLS.
    pub mesh: MeshConfig,
    /// Pinning the kernel links, so capture outlives a crashed sidecar.
    pub pins: PinsConfig,
    /// What happens to outbound connections that are not to a service.
    pub outbound: OutboundConfig,
    /// DNS discovery settings.
    pub dns: DnsConfig,
    /// Virtual addresses balanced across endpoints. Reloaded from the file without a
    /// restart when it changes.
    pub services: Vec<ServiceConfig>,
    /// Services, endpoints and identities discovered from the Kubernetes API.
    pub kubernetes: KubernetesConfig,
}

/// Where links are pinned. With pins, a crashed sidecar leaves capture in place and
/// traffic fails closed (refused outbound, dropped inbound) instead of going around
/// the proxy; a restarted sidecar takes the links over; a clean stop removes them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PinsConfig {
    /// Pin links (recommended; without it a crash detaches capture).
    pub enabled: bool,
    /// Folder on a bpf filesystem; each pod gets `<dir>/cgroup-<id>`. Under
    /// /sys/fs/bpf, the sidecar mounts a bpffs there if none is.
    pub dir: PathBuf,
}

impl Default for PinsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::from("/sys/fs/bpf/sidecar"),
        }
    }
}

/// Where the workload identity lives (as a Secret or cert-manager's CSI driver mounts it).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate chain; the leaf carries the SPIFFE ID as its URI SAN.
    pub cert: PathBuf,
    /// PEM private key (ECDSA P-256, Ed25519 or RSA).
    pub key: PathBuf,
    /// PEM trust bundle of the workload's own trust domain (the one in its SPIFFE ID):
    /// peers of that trust domain must chain to it.
    pub bundle: PathBuf,
    /// Bundles of other trust domains (SPIFFE federation), trust domain → PEM file. A
    /// peer's certificate must chain to the bundle of its own SPIFFE ID's trust
    /// domain; a trust domain with no bundle here is refused.
    #[serde(default)]
    pub federated_bundles: std::collections::BTreeMap<String, PathBuf>,
    /// How often the files are checked for rotation.
    #[serde(default = "default_reload_interval", deserialize_with = "duration")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    // Kubernetes propagates Secret updates within about a minute; checking every second
    // makes a rotation visible to new handshakes within seconds of the swap.
    Duration::from_secs(1)
}

/// What an inbound port accepts.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InboundMode {
    /// Only mTLS from a sidecar whose identity the allow-list admits.
    Strict,
    /// mTLS from sidecars, or anything else passed through untouched, told apart by
    /// the first bytes.
    Permissive,
    /// Plain passthrough, no detection.
    Disabled,
}

/// Caps on label values that come from outside, so a flood of distinct peers cannot
/// grow memory (or Prometheus's series count) without bound. Past the cap a value is
/// reported as `other`, counted by `sidecar_metric_label_folded_total`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct `peer_identity` label values.
    pub max_peer_identities: usize,
    /// Distinct `service` label values.
    pub max_services: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        // A pod rarely talks to more than a few dozen identities or services; these
        // leave headroom while keeping a sidecar's series in the low thousands.
        Self {
            max_peer_identities: 200,
            max_services: 200,
        }
    }
}

/// Settings of the proxy's data path.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// UID the proxy runs as once attached. Connects made by this UID are never
    /// captured, which is how the proxy's own upstream connections avoid a loop
    /// (Istio uses 1337 the same way). Must not be 0.
    pub uid: u32,
    /// Port of the outbound listener on 127.0.0.1 and `[::1]`.
    pub outbound_port: u16,
    /// Also capture IPv6 and listen on `[::1]`.
    pub ipv6: bool,
    /// Budget for connecting to the original destination.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Once one side has closed its direction (sent FIN), the connection is closed
    /// after this long without bytes (at most `idle_timeout`): a peer that finished
    /// and whose other side went silent is not held for the whole idle timeout.
    #[serde(deserialize_with = "duration")]
    pub half_close_timeout: Duration,
    /// On SIGTERM, how long open connections may take to finish before they are closed.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Runtime worker threads. Two matches Istio's default sidecar concurrency and
    /// leaves the app its share of a small node.
    pub worker_threads: usize,
    /// TCP keepalive on the sockets to and from other hosts (not the application's
    /// loopback side): a peer that vanished (node gone, link down) is found in about
    /// `time + interval x probes` instead of at `idle_timeout`.
    pub keepalive: KeepaliveConfig,
    /// Data sent but unacknowledged for this long closes the connection
    /// (`TCP_USER_TIMEOUT`), on the same sockets as `keepalive`.
    #[serde(deserialize_with = "duration")]
    pub user_timeout: Duration,
}

/// TCP keepalive settings (`TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Send keepalive probes at all.
    pub enabled: bool,
    /// Idle time before the first probe.
    #[serde(deserialize_with = "duration")]
    pub time: Duration,
    /// Time between unanswered probes.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Unanswered probes before the connection is closed.
    pub probes: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        // A dead idle peer is found within about a minute (30 s + 3 x 10 s), far below
        // the one-hour idle timeout; a live one costs a probe every 30 s of silence.
        Self {
            enabled: true,
            time: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            probes: 3,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            uid: 1337,
            outbound_port: 15001,
            ipv6: true,
            // Envoy's and Istio's default connect timeout is 10 s; 5 s keeps a dead
            // destination from holding an app's connect for long.
            connect_timeout: Duration::from_secs(5),
            // Istio's default TCP idle timeout.
            idle_timeout: Duration::from_secs(3600),
            // HAProxy's `timeout client-fin` in its sample configurations is 30 s;
            // a server still computing an answer to a half-closed request gets more.
            half_close_timeout: Duration::from_secs(300),
            // Kubernetes' default grace period is 30 s; leave room for the rest of it.
            drain_timeout: Duration::from_secs(10),
            worker_threads: 2,
            keepalive: KeepaliveConfig::default(),
            // Unacknowledged data for a minute means the peer is gone; what a live but
            // slow reader holds back is flow-controlled, not unacknowledged.
            user_timeout: Duration::from_secs(60),
        }
    }
}

/// Which connects are captured. Loopback destinations and the sidecar's own ports
/// are never captured, whatever is configured here.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Destination ports never captured.
    pub exclude_ports: Vec<u16>,
    /// When not empty, only these destination ports are captured.
    pub include_ports: Vec<u16>,
    /// Destination networks never captured (for example the API server's address).
    pub exclude_cidrs: Vec<IpNet>,
    /// When no proxy listens (crashed, not yet started, stopped), let the app's
    /// connects go direct (true) instead of refusing them (false, the default: traffic
    /// never goes around mTLS silently). The kernel checks for the proxy's listener on
    /// each connect.
    pub fail_open: bool,
}

/// Inbound capture: connections arriving from outside the pod for captured local ports
/// are steered by `sk_lookup` into the proxy, which delivers them to the address the
/// client dialed (the pod IP and port), never to loopback.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Steer inbound connections through the proxy.
    pub enabled: bool,
    /// Port of the inbound listeners (127.0.0.1 and `[::1]`). They listen on loopback
    /// only: `sk_lookup` hands them connections for any address, so they are never
    /// reachable directly.
    pub port: u16,
    /// Local ports captured; empty means every port except `exclude_ports` and the
    /// sidecar's own.
    pub ports: Vec<u16>,
    /// Local ports never captured.
    pub exclude_ports: Vec<u16>,
    /// When the proxy's listener is gone (crashed, or draining), drop captured
    /// connections (true) rather than letting them reach the application around the
    /// proxy (false).
    pub fail_closed: bool,
    /// Mode of every port not in `port_modes`. Default: `permissive` when an identity
    /// is configured, else `disabled`.
    pub mode: Option<InboundMode>,
    /// Per-port modes.
    pub port_modes: std::collections::BTreeMap<u16, InboundMode>,
    /// Peers allowed in: SPIFFE IDs, `spiffe://<td>/ns/<namespace>/*` or
    /// `spiffe://<td>/*` over HBONE, and `unauthenticated` for plaintext clients on
    /// ports that are not strict. Empty: any workload of the local trust domain
    /// (never a federated one unless listed) and plaintext where the port admits it.
    /// Not empty and without `unauthenticated`: plaintext is refused on every port,
    /// since a plaintext client has no identity to match. Reloaded with the services
    /// section.
    pub allow: Vec<AllowEntry>,
    /// How long a client of the HBONE port may take to finish its mTLS and HTTP/2
    /// handshakes before it is dropped.
    #[serde(deserialize_with = "duration", alias = "detect_timeout")]
    pub handshake_timeout: Duration,
    /// Connections at most in detection or handshake at once, per sidecar; more are
    /// reset at once (`sidecar_inbound_unauthenticated_refused_total`).
    pub max_unauthenticated: usize,
    /// The same, per client address, so one client cannot take every slot.
    pub max_unauthenticated_per_client: usize,
    /// HBONE connections open at once (handshaking or not), per sidecar; more are
    /// reset at once (`sidecar_inbound_hbone_connections_refused_total`).
    pub max_hbone_connections: usize,
    /// The same, per client address: a peer that proved its identity still cannot
    /// open connections without end.
    pub max_hbone_connections_per_client: usize,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            port: 15006,
            ports: Vec::new(),
            exclude_ports: Vec::new(),
            fail_closed: true,
            mode: None,
            port_modes: Default::default(),
            allow: Vec::new(),
            // Long enough for a client across a slow network, short enough that an idle
            // connection attempt does not hold a task for long.
            handshake_timeout: Duration::from_secs(5),
            // Each costs a socket and a task of a few KiB for up to handshake_timeout: at
            // most a few MiB, and far more handshakes than a pod completes at once.
            max_unauthenticated: 1024,
            max_unauthenticated_per_client: 128,
            // A client pool opens one connection per 100 concurrent streams: 256 is
            // 25,600 application connections from one pod. Above the unauthenticated
            // cap per client, so a handshake flood meets that one first.
            max_hbone_connections: 4096,
            max_hbone_connections_per_client: 256,
        }
    }
}

/// The loopback-only debug listener.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address; must be a loopback address, since debug endpoints name peers.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 15000)),
        }
    }
}

/// The health/metrics listener the kubelet and Prometheus reach on the pod IP.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Address; `[::]` listens dual-stack.
    pub address: SocketAddr,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HEALTH_PORT)),
        }
    }
}

// === impl Config ===

impl Config {
    /// The sidecar's own ports, which are never captured.
    pub fn own_ports(&self) -> [u16; 5] {
        [
            self.proxy.outbound_port,
            self.inbound.port,
            self.admin.address.port(),
            self.health.address.port(),
            self.mesh.hbone.port,
        ]
    }

    /// The mode of inbound `port`.
    pub fn inbound_mode(&self, port: u16) -> InboundMode {
        self.inbound
            .port_modes
            .get(&port)
            .copied()
            .unwrap_or_else(|| self.inbound_default_mode())
    }

    /// The mode of inbound ports not listed in `inbound.port_modes`: `inbound.mode`, or
    /// `permissive` when an identity is configured, else `disabled`.
    pub fn inbound_default_mode(&self) -> InboundMode {
        let implied = if self.identity.is_some() {
            InboundMode::Permissive
        } else {
            InboundMode::Disabled
        };
        self.inbound.mode.unwrap_or(implied)
    }

    /// Inbound listener addresses: 127.0.0.1, plus `[::1]` when IPv6 is on. Loopback
    /// only: `sk_lookup` hands them connections for any address, and nothing else can
    /// reach them.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![SocketAddr::new(
            IpAddr::from([127, 0, 0, 1]),
            self.inbound.port,
        )];
        if self.proxy.ipv6 {
            addrs.push(SocketAddr::new(
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                self.inbound.port,
            ));
        }
        addrs
    }

    /// Excluded networks, plus loopback (the kernel also skips loopback on its own).
    pub fn excluded_cidrs(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.capture.exclude_cidrs.iter().copied()
    }

    /// Outbound listener addresses: IPv4 loopback, plus IPv6 loopback when enabled.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![SocketAddr::new(
            IpAddr::from([127, 0, 0, 1]),
            self.proxy.outbound_port,
        )];
        if self.proxy.ipv6 {
            addrs.push(SocketAddr::new(
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                self.proxy.outbound_port,
            ));
        }
        addrs
    }
}

/// As [`duration`], for an optional field.
fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Deserializes "500ms", "5s", "1h 30m" (humantime syntax).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (use e.g. \"500ms\", \"5s\", \"1m\")"
        ))
    })
}
