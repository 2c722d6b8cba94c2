//! The `mesh` section: which destinations have a sidecar (reached over HBONE), who may
//! serve them, and the HBONE tunnel's settings.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::duration;

/// Outbound mTLS origination.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Destination networks whose pods run a sidecar or ztunnel (typically the pod
    /// CIDRs): reached over HBONE at port `hbone.port` of the destination, whose
    /// certificate must come from the trust bundle, or the connection fails: it is
    /// never sent in plaintext.
    pub cidrs: Vec<IpNet>,
    /// Which identities may serve which destination networks, checked on every
    /// outbound mTLS handshake: the most specific rule whose network holds the
    /// destination applies. A destination no rule covers must present an ID of the
    /// local trust domain. A service's `server_identity` wins over these rules.
    pub identities: Vec<MeshIdentityRule>,
    /// The HBONE tunnel: its port, and the outbound connection pool.
    pub hbone: HboneConfig,
}

/// HBONE: HTTP/2 `CONNECT` streams over pooled mTLS connections, as Istio's ztunnel
/// speaks it. The HTTP/2 windows and frame size are ztunnel's (4 MiB per stream,
/// 16 MiB per connection, 1 MiB frames).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HboneConfig {
    /// Port of the HBONE listener, on every address of the pod (never captured), and
    /// of every peer's: the same in the whole mesh (ztunnel's is 15008).
    pub port: u16,
    /// Streams one pooled outbound connection carries at once at most (the server's
    /// limit applies when lower); more open another connection.
    pub max_streams_per_connection: u32,
    /// Streams one inbound connection may carry at once.
    pub max_inbound_streams_per_connection: u32,
    /// Pooled connections to one destination at most; past it, new streams share the
    /// least loaded one and wait for the server to take them.
    pub max_connections_per_destination: usize,
    /// Connections to one destination that streams open at the same time are
    /// spread over before they share one (default: `proxy.worker_threads`): a
    /// connection's encryption runs on one core at a time, so bulk transfers to one
    /// destination use every core.
    pub parallel_connections: Option<usize>,
    /// A pooled connection that carried no stream for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A PING is sent on every connection this often, both ways...
    #[serde(deserialize_with = "duration")]
    pub keepalive_interval: Duration,
    /// ... and a connection whose PING goes unanswered this long is closed.
    #[serde(deserialize_with = "duration")]
    pub keepalive_timeout: Duration,
}

impl Default for HboneConfig {
    fn default() -> Self {
        // ztunnel's values, so a mixed mesh behaves alike on both sides.
        Self {
            port: super::HBONE_PORT,
            max_streams_per_connection: 100,
            max_inbound_streams_per_connection: 200,
            max_connections_per_destination: 64,
            parallel_connections: None,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
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
