//! From the records of Services, EndpointSlices and Pods to what the registry routes:
//! one service per Service port (each cluster IP, both families), its ready
//! endpoints with the identity of their pod's service account, and every pod by IP.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::objects::{EndpointRecord, Key, PodRecord, ServiceRecord, SliceRecord};
use crate::{
    config::{DiscoveryLimits, EndpointConfig, HashKey, LbPolicy, PlaintextPolicy, ServiceConfig},
    service::{Discovered, Workload},
    tls::{IdentityMatcher, SpiffeId},
};

/// Everything the watches hold, borrowed while it is translated.
#[derive(Clone, Copy, Debug)]
pub struct Cluster<'a> {
    /// Services by namespace and name.
    pub services: &'a HashMap<Key, ServiceRecord>,
    /// EndpointSlices by namespace and name.
    pub slices: &'a HashMap<Key, SliceRecord>,
    /// Pods by namespace and name.
    pub pods: &'a HashMap<Key, PodRecord>,
}

/// How records become routes.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Trust domain of the pods' SPIFFE IDs.
    pub trust_domain: String,
    /// This pod's zone, for `PreferClose` (`kubernetes.zone`). Unset: the zone its
    /// own endpoint has in an EndpointSlice (found by `pod_ips`), if it backs any
    /// Service; else none, and `PreferClose` services use every endpoint.
    pub zone: Option<String>,
    /// This pod's addresses, to find its own zone.
    pub pod_ips: Vec<IpAddr>,
    /// Endpoints without a sidecar.
    pub plaintext: PlaintextPolicy,
    /// Caps on what is routed.
    pub limits: DiscoveryLimits,
}

/// What the caps of [`DiscoveryLimits`] left out of one translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capped {
    /// Services (Service ports) past `max_services`.
    pub services: usize,
    /// Service ports past `max_ports_per_service`.
    pub ports: usize,
    /// Endpoints past `max_endpoints_per_service`.
    pub endpoints: usize,
}

impl Capped {
    /// Whether anything was left out.
    pub fn any(&self) -> bool {
        *self != Capped::default()
    }
}

/// The registry name of a Service's port: `<name>.<namespace>:<port>`.
pub fn service_name(namespace: &str, name: &str, port: u16) -> String {
    format!("{name}.{namespace}:{port}")
}

