//! Prometheus metrics: one registry, prefixed `sidecar_`, served on the health
//! listener's `/metrics`. Connection metrics are recorded by [`ConnRecorder`], which
//! counts the close when it is dropped, so no exit path forgets to. Label values that
//! come from outside (peer identities, service names) pass through a [`LabelLimiter`]
//! so a flood of distinct values cannot grow memory without bound.

pub mod kernel;
pub mod labels;
pub mod render;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

pub use labels::{CloseReason, ConnLabels, Direction, ServiceLabels, Tls};

use crate::proxy::copy::{Totals, Transfer};

/// A metric whose `# HELP` and `# TYPE` lines are written even before its first
/// sample. prometheus-client leaves empty families out, so whether a family existed
/// would depend on the traffic seen; dashboards, alerts and tests need it declared.
#[derive(Debug)]
struct Declared<M>(M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// Label value standing for every value past a limiter's capacity.
pub const OTHER: &str = "other";

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    /// Per-connection metrics.
    pub proxy: Arc<ProxyMetrics>,
}

/// A histogram per service, with a fixed bucket layout.
pub type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

/// Connection metrics, shared by every connection task.
pub struct ProxyMetrics {
    opened: Family<ConnLabels, Counter>,
    closed: Family<labels::CloseLabels, Counter>,
    open: Family<ServiceLabels, Gauge>,
    sent_bytes: Family<ConnLabels, Counter>,
    received_bytes: Family<ConnLabels, Counter>,
    duration: HistogramFamily,
    connection_bytes: HistogramFamily,
    connect_duration: HistogramFamily,
    /// TLS handshake latency.
    pub tls_handshake: HistogramFamily,
    orig_dst_lookups: Family<labels::LookupLabels, Counter>,
    identities: LabelLimiter,
    services: LabelLimiter,
}

/// Admits up to `capacity` distinct label values; later ones become [`OTHER`] and are
/// counted in `sidecar_metric_label_folded_total{label=...}`.
pub struct LabelLimiter {
    seen: Mutex<HashSet<String>>,
    capacity: usize,
    folded: Counter,
}

// === impl Metrics ===

impl Metrics {
    /// Registers every metric. `max_identities` and `max_services` cap those labels.
    pub fn new(max_identities: usize, max_services: usize) -> Self {
        let mut registry = Registry::with_prefix("sidecar");
        let folded = Family::<labels::FoldLabels, Counter>::default();
        registry.register(
            "metric_label_folded",
            "Connections whose label value was folded into \"other\" because the label hit its cap",
            Declared(folded.clone()),
        );
        let limiter = |label: &'static str, capacity| LabelLimiter {
            seen: Mutex::new(HashSet::new()),
            capacity,
            folded: folded
                .get_or_create(&labels::FoldLabels {
                    label: label.into(),
                })
                .clone(),
        };
        let proxy = ProxyMetrics {
            opened: Family::default(),
            closed: Family::default(),
            open: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            duration: Family::new_with_constructor(lifetime_histogram),
            connection_bytes: Family::new_with_constructor(size_histogram),
            connect_duration: Family::new_with_constructor(latency_histogram),
            tls_handshake: Family::new_with_constructor(latency_histogram),
            orig_dst_lookups: Family::default(),
            identities: limiter("peer_identity", max_identities),
            services: limiter("service", max_services),
        };
        registry.register(
            "connections_opened",
            "Connections accepted by the proxy",
            Declared(proxy.opened.clone()),
        );
        registry.register(
            "connections_closed",
            "Connections finished, by close reason",
            Declared(proxy.closed.clone()),
        );
        registry.register(
            "connections_open",
            "Connections open now",
            Declared(proxy.open.clone()),
        );
        registry.register_with_unit(
            "connection_sent",
            "Bytes from the connection's initiator to its destination, counted as they flow",
            Unit::Bytes,
            Declared(proxy.sent_bytes.clone()),
        );
        registry.register_with_unit(
            "connection_received",
            "Bytes from the destination back to the initiator, counted as they flow",
            Unit::Bytes,
            Declared(proxy.received_bytes.clone()),
        );
        registry.register_with_unit(
            "connection_duration",
            "Lifetime of finished connections",
            Unit::Seconds,
            Declared(proxy.duration.clone()),
        );
        registry.register_with_unit(
            "connection_size",
            "Bytes moved (both directions) per finished connection",
            Unit::Bytes,
            Declared(proxy.connection_bytes.clone()),
        );
        registry.register_with_unit(
            "upstream_connect_duration",
            "Time to connect to the destination (successful connects)",
            Unit::Seconds,
            Declared(proxy.connect_duration.clone()),
        );
        registry.register_with_unit(
            "tls_handshake_duration",
            "TLS handshake latency",
            Unit::Seconds,
            Declared(proxy.tls_handshake.clone()),
        );
        registry.register(
            "orig_dst_lookups",
            "Original-destination lookups at accept, by result",
            Declared(proxy.orig_dst_lookups.clone()),
        );
        Self {
            registry,
            proxy: Arc::new(proxy),
        }
    }

    /// Adds the kernel-side collector (per-program counters, map fill).
    pub fn register_kernel(&mut self, collector: Arc<kernel::KernelCollector>) {
        self.registry.register_collector(Box::new(collector));
    }

    /// Adds the service and endpoint collector.
    pub fn register_services(&mut self, collector: crate::service::metrics::ServiceCollector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// The registry, for an area to register the metrics it keeps beside what it counts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Bucket layouts. Connection lifetimes: 1 ms to about 35 min.
fn lifetime_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

/// Connect and handshake latency: 100 µs to about 6.5 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Bytes per connection: 64 B to about 4 GiB.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(64.0, 4.0, 14))
}

