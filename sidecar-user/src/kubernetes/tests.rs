//! Records from the API's JSON, and what they translate to.

use std::{collections::HashMap, net::SocketAddr};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;

use super::{
    objects::{Key, PodRecord, ServiceRecord, SliceRecord},
    pod::PodIdentity,
    translate::{Cluster, Rules},
};
use crate::{
    config::{HashKey, LbPolicy, PlaintextPolicy},
    service::Discovered,
};

fn service(ns: &str, name: &str, spec: serde_json::Value) -> (Key, ServiceRecord) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name}, "spec": spec,
    }))
    .expect("service json");
    ServiceRecord::of(&svc).expect("record")
}

fn slice(ns: &str, svc: &str, port: u16, endpoints: serde_json::Value) -> (Key, SliceRecord) {
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": format!("{svc}-x"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("slice json");
    SliceRecord::of(&s).expect("record")
}

fn pod(
    ns: &str,
    name: &str,
    sa: &str,
    ip: &str,
    annotations: serde_json::Value,
) -> (Key, PodRecord) {
    let p: PodIdentity = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "annotations": annotations},
        "spec": {"serviceAccountName": sa, "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .expect("pod json");
    PodRecord::of(&p).expect("record")
}

fn translate(
    services: Vec<(Key, ServiceRecord)>,
    slices: Vec<(Key, SliceRecord)>,
    pods: Vec<(Key, PodRecord)>,
    plaintext: PlaintextPolicy,
) -> Discovered {
    let rules = Rules {
        trust_domain: "cluster.local".into(),
        zone: Some("a".into()),
        pod_ips: Vec::new(),
        plaintext,
        limits: Default::default(),
    };
    translate_with(services, slices, pods, &rules)
}

fn translate_with(
    services: Vec<(Key, ServiceRecord)>,
    slices: Vec<(Key, SliceRecord)>,
    pods: Vec<(Key, PodRecord)>,
    rules: &Rules,
) -> Discovered {
    let (s, e, p): (HashMap<_, _>, HashMap<_, _>, HashMap<_, _>) = (
        services.into_iter().collect(),
        slices.into_iter().collect(),
        pods.into_iter().collect(),
    );
    Cluster {
        services: &s,
        slices: &e,
        pods: &p,
    }
    .translate(rules)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// Records of a whole (small) cluster.
type Records = (
    Vec<(Key, ServiceRecord)>,
    Vec<(Key, SliceRecord)>,
    Vec<(Key, PodRecord)>,
);

fn shop() -> Records {
    let svc = service(
        "shop",
        "web",
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
               "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                         {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    );
    let eps = slice(
        "shop",
        "web",
        8080,
        json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "a"},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": true}, "zone": "b"},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}},
        ]),
    );
    let pods = vec![
        pod(
            "shop",
            "web-1",
            "web",
            "10.0.0.1",
            json!({"sidecar.example.dev/injected": "true"}),
        ),
        pod("shop", "web-2", "legacy", "10.0.0.2", json!({})),
        pod(
            "shop",
            "web-3",
            "web",
            "10.0.0.3",
            json!({"ambient.istio.io/redirection": "enabled"}),
        ),
    ];
    (vec![svc], vec![eps], pods)
}

#[test]
fn a_service_port_balances_its_ready_endpoints_with_their_pods_identities() {
    let (s, e, p) = shop();
    let d = translate(s, e, p, PlaintextPolicy::Allow);
    assert_eq!(d.services.len(), 1, "the UDP port is left out");
    let web = &d.services[0];
    assert_eq!(web.name, "web.shop:80");
    assert_eq!(
        web.addresses,
        vec![addr("10.96.0.10:80"), addr("[fd00::10]:80")]
    );
    let got: Vec<_> = web
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address,
                e.identity.as_ref().map(ToString::to_string),
                e.mtls,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                addr("10.0.0.1:8080"),
                Some("spiffe://cluster.local/ns/shop/sa/web".into()),
                Some(true)
            ),
            // No sidecar: plaintext, no identity to check.
            (addr("10.0.0.2:8080"), None, Some(false)),
        ],
        "not-ready and terminating endpoints take no new connections"
    );
    // Every pod by IP, ambient ones over HBONE too.
    let w = d
        .workloads
        .get(&"10.0.0.3".parse().expect("ip"))
        .expect("pod");
    assert!(w.hbone);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert!(!d.workloads[&"10.0.0.2".parse().expect("ip")].hbone);
}

#[test]
fn plaintext_deny_leaves_out_pods_without_a_sidecar() {
    let (s, e, p) = shop();
    let d = translate(s, e, p, PlaintextPolicy::Deny);
    let eps: Vec<_> = d.services[0].endpoints.iter().map(|e| e.address).collect();
    assert_eq!(eps, vec![addr("10.0.0.1:8080")]);
}

