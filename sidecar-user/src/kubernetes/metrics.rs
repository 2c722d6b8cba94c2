//! Discovery's metrics, per kind watched: records held, events, lists after 410 Gone,
//! errors, and how stale the view is (0 while the watch is open and answering).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The families, shared by every kind.
#[derive(Debug, Default)]
pub struct DiscoveryMetrics {
    objects: Family<KindLabels, Gauge>,
    events: Family<KindLabels, Counter>,
    relists: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    stale: Family<KindLabels, Gauge<f64, AtomicU64>>,
    synced: Gauge,
    services: Gauge,
    workloads: Gauge,
    capped: Family<WhatLabels, Gauge>,
    rebuilds: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: &'static str,
}

/// One kind's handle on the families.
#[derive(Debug)]
pub struct KindMetrics {
    objects: Gauge,
    events: Counter,
    relists: Counter,
    errors: Counter,
    stale: Gauge<f64, AtomicU64>,
    start: Instant,
    /// The watch is open and answering.
    healthy: AtomicBool,
    /// When the view was last known current (ms since `start`).
    fresh_at: AtomicU64,
    /// The first full list has completed.
    listed: AtomicBool,
}

impl DiscoveryMetrics {
    /// Registers the families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kubernetes");
        r.register(
            "objects",
            "Objects held from the API server (only the fields routing needs), by kind",
            self.objects.clone(),
        );
        r.register(
            "events",
            "Watch events received, by kind",
            self.events.clone(),
        );
        r.register(
            "relists",
            "Full lists after the API server answered 410 Gone (the watch's version was compacted), by kind",
            self.relists.clone(),
        );
        r.register(
            "errors",
            "Failed lists and watches (the last known state is kept), by kind",
            self.errors.clone(),
        );
        r.register(
            "stale_seconds",
            "How long ago the view of this kind was last known current (0 while its watch is open)",
            self.stale.clone(),
        );
        r.register(
            "synced",
            "1 once every watched kind has been listed in full",
            self.synced.clone(),
        );
        r.register(
            "services",
            "Services (one per Service port) discovered and routed",
            self.services.clone(),
        );
        r.register(
            "workloads",
            "Pod IPs with a known identity",
            self.workloads.clone(),
        );
        r.register(
            "capped",
            "Objects left out by kubernetes.limits in the last rebuild, by what \
             (services, ports, endpoints)",
            self.capped.clone(),
        );
        self.capped(super::translate::Capped::default());
        r.register(
            "rebuilds",
            "Translations of the watched objects into routes (at most four a second)",
            self.rebuilds.clone(),
        );
    }

    /// The handle of `kind`.
    pub fn kind(&self, kind: &'static str) -> Arc<KindMetrics> {
        let labels = KindLabels { kind };
        Arc::new(KindMetrics {
            objects: self.objects.get_or_create(&labels).clone(),
            events: self.events.get_or_create(&labels).clone(),
            relists: self.relists.get_or_create(&labels).clone(),
            errors: self.errors.get_or_create(&labels).clone(),
            stale: self.stale.get_or_create(&labels).clone(),
            start: Instant::now(),
            healthy: AtomicBool::new(false),
            fresh_at: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        })
    }

    /// Every kind listed.
    pub fn set_synced(&self) {
        self.synced.set(1);
    }

    /// What the caps left out of the last rebuild.
    pub fn capped(&self, capped: super::translate::Capped) {
        for (what, n) in [
            ("services", capped.services),
            ("ports", capped.ports),
            ("endpoints", capped.endpoints),
        ] {
            self.capped
                .get_or_create(&WhatLabels { what })
                .set(n as i64);
        }
    }

    /// What the registry was given (one rebuild).
    pub fn routed(&self, services: usize, workloads: usize) {
        self.rebuilds.inc();
        self.services.set(services as i64);
        self.workloads.set(workloads as i64);
    }
}

impl KindMetrics {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The API server answered: the view is current.
    pub fn fresh(&self) {
        self.fresh_at.store(self.now_ms(), Relaxed);
        self.healthy.store(true, Relaxed);
        self.stale.set(0.0);
    }

    /// A list or watch failed: the view ages from its last fresh moment.
    pub fn failed(&self) {
        self.errors.inc();
        self.healthy.store(false, Relaxed);
        self.tick();
    }

    /// Updates the staleness gauge.
    pub fn tick(&self) {
        if self.healthy.load(Relaxed) {
            self.stale.set(0.0);
            return;
        }
        // Before the first answer, the view is as old as the sidecar.
        let since = self.fresh_at.load(Relaxed);
        self.stale
            .set(self.now_ms().saturating_sub(since) as f64 / 1000.0);
    }

    /// A full list of `n` records arrived.
    pub fn listed(&self, n: usize) {
        self.fresh();
        self.objects.set(n as i64);
        self.listed.store(true, Relaxed);
    }

    /// Whether the first full list has arrived.
    pub fn has_listed(&self) -> bool {
        self.listed.load(Relaxed)
    }

    /// Records held now.
    pub fn objects(&self) -> i64 {
        self.objects.get()
    }

    /// Sets the records held.
    pub fn set_objects(&self, n: usize) {
        self.objects.set(n as i64);
    }

    /// A watch event arrived.
    pub fn event(&self) {
        self.events.inc();
    }

    /// The API server answered 410 Gone.
    pub fn relisted(&self) {
        self.relists.inc();
    }
}
