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
    /// Services, each with its endpoints (and their identities) filled in; shared
    /// with the registry's services, and kept across rebuilds while unchanged.
    pub services: Vec<Arc<ServiceConfig>>,
    /// Pods by IP.
    pub workloads: Arc<HashMap<IpAddr, Workload>>,
}

/// A service and its current endpoints.
pub struct Service {
    /// Its config (a discovered service shares it with [`Discovered`]).
    pub config: Arc<ServiceConfig>,
    /// Budget for connecting across attempts.
    pub connect_timeout: Duration,
    /// State carried across reloads.
    pub state: Arc<ServiceState>,
    /// Learned from Kubernetes, not the config file.
    pub discovered: bool,
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
        c: Arc<ServiceConfig>,
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
            discovered: false,
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

    /// The balancer over `configs`; an endpoint already in `previous` (by address)
    /// keeps its live state.
    fn build_balancer(&self, configs: &[EndpointConfig], previous: Option<&Balancer>) -> Balancer {
        let states: HashMap<SocketAddr, &Arc<EndpointState>> = previous
            .map(|b| b.endpoints.iter().map(|e| (e.addr, &e.state)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Endpoint> = configs
            .iter()
            .map(|c| {
                let state = states
                    .get(&c.address)
                    .map_or_else(|| Arc::new(EndpointState::default()), |s| Arc::clone(s));
                let in_mesh = self.mesh.iter().any(|n| n.contains(&c.address.ip()));
                Endpoint {
                    addr: c.address,
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
        // Names only while the picker hashes them: 50,000 endpoints hold no text.
        let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        let weighted: Vec<Weighted<'_>> = endpoints
            .iter()
            .zip(&names)
            .map(|(e, name)| Weighted {
                name,
                weight: e.weight,
            })
            .collect();
        let picker = Picker::new(self.config.policy, &weighted);
        Balancer { endpoints, picker }
    }

    /// Replaces the endpoints (from DNS); established connections are untouched.
    pub fn set_endpoints(&self, configs: Vec<EndpointConfig>) {
        let balancer = self.build_balancer(&configs, Some(&self.balancer.load()));
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

mod build;
#[cfg(test)]
mod tests;
