//! The service table and its snapshots.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use super::{
    endpoint::{Endpoint, EndpointState, Health, now_ns},
    lb::{self, Candidates, Picker, Weighted},
};
use crate::{
    config::{Config, EndpointConfig, HashKey, OutboundPolicy, ServiceConfig},
    tls::IdentityMatcher,
};

/// Where an outbound connection goes.
pub enum Route {
    /// To a service: balanced.
    Service(Arc<Service>),
    /// Not a service: straight to the original destination.
    Passthrough,
    /// Not a service, and `registry_only` forbids it.
    Denied,
}

/// One immutable snapshot of every service.
#[derive(Default)]
pub struct Snapshot {
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    /// Every service: the config file's in order, then the discovered ones.
    pub services: Vec<Arc<Service>>,
    policy: OutboundPolicy,
    allow_cidrs: Vec<IpNet>,
    workloads: Arc<HashMap<IpAddr, Workload>>,
    plaintext_denied: bool,
}

/// A pod known by its IP (from Kubernetes): who it must prove to be, and whether it
/// speaks HBONE. A connection dialed to its IP directly (a headless service, a
/// StatefulSet member) gets the same identity check as one balanced to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Namespace and name of the pod, for logs (shared with discovery's records).
    pub pod: (Arc<str>, Arc<str>),
    /// The identity of its service account (shared by the pods that have it).
    pub identity: Arc<IdentityMatcher>,
    /// It has a sidecar or ztunnel in front: reached over HBONE.
    pub hbone: bool,
}

/// What discovery adds to the config file's services.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Discovered {
    /// Services, each with its endpoints (and their identities) filled in.
    pub services: Vec<ServiceConfig>,
    /// Pods by IP.
    pub workloads: Arc<HashMap<IpAddr, Workload>>,
}

/// A service and its current endpoints.
pub struct Service {
    /// Its config.
    pub config: ServiceConfig,
    /// Budget for connecting across attempts.
    pub connect_timeout: Duration,
    /// State carried across reloads.
    pub state: Arc<ServiceState>,
    balancer: ArcSwap<Balancer>,
    mesh: Arc<Vec<IpNet>>,
}

/// The endpoints of a service and the policy's precomputed choice state.
pub struct Balancer {
    /// Endpoints, in picker index order.
    pub endpoints: Vec<Endpoint>,
    picker: Picker,
}

/// What survives reloads of one service (matched by name).
#[derive(Default)]
pub struct ServiceState {
    pub(super) active: AtomicUsize,
    pending: AtomicUsize,
    overflow_connections: AtomicU64,
    overflow_pending: AtomicU64,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    discovered: Mutex<Option<Vec<EndpointConfig>>>,
}

/// A service's circuit breaker was open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    /// `limits.max_connections` connections are open.
    #[error("limits.max_connections reached")]
    Connections,
    /// `limits.max_pending` connects are in progress.
    #[error("limits.max_pending reached")]
    Pending,
}

/// A connection admitted by a service's limits; gives its slots back on drop.
pub struct Admission {
    state: Arc<ServiceState>,
    pending: bool,
}

/// The shared handle: the current registry, swapped on reload.
pub struct Services {
    current: ArcSwap<Snapshot>,
    states: Mutex<HashMap<String, Arc<ServiceState>>>,
    /// The inputs of the current snapshot: the last config and the last discovery.
    inputs: Mutex<(Arc<Config>, Arc<Discovered>)>,
}

// === impl Snapshot ===

impl Snapshot {
    /// Where a connection to `dst` goes.
    pub fn route(&self, dst: SocketAddr) -> Route {
        if let Some(service) = self.by_vip.get(&dst) {
            return Route::Service(service.clone());
        }
        if self.policy == OutboundPolicy::RegistryOnly
            && !self.allow_cidrs.iter().any(|n| n.contains(&dst.ip()))
        {
            return Route::Denied;
        }
        Route::Passthrough
    }

    /// A service by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.iter().find(|s| s.config.name == name)
    }

    /// The pod at `ip`, when discovery knows it.
    pub fn workload(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.get(&ip.to_canonical())
    }

    /// `kubernetes.plaintext: deny`: pods without a sidecar are refused.
    pub fn plaintext_denied(&self) -> bool {
        self.plaintext_denied
    }
}

// === impl Service ===

