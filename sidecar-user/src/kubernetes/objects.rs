//! What the sidecar keeps of each Kubernetes object: only the fields routing needs,
//! copied out of the API's objects as they arrive (a Pod is kilobytes; its record
//! here is tens of bytes), so memory follows the endpoints, not the objects.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, LazyLock, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::pod::PodIdentity;

/// The annotation `sidecar inject` sets on the pods it injects: they speak HBONE.
pub const INJECTED_ANNOTATION: &str = "sidecar.example.dev/injected";
/// Istio's ambient enrollment: the node's ztunnel serves the pod over HBONE.
pub const AMBIENT_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name`, the key of every record.
pub type Key = (Arc<str>, Arc<str>);

/// Namespaces, service accounts and zones: a few hundred names shared by 50,000
/// records, so each is held once (at 32 bytes a copy, that is 3 MB saved).
static SHARED_NAMES: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);

/// The shared copy of `name`.
fn shared(name: &str) -> Arc<str> {
    let mut names = match SHARED_NAMES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(known) = names.get(name) {
        return known.clone();
    }
    let name: Arc<str> = name.into();
    names.insert(name.clone());
    name
}

/// Forgets the shared names no record holds any more (a deleted namespace's).
pub fn forget_unused_names() {
    if let Ok(mut names) = SHARED_NAMES.lock() {
        names.retain(|n| Arc::strong_count(n) > 1);
    }
}

/// A Service's routing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Cluster IPs (IPv4 and IPv6); empty for headless and ExternalName services.
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
    /// `trafficDistribution: PreferClose`.
    pub prefer_close: bool,
}

/// One TCP port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port the application dials on the cluster IP.
    pub port: u16,
    /// Its name (matches the EndpointSlice port of the same name; shared).
    pub name: Option<Arc<str>>,
}

/// An EndpointSlice's routing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: Arc<str>,
    /// Named target ports (names shared).
    pub ports: Vec<(Option<Arc<str>>, u16)>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointRecord>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// Its address: the first of its addresses, which the API says are fungible and
    /// clients may use alone (kube-proxy does).
    pub address: IpAddr,
    /// Ready: takes new connections. Terminating and not-ready endpoints do not
    /// (their open connections run on).
    pub ready: bool,
    /// `topology.kubernetes.io/zone` of its node (shared).
    pub zone: Option<Arc<str>>,
    /// Topology hints: the zones that should use it (shared).
    pub for_zones: Box<[Arc<str>]>,
}

/// A Pod's identity fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// Its service account.
    pub service_account: Arc<str>,
    /// Its IPv4 address (not the node's: host-network pods are left out).
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// Served over HBONE: injected with our sidecar, or enrolled in Istio ambient.
    pub hbone: bool,
    /// In phase `Running` (another pod claiming its IP loses to it).
    pub running: bool,
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((
        shared(meta.namespace.as_deref()?),
        meta.name.as_deref()?.into(),
    ))
}

fn ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

impl ServiceRecord {
    /// The record of `svc`, with its key; `None` for an object without a name.
    pub fn of(svc: &Service) -> Option<(Key, Self)> {
        let key = key(&svc.metadata)?;
        let spec = svc.spec.as_ref();
        let external = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
        let mut cluster_ips: Vec<IpAddr> = match spec {
            Some(s) if !external => s
                .cluster_ips
                .iter()
                .flatten()
                .chain(s.cluster_ip.iter())
                .filter_map(|a| ip(a))
                .collect(),
            _ => Vec::new(),
        };
        cluster_ips.sort();
        cluster_ips.dedup();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .filter_map(|p| {
                        Some(ServicePort {
                            port: u16::try_from(p.port).ok().filter(|&p| p != 0)?,
                            name: p.name.as_deref().filter(|n| !n.is_empty()).map(shared),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some((
            key,
            Self {
                cluster_ips,
                ports,
                client_ip_affinity: spec.and_then(|s| s.session_affinity.as_deref())
                    == Some("ClientIP"),
                prefer_close: spec.and_then(|s| s.traffic_distribution.as_deref())
                    == Some("PreferClose"),
            },
        ))
    }
}

impl SliceRecord {
    /// The record of `slice`, with its key; `None` without a name or a Service label
    /// (a slice no Service owns routes nothing).
    pub fn of(slice: &EndpointSlice) -> Option<(Key, Self)> {
        let key = key(&slice.metadata)?;
        let service: Arc<str> = slice
            .metadata
            .labels
            .as_ref()?
            .get(SERVICE_NAME_LABEL)?
            .as_str()
            .into();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|&p| p != 0)?;
                Some((
                    p.name.as_deref().filter(|n| !n.is_empty()).map(shared),
                    port,
                ))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                let conditions = e.conditions.as_ref();
                // Unset `ready` means ready (the API's rule); a terminating endpoint
                // is never ready for new connections.
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                    && !conditions.and_then(|c| c.terminating).unwrap_or(false);
                Some(EndpointRecord {
                    address: e.addresses.first().and_then(|a| ip(a))?,
                    ready,
                    zone: e.zone.as_deref().map(shared),
                    for_zones: e
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| shared(&z.name))
                        .collect(),
                })
            })
            .collect();
        Some((
            key,
            Self {
                service,
                ports,
                endpoints,
            },
        ))
    }
}

impl PodRecord {
    /// Its addresses.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        v4.into_iter().chain(self.ipv6.map(IpAddr::V6))
    }

    /// The record of `pod`, with its key; `None` for a pod with no IP of its own yet
    /// (pending, or on the host network: its IP is the node's), or one being deleted
    /// (its IP may already be another pod's).
    pub fn of(pod: &PodIdentity) -> Option<(Key, Self)> {
        let key = key(&pod.metadata)?;
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| ip(&p.ip))
            .chain(status.pod_ip.as_deref().and_then(ip))
            .collect();
        ips.sort();
        ips.dedup();
        // The lowest of each family (a pod has at most one of each).
        let ipv4 = ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        let ipv6 = ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        });
        if ipv4.is_none() && ipv6.is_none() {
            return None;
        }
        let annotations = pod.metadata.annotations.as_ref();
        let annotated = |k: &str, v: &str| {
            annotations
                .and_then(|a| a.get(k))
                .is_some_and(|value| value == v)
        };
        Some((
            key,
            Self {
                service_account: shared(
                    spec.service_account_name
                        .as_deref()
                        .filter(|s| !s.is_empty())
                        .unwrap_or("default"),
                ),
                ipv4,
                ipv6,
                hbone: annotated(INJECTED_ANNOTATION, "true")
                    || annotated(AMBIENT_ANNOTATION, "enabled"),
                running: status.phase.as_deref() == Some("Running"),
            },
        ))
    }
}