#[test]
fn affinity_maps_to_ring_hash_and_prefer_close_keeps_the_zone() {
    let (_, e, p) = shop();
    let svc = service(
        "shop",
        "web",
        json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
               "trafficDistribution": "PreferClose",
               "ports": [{"name": "http", "port": 80}]}),
    );
    let d = translate(vec![svc], e, p, PlaintextPolicy::Allow);
    let web = &d.services[0];
    assert_eq!(
        (web.policy, web.hash_key),
        (LbPolicy::RingHash, HashKey::ClientIp)
    );
    let eps: Vec<_> = web.endpoints.iter().map(|e| e.address).collect();
    assert_eq!(eps, vec![addr("10.0.0.1:8080")], "only zone a, ours");
}

#[test]
fn without_a_configured_zone_the_pod_s_own_endpoint_tells_it() {
    let prefer_close = || {
        let (_, e, p) = shop();
        let svc = service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.10", "trafficDistribution": "PreferClose",
                   "ports": [{"name": "http", "port": 80}]}),
        );
        (vec![svc], e, p)
    };
    let routed = |pod_ips: &[&str]| {
        let (s, e, p) = prefer_close();
        let rules = Rules {
            trust_domain: "cluster.local".into(),
            zone: None,
            pod_ips: pod_ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            plaintext: PlaintextPolicy::Allow,
            limits: Default::default(),
        };
        let d = translate_with(s, e, p, &rules);
        let eps: Vec<_> = d.services[0].endpoints.iter().map(|e| e.address).collect();
        eps
    };
    // This pod is 10.0.0.2, an endpoint in zone b: zone b it is.
    assert_eq!(routed(&["10.0.0.2"]), vec![addr("10.0.0.2:8080")]);
    // A pod no slice names has no zone: every endpoint.
    assert_eq!(
        routed(&["10.9.9.9"]),
        vec![addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]
    );
}

#[test]
fn headless_and_external_name_services_route_no_virtual_address() {
    let headless = service(
        "db",
        "pg",
        json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
    );
    let external = service(
        "db",
        "ext",
        json!({"type": "ExternalName", "externalName": "db.example.com", "ports": [{"port": 5432}]}),
    );
    let member = pod(
        "db",
        "pg-0",
        "pg",
        "10.0.1.5",
        json!({"sidecar.example.dev/injected": "true"}),
    );
    let d = translate(
        vec![headless, external],
        vec![],
        vec![member],
        PlaintextPolicy::Allow,
    );
    assert!(d.services.is_empty());
    let w = &d.workloads[&"10.0.1.5".parse().expect("ip")];
    assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/db/sa/pg");
    assert_eq!((&*w.pod.0, &*w.pod.1), ("db", "pg-0"));
}

#[test]
fn pods_without_their_own_ip_are_left_out() {
    let host: PodIdentity = serde_json::from_value(json!({
        "metadata": {"namespace": "kube-system", "name": "proxy"},
        "spec": {"hostNetwork": true, "containers": []},
        "status": {"phase": "Running", "podIP": "192.168.1.10"},
    }))
    .expect("json");
    assert!(PodRecord::of(&host).is_none(), "its IP is the node's");
    let pending: PodIdentity = serde_json::from_value(json!({
        "metadata": {"namespace": "a", "name": "p"},
        "spec": {"containers": []}, "status": {"phase": "Pending"},
    }))
    .expect("json");
    assert!(PodRecord::of(&pending).is_none());
}