impl Cluster<'_> {
    /// The services and pods to route, under `rules`.
    pub fn translate(&self, rules: &Rules) -> Discovered {
        self.translate_capped(rules).0
    }

    /// As [`Cluster::translate`], with what the caps left out.
    pub fn translate_capped(&self, rules: &Rules) -> (Discovered, Capped) {
        let limits = rules.limits;
        let mut capped = Capped::default();
        let workloads = self.workloads(rules);
        let zone = rules
            .zone
            .as_deref()
            .or_else(|| self.own_zone(&rules.pod_ips));
        let mut by_service: HashMap<(&str, &str), Vec<&SliceRecord>> = HashMap::new();
        for ((ns, _), slice) in self.slices {
            by_service
                .entry((ns, &slice.service))
                .or_default()
                .push(slice);
        }
        let mut services = Vec::new();
        for ((ns, name), svc) in self.services {
            if svc.cluster_ips.is_empty() {
                // Headless or ExternalName: the app dials pod IPs (checked as
                // workloads) or a DNS name; no virtual address to balance.
                continue;
            }
            let slices = by_service
                .get(&(ns.as_ref(), name.as_ref()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ports = &svc.ports[..svc.ports.len().min(limits.max_ports_per_service)];
            capped.ports += svc.ports.len() - ports.len();
            for port in ports {
                let mut c = ServiceConfig::named(
                    service_name(ns, name, port.port),
                    svc.cluster_ips
                        .iter()
                        .map(|&ip| SocketAddr::new(ip, port.port))
                        .collect(),
                );
                if svc.client_ip_affinity {
                    c.policy = LbPolicy::RingHash;
                    c.hash_key = HashKey::ClientIp;
                }
                let port_name = port.name.as_deref();
                c.endpoints = endpoints(slices, port_name, svc, &workloads, rules, zone);
                let max = limits.max_endpoints_per_service;
                capped.endpoints += c.endpoints.len().saturating_sub(max);
                c.endpoints.truncate(max);
                services.push(Arc::new(c));
            }
        }
        // Stable order: a rebuild with nothing changed finds every service equal.
        services.sort_by(|a, b| a.name.cmp(&b.name));
        capped.services = services.len().saturating_sub(limits.max_services);
        services.truncate(limits.max_services);
        let discovered = Discovered {
            services,
            workloads: Arc::new(workloads),
        };
        (discovered, capped)
    }

    /// This pod's zone, as an EndpointSlice with one of `ips` as an endpoint says.
    fn own_zone(&self, ips: &[IpAddr]) -> Option<&str> {
        if ips.is_empty() {
            return None;
        }
        self.slices
            .values()
            .flat_map(|s| &s.endpoints)
            .filter(|e| ips.contains(&e.address.to_canonical()))
            .find_map(|e| e.zone.as_deref())
    }

    /// Every pod by IP. Two pods claiming one IP (a pod being replaced, a stale
    /// record) resolve the same way in every sidecar: a running pod over one that is
    /// not, then the lower namespace and name.
    fn workloads(&self, rules: &Rules) -> HashMap<IpAddr, Workload> {
        let mut out = HashMap::with_capacity(self.pods.len());
        let mut claims: HashMap<IpAddr, (bool, &Key)> = HashMap::with_capacity(self.pods.len());
        // One identity per service account, shared by its pods and their endpoints.
        let mut identities: HashMap<(&str, &str), Arc<IdentityMatcher>> = HashMap::new();
        for (key, pod) in self.pods {
            let (ns, name) = key;
            let identity = match identities.get(&(ns.as_ref(), pod.service_account.as_ref())) {
                Some(id) => id.clone(),
                None => {
                    let Ok(id) = SpiffeId::workload(&rules.trust_domain, ns, &pod.service_account)
                    else {
                        continue;
                    };
                    let id = Arc::new(IdentityMatcher::Exact(id));
                    identities.insert((ns, &pod.service_account), id.clone());
                    id
                }
            };
            let workload = Workload {
                pod: (ns.clone(), name.clone()),
                identity,
                hbone: pod.hbone,
            };
            for ip in pod.ips() {
                let claim = (pod.running, key);
                let wins = claims.get(&ip).is_none_or(|&(running, other)| {
                    (claim.0 && !running) || (claim.0 == running && key < other)
                });
                if wins {
                    claims.insert(ip, claim);
                    out.insert(ip, workload.clone());
                }
            }
        }
        out
    }
}

/// The endpoints of one Service port: ready ones, in the preferred zone when the
/// Service asks for it and any is there, each with its pod's identity.
fn endpoints(
    slices: &[&SliceRecord],
    port_name: Option<&str>,
    svc: &ServiceRecord,
    workloads: &HashMap<IpAddr, Workload>,
    rules: &Rules,
    zone: Option<&str>,
) -> Vec<EndpointConfig> {
    let mut ready: Vec<(&EndpointRecord, u16)> = Vec::new();
    for slice in slices {
        let Some(&(_, target)) = slice.ports.iter().find(|(n, _)| n.as_deref() == port_name) else {
            continue;
        };
        ready.extend(
            slice
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| (e, target)),
        );
    }
    if let (true, Some(zone)) = (svc.prefer_close, zone) {
        let close = |e: &EndpointRecord| {
            e.for_zones.iter().any(|z| &**z == zone)
                || (e.for_zones.is_empty() && e.zone.as_deref() == Some(zone))
        };
        if ready.iter().any(|(e, _)| close(e)) {
            ready.retain(|(e, _)| close(e));
        }
    }
    let mut out: Vec<EndpointConfig> = Vec::with_capacity(ready.len());
    for (e, target) in ready {
        {
            let ip = &e.address;
            let mut c = EndpointConfig::at(SocketAddr::new(*ip, target));
            c.zone = e.zone.clone();
            match workloads.get(&ip.to_canonical()) {
                Some(w) if w.hbone => {
                    c.identity = Some(w.identity.clone());
                    c.mtls = Some(true);
                }
                Some(_) if rules.plaintext == PlaintextPolicy::Deny => continue,
                Some(_) => c.mtls = Some(false),
                // Not a pod discovery knows (a Service without a selector, a pod in
                // an unwatched namespace): mTLS is required under `deny`, else the
                // config's `mesh.cidrs` decide.
                None if rules.plaintext == PlaintextPolicy::Deny => c.mtls = Some(true),
                None => {}
            }
            out.push(c);
        }
    }
    out.sort_by_key(|c| c.address);
    out.dedup_by_key(|c| c.address);
    out
}