impl Service {
    /// A service of `c` with no endpoints yet.
    fn new(
        c: ServiceConfig,
        config: &Config,
        state: Arc<ServiceState>,
        mesh: Arc<Vec<IpNet>>,
    ) -> Self {
        Self {
            connect_timeout: c.connect_timeout.unwrap_or(config.proxy.connect_timeout),
            balancer: ArcSwap::from_pointee(Balancer {
                endpoints: Vec::new(),
                picker: Picker::new(c.policy, &[]),
            }),
            config: c,
            state,
            mesh,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The current endpoints.
    pub fn balancer(&self) -> arc_swap::Guard<Arc<Balancer>> {
        self.balancer.load()
    }

    /// Takes a connection slot and a pending-connect slot, or says which limit is hit.
    pub fn admit(&self) -> Result<Admission, Overflow> {
        let limits = &self.config.limits;
        let state = &self.state;
        if state.active.fetch_add(1, Relaxed) >= limits.max_connections {
            state.active.fetch_sub(1, Relaxed);
            state.overflow_connections.fetch_add(1, Relaxed);
            return Err(Overflow::Connections);
        }
        if state.pending.fetch_add(1, Relaxed) >= limits.max_pending {
            state.pending.fetch_sub(1, Relaxed);
            state.active.fetch_sub(1, Relaxed);
            state.overflow_pending.fetch_add(1, Relaxed);
            return Err(Overflow::Pending);
        }
        Ok(Admission {
            state: state.clone(),
            pending: true,
        })
    }

    /// The hash key of a connection from `client`.
    pub fn hash_key(&self, client: SocketAddr) -> u64 {
        match self.config.hash_key {
            HashKey::ClientIp => match client.ip() {
                IpAddr::V4(ip) => lb::hash(&ip.octets(), 0),
                IpAddr::V6(ip) => lb::hash(&ip.octets(), 0),
            },
            HashKey::SourceAddress => lb::hash(client.to_string().as_bytes(), 0),
        }
    }

    /// Chooses an endpoint not in `tried`. Unhealthy and ejected endpoints are skipped
    /// unless fewer than `panic_threshold`% are healthy, then all are candidates
    /// (Envoy's panic mode: balance across all rather than none).
    pub fn choose(&self, key: u64, tried: &[SocketAddr]) -> Option<Endpoint> {
        let balancer = self.balancer.load();
        let now = now_ns();
        let healthy = balancer
            .endpoints
            .iter()
            .filter(|e| e.state.health(now) == Health::Healthy)
            .count();
        let total = balancer.endpoints.len();
        let panic = healthy * 100 < usize::from(self.config.panic_threshold) * total;
        let candidates = Eligible {
            endpoints: &balancer.endpoints,
            tried,
            now,
            panic,
        };
        let i = balancer.picker.pick(key, &candidates)?;
        balancer.endpoints.get(i).cloned()
    }

    /// Connections open now, and connections refused by each limit so far.
    pub fn limits_state(&self) -> (usize, u64, u64) {
        (
            self.state.active.load(Relaxed),
            self.state.overflow_connections.load(Relaxed),
            self.state.overflow_pending.load(Relaxed),
        )
    }

    fn build_balancer(&self, configs: &[EndpointConfig]) -> Balancer {
        let mut states = match self.state.endpoints.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut kept = HashMap::new();
        let endpoints: Vec<Endpoint> = configs
            .iter()
            .map(|c| {
                let state = states
                    .get(&c.address)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointState::default()));
                kept.insert(c.address, state.clone());
                let in_mesh = self.mesh.iter().any(|n| n.contains(&c.address.ip()));
                Endpoint {
                    addr: c.address,
                    name: c.address.to_string(),
                    weight: c.weight,
                    zone: c.zone.clone(),
                    mtls: c.mtls.unwrap_or_else(|| {
                        self.config.mtls.unwrap_or(in_mesh)
                            || self.config.server_identity.is_some()
                            || c.identity.is_some()
                    }),
                    identity: c.identity.clone(),
                    state,
                }
            })
            .collect();
        *states = kept;
        let weighted: Vec<Weighted<'_>> = endpoints
            .iter()
            .map(|e| Weighted {
                name: &e.name,
                weight: e.weight,
            })
            .collect();
        let picker = Picker::new(self.config.policy, &weighted);
        Balancer { endpoints, picker }
    }

    /// Replaces the endpoints (from DNS); established connections are untouched.
    pub fn set_endpoints(&self, configs: Vec<EndpointConfig>) {
        let balancer = self.build_balancer(&configs);
        if let Ok(mut d) = self.state.discovered.lock() {
            *d = Some(configs);
        }
        self.balancer.store(Arc::new(balancer));
    }

    /// The endpoints last discovered by DNS, if any.
    pub fn discovered(&self) -> Option<Vec<EndpointConfig>> {
        self.state.discovered.lock().ok().and_then(|d| d.clone())
    }
}

struct Eligible<'a> {
    endpoints: &'a [Endpoint],
    tried: &'a [SocketAddr],
    now: u64,
    panic: bool,
}

impl Candidates for Eligible<'_> {
    fn eligible(&self, i: usize) -> bool {
        let Some(e) = self.endpoints.get(i) else {
            return false;
        };
        !self.tried.contains(&e.addr) && (self.panic || e.state.health(self.now) == Health::Healthy)
    }

    fn load(&self, i: usize) -> f64 {
        self.endpoints.get(i).map_or(f64::MAX, |e| e.state.load())
    }
}