// === impl ProxyMetrics ===

impl ProxyMetrics {
    /// Counts an original-destination lookup.
    pub fn orig_dst_lookup(&self, found: bool) {
        let result = if found { "found" } else { "missing" };
        self.orig_dst_lookups
            .get_or_create(&labels::LookupLabels { result })
            .inc();
    }

    /// Records a successful upstream connect's latency.
    pub fn upstream_connected(&self, service: &ServiceLabels, started: Instant) {
        self.connect_duration
            .get_or_create(service)
            .observe(started.elapsed().as_secs_f64());
    }
}

// === impl LabelLimiter ===

impl LabelLimiter {
    /// `value` if it is admitted (already seen, or room left), else [`OTHER`].
    pub fn admit(&self, value: &str) -> String {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.capacity {
            seen.insert(value.to_string());
            return value.to_string();
        }
        self.folded.inc();
        OTHER.to_string()
    }
}

/// One connection's metrics. Opened on creation; the close (reason, duration, size)
/// is recorded when it is dropped.
pub struct ConnRecorder {
    metrics: Arc<ProxyMetrics>,
    labels: ConnLabels,
    service: ServiceLabels,
    started: Instant,
    reason: CloseReason,
    /// Live byte counts (also shown by `/connections`).
    pub transfer: Arc<Transfer>,
}

impl ConnRecorder {
    /// Counts a new connection.
    pub fn open(
        metrics: &Arc<ProxyMetrics>,
        direction: Direction,
        service: &str,
        peer_identity: &str,
        tls: Tls,
    ) -> Self {
        let service = metrics.services.admit(service);
        let peer_identity = metrics.identities.admit(peer_identity);
        let labels = ConnLabels {
            direction,
            service: service.clone(),
            peer_identity,
            tls,
        };
        let service = ServiceLabels { direction, service };
        metrics.opened.get_or_create(&labels).inc();
        metrics.open.get_or_create(&service).inc();
        Self {
            metrics: metrics.clone(),
            labels,
            service,
            started: Instant::now(),
            // Overwritten on every normal path; stays only if the task is cancelled.
            reason: CloseReason::Aborted,
            transfer: Arc::default(),
        }
    }

    /// The byte counters the copy loop adds to.
    pub fn totals(&self) -> Totals {
        Totals {
            sent: self.metrics.sent_bytes.get_or_create(&self.labels).clone(),
            received: self
                .metrics
                .received_bytes
                .get_or_create(&self.labels)
                .clone(),
        }
    }

    /// The service labels of this connection.
    pub fn service(&self) -> &ServiceLabels {
        &self.service
    }

    /// Sets why the connection ends (recorded on drop).
    pub fn set_reason(&mut self, reason: CloseReason) {
        self.reason = reason;
    }
}

impl Drop for ConnRecorder {
    fn drop(&mut self) {
        let m = &self.metrics;
        let closed = labels::CloseLabels::new(&self.labels, self.reason);
        m.closed.get_or_create(&closed).inc();
        m.open.get_or_create(&self.service).dec();
        m.duration
            .get_or_create(&self.service)
            .observe(self.started.elapsed().as_secs_f64());
        let bytes = self.transfer.total();
        m.connection_bytes
            .get_or_create(&self.service)
            .observe(bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_folds_past_capacity_and_counts_exactly() {
        let metrics = Metrics::new(3, 10);
        let m = &metrics.proxy;
        let admitted: Vec<String> = (0..10)
            .map(|i| m.identities.admit(&format!("id-{i}")))
            .collect();
        assert_eq!(&admitted[..3], ["id-0", "id-1", "id-2"]);
        assert!(admitted[3..].iter().all(|v| v == OTHER));
        // Admitted values stay admitted.
        assert_eq!(m.identities.admit("id-1"), "id-1");
        assert_eq!(m.identities.folded.get(), 7);
    }

    #[test]
    fn recorder_counts_open_and_close_once() {
        let metrics = Metrics::new(10, 10);
        {
            let mut r = ConnRecorder::open(
                &metrics.proxy,
                Direction::Outbound,
                "passthrough",
                "none",
                Tls::No,
            );
            r.transfer
                .sent
                .fetch_add(10, std::sync::atomic::Ordering::Relaxed);
            r.set_reason(CloseReason::Refused);
        }
        let text = render::openmetrics(metrics.registry()).expect("encode");
        assert!(text.contains("sidecar_connections_opened_total{direction=\"outbound\",service=\"passthrough\",peer_identity=\"none\",tls=\"false\"} 1"), "{text}");
        assert!(text.contains("reason=\"refused\"} 1"), "{text}");
        assert!(
            text.contains(
                "sidecar_connections_open{direction=\"outbound\",service=\"passthrough\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains("sidecar_connection_size_bytes_sum{direction=\"outbound\",service=\"passthrough\"} 10.0"), "{text}");
    }
}