#[test]
fn a_full_pod_reads_as_its_identity_fields() {
    // A pod as the API server sends it, written by `k8s_openapi`'s own serializer
    // (so the field names are the API's): every field the slim type does not name is
    // skipped, and the ones it names are read.
    let full: Pod = serde_json::from_value(json!({
        "metadata": {
            "namespace": "shop", "name": "web-7d4f", "uid": "0b1c",
            "labels": {"app": "web"}, "annotations": {"sidecar.example.dev/injected": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "9"}],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {
            "serviceAccountName": "web", "nodeName": "node-1", "hostNetwork": false,
            "containers": [{
                "name": "app", "image": "nginx",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "securityContext": {"runAsUser": 1000, "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
        },
        "status": {
            "phase": "Running", "podIP": "10.0.1.5",
            "podIPs": [{"ip": "10.0.1.5"}, {"ip": "fd00::15"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "nginx", "imageID": "x"}],
        },
    }))
    .expect("a full pod");
    let wire = serde_json::to_value(&full).expect("serialize");
    let slim: PodIdentity =
        serde_json::from_value(wire).expect("the slim pod reads the API's JSON");
    let (key, record) = PodRecord::of(&slim).expect("record");
    assert_eq!((&*key.0, &*key.1), ("shop", "web-7d4f"));
    assert_eq!(&*record.service_account, "web");
    assert_eq!(record.ipv4, Some("10.0.1.5".parse().expect("ip")));
    assert_eq!(record.ipv6, Some("fd00::15".parse().expect("ip")));
    assert!(record.hbone, "the injected annotation was read");

    // The fields that leave a pod out are read too.
    let mut host = serde_json::to_value(&full).expect("serialize");
    host["spec"]["hostNetwork"] = json!(true);
    let host: PodIdentity = serde_json::from_value(host).expect("json");
    assert!(PodRecord::of(&host).is_none(), "hostNetwork was read");
    let mut done = serde_json::to_value(&full).expect("serialize");
    done["status"]["phase"] = json!("Succeeded");
    let done: PodIdentity = serde_json::from_value(done).expect("json");
    assert!(PodRecord::of(&done).is_none(), "the phase was read");
}

#[test]
fn caps_leave_out_ports_endpoints_and_services_past_them_and_count_them() {
    let ports: Vec<serde_json::Value> = (1..=40)
        .map(|p| json!({"name": format!("p{p}"), "port": 1000 + p}))
        .collect();
    let many = service(
        "shop",
        "many",
        json!({"clusterIP": "10.96.0.9", "ports": ports}),
    );
    let eps: Vec<serde_json::Value> = (1..=30)
        .map(|i| json!({"addresses": [format!("10.0.1.{i}")]}))
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": "many-x",
                     "labels": {"kubernetes.io/service-name": "many"}},
        "addressType": "IPv4",
        "ports": [{"name": "p1", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .expect("slice");
    let slice = SliceRecord::of(&s).expect("record");
    let mut rules = Rules {
        trust_domain: "cluster.local".into(),
        zone: None,
        pod_ips: Vec::new(),
        plaintext: PlaintextPolicy::Allow,
        limits: Default::default(),
    };
    rules.limits.max_ports_per_service = 8;
    rules.limits.max_endpoints_per_service = 10;
    rules.limits.max_services = 5;
    let (services, slices, pods): (HashMap<_, _>, HashMap<_, _>, HashMap<_, _>) = (
        [many].into_iter().collect(),
        [slice].into_iter().collect(),
        HashMap::new(),
    );
    let (d, capped) = Cluster {
        services: &services,
        slices: &slices,
        pods: &pods,
    }
    .translate_capped(&rules);
    assert_eq!(d.services.len(), 5);
    assert_eq!(capped.ports, 32, "{capped:?}");
    assert_eq!(capped.services, 3, "{capped:?}");
    let p1 = d
        .services
        .iter()
        .find(|s| s.name == "many.shop:1001")
        .expect("the first port is routed");
    assert_eq!(p1.endpoints.len(), 10);
    assert_eq!(capped.endpoints, 20, "{capped:?}");
    // Within the caps nothing is left out.
    rules.limits = crate::config::DiscoveryLimits {
        max_services: 40,
        max_ports_per_service: 40,
        max_endpoints_per_service: 30,
        ..Default::default()
    };
    let (_, none) = Cluster {
        services: &services,
        slices: &slices,
        pods: &pods,
    }
    .translate_capped(&rules);
    assert!(!none.any(), "{none:?}");
}

#[test]
fn an_ip_two_pods_claim_is_the_running_pods_and_a_deleted_pod_claims_nothing() {
    let pod_in = |name: &str, sa: &str, phase: &str, deleting: bool| {
        let mut meta = json!({"namespace": "shop", "name": name});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let p: PodIdentity = serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"serviceAccountName": sa, "containers": []},
            "status": {"phase": phase, "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}]},
        }))
        .expect("pod json");
        PodRecord::of(&p)
    };
    assert!(
        pod_in("gone", "old", "Running", true).is_none(),
        "a pod being deleted"
    );
    let ip: std::net::IpAddr = "10.0.0.7".parse().expect("ip");
    // Whatever the order (names chosen so that the lower name is the pending pod).
    for order in [["a-new", "z-old"], ["z-old", "a-new"]] {
        let pods: Vec<(Key, PodRecord)> = order
            .iter()
            .map(|n| match *n {
                "a-new" => pod_in(n, "pending-sa", "Pending", false),
                _ => pod_in(n, "running-sa", "Running", false),
            })
            .map(|p| p.expect("record"))
            .collect();
        let d = translate(Vec::new(), Vec::new(), pods, PlaintextPolicy::Allow);
        let w = d.workloads.get(&ip).expect("a workload at the IP");
        assert_eq!(&*w.pod.1, "z-old", "the running pod wins");
    }
    // Two running pods: the lower name, in every sidecar.
    let pods = vec![
        pod_in("b", "sa-b", "Running", false).expect("record"),
        pod_in("a", "sa-a", "Running", false).expect("record"),
    ];
    let d = translate(Vec::new(), Vec::new(), pods, PlaintextPolicy::Allow);
    assert_eq!(&*d.workloads.get(&ip).expect("workload").pod.1, "a");
}
