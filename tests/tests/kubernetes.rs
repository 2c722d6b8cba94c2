//! Kubernetes discovery: the client pod's sidecar learns services, endpoints and the
//! identity each endpoint must present from an API server (the test double in
//! `sidecar_tests::kube_api`, spoken to by the same kube-rs code a cluster runs), and
//! routes a cluster IP that exists nowhere (no route in any pod) to real pods.

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::api::{
    core::v1::{Pod as KubePod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};
use sidecar_tests::{
    Certs, Net, Placement, Pod, Sidecar,
    kube_api::KubeApi,
    tools::{Background, pod_tool_bin, run_json, tally_by_server},
};

const CLUSTER_IP: &str = "10.96.0.10";
const PORT: u16 = 8080;

fn object<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid Kubernetes object")
}

/// Service `name` in `shop` at [`CLUSTER_IP`]:80, port `http` to 8080.
fn service(name: &str, extra: Value) -> Service {
    let mut spec = json!({"clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
        "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]});
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    object(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": name}, "spec": spec}))
}

/// The EndpointSlice of Service `name`: `(ip, ready)` endpoints on port 8080.
fn slice(name: &str, endpoints: &[(Ipv4Addr, bool)]) -> EndpointSlice {
    let with: Vec<(Ipv4Addr, Value)> = endpoints
        .iter()
        .map(|(ip, ready)| (*ip, json!({"ready": ready})))
        .collect();
    slice_with(name, &with)
}

/// The conditions of a terminating endpoint still serving its open connections, as
/// the EndpointSlice controller writes them for a Service that publishes not-ready
/// addresses (otherwise `ready` is false too): only `terminating` keeps new
/// connections away.
fn terminating() -> Value {
    json!({"ready": true, "serving": true, "terminating": true})
}

/// The EndpointSlice of Service `name`: endpoints with these conditions, port 8080.
fn slice_with(name: &str, endpoints: &[(Ipv4Addr, Value)]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, conditions)| json!({"addresses": [ip.to_string()], "conditions": conditions}))
        .collect();
    object(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": format!("{name}-abc"),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": eps}),
    )
}

/// Pod `name` in `shop` with service account `sa` at `pod`'s IP; `injected`: it
/// carries the annotation `sidecar inject` sets.
fn kube_pod(name: &str, sa: &str, pod: &Pod, injected: bool) -> KubePod {
    let annotations = match injected {
        true => json!({"sidecar.example.dev/injected": "true"}),
        false => json!({}),
    };
    object(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "annotations": annotations},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": pod.ip4.to_string(),
                   "podIPs": [{"ip": pod.ip4.to_string()}]}}))
}

/// An echo server on `pod`'s IPv4 address, port 8080 (it names its address first).
fn echo(pod: &Pod) -> Background {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["echo", "--listen", &format!("{}:{PORT}", pod.ip4)]);
    Background::start_ready(cmd)
}

/// `count` echo connections from `pod` to `to`; the pod-tool summary.
fn tally(pod: &Pod, to: &str, count: usize) -> Value {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()])
        .args(["--concurrency", "4", "--interval-ms", "0"]);
    run_json(cmd)
}

fn discovery(api: &KubeApi) -> String {
    format!(
        "kubernetes:\n  enabled: true\n  kubeconfig: {}\n",
        api.kubeconfig().display()
    )
}

