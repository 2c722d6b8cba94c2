//! Per-service and per-endpoint series, read from the current registry at scrape
//! time, so removed endpoints disappear from `/metrics` with them.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::{Health, Services, discovery::DiscoveryStats, endpoint::now_ns};

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
    /// A collector over `services` and the discovery counters.
    pub fn new(services: Arc<Services>, stats: Arc<DiscoveryStats>) -> Self {
        Self { services, stats }
    }
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registry = self.services.load();
        let now = now_ns();
        let gauge = ConstGauge::new(0i64).metric_type();
        let counter = ConstCounter::new(0u64).metric_type();

        let mut active = encoder.encode_descriptor(
            "endpoint_active_connections",
            "Connections (and connects in progress) to each endpoint",
            None,
            gauge,
        )?;
        for s in &registry.services {
            for e in &s.balancer().endpoints {
                let labels = [("service", s.name()), ("endpoint", e.name.as_str())];
                ConstGauge::new(e.state.active() as i64).encode(active.encode_family(&labels)?)?;
            }
        }
        let mut healthy = encoder.encode_descriptor(
            "endpoint_healthy",
            "1 when the endpoint takes new connections, 0 when ejected or failing health checks",
            None,
            gauge,
        )?;
        for s in &registry.services {
            for e in &s.balancer().endpoints {
                let labels = [("service", s.name()), ("endpoint", e.name.as_str())];
                let up = i64::from(e.state.health(now) == Health::Healthy);
                ConstGauge::new(up).encode(healthy.encode_family(&labels)?)?;
            }
        }
        let mut ejected = encoder.encode_descriptor(
            "endpoint_ejected",
            "1 while outlier detection has the endpoint ejected",
            None,
            gauge,
        )?;
        for s in &registry.services {
            for e in &s.balancer().endpoints {
                let labels = [("service", s.name()), ("endpoint", e.name.as_str())];
                let out = i64::from(e.state.health(now) == Health::Ejected);
                ConstGauge::new(out).encode(ejected.encode_family(&labels)?)?;
            }
        }
        let mut ejections = encoder.encode_descriptor(
            "endpoint_ejections",
            "Times outlier detection ejected the endpoint",
            None,
            counter,
        )?;
        for s in &registry.services {
            for e in &s.balancer().endpoints {
                let labels = [("service", s.name()), ("endpoint", e.name.as_str())];
                ConstCounter::new(e.state.ejections()).encode(ejections.encode_family(&labels)?)?;
            }
        }
        let mut attempts = encoder.encode_descriptor(
            "endpoint_connect_attempts",
            "Connect attempts to each endpoint, by result (failures are retried elsewhere)",
            None,
            counter,
        )?;
        for s in &registry.services {
            for e in &s.balancer().endpoints {
                let (ok, failed) = e.state.attempts();
                for (result, n) in [("success", ok), ("failure", failed)] {
                    let labels = [
                        ("service", s.name()),
                        ("endpoint", e.name.as_str()),
                        ("result", result),
                    ];
                    ConstCounter::new(n).encode(attempts.encode_family(&labels)?)?;
                }
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
