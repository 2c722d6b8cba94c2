//! `cargo xtask demo --kubernetes`: the client pod's sidecar has no service in its
//! config file; it learns two Services from a Kubernetes API server. No API server
//! runs on these machines, so it is the test double in `sidecar_tests::kube_api`
//! (HTTPS, bearer token, list and watch as the real one serves them), spoken to by
//! the same kube-rs code a cluster runs. `web` has two pods with sidecars (HBONE,
//! each must present the `web` service account's identity); `legacy` has one pod
//! without a sidecar (plaintext). Then a pod becomes not ready and new connections
//! leave it, with no config change anywhere.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidecar_tests::{
    Certs, Net, Placement, Pod, Sidecar,
    kube_api::KubeApi,
    tools::{Background, firewall_rules},
};

use super::{curl, http_server, step};

/// The Services' cluster IPs: they exist in no pod and have no route anywhere.
const WEB_IP: &str = "10.96.0.10";
const LEGACY_IP: &str = "10.96.0.20";

/// Runs the demo with Kubernetes discovery; `bin` holds the release binaries.
pub fn run(bin: &Path) -> Result<()> {
    let firewall_before = firewall_rules();
    step("Creating pods on a private bridge: client, web-1, web-2 (sidecars), legacy (none), api");
    let mut net = Net::new("demo-kube");
    let api_pod = net.pod("api");
    let client = net.pod("client");
    let web1 = net.pod("web1");
    let web2 = net.pod("web2");
    let legacy = net.pod("legacy");
    for (name, pod) in [("web-1", &web1), ("web-2", &web2), ("legacy-0", &legacy)] {
        println!("  {name}: {}", pod.ip4);
    }
    let _http: Vec<Background> = [&web1, &web2, &legacy]
        .iter()
        .map(|pod| http_server(pod, bin))
        .collect();

    step(
        "Dev certificates: client = shop/cart; web-1 and web-2 = shop/web (their service account)",
    );
    let certs = Certs::new(
        "demo-kube",
        &["client=shop/cart", "web1=shop/web", "web2=shop/web"],
    );
    let strict = |who: &str| format!("{}inbound:\n  mode: strict\n", certs.identity(who));
    let _web1_sidecar = Sidecar::start(&web1, &strict("web1"), Placement::InPodCgroup);
    let web2_sidecar = Sidecar::start(&web2, &strict("web2"), Placement::InPodCgroup);

    step(&format!(
        "Test API server (a test double: HTTPS + bearer token, list/watch/bookmarks/410) at {}:6443, loaded with two Services",
        api_pod.ip4
    ));
    let api = KubeApi::start(&api_pod, Duration::from_secs(5))?;
    load(&api, &web1, &web2, &legacy)?;
    println!(
        "  Service shop/web    {WEB_IP}:80 -> web-1, web-2 :8080 (pods annotated as injected, service account web)"
    );
    println!("  Service shop/legacy {LEGACY_IP}:80 -> legacy-0 :8080 (no sidecar)");

    step(
        "`sidecar discovery --kubeconfig ...`: what a sidecar would route, without capturing anything",
    );
    let out = client
        .outsider(&bin.join("sidecar").to_string_lossy())
        .args(["discovery", "--kubeconfig"])
        .arg(api.kubeconfig())
        .output()
        .context("sidecar discovery")?;
    if !out.status.success() {
        bail!(
            "sidecar discovery failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }

    step(
        "The client pod's sidecar: no services in its config file, only `kubernetes: {enabled: true}`",
    );
    let config = format!(
        "{}kubernetes:\n  enabled: true\n  kubeconfig: {}\n",
        certs.identity("client"),
        api.kubeconfig().display()
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    for name in ["synced", "services", "workloads"] {
        println!(
            "  sidecar_kubernetes_{name} = {}",
            sidecar.metric(&format!("sidecar_kubernetes_{name}"), &[])
        );
    }

    step(&format!(
        "The app curls the cluster IPs (routed nowhere): web {WEB_IP} 4 times, legacy {LEGACY_IP} twice"
    ));
    for url in [WEB_IP; 4].iter().chain(&[LEGACY_IP; 2]) {
        print!("  {url}: {}", curl(&client, &format!("http://{url}/"))?);
    }
    print_services(&sidecar);

    step("web-2 becomes not ready (its EndpointSlice says so): new connections leave it");
    let inbound = || {
        web2_sidecar.metric(
            "sidecar_connections_opened_total",
            &[("direction", "inbound")],
        )
    };
    let before = inbound();
    let changed = Instant::now();
    api.apply_json(slice("web", &[(&web1, true), (&web2, false)]))?;
    let deadline = changed + Duration::from_secs(5);
    while web_endpoints(&sidecar) != 1 {
        if Instant::now() > deadline {
            bail!("the client's sidecar still routes to web-2 after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  the client's registry changed {} ms after the API server did",
        changed.elapsed().as_millis()
    );
    for _ in 0..3 {
        print!(
            "  {WEB_IP}: {}",
            curl(&client, &format!("http://{WEB_IP}/"))?
        );
    }
    let after = inbound();
    println!("  web-2's sidecar accepted {before} connections before the change, {after} after");
    if after != before {
        bail!("web-2 took new connections after it became not ready");
    }

    step("Firewall rules added: none (iptables-save / nft list ruleset unchanged)");
    if firewall_rules() != firewall_before {
        bail!("firewall rules changed during the demo");
    }
    drop(sidecar);
    drop(api);
    drop(net);
    drop(certs);
    step("Cleaned up: pods, cgroups, namespaces, the API server and certificates removed");
    Ok(())
}

/// Loads the two Services, their EndpointSlices and their Pods.
fn load(api: &KubeApi, web1: &Pod, web2: &Pod, legacy: &Pod) -> Result<()> {
    for (name, ip) in [("web", WEB_IP), ("legacy", LEGACY_IP)] {
        api.apply_json(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))?;
    }
    api.apply_json(slice("web", &[(web1, true), (web2, true)]))?;
    api.apply_json(slice("legacy", &[(legacy, true)]))?;
    for (name, pod, sa, injected) in [
        ("web-1", web1, "web", true),
        ("web-2", web2, "web", true),
        ("legacy-0", legacy, "legacy", false),
    ] {
        let annotations = match injected {
            true => json!({"sidecar.example.dev/injected": "true"}),
            false => json!({}),
        };
        api.apply_json(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": name, "annotations": annotations},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": pod.ip4.to_string(),
                       "podIPs": [{"ip": pod.ip4.to_string()}]}}))?;
    }
    Ok(())
}

/// The EndpointSlice of Service `name` over `(pod, ready)`, port `http` 8080.
fn slice(name: &str, endpoints: &[(&Pod, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ready)| json!({"addresses": [pod.ip4.to_string()], "conditions": {"ready": ready}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": format!("{name}-abc"),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

/// The client's `/services` as the operator sees it.
fn print_services(sidecar: &Sidecar) {
    for s in sidecar
        .admin_json("/services")
        .as_array()
        .into_iter()
        .flatten()
    {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            println!(
                "  /services: {} ({}) endpoint {} mtls={} must_be={} attempts_ok={}",
                s["name"], s["source"], e["address"], e["mtls"], e["identity"], e["attempts_ok"]
            );
        }
    }
}

/// The endpoints the client's sidecar routes `web.shop:80` to now.
fn web_endpoints(sidecar: &Sidecar) -> usize {
    sidecar
        .admin_json("/services")
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "web.shop:80")
        .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
        .sum()
}