#[test]
fn a_cluster_ip_balances_meshed_and_plain_pods_and_refuses_an_impostor() {
    let mut net = Net::new("kube-bind");
    let api_pod = net.pod("api");
    let client = net.pod("client");
    let web1 = net.pod("web1");
    let web2 = net.pod("web2");
    let imp = net.pod("imp");
    let certs = Certs::new(
        "kube-bind",
        &["client=shop/client", "web1=shop/web", "imp=shop/other"],
    );
    let _apps: Vec<Background> = [&web1, &web2, &imp].into_iter().map(echo).collect();
    let strict = |name: &str| format!("{}inbound:\n  mode: strict\n", certs.identity(name));
    let _s1 = Sidecar::start(&web1, &strict("web1"), Placement::InPodCgroup);
    // Holds a certificate of the mesh, but of another service account than the one
    // the API server says the pod runs as.
    let _si = Sidecar::start(&imp, &strict("imp"), Placement::InPodCgroup);

    let api = KubeApi::start(&api_pod, Duration::from_secs(1)).expect("test API server");
    api.apply(&service("web", json!({}))).expect("apply");
    api.apply(&slice(
        "web",
        &[(web1.ip4, true), (web2.ip4, true), (imp.ip4, true)],
    ))
    .expect("apply");
    api.apply(&kube_pod("web-1", "web", &web1, true))
        .expect("apply");
    api.apply(&kube_pod("web-2", "legacy", &web2, false))
        .expect("apply");
    api.apply(&kube_pod("web-3", "web", &imp, true))
        .expect("apply");
    // A headless service over the same pods (a StatefulSet's): no virtual address;
    // its members are dialed by pod IP.
    let headless: Service = object(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web-headless"},
        "spec": {"clusterIP": "None", "ports": [{"port": PORT}]}}));
    api.apply(&headless).expect("apply");

    let sidecar = Sidecar::start(
        &client,
        &format!("{}{}", certs.identity("client"), discovery(&api)),
        Placement::InPodCgroup,
    );
    assert_eq!(
        sidecar.metric("sidecar_kubernetes_synced", &[]),
        1.0,
        "ready means listed"
    );

    let summary = tally(&client, &format!("{CLUSTER_IP}:80"), 40);
    assert_eq!(summary["failed"], 0, "{summary}");
    let counts = tally_by_server(&summary);
    let (w1, w2, im) = (
        format!("{}:{PORT}", web1.ip4),
        format!("{}:{PORT}", web2.ip4),
        format!("{}:{PORT}", imp.ip4),
    );
    assert!(
        counts.get(&w1).copied().unwrap_or(0) > 0 && counts.get(&w2).copied().unwrap_or(0) > 0,
        "both the meshed and the plain pod serve: {counts:?}"
    );
    assert!(!counts.contains_key(&im), "the impostor served: {counts:?}");
    let attempts = |endpoint: &str, result: &str| {
        sidecar.metric(
            "sidecar_endpoint_connect_attempts_total",
            &[("endpoint", endpoint), ("result", result)],
        )
    };
    assert!(
        attempts(&im, "failure") >= 1.0,
        "the impostor was tried and refused"
    );
    assert_eq!(attempts(&im, "success"), 0.0);
    assert!(attempts(&w1, "success") >= 1.0);

    // The pods dialed by IP (as a headless service's members are): the same identity
    // binding from the pod table.
    let before = sidecar.closed("identity_mismatch");
    let direct = tally(&client, &im, 3);
    assert_eq!(direct["ok"], 0, "{direct}");
    assert_eq!(sidecar.closed("identity_mismatch") - before, 3);
    let ok = tally(&client, &w1, 3);
    assert_eq!(ok["ok"], 3, "the meshed pod by IP: {ok}");
    let plain = tally(&client, &w2, 3);
    assert_eq!(plain["ok"], 3, "the plain pod by IP: {plain}");
    assert!(
        sidecar.metric("sidecar_hbone_streams_opened_total", &[("side", "client")]) >= 4.0,
        "the meshed pod is reached over HBONE"
    );

    // What an operator sees without starting capture.
    let out = client
        .outsider(&sidecar_tests::tools::sidecar_bin().to_string_lossy())
        .args(["discovery", "--kubeconfig"])
        .arg(api.kubeconfig())
        .output()
        .expect("sidecar discovery");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "web.shop:80 (kubernetes, RoundRobin) {CLUSTER_IP}:80"
        )),
        "{text}"
    );
    for (endpoint, how) in [
        (&w1, "HBONE, must be spiffe://cluster.local/ns/shop/sa/web"),
        (&w2, "plaintext"),
        (&im, "HBONE, must be spiffe://cluster.local/ns/shop/sa/web"),
    ] {
        assert!(
            text.contains(&format!("  {endpoint} {how}")),
            "{endpoint}: {text}"
        );
    }
    assert!(
        text.contains("pods with a known identity: 3 (2 over HBONE)"),
        "{text}"
    );
    assert!(
        !text.contains("web-headless"),
        "a headless service has nothing to balance: {text}"
    );
}

/// Opens `n` echo connections to `to` from `pod` (python, so nothing of ours is in
/// the client), reports which server each reached, and once `go` exists checks each
/// still carries bytes both ways.
struct Holders {
    child: std::process::Child,
    out: sidecar_tests::tools::Lines,
    go: std::path::PathBuf,
}

const HOLDERS: &str = r#"
import json, os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, go = int(sys.argv[2]), sys.argv[3]
conns = [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]
servers = [c.recv(64, socket.MSG_WAITALL).decode().strip() for c in conns]
for c in conns:
    c.sendall(b"S")
