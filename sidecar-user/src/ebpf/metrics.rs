//! Kernel-side metrics, read from the maps at scrape time: per-program event counters
//! (summed over CPUs, counted by the programs themselves, never derived) and the fill
//! of each map.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use sidecar_common::{ORIG_DST_MAP_CAPACITY, map_names};

use super::KernelMaps;

/// Reads the kernel maps on each scrape.
pub struct KernelCollector {
    kernel: Arc<KernelMaps>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl KernelCollector {
    /// Registers the collector over `kernel`.
    pub fn register(kernel: Arc<KernelMaps>, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(Self { kernel }));
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.kernel.counters();
        let mut family = encoder.encode_descriptor(
            "kernel_events",
            "Events counted by the eBPF programs, per program",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (program, counter, value) in counters {
            let labels = [("program", program.name()), ("event", counter.name())];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }

        let (by_cookie, by_flow) = self.kernel.orig_dst_entries();
        let mut entries = encoder.encode_descriptor(
            "kernel_map_entries",
            "Entries in each eBPF map that can fill up",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, n) in [
            (map_names::ORIG_DST_BY_COOKIE, by_cookie),
            (map_names::ORIG_DST_BY_FLOW, by_flow),
        ] {
            ConstGauge::new(n as i64).encode(entries.encode_family(&[("map", map)])?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "kernel_map_capacity",
            "Capacity of each eBPF map that can fill up",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for map in [map_names::ORIG_DST_BY_COOKIE, map_names::ORIG_DST_BY_FLOW] {
            ConstGauge::new(i64::from(ORIG_DST_MAP_CAPACITY))
                .encode(capacity.encode_family(&[("map", map)])?)?;
        }
        Ok(())
    }
}
