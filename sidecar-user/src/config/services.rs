//! Services: virtual addresses the application dials (a Kubernetes ClusterIP:port),
//! balanced by the proxy across endpoints from the config file or from DNS, plus the
//! outbound traffic policy for everything that is not a service.

use std::{fmt, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use super::{ConfigError, duration, opt_duration};
use crate::tls::IdentityMatcher;

/// What happens to outbound connections whose destination is not a service.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// `allow_any` (default): unknown destinations pass through to where the app
    /// dialed. `registry_only`: only services and `allow_cidrs` are reachable.
    pub policy: OutboundPolicy,
    /// Destinations reachable under `registry_only` without being a service.
    pub allow_cidrs: Vec<IpNet>,
}

/// Istio's `outboundTrafficPolicy.mode`, with the same two values.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// Unknown destinations pass through.
    #[default]
    AllowAny,
    /// Unknown destinations are refused and counted.
    RegistryOnly,
}

/// DNS discovery settings shared by every service that uses `dns:`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Resolver to ask (`ip:port`); default: the first `nameserver` of
    /// /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
}

/// One service.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name, used in metrics and logs.
    pub name: String,
    /// Virtual addresses (`ip:port`, IPv4 or `[IPv6]:port`) the application dials.
    pub addresses: Vec<SocketAddr>,
    /// Static endpoints: `ip:port`, or `{address, weight, zone}`.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// DNS discovery (`name:port`): the A/AAAA answers are the endpoints.
    #[serde(default)]
    pub dns: Option<DnsTarget>,
    /// Re-resolve this often; default: when the answer's TTL expires (at least every
    /// second, at most every 5 minutes).
    #[serde(default, deserialize_with = "opt_duration")]
    pub dns_refresh: Option<Duration>,
    /// Load-balancing policy.
    #[serde(default)]
    pub policy: LbPolicy,
    /// What consistent-hashing policies hash.
    #[serde(default)]
    pub hash_key: HashKey,
    /// Budget for connecting, across every attempt; default `proxy.connect_timeout`.
    #[serde(default, deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Further endpoints tried after a failed connect, within the budget.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Reach the endpoints over mTLS (they run a sidecar). Default: when the endpoint
    /// is in `mesh.cidrs`.
    #[serde(default)]
    pub mtls: Option<bool>,
    /// Identity the endpoints must present (SPIFFE ID or `spiffe://td/ns/<ns>/*`).
    #[serde(default)]
    pub server_identity: Option<IdentityMatcher>,
    /// Circuit-breaker thresholds.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Active TCP health checks (off unless set).
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Below this percentage of healthy endpoints, balance across all of them.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u8,
}

impl ServiceConfig {
    /// A service at `addresses` with every other field at its default, as a config
    /// file entry with only `name` and `addresses` would have.
    pub fn named(name: String, addresses: Vec<SocketAddr>) -> Self {
        Self {
            name,
            addresses,
            endpoints: Vec::new(),
            dns: None,
            dns_refresh: None,
            policy: LbPolicy::default(),
            hash_key: HashKey::default(),
            connect_timeout: None,
            retries: default_retries(),
            mtls: None,
            server_identity: None,
            limits: LimitsConfig::default(),
            outlier: OutlierConfig::default(),
            health_check: None,
            panic_threshold: default_panic_threshold(),
        }
    }
}

fn default_retries() -> u32 {
    // Envoy's default retry policy for connect failures allows one retry; two more
    // attempts ride out a single dead endpoint plus one more while ejection kicks in.
    2
}

fn default_panic_threshold() -> u8 {
    // Envoy's default healthy panic threshold.
    50
}

/// An endpoint in the config file.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Relative share of new connections (≥ 1).
    pub weight: u32,
    /// Locality, shown in logs and `/services`.
    pub zone: Option<Arc<str>>,
    /// The identity this endpoint must present; wins over the service's
    /// `server_identity` (discovery sets the pod's service account, shared by its
    /// endpoints).
    pub identity: Option<Arc<IdentityMatcher>>,
    /// Reach it over mTLS (HBONE) or not; default: the service's `mtls`.
    pub mtls: Option<bool>,
}

impl EndpointConfig {
    /// A plain endpoint at `address`: weight 1, no zone, the service's mTLS rule.
    pub fn at(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            zone: None,
            identity: None,
            mtls: None,
        }
    }
}

/// `name:port` for DNS discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    /// Name to resolve (A and AAAA).
    pub name: String,
    /// Port of every endpoint.
    pub port: u16,
}

/// Load-balancing policies, with Envoy's names.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Each endpoint in turn, weighted.
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices over active connections × connect latency (Linkerd's).
    LeastRequest,
    /// Consistent hashing on a ring (Ketama-style, xxHash64 like Envoy).
    RingHash,
    /// Maglev consistent hashing (Envoy's default table size, 65537).
    Maglev,
}

/// What consistent hashing keys on.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The client pod's address: session affinity like Kubernetes' `ClientIP`.
    #[default]
    ClientIp,
    /// Client address and port: spreads one pod's connections, each sticking.
    SourceAddress,
}

/// Envoy's circuit-breaker thresholds, per service and per sidecar.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections to the service; past it new ones are refused.
    pub max_connections: usize,
    /// Connects in progress to the service; past it new ones are refused.
    pub max_pending: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        // Envoy's 1,024 is a limit busy pods hit by surprise (a pool of 200 database
        // connections per replica, times a few replicas, is already close). These are
        // above what one pod can open at all (28,232 ephemeral ports per family), so
        // they only bound a runaway client; set lower ones per service on purpose.
        Self {
            max_connections: 65_536,
            max_pending: 16_384,
        }
    }
}

