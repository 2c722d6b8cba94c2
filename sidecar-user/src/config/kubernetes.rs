//! The `kubernetes` section: discovery of services, endpoints and the identity each
//! endpoint must present, straight from the Kubernetes API server.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::duration;

/// Kubernetes discovery. Off unless `enabled`; the config file's `services` stay and
/// win over discovered ones with the same address or name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Watch Services, EndpointSlices and Pods.
    pub enabled: bool,
    /// A kubeconfig file to reach the API server with; default: the pod's service
    /// account (`KUBERNETES_SERVICE_HOST` and the mounted token and CA).
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to watch (one watch per namespace and kind); empty: the whole
    /// cluster. Destinations in other namespaces then pass through as unknown.
    pub namespaces: Vec<String>,
    /// Trust domain of the SPIFFE IDs endpoints must present
    /// (`spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`); default:
    /// the sidecar's own.
    pub trust_domain: Option<String>,
    /// This pod's zone (`topology.kubernetes.io/zone` of its node), for services with
    /// `trafficDistribution: PreferClose` or topology hints; unset: the zone of the
    /// pod's own endpoint in an EndpointSlice, if it backs a Service.
    pub zone: Option<String>,
    /// Endpoints with no sidecar or ztunnel in front (plain pods): `allow` reaches
    /// them in plaintext, `deny` refuses them (a mesh that requires mTLS).
    pub plaintext: PlaintextPolicy,
    /// How long an outbound connection waits for the first full list before it is
    /// refused (the sidecar is not ready until then).
    #[serde(deserialize_with = "duration")]
    pub initial_sync_timeout: Duration,
    /// Caps on what discovery routes: anyone allowed to create Services or Pods
    /// anywhere in the watched namespaces writes into every sidecar's memory.
    pub limits: DiscoveryLimits,
}

/// Caps on discovered objects. What a cap leaves out is counted
/// (`sidecar_kubernetes_capped`) and logged; it is never routed.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryLimits {
    /// Routed services (one per Service port) at most; past it, by name order.
    pub max_services: usize,
    /// Ports routed per Service (its first ones).
    pub max_ports_per_service: usize,
    /// Endpoints per Service port (the lowest addresses).
    pub max_endpoints_per_service: usize,
    /// Bytes of one API server response that is not a watch (a list page of 500
    /// objects); a larger one fails, and the list is retried after the backoff.
    pub max_response_bytes: usize,
    /// Bytes of one watch event (one object: etcd stores at most 1.5 MiB); a larger
    /// one ends the watch, which is resumed after the backoff.
    pub max_watch_line_bytes: usize,
}

impl Default for DiscoveryLimits {
    fn default() -> Self {
        // A large cluster has a few thousand Service ports; Kubernetes itself puts
        // at most 1,000 endpoints in a Service's Endpoints object.
        Self {
            max_services: 5_000,
            max_ports_per_service: 32,
            max_endpoints_per_service: 1_000,
            max_response_bytes: 64 << 20,
            max_watch_line_bytes: 8 << 20,
        }
    }
}

/// What happens to endpoints that cannot speak mTLS.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PlaintextPolicy {
    /// Reached in plaintext.
    #[default]
    Allow,
    /// Never chosen; a service with no other endpoint refuses the connection.
    Deny,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            namespaces: Vec::new(),
            trust_domain: None,
            zone: None,
            plaintext: PlaintextPolicy::Allow,
            initial_sync_timeout: Duration::from_secs(10),
            limits: DiscoveryLimits::default(),
        }
    }
}
