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
use crate::config::{Config, EndpointConfig, HashKey, OutboundPolicy, ServiceConfig};

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
    /// Every service, in config order.
    pub services: Vec<Arc<Service>>,
    policy: OutboundPolicy,
    allow_cidrs: Vec<IpNet>,
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
    update: Mutex<()>,
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
}

// === impl Service ===

impl Service {
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
                    mtls: self.config.mtls.unwrap_or(in_mesh)
                        || self.config.server_identity.is_some(),
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
            update: Mutex::new(()),
        };
        services.apply(config);
        services
    }

    /// The current snapshot.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Rebuilds the registry from `config`, keeping the live state of services (by
    /// name) and endpoints (by address) that remain. Connections in flight keep their
    /// endpoint whatever the new set is.
    pub fn apply(&self, config: &Config) {
        let _serial = self.update.lock();
        let mut states = match self.states.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mesh = Arc::new(config.mesh.cidrs.clone());
        let mut registry = Snapshot {
            policy: config.outbound.policy,
            allow_cidrs: config.outbound.allow_cidrs.clone(),
            ..Snapshot::default()
        };
        let mut kept = HashMap::new();
        for c in &config.services {
            let state = states.get(&c.name).cloned().unwrap_or_default();
            kept.insert(c.name.clone(), state.clone());
            let mut service = Service {
                config: c.clone(),
                connect_timeout: c.connect_timeout.unwrap_or(config.proxy.connect_timeout),
                state,
                balancer: ArcSwap::from_pointee(Balancer {
                    endpoints: Vec::new(),
                    picker: Picker::new(c.policy, &[]),
                }),
                mesh: mesh.clone(),
            };
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
        *states = kept;
        self.current.store(Arc::new(registry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_yaml(text, "test", Vec::new()).expect("valid")
    }

    const TWO: &str = "services:\n- name: web\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.1:8080', {address: '10.0.0.2:8080', weight: 3, zone: b}]\n  limits: {max_connections: 2, max_pending: 1}\n";

    #[test]
    fn routes_vips_and_applies_the_outbound_policy() {
        let services = Services::new(&config(TWO));
        let reg = services.load();
        assert!(matches!(
            reg.route("198.19.0.10:80".parse().expect("addr")),
            Route::Service(_)
        ));
        assert!(matches!(
            reg.route("198.19.0.10:81".parse().expect("addr")),
            Route::Passthrough
        ));
        let strict =
            format!("{TWO}outbound:\n  policy: registry_only\n  allow_cidrs: [192.0.2.0/24]\n");
        services.apply(&config(&strict));
        let reg = services.load();
        assert!(matches!(
            reg.route("198.19.0.11:80".parse().expect("addr")),
            Route::Denied
        ));
        assert!(matches!(
            reg.route("192.0.2.7:443".parse().expect("addr")),
            Route::Passthrough
        ));
    }

    #[test]
    fn limits_refuse_the_overflow_and_free_slots_on_drop() {
        let services = Services::new(&config(TWO));
        let reg = services.load();
        let web = reg.get("web").expect("web");
        let mut a = web.admit().expect("first");
        assert_eq!(
            web.admit().err(),
            Some(Overflow::Pending),
            "one connect pending at a time"
        );
        a.connected();
        let b = web.admit().expect("second");
        drop(b);
        let _c = web.admit().expect("slot freed");
        assert_eq!(web.admit().err(), Some(Overflow::Connections));
        assert_eq!(web.limits_state(), (2, 1, 1));
    }

    #[test]
    fn reload_keeps_endpoint_state_by_address() {
        let services = Services::new(&config(TWO));
        let first = services
            .load()
            .get("web")
            .expect("web")
            .choose(0, &[])
            .expect("endpoint");
        let lease = first.state.lease();
        let changed = TWO.replace("'10.0.0.1:8080', ", "'10.0.0.1:8080', '10.0.0.3:8080', ");
        services.apply(&config(&changed));
        let reg = services.load();
        let web = reg.get("web").expect("web");
        let b = web.balancer();
        assert_eq!(b.endpoints.len(), 3);
        let same = b
            .endpoints
            .iter()
            .find(|e| e.addr == first.addr)
            .expect("kept");
        assert_eq!(same.state.active(), 1, "live state carried over");
        drop(lease);
        assert_eq!(same.state.active(), 0);
    }

    #[test]
    fn retries_skip_tried_endpoints_and_panic_mode_uses_all() {
        let services = Services::new(&config(TWO));
        let reg = services.load();
        let web = reg.get("web").expect("web");
        let a = web.choose(1, &[]).expect("a");
        let b = web.choose(1, &[a.addr]).expect("b");
        assert_ne!(a.addr, b.addr);
        assert!(web.choose(1, &[a.addr, b.addr]).is_none());
        // Eject one of two: 50% healthy is not below the 50% threshold, so only the
        // healthy one is chosen.
        let outlier = crate::config::OutlierConfig {
            consecutive_failures: 1,
            ..Default::default()
        };
        a.state.failed(&outlier);
        assert!((0..20).all(|k| web.choose(k, &[]).map(|e| e.addr) == Some(b.addr)));
        // Eject both: panic mode balances across all instead of none.
        b.state.failed(&outlier);
        assert!(web.choose(1, &[]).is_some());
    }
}