/// Passive outlier detection: ejection after consecutive connect failures.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failed connects that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection; each further one in a row doubles it.
    #[serde(deserialize_with = "duration")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(deserialize_with = "duration")]
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        // Envoy: consecutive_gateway_failure 5, base_ejection_time 30 s, max 300 s.
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// Active TCP health checks.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between checks of one endpoint.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Budget for one check.
    #[serde(default = "default_check_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark it healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_unhealthy_threshold() -> u32 {
    2
}

fn default_healthy_threshold() -> u32 {
    1
}

// === impl EndpointConfig ===

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            address: SocketAddr,
            #[serde(default = "one")]
            weight: u32,
            #[serde(default)]
            zone: Option<String>,
            #[serde(default)]
            identity: Option<IdentityMatcher>,
            #[serde(default)]
            mtls: Option<bool>,
        }
        fn one() -> u32 {
            1
        }
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"ip:port\" or {address, weight, zone, identity, mtls}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let address = v
                    .parse()
                    .map_err(|e| E::custom(format!("invalid endpoint {v:?}: {e}")))?;
                Ok(EndpointConfig::at(address))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let f = Fields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointConfig {
                    address: f.address,
                    weight: f.weight,
                    zone: f.zone.map(Into::into),
                    identity: f.identity.map(Arc::new),
                    mtls: f.mtls,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

// === impl DnsTarget ===

impl FromStr for DnsTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected name:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid || port == 0 {
            return Err(format!("{s:?}: expected a DNS name and a port (1-65535)"));
        }
        Ok(Self {
            name: name.trim_end_matches('.').to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for DnsTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// Checks the services: names unique, addresses unique, endpoints or DNS (not both),
/// sane weights and thresholds. `index` errors name `services[i].field`.
pub fn validate(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let invalid = |i: usize, field: &str, reason: String| ConfigError::InvalidAt {
        field: format!("services[{i}].{field}"),
        reason,
    };
    let mut names = std::collections::HashMap::new();
    let mut vips = std::collections::HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if s.name.is_empty()
            || s.name.len() > 63
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(invalid(
                i,
                "name",
                format!("{:?}: use 1-63 letters, digits, '-', '.', '_'", s.name),
            ));
        }
        if let Some(j) = names.insert(s.name.as_str(), i) {
            return Err(invalid(
                i,
                "name",
                format!("{:?} is already the name of services[{j}]", s.name),
            ));
        }
        if s.addresses.is_empty() {
            return Err(invalid(i, "addresses", "needs at least one ip:port".into()));
        }
        for addr in &s.addresses {
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_loopback() {
                return Err(invalid(
                    i,
                    "addresses",
                    format!(
                        "{addr}: a virtual address needs a routable IP and a port (loopback is never captured)"
                    ),
                ));
            }
            if let Some(j) = vips.insert(*addr, i) {
                return Err(invalid(
                    i,
                    "addresses",
                    format!("{addr} is already an address of services[{j}]"),
                ));
            }
        }
        match (&s.dns, s.endpoints.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    i,
                    "dns",
                    "use either endpoints or dns, not both".into(),
                ));
            }
            (None, true) => {
                return Err(invalid(
                    i,
                    "endpoints",
                    "needs at least one endpoint (or dns: name:port)".into(),
                ));
            }
            _ => {}
        }
        for (k, e) in s.endpoints.iter().enumerate() {
            if e.weight == 0 || e.weight > 10_000 {
                return Err(invalid(
                    i,
                    &format!("endpoints[{k}].weight"),
                    format!("{}: must be between 1 and 10000", e.weight),
                ));
            }
            if e.address.port() == 0 || e.address.ip().is_unspecified() {
                return Err(invalid(
                    i,
                    &format!("endpoints[{k}].address"),
                    format!("{}: needs an IP and a port", e.address),
                ));
            }
        }
        if s.panic_threshold > 100 {
            return Err(invalid(
                i,
                "panic_threshold",
                format!("{}: a percentage, 0-100", s.panic_threshold),
            ));
        }
        if s.connect_timeout.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                i,
                "connect_timeout",
                "must be greater than 0".into(),
            ));
        }
        if s.limits.max_connections == 0 || s.limits.max_pending == 0 {
            return Err(invalid(i, "limits", "limits must be at least 1".into()));
        }
        if s.outlier.consecutive_failures == 0 || s.outlier.base_ejection.is_zero() {
            return Err(invalid(
                i,
                "outlier",
                "consecutive_failures and base_ejection must be greater than 0".into(),
            ));
        }
        if s.outlier.max_ejection < s.outlier.base_ejection {
            return Err(invalid(
                i,
                "outlier.max_ejection",
                "must not be shorter than base_ejection".into(),
            ));
        }
        if let Some(h) = &s.health_check {
            if h.interval.is_zero() || h.timeout.is_zero() {
                return Err(invalid(
                    i,
                    "health_check",
                    "interval and timeout must be greater than 0".into(),
                ));
            }
            if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                return Err(invalid(
                    i,
                    "health_check",
                    "thresholds must be at least 1".into(),
                ));
            }
        }
        if s.dns_refresh.is_some_and(|d| d.is_zero()) {
            return Err(invalid(i, "dns_refresh", "must be greater than 0".into()));
        }
    }
    Ok(())
}
