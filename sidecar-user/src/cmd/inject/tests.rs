//! `sidecar inject` on workloads of every kind, probes, idempotence, errors.

use super::*;

fn options() -> InjectOptions {
    InjectOptions {
        image: "ghcr.io/example/sidecar:0.1.0".into(),
        config_map: "sidecar-config".into(),
        identity_secret: Some("web-identity".into()),
        keep_app_token: false,
    }
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          ports: [{name: http, containerPort: 8080}]
          readinessProbe:
            httpGet: {path: /ready, port: http}
            periodSeconds: 3
          livenessProbe:
            tcpSocket: {port: 8080}
          startupProbe:
            exec: {command: [true]}
";

fn injected() -> Value {
    serde_yaml_ng::from_str(&inject(DEPLOYMENT, &options()).expect("inject")).expect("yaml")
}

#[test]
fn adds_a_native_sidecar_with_the_documented_capabilities() {
    let out = injected();
    let pod = &out["spec"]["template"];
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 15020);
    let caps: Vec<&str> = sidecar["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("add")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(caps, CAPABILITIES);
    assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        volumes,
        [
            "sidecar-config",
            "host-cgroup",
            "host-bpffs",
            "sidecar-token",
            "sidecar-identity"
        ]
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    // The rest is untouched.
    assert_eq!(pod["spec"]["containers"][0]["image"], "nginx:1.27");
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
}

#[test]
fn rewrites_http_and_tcp_probes_to_the_health_port() {
    let out = injected();
    let web = &out["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        web["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readiness"
    );
    assert_eq!(web["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(
        web["readinessProbe"]["periodSeconds"], 3,
        "other fields kept"
    );
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/liveness"
    );
    assert!(web["livenessProbe"].get("tcpSocket").is_none());
    assert!(
        web["startupProbe"].get("exec").is_some(),
        "exec probes stay"
    );
    let env = out["spec"]["template"]["spec"]["initContainers"][0]["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == PROBES_ENV)
        .expect("probes env")
        .clone();
    let probes: BTreeMap<String, AppProbe> =
        serde_json::from_str(env["value"].as_str().expect("json")).expect("probes");
    assert_eq!(
        probes["/app-health/web/readiness"],
        AppProbe::HttpGet {
            port: 8080,
            path: "/ready".into()
        }
    );
    assert_eq!(
        probes["/app-health/web/liveness"],
        AppProbe::TcpSocket { port: 8080 }
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = inject(DEPLOYMENT, &options()).expect("once");
    let twice = inject(&once, &options()).expect("twice");
    assert_eq!(once, twice);
}

#[test]
fn handles_every_workload_kind_and_passes_others_through() {
    let input = "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\n\
            kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: x}]}\n---\n\
            kind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec: {containers: [{name: a, image: x}], restartPolicy: Never}\n---\n\
            kind: List\nitems:\n- kind: StatefulSet\n  metadata: {name: s}\n  spec: {template: {spec: {containers: [{name: a, image: x}]}}}\n";
    let out = inject(input, &options()).expect("inject");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| Value::deserialize(d).expect("doc"))
        .collect();
    assert_eq!(docs.len(), 4);
    assert!(
        docs[0]["spec"].get("initContainers").is_none(),
        "Service untouched"
    );
    assert_eq!(docs[1]["spec"]["initContainers"][0]["name"], "sidecar");
    assert_eq!(
        docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "sidecar"
    );
    assert_eq!(
        docs[3]["items"][0]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "sidecar"
    );
}

#[test]
fn refuses_host_network_and_other_meshes_with_clear_messages() {
    let host = "kind: Pod\nmetadata: {name: node-agent}\nspec: {hostNetwork: true, containers: [{name: a, image: x}]}\n";
    let e = inject(host, &options())
        .expect_err("hostNetwork")
        .to_string();
    assert!(
        e.contains("Pod node-agent") && e.contains("hostNetwork"),
        "{e}"
    );
    let istio = "kind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      annotations: {sidecar.istio.io/status: '{}'}\n    spec: {containers: [{name: web, image: x}, {name: istio-proxy, image: y}]}\n";
    let e = inject(istio, &options()).expect_err("istio").to_string();
    assert!(e.contains("Deployment web") && e.contains("Istio"), "{e}");
    let linkerd = "kind: Pod\nmetadata: {name: p, annotations: {linkerd.io/proxy-version: v2}}\nspec: {containers: [{name: linkerd-proxy, image: y}]}\n";
    let e = inject(linkerd, &options())
        .expect_err("linkerd")
        .to_string();
    assert!(e.contains("Linkerd"), "{e}");
    let e = inject("kind: Pod\n: : bad\n", &options())
        .expect_err("yaml")
        .to_string();
    assert!(e.contains("document 1"), "{e}");
}

#[test]
fn the_pod_is_marked_for_discovery_and_the_sidecar_alone_gets_the_token() {
    let doc = injected();
    let template = &doc["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"][sidecar::kubernetes::objects::INJECTED_ANNOTATION],
        Value::from("true"),
        "discovery reaches this pod over HBONE"
    );
    let spec = &template["spec"];
    let sidecar = &spec["initContainers"][0];
    let mounts = sidecar["volumeMounts"].as_sequence().expect("mounts");
    assert!(mounts.iter().any(|m| m["name"] == "sidecar-token"
        && m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"));
    let app = &spec["containers"][0];
    assert!(
        app["volumeMounts"]
            .as_sequence()
            .is_none_or(|m| m.iter().all(|m| m["name"] != "sidecar-token")),
        "the application does not get the sidecar's token mount"
    );
    let volume = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "sidecar-token")
        .expect("token volume");
    let sources = volume["projected"]["sources"]
        .as_sequence()
        .expect("sources");
    assert_eq!(
        sources[0]["serviceAccountToken"]["path"],
        Value::from("token")
    );
    assert_eq!(volume["projected"]["defaultMode"], 292);
    // The application gets no token of its own by default (the discovery token may
    // list every pod of the cluster) ...
    assert_eq!(spec["automountServiceAccountToken"], false);
    // ... unless the pod says what it wants, or the operator asks to keep it.
    let own = DEPLOYMENT.replace(
        "    spec:\n",
        "    spec:\n      automountServiceAccountToken: true\n",
    );
    assert_ne!(own, DEPLOYMENT);
    let out: Value =
        serde_yaml_ng::from_str(&inject(&own, &options()).expect("inject")).expect("yaml");
    assert_eq!(
        out["spec"]["template"]["spec"]["automountServiceAccountToken"],
        true
    );
    let keep = InjectOptions {
        keep_app_token: true,
        ..options()
    };
    let out: Value =
        serde_yaml_ng::from_str(&inject(DEPLOYMENT, &keep).expect("inject")).expect("yaml");
    assert!(out["spec"]["template"]["spec"]["automountServiceAccountToken"].is_null());
}
