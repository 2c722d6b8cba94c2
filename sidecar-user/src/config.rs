//! The sidecar's configuration: one typed [`Config`] read from YAML (a Kubernetes
//! ConfigMap fits), overridden by `SIDECAR__SECTION__FIELD` environment variables, and
//! validated before anything binds or attaches. Every field has a default, so an empty
//! file (or no file) is a working configuration.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

mod services;

pub use services::{
    DnsConfig, DnsTarget, EndpointConfig, HashKey, HealthCheckConfig, LbPolicy, LimitsConfig,
    OutboundConfig, OutboundPolicy, OutlierConfig, ServiceConfig,
};

/// Prefix of environment variables that override config fields; `__` separates path
/// segments: `SIDECAR__PROXY__CONNECT_TIMEOUT=2s`, `SIDECAR__CAPTURE__EXCLUDE_PORTS=[22,443]`.
pub const ENV_PREFIX: &str = "SIDECAR__";

/// Why a configuration was refused. Each variant names the file, field or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a field has the wrong type or name.
    #[error("{origin}: field `{field}`: {message}")]
    Parse {
        /// The file, or the environment variable that set the field.
        origin: String,
        /// Dotted path of the field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A field parsed but its value is not allowed.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A field inside a list is not allowed (the path names the element).
    #[error("field `{field}`: {reason}")]
    InvalidAt {
        /// Dotted path of the field at fault, with indices: `services[2].endpoints[0]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An override variable names no valid path or holds unparsable YAML.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
}

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

/// Outbound mTLS origination.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Destination networks whose pods run a sidecar (typically the pod CIDRs). The
    /// server must present our ALPN and a certificate from the trust bundle, or the
    /// connection fails: it is never sent in plaintext.
    pub cidrs: Vec<IpNet>,
    /// Which identities may serve which destination networks, checked on every
    /// outbound mTLS handshake: the most specific rule whose network holds the
    /// destination applies. A destination no rule covers must present an ID of the
    /// local trust domain. A service's `server_identity` wins over these rules.
    pub identities: Vec<MeshIdentityRule>,
}

/// Identities allowed to serve some destination networks.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshIdentityRule {
    /// The destination networks.
    pub cidrs: Vec<IpNet>,
    /// SPIFFE IDs, `spiffe://<td>/ns/<namespace>/*` or `spiffe://<td>/*`.
    pub allow: Vec<crate::tls::IdentityMatcher>,
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
    /// Peers allowed in over mTLS: SPIFFE IDs, `spiffe://<td>/ns/<namespace>/*` or
    /// `spiffe://<td>/*`. Empty: any workload of the local trust domain (never a
    /// federated one unless listed). Reloaded with the services section.
    pub allow: Vec<crate::tls::IdentityMatcher>,
    /// How long a client may take to send its first bytes (or finish its handshake)
    /// before a strict or permissive port gives up on it.
    #[serde(deserialize_with = "duration")]
    pub detect_timeout: Duration,
    /// Connections at most in detection or handshake at once, per sidecar; more are
    /// reset at once (`sidecar_inbound_unauthenticated_refused_total`).
    pub max_unauthenticated: usize,
    /// The same, per client address, so one client cannot take every slot.
    pub max_unauthenticated_per_client: usize,
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
            detect_timeout: Duration::from_secs(5),
            // Each costs a socket and a task of a few KiB for up to detect_timeout: at
            // most a few MiB, and far more handshakes than a pod completes at once.
            max_unauthenticated: 1024,
            max_unauthenticated_per_client: 128,
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
            address: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15020)),
        }
    }
}

// === impl Config ===

