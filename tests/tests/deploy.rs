//! Deployment artefacts: the Kubernetes manifests and `sidecar inject`'s output
//! validate against the real Kubernetes schemas (kubernetes-validate, offline, strict)
//! for the oldest version with native sidecars (1.29) and the newest bundled (1.37);
//! the injected example in deploy/ is exactly what `sidecar inject` produces.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
};

use sidecar_tests::tools::sidecar_bin;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn kubernetes_validate() -> PathBuf {
    let bin = root().join("target/tools/py/bin/kubernetes-validate");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask deps`",
        bin.display()
    );
    bin
}

/// Validates `files` strictly for both versions; panics with the tool's report.
fn validate(files: &[PathBuf]) {
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .expect("kubernetes-validate");
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn inject(input: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(sidecar_bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sidecar inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn manifests_validate_strictly_for_kubernetes_1_29_and_1_37() {
    let dir = root().join("deploy/kubernetes");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    validate(&files);
}

#[test]
fn the_injected_example_is_current_and_injecting_is_idempotent() {
    let dir = root().join("deploy/kubernetes");
    let app = std::fs::read_to_string(dir.join("app.yaml")).expect("app.yaml");
    let (ok, once, err) = inject(&app, &[]);
    assert!(ok, "{err}");
    let committed = std::fs::read_to_string(dir.join("web.yaml")).expect("web.yaml");
    assert_eq!(
        once, committed,
        "deploy/kubernetes/web.yaml is stale: regenerate with `sidecar inject deploy/kubernetes/app.yaml`"
    );
    let (ok, twice, err) = inject(&once, &[]);
    assert!(ok, "{err}");
    assert_eq!(once, twice, "injecting twice changes nothing");
}

#[test]
fn inject_output_for_every_workload_kind_validates() {
    let sample = "apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
        - name: db
          image: postgres:17
          readinessProbe: {tcpSocket: {port: 5432}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: shop}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: busybox:1.37, args: [sleep, infinity]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: shop}
spec:
  schedule: '0 3 * * *'
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: run, image: busybox:1.37}]
---
apiVersion: v1
kind: Pod
metadata: {name: one, namespace: shop}
spec:
  containers:
    - name: web
      image: nginx:1.27
      livenessProbe: {httpGet: {path: /healthz, port: 8080}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";
    let (ok, out, err) = inject(sample, &["--image", "registry.local/sidecar:test"]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("restartPolicy: Always").count(), 4, "{out}");
    // Two rewritten probes, each in the probe and in the sidecar's SIDECAR_APP_PROBES.
    assert_eq!(out.matches("path: /app-health/").count(), 2, "{out}");
    assert_eq!(out.matches("SIDECAR_APP_PROBES").count(), 2, "{out}");
    let dir = std::env::temp_dir().join(format!("sidecar-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("injected.yaml");
    std::fs::write(&file, &out).expect("write");
    validate(&[file]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inject_refuses_host_network_and_istio_pods_with_clear_messages() {
    let host = "apiVersion: v1\nkind: Pod\nmetadata: {name: node-exporter}\nspec:\n  hostNetwork: true\n  containers: [{name: e, image: x}]\n";
    let (ok, _, err) = inject(host, &[]);
    assert!(!ok);
    assert!(
        err.contains("Pod node-exporter") && err.contains("hostNetwork"),
        "{err}"
    );
    let istio = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata:\n      labels: {app: web}\n      annotations: {sidecar.istio.io/status: '{}'}\n    spec:\n      containers: [{name: web, image: x}, {name: istio-proxy, image: y}]\n";
    let (ok, _, err) = inject(istio, &[]);
    assert!(!ok);
    assert!(
        err.contains("Deployment web") && err.contains("Istio"),
        "{err}"
    );
}

/// No Docker engine runs here, so the image is not built in the tests. What can be
/// checked is that the Dockerfile builds what CI builds and tests, and ships it as the
/// manifests expect: the builder runs exactly CI's `cargo xtask dist` step (and CI runs
/// it as a command), the runtime stage copies that binary to the entrypoint, the
/// exposed port is the health port the manifests probe, and the image starts as root
/// (capabilities are only effective for UID 0) with the default config path.
#[test]
fn the_dockerfile_ships_the_binary_ci_builds_and_tests() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_ascii_uppercase(), v.trim().to_string()))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage: {stages:?}");
    let (builder, runtime) = instructions.split_at(stages[1]);
    assert!(builder[0].1.ends_with("AS builder"), "{:?}", builder[0]);
    let runs: Vec<&str> = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        runs.last(),
        Some(&"cargo xtask dist --out /out"),
        "the builder's last step is CI's dist step: {runs:?}"
    );
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines()
            .map(|l| l.trim().trim_start_matches("step "))
            .any(|l| l.starts_with("cargo xtask dist --out")),
        "CI runs the Dockerfile's build step as a command"
    );
    let get = |key: &str| {
        runtime
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("runtime stage has no {key}"))
    };
    let copy = get("COPY");
    let (from, dest) = copy
        .strip_prefix("--from=builder ")
        .and_then(|rest| rest.split_once(' '))
        .unwrap_or_else(|| panic!("runtime COPY is not from the builder: {copy}"));
    assert_eq!(from, "/out/sidecar");
    let entrypoint: Vec<String> =
        serde_json::from_str(get("ENTRYPOINT")).expect("ENTRYPOINT in exec form");
    assert_eq!(entrypoint, [dest.to_string()]);
    let cmd: Vec<String> = serde_json::from_str(get("CMD")).expect("CMD in exec form");
    assert_eq!(cmd, ["run", "--config", "/etc/sidecar/sidecar.yaml"]);
    assert_eq!(get("EXPOSE"), "15020", "the health port the probes use");
    assert_eq!(get("USER"), "0:0");
    let manifests =
        std::fs::read_to_string(root().join("deploy/kubernetes/web.yaml")).expect("web.yaml");
    assert!(
        manifests.contains("/etc/sidecar"),
        "the manifests mount the config where CMD reads it"
    );
}

#[test]
fn discovery_rbac_reads_services_endpointslices_and_pods_and_nothing_else() {
    let text =
        std::fs::read_to_string(root().join("deploy/kubernetes/rbac.yaml")).expect("rbac.yaml");
    let role = text
        .split("\n---\n")
        .find(|d| d.contains("kind: ClusterRole\n"))
        .expect("a ClusterRole");
    let rules: Vec<&str> = role
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("resources:") || l.trim_start().starts_with("verbs:")
        })
        .map(str::trim)
        .collect();
    assert_eq!(
        rules,
        [
            r#"resources: ["services", "pods"]"#,
            r#"verbs: ["get", "list", "watch"]"#,
            r#"resources: ["endpointslices"]"#,
            r#"verbs: ["get", "list", "watch"]"#,
        ]
    );
}
