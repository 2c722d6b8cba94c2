//! Memory of Kubernetes discovery at scale: a sidecar fed by the test API server
//! (`sidecar_tests::kube_api`) with 10,000 Services of 5 endpoints each, every
//! endpoint a pod of its own (50,000), against the same sidecar watching an empty
//! namespace. What is left per endpoint is what discovery holds: records, services,
//! balancers, endpoint state and the pod table.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use sidecar_tests::{Net, Placement, Sidecar, kube_api::KubeApi};

use super::{Figures, rss_kib};

/// Rounds of (empty, synced) sidecars.
const ROUNDS: usize = 3;
/// Endpoints per service.
const PER_SERVICE: usize = 5;

/// Services and endpoints of a run.
pub fn scale(quick: bool) -> (usize, usize) {
    let services = if quick { 1_000 } else { 10_000 };
    (services, services * PER_SERVICE)
}

fn ip(prefix: u8, i: usize) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// Loads `services` Services (5 pods each) into `api`.
fn load(api: &KubeApi, services: usize) -> Result<()> {
    for s in 0..services {
        let ns = format!("ns{}", s % 100);
        let name = format!("svc{s}");
        api.apply_json(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
            "spec": {"clusterIP": ip(10, s + 1), "clusterIPs": [ip(10, s + 1)],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))?;
        let mut endpoints = Vec::new();
        for e in 0..PER_SERVICE {
            let pod_ip = ip(11, s * PER_SERVICE + e + 1);
            let pod = format!("{name}-{e}");
            endpoints.push(json!({"addresses": [pod_ip], "conditions": {"ready": true},
                "zone": "zone-a", "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}));
            api.apply_json(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": ns, "name": pod, "labels": {"app": name},
                             "annotations": {"sidecar.example.dev/injected": "true"}},
                "spec": {"serviceAccountName": name, "nodeName": "node-1",
                         "containers": [{"name": "app", "image": "registry.example/app:1.0",
                                         "ports": [{"containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}}))?;
        }
        api.apply_json(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{name}-abc"),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}),
        )?;
    }
    // The double's change history is not the sidecar's: drop it.
    api.compact();
    Ok(())
}

/// RSS of a sidecar watching everything, and of one watching an empty namespace,
/// in [`ROUNDS`] alternated rounds.
pub fn measure(quick: bool) -> Result<Vec<Figures>> {
    let (services, endpoints) = scale(quick);
    let mut net = Net::new("bench-kube");
    let api_pod = net.pod("api");
    let client = net.pod("client");
    let api = KubeApi::start(&api_pod, Duration::from_secs(5))?;
    load(&api, services).context("loading the test API server")?;
    let config = |namespaces: &str| {
        format!(
            "kubernetes:\n  enabled: true\n  kubeconfig: {}\n  namespaces: {namespaces}\n",
            api.kubeconfig().display()
        )
    };
    let rss = |sidecar: &Sidecar| {
        // Let the registry settle (the build after the list) before reading.
        std::thread::sleep(Duration::from_secs(1));
        rss_kib(&[sidecar.pid()]) as f64
    };
    // Alternated rounds (these VMs are noisy): the report takes medians and spread.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let empty = Sidecar::start(&client, &config("[empty]"), Placement::InPodCgroup);
        let base = rss(&empty);
        drop(empty);
        let full = Sidecar::start(&client, &config("[]"), Placement::InPodCgroup);
        let held = rss(&full);
        let routed = full.metric("sidecar_kubernetes_services", &[]);
        anyhow::ensure!(
            routed as usize == services,
            "discovery routed {routed} services of {services}"
        );
        drop(full);
        let mut f = Figures::new();
        f.insert("kube_rss_mib_empty", base / 1024.0);
        f.insert("kube_rss_mib_synced", held / 1024.0);
        f.insert(
            "kube_bytes_per_endpoint",
            (held - base).max(0.0) * 1024.0 / endpoints as f64,
        );
        rounds.push(f);
    }
    Ok(rounds)
}
