//! Kernel-side metrics, read from the maps at scrape time: per-program event counters
//! (summed over CPUs), the fill of each map, and original destinations evicted.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use sidecar_common::{Counter, ORIG_DST_MAP_CAPACITY, map_names};

use super::ProxyMetrics;
use crate::ebpf::KernelMaps;

/// Reads the kernel maps on each scrape.
pub struct KernelCollector {
    kernel: Arc<KernelMaps>,
    proxy: Arc<ProxyMetrics>,
    /// Highest eviction count reported, so the counter never goes backwards when the
    /// inputs are read at slightly different moments.
    evicted: AtomicU64,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl KernelCollector {
    /// A collector over `kernel`, using `proxy`'s lookup count for evictions.
    pub fn new(kernel: Arc<KernelMaps>, proxy: Arc<ProxyMetrics>) -> Self {
        Self {
            kernel,
            proxy,
            evicted: AtomicU64::new(0),
        }
    }

    /// Original destinations that left the flow map without being taken by the proxy
    /// (LRU evictions of connects abandoned before accept): re-keyed − taken − present.
    pub fn evicted(&self) -> u64 {
        let (_, present) = self.kernel.orig_dst_entries();
        let rekeyed = self.kernel.counter_total(Counter::OrigDstRekeyed);
        let taken = self.proxy.orig_dst_found();
        let now = rekeyed.saturating_sub(taken + present as u64);
        self.evicted.fetch_max(now, Ordering::Relaxed).max(now)
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
        let evicted = encoder.encode_descriptor(
            "orig_dst_evicted",
            "Original destinations evicted from the LRU map before the proxy took them",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        ConstCounter::new(self.evicted()).encode(evicted)?;
        Ok(())
    }
}
