//! Per-service and per-endpoint series, read from the current registry at scrape
//! time, so removed endpoints disappear from `/metrics` with them. A service learned
//! from Kubernetes reports only the endpoints this sidecar has used (or ejected, or
//! found unhealthy): a cluster of 50,000 endpoints would otherwise put 300,000
//! series (30 MB) in every scrape of every sidecar.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::MetricType,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::{
    Endpoint, Health, Service, Services, Snapshot, discovery::DiscoveryStats, endpoint::now_ns,
};

/// Renders service and endpoint state.
#[derive(Clone)]
pub struct ServiceCollector {
    services: Arc<Services>,
    stats: Arc<DiscoveryStats>,
}

impl std::fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceCollector")
    }
}

impl ServiceCollector {
    /// Registers the collector over `services` and the discovery counters.
    pub fn register(
        services: Arc<Services>,
        stats: Arc<DiscoveryStats>,
        registry: &mut prometheus_client::registry::Registry,
    ) {
        registry.register_collector(Box::new(Self { services, stats }));
    }
}

/// The Prometheus type of a constant metric, known without a value.
trait Kind {
    fn metric_kind() -> MetricType;
}

impl Kind for ConstGauge<i64> {
    fn metric_kind() -> MetricType {
        MetricType::Gauge
    }
}

impl Kind for ConstCounter<u64> {
    fn metric_kind() -> MetricType {
        MetricType::Counter
    }
}

/// One series per endpoint of every service, labelled `service` and `endpoint`.
fn per_endpoint<M: EncodeMetric + Kind>(
    encoder: &mut DescriptorEncoder,
    registry: &Snapshot,
    (name, help): (&str, &str),
    value: impl Fn(&Endpoint) -> M,
) -> Result<(), std::fmt::Error> {
    // Declared even without endpoints, so dashboards always find the family.
    let mut family = encoder.encode_descriptor(name, help, None, M::metric_kind())?;
    for (s, e) in reported(registry, now_ns()) {
        let name = e.addr.to_string();
        let labels = [("service", s.name()), ("endpoint", name.as_str())];
        value(&e).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The endpoints with series: every endpoint of a config-file service, and those of
/// a discovered service that have carried a connection or are out of rotation.
fn reported(registry: &Snapshot, now: u64) -> impl Iterator<Item = (&Service, Endpoint)> {
    registry.services.iter().flat_map(move |s| {
        let balancer = s.balancer();
        let all = !s.discovered;
        balancer
            .endpoints
            .iter()
            .filter(|e| all || e.state.used(now))
            .map(|e| (&**s, e.clone()))
            .collect::<Vec<_>>()
    })
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registry = self.services.load();
        let now = now_ns();
        let counter = ConstCounter::new(0u64).metric_type();
        let gauge = |v: bool| ConstGauge::new(i64::from(v));
        per_endpoint(
            &mut encoder,
            &registry,
            (
                "endpoint_active_connections",
                "Connections (and connects in progress) to each endpoint",
            ),
            |e| ConstGauge::new(e.state.active() as i64),
        )?;
        per_endpoint(
            &mut encoder,
            &registry,
            (
                "endpoint_healthy",
                "1 when the endpoint takes new connections, 0 when ejected or failing health checks",
            ),
            |e| gauge(e.state.health(now) == Health::Healthy),
        )?;
        per_endpoint(
            &mut encoder,
            &registry,
            (
                "endpoint_ejected",
                "1 while outlier detection has the endpoint ejected",
            ),
            |e| gauge(e.state.health(now) == Health::Ejected),
        )?;
        per_endpoint(
            &mut encoder,
            &registry,
            (
                "endpoint_ejections",
                "Times outlier detection ejected the endpoint",
            ),
            |e| ConstCounter::new(e.state.ejections()),
        )?;
        let mut attempts = encoder.encode_descriptor(
            "endpoint_connect_attempts",
            "Connect attempts to each endpoint, by result (failures are retried elsewhere)",
            None,
            counter,
        )?;
        for (s, e) in reported(&registry, now) {
            let (ok, failed) = e.state.attempts();
            let name = e.addr.to_string();
            for (result, n) in [("success", ok), ("failure", failed)] {
                let labels = [
                    ("service", s.name()),
                    ("endpoint", name.as_str()),
                    ("result", result),
                ];
                ConstCounter::new(n).encode(attempts.encode_family(&labels)?)?;
            }
        }
        let mut overflow = encoder.encode_descriptor(
            "service_overflow",
            "Connections refused by a service's circuit breaker, by limit",
            None,
            counter,
        )?;
        for s in &registry.services {
            let (_, connections, pending) = s.limits_state();
            let used = || s.balancer().endpoints.iter().any(|e| e.state.used(now));
            if s.discovered && connections == 0 && pending == 0 && !used() {
                continue;
            }
            for (limit, n) in [("max_connections", connections), ("max_pending", pending)] {
                ConstCounter::new(n)
                    .encode(overflow.encode_family(&[("service", s.name()), ("limit", limit)])?)?;
            }
        }
        let mut reloads = encoder.encode_descriptor(
            "config_reloads",
            "Config file reloads, by result (a rejected reload keeps the previous config)",
            None,
            counter,
        )?;
        for (result, n) in [
            ("applied", self.stats.reloads_applied.load(Relaxed)),
            ("rejected", self.stats.reloads_rejected.load(Relaxed)),
        ] {
            ConstCounter::new(n).encode(reloads.encode_family(&[("result", result)])?)?;
        }
        let mut dns = encoder.encode_descriptor(
            "dns_lookups",
            "DNS discovery lookups, by result (a failed lookup keeps the previous endpoints)",
            None,
            counter,
        )?;
        for (result, n) in [
            ("success", self.stats.dns_ok.load(Relaxed)),
            ("failure", self.stats.dns_failed.load(Relaxed)),
        ] {
            ConstCounter::new(n).encode(dns.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}
