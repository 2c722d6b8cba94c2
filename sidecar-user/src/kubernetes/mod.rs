//! Kubernetes discovery, straight from the API server with no control plane of our
//! own: each sidecar lists and watches Services, EndpointSlices and Pods (the whole
//! cluster or `kubernetes.namespaces`), keeps only what routing needs
//! ([`objects`]), and turns it into services with per-endpoint identities and a pod
//! table ([`translate`]) for the registry. The config file's services win.
//!
//! Outbound connections wait for the first full list ([`Synced`]); after that the
//! last known state serves through API server outages ([`watch`]).

mod bounded;
pub mod metrics;
pub mod objects;
pub mod pod;
#[cfg(test)]
mod tests;
pub mod translate;
mod watch;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::Api;
use tokio::sync::{Notify, watch as channel};
use tracing::{info, warn};

use self::{
    metrics::DiscoveryMetrics,
    objects::{PodRecord, ServiceRecord, SliceRecord},
    pod::PodIdentity,
    translate::{Cluster, Rules},
    watch::Sink,
};
use crate::{config::KubernetesConfig, service::Services};

/// Changes arriving within this long are applied together (a list, a rollout).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Rebuilds of the routed cluster start at least this far apart: an object that
/// changes all the time (a toggled annotation) costs every sidecar at most four
/// rebuilds a second, and an endpoint change still applies within about 300 ms.
const MIN_REBUILD_INTERVAL: Duration = Duration::from_millis(250);

/// Why discovery could not start. Each names the file or source at fault.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The kubeconfig file could not be read or used.
    #[error("kubernetes.kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    /// Not in a pod with a service account (no `kubernetes.kubeconfig` given).
    #[error("kubernetes: no kubeconfig given and not in a pod with a service account token: {0}")]
    InCluster(String),
    /// The client could not be built from the configuration.
    #[error("kubernetes client: {0}")]
    Client(String),
}

/// Waits for discovery's first full list.
#[derive(Clone, Debug)]
pub struct Synced {
    rx: channel::Receiver<bool>,
    timeout: Duration,
}

impl Synced {
    /// Returns once every watch has listed in full, or the configured time (as the
    /// error) has passed without it.
    pub async fn wait(&self) -> Result<(), Duration> {
        if *self.rx.borrow() {
            return Ok(());
        }
        let mut rx = self.rx.clone();
        match tokio::time::timeout(self.timeout, rx.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.timeout),
        }
    }

    /// Whether the first full list is in.
    pub fn is_synced(&self) -> bool {
        *self.rx.borrow()
    }

    /// Returns once the first full list is in, however long it takes.
    pub async fn synced(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// A client for the API server: from `kubernetes.kubeconfig`, or the pod's service
/// account.
pub async fn client(config: &KubernetesConfig) -> Result<kube::Client, DiscoveryError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| DiscoveryError::Kubeconfig(path.clone(), e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| DiscoveryError::Kubeconfig(path.clone(), e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| DiscoveryError::InCluster(e.to_string()))?,
    };
    let bounds = bounded::Bounds {
        max_response_bytes: config.limits.max_response_bytes,
        max_watch_line_bytes: config.limits.max_watch_line_bytes,
    };
    let builder = kube::client::ClientBuilder::try_from(kube_config)
        .map_err(|e| DiscoveryError::Client(e.to_string()))?;
    Ok(builder.with_layer(&bounded::BoundedLayer(bounds)).build())
}

/// The records every watch of one kind shares.
type Records<R> = Arc<Mutex<std::collections::HashMap<objects::Key, R>>>;

