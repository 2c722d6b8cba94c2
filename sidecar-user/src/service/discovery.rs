//! Keeping services current without a restart: the config file is watched (a
//! ConfigMap update, or an edit) and DNS names are re-resolved. A bad edit or a failed
//! lookup keeps what was there and says why; endpoint changes never touch established
//! connections. Also owns the per-service background tasks (DNS, health checks).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{Services, health_check};
use crate::config::{Config, DnsTarget, EndpointConfig, ServiceConfig};

/// How often the config file is checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Bounds on re-resolution when it follows the answer's TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(300);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    /// Config reloads applied.
    pub reloads_applied: AtomicU64,
    /// Config reloads rejected (the previous config stays).
    pub reloads_rejected: AtomicU64,
    /// DNS lookups that answered.
    pub dns_ok: AtomicU64,
    /// DNS lookups that failed (the previous endpoints stay).
    pub dns_failed: AtomicU64,
}

/// The per-service background tasks, reconciled with each config.
pub struct Discovery {
    services: Arc<Services>,
    stats: Arc<DiscoveryStats>,
    connector: Option<crate::mesh::MeshConnector>,
    resolver: Option<SocketAddr>,
    tasks: HashMap<String, (String, AbortHandle)>,
}

/// The file a running sidecar reloads services from.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    /// The config file.
    pub path: PathBuf,
    /// The `SIDECAR__*` overrides it was started with (applied to every reload).
    pub env: Vec<(String, String)>,
}

// === impl Discovery ===

impl Discovery {
    /// Starts the tasks `config` needs. Must run inside the runtime.
    pub fn start(
        config: &Config,
        services: Arc<Services>,
        stats: Arc<DiscoveryStats>,
        connector: Option<crate::mesh::MeshConnector>,
    ) -> Self {
        let mut discovery = Self {
            services,
            stats,
            connector,
            resolver: None,
            tasks: HashMap::new(),
        };
        discovery.reconcile(config);
        discovery
    }

    /// Starts, restarts or stops DNS and health-check tasks to match `config`.
    fn reconcile(&mut self, config: &Config) {
        self.resolver = config.dns.resolver.or_else(system_resolver);
        let mut wanted = HashMap::new();
        for s in &config.services {
            if let Some(target) = &s.dns {
                wanted.insert(
                    format!("dns/{}", s.name),
                    (
                        format!("{target} {:?} {:?}", s.dns_refresh, self.resolver),
                        s,
                    ),
                );
            }
            if let Some(check) = &s.health_check {
                wanted.insert(format!("check/{}", s.name), (format!("{check:?}"), s));
            }
        }
        self.tasks.retain(|key, (fingerprint, handle)| {
            let keep = wanted.get(key).is_some_and(|(f, _)| f == fingerprint);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, (fingerprint, service)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let handle = if key.starts_with("dns/") {
                self.spawn_dns(service)
            } else {
                self.spawn_check(service)
            };
            if let Some(handle) = handle {
                self.tasks.insert(key, (fingerprint, handle));
            }
        }
    }

    fn spawn_dns(&self, service: &ServiceConfig) -> Option<AbortHandle> {
        let target = service.dns.clone()?;
        let Some(resolver) = self.resolver else {
            warn!(service = %service.name, "no DNS resolver: set dns.resolver (no nameserver in /etc/resolv.conf)");
            return None;
        };
        let task = resolve_loop(
            self.services.clone(),
            self.stats.clone(),
            resolver,
            service.name.clone(),
            target,
            service.dns_refresh,
        );
        Some(tokio::spawn(task).abort_handle())
    }

    fn spawn_check(&self, service: &ServiceConfig) -> Option<AbortHandle> {
        let check = service.health_check.clone()?;
        let task = health_check::run(
            self.services.clone(),
            service.name.clone(),
            check,
            self.connector.clone(),
        );
        Some(tokio::spawn(task).abort_handle())
    }

    /// Watches `source` and applies valid edits: services, endpoints and the outbound
    /// policy change at once; an invalid file keeps everything as it was. Runs until
    /// the task is dropped.
    pub async fn watch(mut self, source: ConfigSource, mut current: Config) {
        let mut last = std::fs::read(&source.path).ok();
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let Ok(bytes) = std::fs::read(&source.path) else {
                continue;
            };
            if last.as_ref() == Some(&bytes) {
                continue;
            }
            last = Some(bytes.clone());
            let text = String::from_utf8_lossy(&bytes);
            let origin = source.path.display().to_string();
            let next = match Config::from_yaml(&text, &origin, source.env.clone()) {
                Ok(next) => next,
                Err(error) => {
                    self.stats.reloads_rejected.fetch_add(1, Relaxed);
                    warn!(%error, "config reload rejected: keeping the previous configuration");
                    continue;
                }
            };
            let restart_needed = restart_only_changes(&current, &next);
            if !restart_needed.is_empty() {
                warn!(sections = ?restart_needed, "config changes in these sections take effect only after a restart");
            }
            self.services.apply(&next);
            if let Some(connector) = &self.connector {
                connector.policy.apply(&next);
            }
            self.reconcile(&next);
            self.stats.reloads_applied.fetch_add(1, Relaxed);
            info!(
                services = next.services.len(),
                "config reloaded: services applied"
            );
            current = next;
        }
    }
}

