//! Building a registry snapshot: from the config file's services and discovery's,
//! keeping what survives (a service's state by name, an endpoint's by address, an
//! unchanged discovered service whole).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;

use super::{Discovered, Service, Services, Snapshot, lock};
use crate::config::{Config, ServiceConfig};

impl Services {
    /// Rebuilds the registry from `config`, keeping the live state of services (by
    /// name) and endpoints (by address) that remain. Connections in flight keep their
    /// endpoint whatever the new set is.
    pub fn apply(&self, config: &Config) {
        let mut inputs = lock(&self.inputs);
        inputs.0 = Arc::new(config.clone());
        self.rebuild(&inputs.0, &inputs.1);
    }

    /// Replaces the discovered services and pods. The config file's services win:
    /// a discovered service whose name or address one of them has is left out (or
    /// keeps only its other addresses).
    pub fn set_discovered(&self, mut discovered: Discovered) {
        let mut inputs = lock(&self.inputs);
        // An unchanged service keeps its config (and so its registry entry).
        let known: HashMap<&str, &Arc<ServiceConfig>> = inputs
            .1
            .services
            .iter()
            .map(|d| (d.name.as_str(), d))
            .collect();
        for d in &mut discovered.services {
            if let Some(&old) = known.get(d.name.as_str()) {
                if **old == **d {
                    *d = Arc::clone(old);
                }
            }
        }
        drop(known);
        inputs.1 = Arc::new(discovered);
        self.rebuild(&inputs.0, &inputs.1);
    }

    /// A new snapshot of `config`'s services and `discovered`'s. A discovered service
    /// whose config is the one the current snapshot has (mostly the same `Arc`: see
    /// [`Services::set_discovered`]) is kept whole, balancer and all; any other
    /// keeps the live state of its endpoints that remain.
    fn rebuild(&self, config: &Config, discovered: &Discovered) {
        let previous = self.current.load_full();
        let previous_by_name: HashMap<&str, &Arc<Service>> =
            previous.services.iter().map(|s| (s.name(), s)).collect();
        let mesh = Arc::new(config.mesh.cidrs.clone());
        let mut registry = Snapshot {
            policy: config.outbound.policy,
            allow_cidrs: config.outbound.allow_cidrs.clone(),
            workloads: discovered.workloads.clone(),
            plaintext_denied: config.kubernetes.plaintext == crate::config::PlaintextPolicy::Deny,
            ..Snapshot::default()
        };
        let mut names = std::collections::HashSet::new();
        // A service's state lives on while a service of its name does.
        let fresh = |c: Arc<ServiceConfig>| {
            let state = previous_by_name
                .get(c.name.as_str())
                .map(|s| s.state.clone())
                .unwrap_or_default();
            Service::new(c, config, state, mesh.clone())
        };
        for c in &config.services {
            names.insert(c.name.as_str());
            let mut service = fresh(Arc::new(c.clone()));
            // DNS services keep their last answer until the resolver's next one.
            let endpoints = match &c.dns {
                Some(_) => service.discovered().unwrap_or_default(),
                None => c.endpoints.clone(),
            };
            let before = previous_by_name.get(c.name.as_str()).map(|s| s.balancer());
            service.balancer = ArcSwap::from_pointee(
                service.build_balancer(&endpoints, before.as_deref().map(|b| &**b)),
            );
            add(&mut registry, Arc::new(service));
        }
        for d in &discovered.services {
            if names.contains(d.name.as_str()) {
                continue;
            }
            let taken = |a: &SocketAddr| registry.by_vip.contains_key(a);
            let narrowed = d.addresses.iter().any(taken);
            let c = if narrowed {
                let addresses: Vec<SocketAddr> =
                    d.addresses.iter().copied().filter(|a| !taken(a)).collect();
                if addresses.is_empty() {
                    continue;
                }
                Arc::new(ServiceConfig {
                    addresses,
                    ..(**d).clone()
                })
            } else {
                Arc::clone(d)
            };
            let before = previous_by_name.get(c.name.as_str());
            let service = match before {
                Some(s)
                    // set_discovered already compared the discovered configs; only
                    // a narrowed copy needs comparing again.
                    if (Arc::ptr_eq(&s.config, &c) || (narrowed && s.config == c))
                        && s.mesh == mesh
                        && s.connect_timeout
                            == c.connect_timeout.unwrap_or(config.proxy.connect_timeout) =>
                {
                    Arc::clone(s)
                }
                _ => {
                    let mut service = fresh(c);
                    service.discovered = true;
                    let old = before.map(|s| s.balancer());
                    service.balancer = ArcSwap::from_pointee(
                        service.build_balancer(&d.endpoints, old.as_deref().map(|b| &**b)),
                    );
                    Arc::new(service)
                }
            };
            add(&mut registry, service);
        }
        self.current.store(Arc::new(registry));
    }
}

/// Puts `service` in `registry` at each of its addresses.
fn add(registry: &mut Snapshot, service: Arc<Service>) {
    for vip in &service.config.addresses {
        registry.by_vip.insert(*vip, service.clone());
    }
    registry.services.push(service);
}