// === impl Admission ===

impl Admission {
    /// The connect finished (either way): frees the pending slot.
    pub fn connected(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.state.pending.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.connected();
        self.state.active.fetch_sub(1, Relaxed);
    }
}

// === impl Services ===

impl Services {
    /// The services of `config`.
    pub fn new(config: &Config) -> Self {
        let services = Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            states: Mutex::new(HashMap::new()),
            inputs: Mutex::new((Arc::new(config.clone()), Arc::default())),
        };
        services.apply(config);
        services
    }

    /// The current snapshot.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, to hold across waits.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Rebuilds the registry from `config`, keeping the live state of services (by
    /// name) and endpoints (by address) that remain. Connections in flight keep their
    /// endpoint whatever the new set is.
    pub fn apply(&self, config: &Config) {
        let mut inputs = lock(&self.inputs);
        inputs.0 = Arc::new(config.clone());
        self.rebuild(&inputs.0, &inputs.1, &inputs.1);
    }

    /// Replaces the discovered services and pods. The config file's services win:
    /// a discovered service whose name or address one of them has is left out (or
    /// keeps only its other addresses).
    pub fn set_discovered(&self, discovered: Discovered) {
        let mut inputs = lock(&self.inputs);
        let before = std::mem::replace(&mut inputs.1, Arc::new(discovered));
        self.rebuild(&inputs.0, &inputs.1, &before);
    }

    /// A new snapshot of `config`'s services and `discovered`'s (which replaced
    /// `before`). A discovered service keeps its endpoints only in `discovered` (its
    /// `config` has none): 50,000 endpoints are held once, not twice.
    fn rebuild(&self, config: &Config, discovered: &Discovered, before: &Discovered) {
        let mut states = lock(&self.states);
        let previous = self.current.load_full();
        let previous_by_name: HashMap<&str, &Arc<Service>> =
            previous.services.iter().map(|s| (s.name(), s)).collect();
        let endpoints_before: HashMap<&str, &[EndpointConfig]> = before
            .services
            .iter()
            .map(|d| (d.name.as_str(), d.endpoints.as_slice()))
            .collect();
        let mesh = Arc::new(config.mesh.cidrs.clone());
        let mut registry = Snapshot {
            policy: config.outbound.policy,
            allow_cidrs: config.outbound.allow_cidrs.clone(),
            workloads: discovered.workloads.clone(),
            plaintext_denied: config.kubernetes.plaintext == crate::config::PlaintextPolicy::Deny,
            ..Snapshot::default()
        };
        let mut kept = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for c in &config.services {
            names.insert(c.name.as_str());
            let state = states.get(&c.name).cloned().unwrap_or_default();
            kept.insert(c.name.clone(), state.clone());
            let mut service = Service::new(c.clone(), config, state, mesh.clone());
            // DNS services keep their last answer until the resolver's next one.
            let endpoints = match &c.dns {
                Some(_) => service.discovered().unwrap_or_default(),
                None => c.endpoints.clone(),
            };
            service.balancer = ArcSwap::from_pointee(service.build_balancer(&endpoints));
            let service = Arc::new(service);
            for vip in &c.addresses {
                registry.by_vip.insert(*vip, service.clone());
            }
            registry.services.push(service);
        }
        for d in &discovered.services {
            if names.contains(d.name.as_str()) {
                continue;
            }
            let addresses: Vec<SocketAddr> = d
                .addresses
                .iter()
                .copied()
                .filter(|a| !registry.by_vip.contains_key(a))
                .collect();
            if addresses.is_empty() {
                continue;
            }
            let mut c = d.clone();
            c.addresses = addresses;
            c.endpoints = Vec::new();
            // Unchanged since the last snapshot: the same service, balancer and all.
            let unchanged_endpoints =
                endpoints_before.get(d.name.as_str()) == Some(&d.endpoints.as_slice());
            let service = match previous_by_name.get(c.name.as_str()) {
                Some(s)
                    if s.config == c
                        && unchanged_endpoints
                        && s.mesh == mesh
                        && Some(s.connect_timeout)
                            == Some(c.connect_timeout.unwrap_or(config.proxy.connect_timeout)) =>
                {
                    (*s).clone()
                }
                _ => {
                    let state = states.get(&c.name).cloned().unwrap_or_default();
                    let mut service = Service::new(c.clone(), config, state, mesh.clone());
                    service.balancer = ArcSwap::from_pointee(service.build_balancer(&d.endpoints));
                    Arc::new(service)
                }
            };
            kept.insert(c.name.clone(), service.state.clone());
            for vip in &c.addresses {
                registry.by_vip.insert(*vip, service.clone());
            }
            registry.services.push(service);
        }
        *states = kept;
        self.current.store(Arc::new(registry));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests;