/// Sections of `next` that differ from `current` but are not applied live.
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let checks: [(&'static str, bool); 9] = [
        ("proxy", current.proxy != next.proxy),
        ("capture", current.capture != next.capture),
        (
            "inbound",
            !same_except(&current.inbound, &next.inbound, |i| i.allow.clear()),
        ),
        ("admin", current.admin != next.admin),
        ("health", current.health != next.health),
        ("metrics", current.metrics != next.metrics),
        ("identity", current.identity != next.identity),
        (
            "mesh",
            !same_except(&current.mesh, &next.mesh, |m| m.identities.clear()),
        ),
        ("pins", current.pins != next.pins),
    ];
    for (name, differs) in checks {
        if differs {
            changed.push(name);
        }
    }
    changed
}

/// Whether `a` and `b` are equal once `live` has cleared the fields applied live.
fn same_except<T: Clone + PartialEq>(a: &T, b: &T, live: impl Fn(&mut T)) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    live(&mut a);
    live(&mut b);
    a == b
}

/// The first `nameserver` in /etc/resolv.conf.
fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Resolves `target` (A and AAAA) again and again: when the answer's TTL runs out, or
/// every `refresh`. A changed answer replaces the service's endpoints; a failed lookup
/// keeps them.
async fn resolve_loop(
    services: Arc<Services>,
    stats: Arc<DiscoveryStats>,
    resolver: SocketAddr,
    service: String,
    target: DnsTarget,
    refresh: Option<Duration>,
) {
    let group = NameServerConfigGroup::from_ips_clear(&[resolver.ip()], resolver.port(), true);
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    let dns: TokioResolver = TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], group),
        TokioConnectionProvider::default(),
    )
    .with_options(opts)
    .build();
    let fqdn = format!("{}.", target.name);
    loop {
        // Every lookup asks the server: the TTL decides when, not a cache.
        dns.clear_cache();
        let wait = match dns.lookup_ip(fqdn.as_str()).await {
            Ok(answer) => {
                stats.dns_ok.fetch_add(1, Relaxed);
                let mut ips: Vec<IpAddr> = answer.iter().collect();
                ips.sort();
                ips.dedup();
                let endpoints: Vec<EndpointConfig> = ips
                    .iter()
                    .map(|&ip| EndpointConfig::at(SocketAddr::new(ip, target.port)))
                    .collect();
                let registry = services.load();
                let Some(svc) = registry.get(&service) else {
                    return;
                };
                if svc.discovered().as_ref() != Some(&endpoints) {
                    info!(service, name = %target, endpoints = ?ips, "DNS answer changed: endpoints updated");
                    svc.set_endpoints(endpoints);
                }
                let ttl = answer
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                refresh.unwrap_or(ttl.clamp(MIN_REFRESH, MAX_REFRESH))
            }
            Err(error) => {
                stats.dns_failed.fetch_add(1, Relaxed);
                warn!(service, name = %target, %error, "DNS lookup failed: keeping the previous endpoints");
                refresh.unwrap_or(MIN_REFRESH).min(Duration::from_secs(5))
            }
        };
        tokio::time::sleep(wait).await;
    }
}