print(json.dumps({"servers": servers}), flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
ok = 0
for i, c in enumerate(conns):
    msg = b"ping-%d" % i
    c.sendall(msg)
    if c.recv(len(msg), socket.MSG_WAITALL) == msg:
        ok += 1
print(json.dumps({"servers": servers, "ok": ok}), flush=True)
"#;

impl Holders {
    fn open(pod: &Pod, to: &str, n: usize) -> (Self, Vec<String>) {
        let go = std::env::temp_dir().join(format!("kube-holders-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&go);
        let mut child = pod
            .app("python3")
            .args(["-c", HOLDERS, to, &n.to_string()])
            .arg(&go)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let out = sidecar_tests::tools::Lines::new(child.stdout.take().expect("stdout"));
        let line = out.next_within(Duration::from_secs(60), "the holders' report");
        let v: Value = serde_json::from_str(&line).expect("holders json");
        let servers = v["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect();
        (Self { child, out, go }, servers)
    }

    /// How many connections still echoed.
    fn check(mut self) -> u64 {
        std::fs::write(&self.go, b"go").expect("go file");
        let line = self
            .out
            .next_within(Duration::from_secs(60), "the holders' result");
        sidecar_tests::tools::wait_within(&mut self.child, Duration::from_secs(10), "holders");
        let _ = std::fs::remove_file(&self.go);
        serde_json::from_str::<Value>(&line).expect("json")["ok"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// A net with the API server, a client pod with discovery, and plain echo pods
/// `b1..bn` registered as pods of service account `web` (no sidecar).
/// Fields drop in order: the sidecar first, the net last.
struct Plain {
    sidecar: Sidecar,
    api: KubeApi,
    client: Pod,
    b: Vec<Pod>,
    _apps: Vec<Background>,
    _net: Net,
}

fn plain(tag: &str, n: usize, ready: &[usize]) -> Plain {
    plain_with(tag, n, ready, "")
}

/// As [`plain`], with `limits` (YAML lines) under `kubernetes.limits`.
fn plain_with(tag: &str, n: usize, ready: &[usize], limits: &str) -> Plain {
    let mut net = Net::new(tag);
    let api_pod = net.pod("api");
    let client = net.pod("client");
    let b: Vec<Pod> = (1..=n).map(|i| net.pod(&format!("b{i}"))).collect();
    let apps = b.iter().map(echo).collect();
    let api = KubeApi::start(&api_pod, Duration::from_millis(500)).expect("test API server");
    api.apply(&service("web", json!({}))).expect("apply");
    let eps: Vec<(Ipv4Addr, bool)> = b
        .iter()
        .enumerate()
        .filter(|(i, _)| ready.contains(i))
        .map(|(_, p)| (p.ip4, true))
        .collect();
    api.apply(&slice("web", &eps)).expect("apply");
    for (i, p) in b.iter().enumerate() {
        api.apply(&kube_pod(&format!("web-{}", i + 1), "web", p, false))
            .expect("apply");
    }
    let mut config = discovery(&api);
    if !limits.is_empty() {
        config.push_str("  limits:\n");
        for line in limits.lines() {
            config.push_str(&format!("    {line}\n"));
        }
    }
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    Plain {
        _net: net,
        api,
        client,
        b,
        _apps: apps,
        sidecar,
    }
}

fn endpoint(pod: &Pod) -> String {
    format!("{}:{PORT}", pod.ip4)
}

#[test]
fn endpoint_changes_reach_new_connections_within_a_second_and_spare_open_ones() {
    let rig = plain("kube-churn", 3, &[0, 1]);
    let vip = format!("{CLUSTER_IP}:80");
    let (holders, servers) = Holders::open(&rig.client, &vip, 6);
    let (b1, b2, b3) = (
        endpoint(&rig.b[0]),
        endpoint(&rig.b[1]),
        endpoint(&rig.b[2]),
    );
    assert!(
        servers.contains(&b1) && servers.contains(&b2),
        "held connections are on b1 and b2: {servers:?}"
    );
    // Scale up (b3) and b2 stops being ready, in one change.
    let started = std::time::Instant::now();
    rig.api
        .apply(&slice(
            "web",
            &[
                (rig.b[0].ip4, true),
                (rig.b[1].ip4, false),
                (rig.b[2].ip4, true),
            ],
        ))
        .expect("apply");
    loop {
        let seen = tally_by_server(&tally(&rig.client, &vip, 4));
        if !seen.contains_key(&b2) && seen.contains_key(&b3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the change did not reach new connections within 1 s: {seen:?}"
        );
    }
    let after = tally(&rig.client, &vip, 20);
    let counts = tally_by_server(&after);
    assert_eq!(after["failed"], 0, "{after}");
    assert!(!counts.contains_key(&b2), "b2 is not ready: {counts:?}");
    assert!(
        counts.contains_key(&b1) && counts.contains_key(&b3),
        "{counts:?}"
    );
    // b1's pod is deleted: its endpoint is terminating (still serving what it has).
    let started = std::time::Instant::now();
    rig.api
        .apply(&slice_with(
            "web",
            &[
                (rig.b[0].ip4, terminating()),
                (rig.b[1].ip4, json!({"ready": false})),
                (rig.b[2].ip4, json!({"ready": true})),
            ],
        ))
        .expect("apply");
    loop {
        let seen = tally_by_server(&tally(&rig.client, &vip, 4));
        if seen.keys().eq([&b3]) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the terminating endpoint still took new connections after 1 s: {seen:?}"
        );
    }
    assert_eq!(
        holders.check(),
        6,
        "every open connection kept running, b1's and b2's too"
    );
}

#[test]
fn an_api_server_outage_keeps_traffic_flowing_and_a_410_relists() {
    let rig = plain("kube-outage", 2, &[0, 1]);
    let vip = format!("{CLUSTER_IP}:80");
    let lists_before = rig
        .api
        .requests("list", sidecar_tests::kube_api::Kind::EndpointSlice);
    rig.api.set_down(true);
    let stale = || {
        rig.sidecar.metric(
            "sidecar_kubernetes_stale_seconds",
            &[("kind", "endpointslices")],
        )
    };
    // 30 s without an API server: every connection still balanced over both pods.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let t = tally(&rig.client, &vip, 10);
        assert_eq!(t["failed"], 0, "traffic during the outage: {t}");
        assert_eq!(tally_by_server(&t).len(), 2, "{t}");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        stale() >= 25.0,
        "the staleness gauge shows the outage: {}",
        stale()
    );
    // Meanwhile b2 stopped being ready, and the history was compacted: the watch's
    // version is gone, so resuming gets 410 and the sidecar must list again.
    rig.api
        .apply(&slice(
            "web",
            &[(rig.b[0].ip4, true), (rig.b[1].ip4, false)],
        ))
        .expect("apply");
    rig.api.compact();
    rig.api.set_down(false);
    let b2 = endpoint(&rig.b[1]);
    sidecar_tests::tools::wait_until(Duration::from_secs(15), "relisted after 410", || {
        !tally_by_server(&tally(&rig.client, &vip, 4)).contains_key(&b2)
    });
    assert!(
        rig.sidecar.metric(
            "sidecar_kubernetes_relists_total",
            &[("kind", "endpointslices")]
        ) >= 1.0
    );
    assert!(
        rig.api
            .requests("list", sidecar_tests::kube_api::Kind::EndpointSlice)
            > lists_before
    );
    sidecar_tests::tools::wait_until(Duration::from_secs(5), "fresh again", || stale() == 0.0);
}

#[test]
fn watches_ended_at_once_back_off_and_a_flapping_pod_bounds_the_rebuilds() {
    use sidecar_tests::kube_api::Kind;
    let rig = plain("kube-spin", 2, &[0, 1]);
    let vip = format!("{CLUSTER_IP}:80");
    // A pod whose annotation flips 100 times in two seconds: each flip is a change
    // (it decides HBONE), yet the routed cluster is rebuilt at most four times a
    // second.
    let rebuilds = || rig.sidecar.metric("sidecar_kubernetes_rebuilds_total", &[]);
    let before = rebuilds();
    for i in 0..100 {
        rig.api
            .apply(&kube_pod("web-1", "web", &rig.b[0], i % 2 == 0))
            .expect("apply");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let flapped = rebuilds() - before;
    assert!(
        (1.0..=12.0).contains(&flapped),
        "{flapped} rebuilds for 100 changes in 2 s"
    );
    // An API server (or a load balancer before it) that ends every watch at once
    // with a 200: the sidecar resumes after a growing backoff instead of spinning.
    rig.api.end_watches_at_once(true);
    rig.api.set_down(true);
    rig.api.set_down(false);
    let watches = || rig.api.requests("watch", Kind::EndpointSlice);
    let start = watches();
    std::thread::sleep(Duration::from_secs(6));
    let spun = watches() - start;
    assert!(spun <= 10, "{spun} watches of one kind in 6 s");
    // Traffic still flows on what is known.
    let t = tally(&rig.client, &vip, 10);
    assert_eq!(t["failed"], 0, "{t}");
}

#[test]
fn narrowing_mesh_identities_keeps_open_connections_to_a_pod_discovery_vouches_for() {
    // A StatefulSet member dialed by its pod IP: discovery says which service account
    // serves it, and that requirement wins over `mesh.identities`. A reload that
    // narrows the rules for its network must not reset connections a new connect to
    // the same IP would still be allowed.
    let mut net = Net::new("kube-narrow");
    let api_pod = net.pod("api");
    let client = net.pod("client");
    let db = net.pod("db");
    let certs = Certs::new("kube-narrow", &["client=shop/client", "db=shop/db"]);
    let _app = echo(&db);
    let _db_sidecar = Sidecar::start(
        &db,
        &format!("{}inbound:\n  mode: strict\n", certs.identity("db")),
        Placement::InPodCgroup,
    );
    let api = KubeApi::start(&api_pod, Duration::from_secs(1)).expect("test API server");
    api.apply(&kube_pod("db-0", "db", &db, true))
        .expect("apply");
    let config = |allowed_sa: &str| {
        format!(
            "{}{}mesh:\n  identities:\n  - cidrs: ['{}/32']\n    allow: ['spiffe://cluster.local/ns/shop/sa/{allowed_sa}']\n",
            certs.identity("client"),
            discovery(&api),
            db.ip4
        )
    };
    let sidecar = Sidecar::start(&client, &config("db"), Placement::InPodCgroup);
    let to = format!("{}:{PORT}", db.ip4);
    let (holders, servers) = Holders::open(&client, &to, 3);
    assert_eq!(servers.len(), 3, "{servers:?}");
    // The rules for the pod's network now name another service account.
    sidecar.write_config(&config("other"));
    sidecar_tests::tools::wait_until(Duration::from_secs(5), "the reload", || {
        sidecar.metric("sidecar_config_reloads_total", &[("result", "applied")]) >= 1.0
    });
    // Discovery's requirement still holds for new connections to that IP ...
    let t = tally(&client, &to, 3);
    assert_eq!(t["failed"], 0, "{t}");
    // ... so the open ones were not reset.
    assert_eq!(
        holders.check(),
        3,
        "open connections were reset by the reload"
    );
    assert_eq!(sidecar.closed("policy_denied"), 0);
}

#[test]
fn an_oversized_watch_event_fails_its_watch_and_the_rest_keeps_working() {
    // One Service carries a 200 KiB annotation: its watch event is over the
    // configured line bound, so the services watch fails (and backs off) instead of
    // buffering it, while endpoint changes still reach traffic.
    let rig = plain_with(
        "kube-bound",
        2,
        &[0, 1],
        "max_watch_line_bytes: 65536\nmax_response_bytes: 1048576",
    );
    let vip = format!("{CLUSTER_IP}:80");
    let errors = || {
        rig.sidecar
            .metric("sidecar_kubernetes_errors_total", &[("kind", "services")])
    };
    let before = errors();
    rig.api
        .apply_json(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "bloated",
                         "annotations": {"x": "y".repeat(200 * 1024)}},
            "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80}]}}))
        .expect("apply");
    sidecar_tests::tools::wait_until(
        Duration::from_secs(10),
        "the services watch to fail",
        || errors() > before,
    );
    let log = rig.sidecar.logs();
    assert!(log.contains("max_watch_line_bytes"), "{log}");
    // The failing watch backs off: a few errors, not one per round trip.
    std::thread::sleep(Duration::from_secs(3));
    let failures = errors() - before;
    assert!(failures <= 6.0, "{failures} failed watches in 3 s");
    // Endpoint slices are watched on their own: b2 leaving still applies.
    rig.api
        .apply(&slice(
            "web",
            &[(rig.b[0].ip4, true), (rig.b[1].ip4, false)],
        ))
        .expect("apply");
    let b2 = endpoint(&rig.b[1]);
    sidecar_tests::tools::wait_until(Duration::from_secs(5), "b2 to leave", || {
        !tally_by_server(&tally(&rig.client, &vip, 4)).contains_key(&b2)
    });
}
