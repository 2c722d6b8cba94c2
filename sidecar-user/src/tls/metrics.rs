//! Metrics of the workload identity, read from the store at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
    registry::{Registry, Unit},
};

use super::IdentityStore;

/// Exposes the current certificate's expiry, so an alert can fire before a rotation
/// that never came leaves the sidecar with an expired identity.
#[derive(Debug)]
pub struct IdentityCollector(Arc<IdentityStore>);

impl IdentityCollector {
    /// Registers the collector for `store`.
    pub fn register(store: Arc<IdentityStore>, registry: &mut Registry) {
        registry.register_collector(Box::new(Self(store)));
    }
}

impl Collector for IdentityCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let current = self.0.current();
        let expiry = ConstGauge::new(current.not_after);
        let family = encoder.encode_descriptor(
            "identity_expiry_timestamp",
            "When the workload certificate in use expires (Unix time)",
            Some(&Unit::Seconds),
            expiry.metric_type(),
        )?;
        expiry.encode(family)
    }
}