/// Starts the watches and the task that hands their state to `services`.
pub fn start(
    client: kube::Client,
    config: &KubernetesConfig,
    rules: Rules,
    services: Arc<Services>,
    metrics: Arc<DiscoveryMetrics>,
) -> Synced {
    let changed = Arc::new(Notify::new());
    let service_records: Records<ServiceRecord> = Arc::default();
    let slice_records: Records<SliceRecord> = Arc::default();
    let pod_records: Records<PodRecord> = Arc::default();
    let kinds = [
        metrics.kind("services"),
        metrics.kind("endpointslices"),
        metrics.kind("pods"),
    ];
    let namespaces: Vec<Option<Arc<str>>> = match config.namespaces.as_slice() {
        [] => vec![None],
        list => list.iter().map(|n| Some(n.as_str().into())).collect(),
    };
    let mut listed = Vec::new();
    let lists = Arc::new(AtomicU64::new(0));
    for ns in &namespaces {
        let scope = ns.as_deref().unwrap_or("all namespaces").to_string();
        tokio::spawn(watch::run(
            api::<Service>(&client, ns.as_deref()),
            format!("services ({scope})"),
            ServiceRecord::of,
            sink(
                service_records.clone(),
                ns,
                &changed,
                &kinds[0],
                &mut listed,
                &lists,
            ),
        ));
        tokio::spawn(watch::run(
            api::<EndpointSlice>(&client, ns.as_deref()),
            format!("endpointslices ({scope})"),
            SliceRecord::of,
            sink(
                slice_records.clone(),
                ns,
                &changed,
                &kinds[1],
                &mut listed,
                &lists,
            ),
        ));
        tokio::spawn(watch::run(
            api::<PodIdentity>(&client, ns.as_deref()),
            format!("pods ({scope})"),
            PodRecord::of,
            sink(
                pod_records.clone(),
                ns,
                &changed,
                &kinds[2],
                &mut listed,
                &lists,
            ),
        ));
    }
    let (tx, rx) = channel::channel(false);
    tokio::spawn(async move {
        let mut lists_seen = 0;
        let mut capped_seen = translate::Capped::default();
        let mut rebuilt: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = changed.notified() => {}
                _ = tick.tick() => {
                    kinds.iter().for_each(|k| k.tick());
                    continue;
                }
            }
            tokio::time::sleep(DEBOUNCE).await;
            if !listed.iter().all(|l| l.load(Relaxed)) {
                continue;
            }
            if let Some(last) = rebuilt {
                tokio::time::sleep_until(last + MIN_REBUILD_INTERVAL).await;
            }
            rebuilt = Some(tokio::time::Instant::now());
            let discovered = {
                let (s, e, p) = (
                    lock(&service_records),
                    lock(&slice_records),
                    lock(&pod_records),
                );
                Cluster {
                    services: &s,
                    slices: &e,
                    pods: &p,
                }
                .translate_capped(&rules)
            };
            let (discovered, capped) = discovered;
            if capped != capped_seen {
                capped_seen = capped;
                if capped.any() {
                    warn!(services = capped.services, ports = capped.ports, endpoints = capped.endpoints, limits = ?rules.limits, "kubernetes: caps left objects out; they are not routed (raise kubernetes.limits to route them)");
                } else {
                    info!("kubernetes: every object is within the caps again");
                }
            }
            metrics.capped(capped);
            metrics.routed(discovered.services.len(), discovered.workloads.len());
            services.set_discovered(discovered);
            objects::forget_unused_names();
            // A full list parses megabytes of JSON and frees them again; give the
            // pages back (glibc keeps them) so memory follows what is held.
            let done = lists.load(Relaxed);
            if done != lists_seen {
                lists_seen = done;
                crate::process::release_startup_memory();
            }
            if !*tx.borrow() {
                info!("kubernetes: first full list applied; ready");
                metrics.set_synced();
                tx.send_replace(true);
            }
        }
    });
    Synced {
        rx,
        timeout: config.initial_sync_timeout,
    }
}

/// One watch's sink: `records` shared by its kind, its own first-list flag.
fn sink<R>(
    records: Records<R>,
    namespace: &Option<Arc<str>>,
    changed: &Arc<Notify>,
    metrics: &Arc<metrics::KindMetrics>,
    listed: &mut Vec<Arc<AtomicBool>>,
    lists: &Arc<AtomicU64>,
) -> Sink<R> {
    let flag = Arc::new(AtomicBool::new(false));
    listed.push(flag.clone());
    Sink {
        records,
        namespace: namespace.clone(),
        listed: flag,
        lists: lists.clone(),
        changed: changed.clone(),
        metrics: metrics.clone(),
    }
}

/// One list of every kind (no watch), translated under `rules`: what a sidecar with
/// this configuration would route (`sidecar discovery`).
pub async fn snapshot(
    client: &kube::Client,
    config: &KubernetesConfig,
    rules: &Rules,
) -> Result<crate::service::Discovered, kube::Error> {
    let namespaces: Vec<Option<&str>> = match config.namespaces.as_slice() {
        [] => vec![None],
        list => list.iter().map(|n| Some(n.as_str())).collect(),
    };
    let (mut services, mut slices, mut pods) = Default::default();
    for ns in namespaces {
        extend(
            &mut services,
            watch::list_all(&api::<Service>(client, ns), ServiceRecord::of).await?,
        );
        extend(
            &mut slices,
            watch::list_all(&api::<EndpointSlice>(client, ns), SliceRecord::of).await?,
        );
        extend(
            &mut pods,
            watch::list_all(&api::<PodIdentity>(client, ns), PodRecord::of).await?,
        );
    }
    Ok(Cluster {
        services: &services,
        slices: &slices,
        pods: &pods,
    }
    .translate(rules))
}

fn extend<R>(
    into: &mut std::collections::HashMap<objects::Key, R>,
    (records, _): (std::collections::HashMap<objects::Key, R>, String),
) {
    into.extend(records);
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
