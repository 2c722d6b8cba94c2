//! Connection metrics, recorded by [`ConnRecorder`], which counts the close when it is
//! dropped, so no exit path forgets to.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Unit,
};

use super::labels::{
    CloseLabels, CloseReason, ConnLabels, Direction, LookupLabels, NO_IDENTITY, PASSTHROUGH,
    ServiceLabels, Tls,
};
use crate::{
    mesh::PeerIdentity,
    metrics::{Declared, LabelLimiter, Metrics},
    proxy::copy::{Totals, Transfer},
    tls::SpiffeId,
};

/// A histogram per service, with a fixed bucket layout.
pub type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

/// Connection metrics, shared by every connection task.
pub struct ProxyMetrics {
    opened: Family<ConnLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
    open: Family<ServiceLabels, Gauge>,
    sent_bytes: Family<ConnLabels, Counter>,
    received_bytes: Family<ConnLabels, Counter>,
    duration: HistogramFamily,
    connection_bytes: HistogramFamily,
    connect_duration: HistogramFamily,
    /// TLS handshake latency.
    pub tls_handshake: HistogramFamily,
    orig_dst_lookups: Family<LookupLabels, Counter>,
    identities: LabelLimiter,
    services: LabelLimiter,
}

impl ProxyMetrics {
    /// Registers the connection metrics. `max_identities` and `max_services` cap those
    /// labels.
    pub fn register(
        metrics: &mut Metrics,
        max_identities: usize,
        max_services: usize,
    ) -> Arc<Self> {
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
            identities: metrics.limiter("peer_identity", max_identities),
            services: metrics.limiter("service", max_services),
        };
        let registry = metrics.registry_mut();
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
        Arc::new(proxy)
    }

    /// Counts an original-destination lookup.
    pub fn orig_dst_lookup(&self, found: bool) {
        let result = if found { "found" } else { "missing" };
        self.orig_dst_lookups
            .get_or_create(&LookupLabels { result })
            .inc();
    }

    /// Records a successful upstream connect's latency.
    pub fn upstream_connected(&self, service: &ServiceLabels, started: Instant) {
        self.connect_duration
            .get_or_create(service)
            .observe(started.elapsed().as_secs_f64());
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

/// One connection's metrics, from accept to close: the guard every connection task
/// holds. The connection is counted as opened once its labels are known
/// ([`ConnRecorder::label`]: after the connect, or at a refusal), and the close
/// (reason, lifetime from accept, size) is recorded when the guard is dropped, so no
/// exit path forgets to; a guard dropped unlabelled counts as a passthrough
/// connection without identity.
pub struct ConnRecorder {
    metrics: Arc<ProxyMetrics>,
    direction: Direction,
    service: String,
    labelled: Option<(ConnLabels, ServiceLabels)>,
    started: Instant,
    reason: CloseReason,
    /// Live byte counts (also shown by `/connections`).
    pub transfer: Arc<Transfer>,
}

impl ConnRecorder {
    /// Starts recording a connection just accepted.
    pub fn start(metrics: &Arc<ProxyMetrics>, direction: Direction) -> Self {
        Self {
            metrics: metrics.clone(),
            direction,
            service: PASSTHROUGH.into(),
            labelled: None,
            started: Instant::now(),
            // Overwritten on every normal path; stays only if the task is cancelled.
            reason: CloseReason::Aborted,
            transfer: Arc::default(),
        }
    }

    /// Names the service the connection was routed to (default [`PASSTHROUGH`]).
    pub fn set_service(&mut self, name: &str) {
        self.service = name.to_string();
    }

    /// Sets the connection's labels and counts it as opened (once; later calls are
    /// ignored): its service and the peer sidecar that proved its identity, whose
    /// handshake time is observed too.
    pub fn label(&mut self, peer: Option<&PeerIdentity>) {
        if self.labelled.is_none() {
            let handshake = peer.and_then(|p| p.handshake);
            self.open_with(peer.map(|p| &p.id), handshake);
        }
    }

    /// Labels a connection refused at admission, by the identity its peer proved
    /// when the handshake got that far (no handshake time is observed).
    pub fn label_refused(&mut self, identity: Option<&SpiffeId>) {
        if self.labelled.is_none() {
            self.open_with(identity, None);
        }
    }

    /// The byte counters the copy loop adds to (labels the connection first, if
    /// nothing did).
    pub fn totals(&mut self) -> Totals {
        let (labels, _) = self.labels();
        Totals {
            sent: self.metrics.sent_bytes.get_or_create(&labels).clone(),
            received: self.metrics.received_bytes.get_or_create(&labels).clone(),
        }
    }

    /// Sets why the connection ends (recorded on drop).
    pub fn set_reason(&mut self, reason: CloseReason) {
        self.reason = reason;
    }

    fn labels(&mut self) -> (ConnLabels, ServiceLabels) {
        match &self.labelled {
            Some(labels) => labels.clone(),
            None => self.open_with(None, None),
        }
    }

    fn open_with(
        &mut self,
        identity: Option<&SpiffeId>,
        handshake: Option<std::time::Duration>,
    ) -> (ConnLabels, ServiceLabels) {
        let m = &self.metrics;
        let service = m.services.admit(&self.service);
        let tls = identity.is_some();
        let identity = identity.map(ToString::to_string);
        let labels = ConnLabels {
            direction: self.direction,
            service: service.clone(),
            peer_identity: m
                .identities
                .admit(identity.as_deref().unwrap_or(NO_IDENTITY)),
            tls: if tls { Tls::Yes } else { Tls::No },
        };
        let service = ServiceLabels {
            direction: self.direction,
            service,
        };
        m.opened.get_or_create(&labels).inc();
        m.open.get_or_create(&service).inc();
        if let Some(handshake) = handshake {
            m.tls_handshake
                .get_or_create(&service)
                .observe(handshake.as_secs_f64());
        }
        self.labelled = Some((labels.clone(), service.clone()));
        (labels, service)
    }
}

impl Drop for ConnRecorder {
    fn drop(&mut self) {
        let reason = self.reason;
        let lifetime = self.started.elapsed().as_secs_f64();
        let bytes = self.transfer.total();
        let (labels, service) = self.labels();
        let m = &self.metrics;
        m.closed
            .get_or_create(&CloseLabels::new(&labels, reason))
            .inc();
        m.open.get_or_create(&service).dec();
        m.duration.get_or_create(&service).observe(lifetime);
        m.connection_bytes
            .get_or_create(&service)
            .observe(bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_counts_open_and_close_once() {
        let mut metrics = Metrics::new();
        let proxy = ProxyMetrics::register(&mut metrics, 10, 10);
        {
            let mut r = ConnRecorder::start(&proxy, Direction::Outbound);
            r.transfer
                .sent
                .fetch_add(10, std::sync::atomic::Ordering::Relaxed);
            r.set_reason(CloseReason::Refused);
        }
        let text = crate::metrics::render::openmetrics(metrics.registry()).expect("encode");
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

    #[test]
    fn labels_are_set_once_with_the_peer_and_its_handshake() {
        let mut metrics = Metrics::new();
        let proxy = ProxyMetrics::register(&mut metrics, 10, 10);
        let peer = PeerIdentity {
            id: "spiffe://cluster.local/ns/a/sa/b".parse().expect("id"),
            handshake: Some(std::time::Duration::from_millis(3)),
        };
        {
            let mut r = ConnRecorder::start(&proxy, Direction::Inbound);
            r.set_service("db");
            r.label(Some(&peer));
            // A later label (a refusal path, say) changes nothing.
            r.set_service("other");
            r.label(None);
            r.set_reason(CloseReason::Normal);
        }
        let text = crate::metrics::render::openmetrics(metrics.registry()).expect("encode");
        let opened = "sidecar_connections_opened_total{direction=\"inbound\",service=\"db\",peer_identity=\"spiffe://cluster.local/ns/a/sa/b\",tls=\"true\"} 1";
        assert!(text.contains(opened), "{text}");
        assert!(!text.contains("service=\"other\""), "{text}");
        assert!(text.contains("sidecar_tls_handshake_duration_seconds_count{direction=\"inbound\",service=\"db\"} 1"), "{text}");
        assert!(text.contains("reason=\"normal\"} 1"), "{text}");
    }
}
