//! What the sidecar keeps of each Kubernetes object: only the fields routing needs,
//! copied out of the API's objects as they arrive (a Pod is kilobytes; its record
//! here is tens of bytes), so memory follows the endpoints, not the objects.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

/// The annotation `sidecar inject` sets on the pods it injects: they speak HBONE.
pub const INJECTED_ANNOTATION: &str = "sidecar.example.dev/injected";
/// Istio's ambient enrollment: the node's ztunnel serves the pod over HBONE.
pub const AMBIENT_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name`, the key of every record.
pub type Key = (Arc<str>, Arc<str>);

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
    /// Its name (matches the EndpointSlice port of the same name).
    pub name: Option<String>,
}

/// An EndpointSlice's routing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: Arc<str>,
    /// Named target ports.
    pub ports: Vec<(Option<String>, u16)>,
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
    /// `topology.kubernetes.io/zone` of its node (one copy per zone and slice).
    pub zone: Option<Arc<str>>,
    /// Topology hints: the zones that should use it.
    pub for_zones: Vec<String>,
}

/// A Pod's identity fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// Its service account.
    pub service_account: Arc<str>,
    /// Its IPs, one per family (not the node's: host-network pods are left out).
    pub ips: [Option<IpAddr>; 2],
    /// Served over HBONE: injected with our sidecar, or enrolled in Istio ambient.
    pub hbone: bool,
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((
        meta.namespace.as_deref()?.into(),
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
                            name: p.name.clone().filter(|n| !n.is_empty()),
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
                Some((p.name.clone().filter(|n| !n.is_empty()), port))
            })
            .collect();
        let mut zones: Vec<Arc<str>> = Vec::new();
        let mut zone = |z: &str| -> Arc<str> {
            if let Some(known) = zones.iter().find(|k| &***k == z) {
                return known.clone();
            }
            let z: Arc<str> = z.into();
            zones.push(z.clone());
            z
        };
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
                    zone: e.zone.as_deref().map(&mut zone),
                    for_zones: e
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| z.name.clone())
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
    /// The record of `pod`, with its key; `None` for a pod with no IP of its own yet
    /// (pending, or on the host network: its IP is the node's).
    pub fn of(pod: &Pod) -> Option<(Key, Self)> {
        let key = key(&pod.metadata)?;
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
        let mut families = [None, None];
        for ip in ips {
            let slot = usize::from(ip.is_ipv6());
            families[slot] = families[slot].or(Some(ip));
        }
        if families == [None, None] {
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
                service_account: spec
                    .service_account_name
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("default")
                    .into(),
                ips: families,
                hbone: annotated(INJECTED_ANNOTATION, "true")
                    || annotated(AMBIENT_ANNOTATION, "enabled"),
            },
        ))
    }
}