impl Config {
    /// Reads `path` (or defaults when `None`), applies overrides from `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        Self::from_yaml(&text, &origin, env)
    }

    /// Parses YAML `text` (named `origin` in errors), applies `env` overrides, validates.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut tree: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                field: "(document)".to_string(),
                message: e.to_string(),
            })?
        };
        if tree.is_null() {
            tree = Value::Mapping(Default::default());
        }
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some(path) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            let parsed: Value = serde_yaml_ng::from_str(&value).map_err(|e| ConfigError::Env {
                var: var.clone(),
                reason: e.to_string(),
            })?;
            set_path(&mut tree, &segments, parsed).map_err(|reason| ConfigError::Env {
                var: var.clone(),
                reason,
            })?;
            overridden.push((segments.join("."), var));
        }
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let field = e.path().to_string();
            let origin = overridden
                .iter()
                .find(|(path, _)| field.starts_with(path.as_str()))
                .map(|(_, var)| format!("environment variable {var}"))
                .unwrap_or_else(|| origin.to_string());
            ConfigError::Parse {
                origin,
                field,
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot: ranges, overlaps, loopback-only admin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.proxy.uid == 0 {
            return invalid(
                "proxy.uid",
                "must not be 0: every root process would bypass capture",
            );
        }
        if self.proxy.outbound_port == 0 {
            return invalid("proxy.outbound_port", "port 0 is not a valid port");
        }
        for (field, d) in [
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("proxy.idle_timeout", self.proxy.idle_timeout),
            ("proxy.keepalive.time", self.proxy.keepalive.time),
            ("proxy.keepalive.interval", self.proxy.keepalive.interval),
            ("proxy.user_timeout", self.proxy.user_timeout),
        ] {
            if d.is_zero() {
                return invalid(field, "must be greater than 0");
            }
        }
        // The kernel's limits (seconds in an int for the times, TCP_KEEPCNT <= 127).
        let keepalive = &self.proxy.keepalive;
        if keepalive.time.as_secs() > 32_767 || keepalive.interval.as_secs() > 32_767 {
            return invalid(
                "proxy.keepalive",
                "time and interval must be at most 32767s",
            );
        }
        if !(1..=127).contains(&keepalive.probes) {
            return invalid("proxy.keepalive.probes", "must be between 1 and 127");
        }
        if self.proxy.user_timeout.as_millis() > i32::MAX as u128 {
            return invalid("proxy.user_timeout", "must be at most 24 days");
        }
        if !(1..=64).contains(&self.proxy.worker_threads) {
            return invalid("proxy.worker_threads", "must be between 1 and 64");
        }
        if self.capture.exclude_ports.contains(&0) {
            return invalid("capture.exclude_ports", "port 0 is not a valid port");
        }
        if self.capture.include_ports.contains(&0) {
            return invalid("capture.include_ports", "port 0 is not a valid port");
        }
        let excluded: BTreeSet<u16> = self.capture.exclude_ports.iter().copied().collect();
        if let Some(port) = self
            .capture
            .include_ports
            .iter()
            .find(|p| excluded.contains(p))
        {
            return Err(ConfigError::Invalid {
                field: "capture.include_ports",
                reason: format!("port {port} is also in capture.exclude_ports"),
            });
        }
        for (field, ports) in [
            ("inbound.ports", &self.inbound.ports),
            ("inbound.exclude_ports", &self.inbound.exclude_ports),
        ] {
            if ports.contains(&0) {
                return invalid(field, "port 0 is not a valid port");
            }
        }
        if let Some(port) = self
            .inbound
            .ports
            .iter()
            .find(|p| self.inbound.exclude_ports.contains(p))
        {
            return Err(ConfigError::Invalid {
                field: "inbound.ports",
                reason: format!("port {port} is also in inbound.exclude_ports"),
            });
        }
        if self.inbound.port == 0 {
            return invalid("inbound.port", "port 0 is not a valid port");
        }
        let needs_identity = self
            .inbound
            .mode
            .into_iter()
            .chain(self.inbound.port_modes.values().copied())
            .any(|m| m != InboundMode::Disabled);
        if needs_identity && self.identity.is_none() {
            return invalid(
                "inbound.mode",
                "strict and permissive need an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        if !self.mesh.cidrs.is_empty() && self.identity.is_none() {
            return invalid(
                "mesh.cidrs",
                "mTLS origination needs an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        self.validate_no_silent_bypass()?;
        for (i, rule) in self.mesh.identities.iter().enumerate() {
            if rule.cidrs.is_empty() || rule.allow.is_empty() {
                return Err(ConfigError::InvalidAt {
                    field: format!("mesh.identities[{i}]"),
                    reason: "needs at least one network in cidrs and one identity in allow".into(),
                });
            }
        }
        if !self.mesh.identities.is_empty() && self.identity.is_none() {
            return invalid(
                "mesh.identities",
                "identity rules need an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        if let Some(identity) = &self.identity {
            for td in identity.federated_bundles.keys() {
                if format!("spiffe://{td}/x")
                    .parse::<crate::tls::SpiffeId>()
                    .is_err()
                {
                    return Err(ConfigError::InvalidAt {
                        field: format!("identity.federated_bundles.{td}"),
                        reason:
                            "not a valid trust domain (lower-case letters, digits, '-', '.', '_')"
                                .into(),
                    });
                }
            }
        }
        services::validate(&self.services)?;
        for (i, s) in self.services.iter().enumerate() {
            let wants_mtls = s.mtls == Some(true) || s.server_identity.is_some();
            if wants_mtls && self.identity.is_none() {
                return Err(ConfigError::InvalidAt {
                    field: format!("services[{i}].mtls"),
                    reason: "mTLS to a service needs an identity (identity.cert, identity.key, identity.bundle)".into(),
                });
            }
            if s.mtls == Some(false) && s.server_identity.is_some() {
                return Err(ConfigError::InvalidAt {
                    field: format!("services[{i}].server_identity"),
                    reason: "an expected server identity needs mtls".into(),
                });
            }
        }
        if self.inbound.max_unauthenticated == 0 || self.inbound.max_unauthenticated_per_client == 0
        {
            return invalid(
                "inbound.max_unauthenticated",
                "must be greater than 0 (as must max_unauthenticated_per_client)",
            );
        }
        if self.inbound.detect_timeout.is_zero() {
            return invalid("inbound.detect_timeout", "must be greater than 0");
        }
        if !self.admin.address.ip().is_loopback() {
            return invalid(
                "admin.address",
                "must be a loopback address: debug endpoints name peers",
            );
        }
        if self.admin.address.port() == 0 || self.health.address.port() == 0 {
            let field = if self.admin.address.port() == 0 {
                "admin.address"
            } else {
                "health.address"
            };
            return invalid(field, "port 0 is not a valid port");
        }
        let ports = [
            ("proxy.outbound_port", self.proxy.outbound_port),
            ("inbound.port", self.inbound.port),
            ("admin.address", self.admin.address.port()),
            ("health.address", self.health.address.port()),
        ];
        for (i, (field, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("port {port} is already used by {other}"),
                });
            }
        }
        Ok(())
    }

    /// Refuses settings that would let traffic skip a policy the same file asks for:
    /// a port mode on a port inbound capture never steers, mTLS networks or service
    /// addresses that capture excludes.
    fn validate_no_silent_bypass(&self) -> Result<(), ConfigError> {
        let steered = |port: u16| {
            self.inbound.enabled
                && !self.inbound.exclude_ports.contains(&port)
                && !self.own_ports().contains(&port)
                && (self.inbound.ports.is_empty() || self.inbound.ports.contains(&port))
        };
        for (port, mode) in &self.inbound.port_modes {
            if *mode != InboundMode::Disabled && !steered(*port) {
                return Err(ConfigError::InvalidAt {
                    field: format!("inbound.port_modes.{port}"),
                    reason: format!(
                        "port {port} is not captured inbound (inbound.enabled, inbound.ports, \
                         inbound.exclude_ports or a sidecar port), so {mode:?} would not be enforced"
                    ),
                });
            }
        }
        if !self.inbound.enabled
            && self
                .inbound
                .mode
                .is_some_and(|m| m != InboundMode::Disabled)
        {
            return Err(ConfigError::Invalid {
                field: "inbound.mode",
                reason: "inbound.enabled is false, so no inbound port mode is enforced".into(),
            });
        }
        for mesh in &self.mesh.cidrs {
            if let Some(excluded) = self
                .capture
                .exclude_cidrs
                .iter()
                .find(|e| e.contains(mesh) || mesh.contains(*e))
            {
                return Err(ConfigError::Invalid {
                    field: "capture.exclude_cidrs",
                    reason: format!(
                        "{excluded} overlaps mesh.cidrs {mesh}: connections there would skip mTLS"
                    ),
                });
            }
        }
        for (i, service) in self.services.iter().enumerate() {
            for (j, addr) in service.addresses.iter().enumerate() {
                let port_excluded = self.capture.exclude_ports.contains(&addr.port())
                    || (!self.capture.include_ports.is_empty()
                        && !self.capture.include_ports.contains(&addr.port()));
                let net_excluded = self
                    .capture
                    .exclude_cidrs
                    .iter()
                    .any(|net| net.contains(&addr.ip()));
                if port_excluded || net_excluded {
                    return Err(ConfigError::InvalidAt {
                        field: format!("services[{i}].addresses[{j}]"),
                        reason: format!(
                            "{addr} is excluded from capture (capture.exclude_cidrs, \
                             exclude_ports or include_ports), so the service would never be used"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The sidecar's own ports, which are never captured.
    pub fn own_ports(&self) -> [u16; 4] {
        [
            self.proxy.outbound_port,
            self.inbound.port,
            self.admin.address.port(),
            self.health.address.port(),
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

/// Sets `value` at `path` in `tree`, creating mappings on the way.
fn set_path(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("names no field".into());
    };
    let mut node = tree;
    for segment in parents {
        let Value::Mapping(map) = node else {
            return Err(format!(
                "`{segment}` is inside a field that is not a section"
            ));
        };
        node = map
            .entry(Value::String(segment.clone()))
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    let Value::Mapping(map) = node else {
        return Err(format!("`{last}` is inside a field that is not a section"));
    };
    map.insert(Value::String(last.clone()), value);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml", Vec::new())
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").expect("empty is valid"), Config::default());
        assert_eq!(
            parse("# only a comment\n").expect("comment is valid"),
            Config::default()
        );
        assert_eq!(parse("{}").expect("{} is valid"), Config::default());
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../examples/sidecar.yaml");
        let config = parse(text).expect("the documented example is valid");
        assert_eq!(config.proxy.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn full_file_parses() {
        let config = parse(
            "proxy:\n  uid: 1500\n  connect_timeout: 250ms\n  idle_timeout: 2m\n\
             capture:\n  exclude_ports: [22, 6443]\n  exclude_cidrs: [10.96.0.1/32, 'fd00::/8']\n",
        )
        .expect("valid");
        assert_eq!(config.proxy.uid, 1500);
        assert_eq!(config.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.capture.exclude_ports, vec![22, 6443]);
        assert_eq!(config.capture.exclude_cidrs.len(), 2);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = error("proxy:\n  conect_timeout: 1s\n");
        assert!(e.contains("proxy") && e.contains("conect_timeout"), "{e}");
        let e = error("bogus: 1\n");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_cidr_is_named() {
        let e = error("capture:\n  exclude_cidrs: [10.0.0.0/8, 10.0.0.300/8]\n");
        assert!(e.contains("capture.exclude_cidrs[1]"), "{e}");
    }

    #[test]
    fn port_out_of_range_is_named() {
        let e = error("capture:\n  exclude_ports: [80, 70000]\n");
        assert!(e.contains("capture.exclude_ports[1]"), "{e}");
        let e = error("capture:\n  include_ports: [0]\n");
        assert!(e.contains("capture.include_ports"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = error("proxy:\n  connect_timeout: soon\n");
        assert!(
            e.contains("proxy.connect_timeout") && e.contains("soon"),
            "{e}"
        );
    }

    #[test]
    fn admin_must_be_loopback() {
        let e = error("admin:\n  address: 0.0.0.0:15000\n");
        assert!(e.contains("admin.address") && e.contains("loopback"), "{e}");
    }

    #[test]
    fn port_clash_is_named() {
        let e = error("proxy:\n  outbound_port: 15020\n");
        assert!(
            e.contains("health.address") && e.contains("proxy.outbound_port"),
            "{e}"
        );
    }

    #[test]
    fn inbound_settings_are_checked() {
        let e = error("inbound:\n  ports: [80]\n  exclude_ports: [80]\n");
        assert!(e.contains("inbound.ports"), "{e}");
        let e = error("inbound:\n  port: 15000\n");
        assert!(
            e.contains("inbound.port") && e.contains("admin.address"),
            "{e}"
        );
        let config = parse("inbound:\n  ports: [8080]\n  fail_closed: false\n").expect("valid");
        assert_eq!(config.inbound.ports, vec![8080]);
        assert!(!config.inbound.fail_closed);
        assert_eq!(config.own_ports(), [15001, 15006, 15000, 15020]);
    }

    #[test]
    fn inbound_modes_need_an_identity_and_resolve_per_port() {
        let e = error("inbound:\n  mode: strict\n");
        assert!(e.contains("inbound.mode") && e.contains("identity"), "{e}");
        let e = error("inbound:\n  allow: ['spiffe://td/ns/a/sa/b', 'nope']\n");
        assert!(e.contains("inbound.allow[1]"), "{e}");
        let config = parse(
            "identity:\n  cert: c.pem\n  key: k.pem\n  bundle: b.pem\n\
             inbound:\n  port_modes:\n    8080: strict\n    9090: disabled\n  allow: ['spiffe://td/ns/a/*']\n",
        )
        .expect("valid");
        assert_eq!(config.inbound_mode(8080), InboundMode::Strict);
        assert_eq!(config.inbound_mode(9090), InboundMode::Disabled);
        assert_eq!(config.inbound_mode(7070), InboundMode::Permissive);
        assert_eq!(Config::default().inbound_mode(7070), InboundMode::Disabled);
    }

    #[test]
    fn settings_that_would_skip_a_policy_are_refused() {
        let id = "identity:\n  cert: c.pem\n  key: k.pem\n  bundle: b.pem\n";
        let e = error(&format!(
            "{id}inbound:\n  exclude_ports: [9090]\n  port_modes:\n    9090: strict\n"
        ));
        assert!(e.contains("inbound.port_modes.9090"), "{e}");
        let e = error(&format!(
            "{id}inbound:\n  ports: [8080]\n  port_modes:\n    9090: permissive\n"
        ));
        assert!(e.contains("inbound.port_modes.9090"), "{e}");
        let e = error(&format!("{id}inbound:\n  port_modes:\n    15020: strict\n"));
        assert!(e.contains("inbound.port_modes.15020"), "{e}");
        let e = error(&format!("{id}inbound:\n  enabled: false\n  mode: strict\n"));
        assert!(e.contains("inbound.mode"), "{e}");
        let e = error(&format!(
            "{id}inbound:\n  enabled: false\n  port_modes:\n    8080: strict\n"
        ));
        assert!(e.contains("inbound.port_modes.8080"), "{e}");
        let e = error(&format!(
            "{id}mesh:\n  cidrs: [10.0.0.0/16]\ncapture:\n  exclude_cidrs: [10.0.5.0/24]\n"
        ));
        assert!(
            e.contains("capture.exclude_cidrs") && e.contains("mesh"),
            "{e}"
        );
        let svc = "services:\n- name: web\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.1:80']\n";
        let e = error(&format!("capture:\n  exclude_ports: [80]\n{svc}"));
        assert!(e.contains("services[0].addresses[0]"), "{e}");
        let e = error(&format!("capture:\n  include_ports: [443]\n{svc}"));
        assert!(e.contains("services[0].addresses[0]"), "{e}");
        let e = error(&format!(
            "capture:\n  exclude_cidrs: [198.19.0.0/16]\n{svc}"
        ));
        assert!(e.contains("services[0].addresses[0]"), "{e}");
        // Disabled is allowed anywhere: nothing to enforce.
        parse("inbound:\n  exclude_ports: [9090]\n  port_modes:\n    9090: disabled\n")
            .expect("disabled on an excluded port is fine");
    }

    #[test]
    fn proxy_uid_zero_is_refused() {
        assert!(error("proxy:\n  uid: 0\n").contains("proxy.uid"));
    }

    #[test]
    fn env_overrides_fields_and_is_named_on_error() {
        let env = vec![
            (
                "SIDECAR__PROXY__CONNECT_TIMEOUT".to_string(),
                "2s".to_string(),
            ),
            (
                "SIDECAR__CAPTURE__EXCLUDE_PORTS".to_string(),
                "[22, 443]".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let config = Config::from_yaml("proxy:\n  connect_timeout: 9s\n", "f", env).expect("valid");
        assert_eq!(config.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.capture.exclude_ports, vec![22, 443]);

        let env = vec![(
            "SIDECAR__PROXY__OUTBOUND_PORT".to_string(),
            "99999".to_string(),
        )];
        let e = Config::from_yaml("", "f", env)
            .expect_err("out of range")
            .to_string();
        assert!(
            e.contains("SIDECAR__PROXY__OUTBOUND_PORT") && e.contains("proxy.outbound_port"),
            "{e}"
        );

        let env = vec![("SIDECAR__PROXY__NOPE".to_string(), "1".to_string())];
        let e = Config::from_yaml("", "f", env)
            .expect_err("unknown")
            .to_string();
        assert!(
            e.contains("SIDECAR__PROXY__NOPE") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn services_parse_with_short_and_long_endpoints() {
        let config = parse(
            "services:\n- name: web\n  addresses: ['198.19.0.10:80', '[fd00:5d::10]:80']\n  \
             endpoints: ['10.0.0.1:8080', {address: '10.0.0.2:8080', weight: 3, zone: b}]\n  \
             policy: maglev\n  hash_key: source_address\n  connect_timeout: 2s\n\
             - name: db\n  addresses: ['198.19.0.11:5432']\n  dns: db.test:5432\n  dns_refresh: 5s\n\
             outbound:\n  policy: registry_only\n  allow_cidrs: [192.0.2.0/24]\n\
             dns:\n  resolver: 127.0.0.1:5353\n",
        )
        .expect("valid");
        let web = &config.services[0];
        assert_eq!(web.addresses.len(), 2);
        assert_eq!(web.endpoints[0].weight, 1);
        assert_eq!(web.endpoints[1].weight, 3);
        assert_eq!(web.endpoints[1].zone.as_deref(), Some("b"));
        assert_eq!(web.policy, LbPolicy::Maglev);
        assert_eq!(web.hash_key, HashKey::SourceAddress);
        assert_eq!(web.retries, 2);
        assert_eq!(web.outlier, OutlierConfig::default());
        let db = &config.services[1];
        assert_eq!(
            db.dns.as_ref().map(|d| (d.name.as_str(), d.port)),
            Some(("db.test", 5432))
        );
        assert_eq!(db.policy, LbPolicy::RoundRobin);
        assert_eq!(config.outbound.policy, OutboundPolicy::RegistryOnly);
    }

    #[test]
    fn service_errors_name_the_service_and_field() {
        let svc =
            |body: &str| format!("services:\n- name: web\n  addresses: ['198.19.0.10:80']\n{body}");
        let e = error(&svc("  endpoints: [{address: '10.0.0.1:80', weight: 0}]\n"));
        assert!(e.contains("services[0].endpoints[0].weight"), "{e}");
        let e = error(&svc("  endpoints: ['10.0.0.1']\n"));
        assert!(
            e.contains("services[0].endpoints[0]") && e.contains("10.0.0.1"),
            "{e}"
        );
        let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  dns: a.b:80\n"));
        assert!(e.contains("services[0].dns"), "{e}");
        let e = error(&svc(""));
        assert!(e.contains("services[0].endpoints"), "{e}");
        let e = error(&svc("  dns: 'bad name:80'\n"));
        assert!(e.contains("services[0].dns"), "{e}");
        let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  policy: fastest\n"));
        assert!(
            e.contains("services[0].policy") && e.contains("fastest"),
            "{e}"
        );
        let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  mtls: true\n"));
        assert!(
            e.contains("services[0].mtls") && e.contains("identity"),
            "{e}"
        );
        let two = format!(
            "{}- name: api\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.2:80']\n",
            svc("  endpoints: ['10.0.0.1:80']\n")
        );
        let e = error(&two);
        assert!(
            e.contains("services[1].addresses") && e.contains("services[0]"),
            "{e}"
        );
        let e = error(&svc(
            "  endpoints: ['10.0.0.1:80']\n  outlier: {base_ejection: 10s, max_ejection: 1s}\n",
        ));
        assert!(e.contains("services[0].outlier.max_ejection"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Some(Path::new("/nonexistent/sidecar.yaml")), Vec::new())
            .expect_err("missing")
            .to_string();
        assert!(e.contains("/nonexistent/sidecar.yaml"), "{e}");
    }
}
