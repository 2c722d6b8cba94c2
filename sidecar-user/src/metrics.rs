//! Prometheus metrics: one registry, prefixed `sidecar_`, served on the health
//! listener's `/metrics`. Each area registers what it counts beside the code that
//! counts it (`proxy::metrics`, `service::metrics`, `tls::metrics`, `ebpf::metrics`);
//! this module keeps the registry, the rule that families are declared before their
//! first sample, the limits on label values that come from outside (peer identities,
//! service names: a flood of distinct values cannot grow memory without bound), and
//! the rendering.

pub mod render;

use std::{collections::HashSet, sync::Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{MetricType, counter::Counter, family::Family},
    registry::Registry,
};

/// A metric whose `# HELP` and `# TYPE` lines are written even before its first
/// sample. prometheus-client leaves empty families out, so whether a family existed
/// would depend on the traffic seen; dashboards, alerts and tests need it declared.
#[derive(Debug)]
pub struct Declared<M>(pub M);

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

/// The registry every area registers into, and the label limits' fold counter.
pub struct Metrics {
    registry: Registry,
    folded: Family<FoldLabels, Counter>,
}

/// Labels of the folded-label counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FoldLabels {
    /// The label whose values were folded.
    label: String,
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
    /// An empty registry with the fold counter.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidecar");
        let folded = Family::<FoldLabels, Counter>::default();
        registry.register(
            "metric_label_folded",
            "Connections whose label value was folded into \"other\" because the label hit its cap",
            Declared(folded.clone()),
        );
        Self { registry, folded }
    }

    /// A limiter admitting up to `capacity` values of `label`.
    pub fn limiter(&self, label: &'static str, capacity: usize) -> LabelLimiter {
        LabelLimiter {
            seen: Mutex::new(HashSet::new()),
            capacity,
            folded: self
                .folded
                .get_or_create(&FoldLabels {
                    label: label.into(),
                })
                .clone(),
        }
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_folds_past_capacity_and_counts_exactly() {
        let metrics = Metrics::new();
        let limiter = metrics.limiter("peer_identity", 3);
        let admitted: Vec<String> = (0..10).map(|i| limiter.admit(&format!("id-{i}"))).collect();
        assert_eq!(&admitted[..3], ["id-0", "id-1", "id-2"]);
        assert!(admitted[3..].iter().all(|v| v == OTHER));
        // Admitted values stay admitted.
        assert_eq!(limiter.admit("id-1"), "id-1");
        assert_eq!(limiter.folded.get(), 7);
        let text = render::openmetrics(metrics.registry()).expect("encode");
        assert!(
            text.contains("sidecar_metric_label_folded_total{label=\"peer_identity\"} 7"),
            "{text}"
        );
    }
}
