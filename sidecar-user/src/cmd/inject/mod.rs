//! `sidecar inject`: adds the sidecar to Kubernetes workloads, like `linkerd inject`.
//!
//! Every pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob, and those inside a `List`) gets the sidecar as a native sidecar (an init
//! container with `restartPolicy: Always`, started and probed before the app), its
//! volumes, and Prometheus scrape annotations. The app's HTTP and TCP probes are
//! rewritten to `/app-health/<container>/<probe>` on the sidecar's health port, which
//! forwards them to the app: `strict` mTLS would refuse the kubelet's plaintext
//! probes, and a captured TCP probe would always pass since the proxy accepts.
//! Injecting twice changes nothing; everything else is left as it was.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use sidecar::app_health::{AppProbe, PROBES_ENV};

/// Image `sidecar inject` uses unless told otherwise.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/example/sidecar:", env!("CARGO_PKG_VERSION"));
/// Name of the sidecar container (and how an injected pod is recognised).
pub const CONTAINER: &str = "sidecar";
/// The health port the kubelet probes (and Prometheus scrapes).
const HEALTH_PORT: u16 = sidecar::config::HEALTH_PORT;
const HBONE_PORT: u16 = sidecar::config::HBONE_PORT;
/// Capabilities the container adds (after dropping ALL), as Kubernetes names them.
pub const CAPABILITIES: [&str; 6] = ["BPF", "NET_ADMIN", "SETUID", "SETGID", "SETPCAP", "CHOWN"];

/// Why a document could not be injected. Names the object.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The input is not YAML.
    #[error("document {index}: {message}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// The parser's message.
        message: String,
    },
    /// The workload cannot take the sidecar.
    #[error("{kind} {name}: {reason}")]
    Refused {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What the injected container looks like.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// Container image.
    pub image: String,
    /// ConfigMap holding `sidecar.yaml`.
    pub config_map: String,
    /// Secret holding `cert.pem`, `key.pem`, `bundle.pem`; none: no identity volume.
    pub identity_secret: Option<String>,
    /// Leave the application containers the service-account token Kubernetes mounts
    /// by default. Off: the pod's `automountServiceAccountToken` becomes `false`
    /// (unless the pod sets it itself), so only the sidecar holds the token that may
    /// list every pod of the cluster.
    pub keep_app_token: bool,
}

/// Injects every pod template in `input` (one or more YAML documents).
pub fn inject(input: &str, options: &InjectOptions) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let mut value = Value::deserialize(doc).map_err(|e| InjectError::Yaml {
            index: i + 1,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, options)?;
        out.push(
            serde_yaml_ng::to_string(&value).map_err(|e| InjectError::Yaml {
                index: i + 1,
                message: e.to_string(),
            })?,
        );
    }
    Ok(out.join("---\n"))
}

fn inject_object(object: &mut Value, options: &InjectOptions) -> Result<(), InjectError> {
    let kind = object["kind"].as_str().unwrap_or("").to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("(unnamed)")
        .to_string();
    let refuse = |reason: String| InjectError::Refused {
        kind: kind.clone(),
        name: name.clone(),
        reason,
    };
    if kind == "List" {
        if let Some(items) = object.get_mut("items").and_then(Value::as_sequence_mut) {
            for item in items {
                inject_object(item, options)?;
            }
        }
        return Ok(());
    }
    if !matches!(
        kind.as_str(),
        "Pod" | "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "CronJob"
    ) {
        return Ok(());
    }
    let Some(template) = pod_template(object, &kind) else {
        return Err(refuse("no pod template (spec.template)".into()));
    };
    inject_pod(template, options).map_err(refuse)
}

/// The pod (template) of a workload of `kind`.
fn pod_template<'a>(object: &'a mut Value, kind: &str) -> Option<&'a mut Value> {
    match kind {
        "Pod" => Some(object),
        "CronJob" => object
            .get_mut("spec")?
            .get_mut("jobTemplate")?
            .get_mut("spec")?
            .get_mut("template"),
        _ => object.get_mut("spec")?.get_mut("template"),
    }
}

/// Adds the sidecar to a pod (or pod template): `metadata` + `spec`.
fn inject_pod(pod: &mut Value, options: &InjectOptions) -> Result<(), String> {
    let annotations = pod["metadata"]["annotations"].clone();
    let has_annotation = |key: &str| annotations.get(key).is_some();
    let spec = pod
        .get("spec")
        .ok_or_else(|| "no pod spec".to_string())?
        .clone();
    let containers = |key: &str| -> Vec<Value> {
        spec.get(key)
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default()
    };
    let named = |list: &[Value], name: &str| list.iter().any(|c| c["name"].as_str() == Some(name));
    let (init, main) = (containers("initContainers"), containers("containers"));
    if named(&init, CONTAINER) {
        return Ok(()); // already injected
    }
    if has_annotation("sidecar.istio.io/status")
        || named(&main, "istio-proxy")
        || named(&init, "istio-proxy")
        || named(&init, "istio-init")
    {
        return Err(
            "already injected by Istio (istio-proxy); remove Istio's injection first: two proxies would capture the same traffic"
                .into(),
        );
    }
    if has_annotation("linkerd.io/proxy-version")
        || named(&main, "linkerd-proxy")
        || named(&init, "linkerd-proxy")
    {
        return Err(
            "already injected by Linkerd (linkerd-proxy); remove Linkerd's injection first: two proxies would capture the same traffic"
                .into(),
        );
    }
    if spec["hostNetwork"].as_bool() == Some(true) {
        return Err(
            "hostNetwork: true; the pod shares the node's network namespace, so capture would take over the node's traffic; not injected"
                .into(),
        );
    }

    // Probes first: the sidecar container carries the rewritten ones.
    let mut probes = BTreeMap::new();
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or("the pod spec is not a mapping")?;
    if let Some(list) = spec.get_mut("containers").and_then(Value::as_sequence_mut) {
        for container in list {
            rewrite_probes(container, &mut probes)?;
        }
    }
    let sidecar = sidecar_container(options, &probes);
    let init = spec
        .entry("initContainers".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if let Value::Sequence(list) = init {
        // First, so it is running (and ready) before any other init container or app.
        list.insert(0, sidecar);
    }
    let volumes = spec
        .entry("volumes".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if let Value::Sequence(list) = volumes {
        list.extend(sidecar_volumes(options));
    }
    // The discovery token may list and watch every pod of the cluster: the
    // application does not get it by default (the sidecar has its own mount). A pod
    // that says what it wants keeps it.
    if !options.keep_app_token {
        spec.entry("automountServiceAccountToken".into())
            .or_insert(Value::Bool(false));
    }
    let metadata = pod
        .as_mapping_mut()
        .ok_or("the pod is not a mapping")?
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let annotations = metadata
        .as_mapping_mut()
        .ok_or("metadata is not a mapping")?
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Mapping(a) = annotations {
        for (k, v) in [
            // Discovery reaches pods carrying it over HBONE.
            (
                sidecar::kubernetes::objects::INJECTED_ANNOTATION,
                "true".to_string(),
            ),
            ("prometheus.io/scrape", "true".to_string()),
            ("prometheus.io/port", HEALTH_PORT.to_string()),
            ("prometheus.io/path", "/metrics".to_string()),
        ] {
            a.entry(k.into()).or_insert(v.into());
        }
    }
    Ok(())
}

/// Rewrites `container`'s HTTP and TCP probes to the sidecar's health port, recording
/// what each forwarded path must do.
fn rewrite_probes(
    container: &mut Value,
    probes: &mut BTreeMap<String, AppProbe>,
) -> Result<(), String> {
    let name = container["name"].as_str().unwrap_or("app").to_string();
    let ports = container["ports"].clone();
    let resolve = |port: &Value| -> Result<u16, String> {
        match port {
            Value::Number(n) => n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("container {name}: probe port {n} is not a port")),
            Value::String(s) => s.parse().or_else(|_| {
                ports
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"].as_str() == Some(s))
                    .and_then(|p| p["containerPort"].as_u64())
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| {
                        format!("container {name}: probe port {s:?} names no containerPort")
                    })
            }),
            _ => Err(format!("container {name}: probe without a port")),
        }
    };
    for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let Some(probe) = container.get_mut(kind).and_then(Value::as_mapping_mut) else {
            continue;
        };
        let path = format!("/app-health/{name}/{}", kind.trim_end_matches("Probe"));
        let target = if let Some(get) = probe.get("httpGet") {
            if get["scheme"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
            {
                // HTTPS probes are TLS the sidecar's permissive detection passes through.
                continue;
            }
            if get["port"].as_u64() == Some(u64::from(HEALTH_PORT)) {
                continue;
            }
            AppProbe::HttpGet {
                port: resolve(&get["port"])?,
                path: get["path"].as_str().unwrap_or("/").to_string(),
            }
        } else if let Some(tcp) = probe.get("tcpSocket") {
            AppProbe::TcpSocket {
                port: resolve(&tcp["port"])?,
            }
        } else {
            continue; // exec and gRPC probes do not cross the network capture
        };
        probe.remove("httpGet");
        probe.remove("tcpSocket");
        let mut get = Mapping::new();
        get.insert("path".into(), path.clone().into());
        get.insert("port".into(), u64::from(HEALTH_PORT).into());
        probe.insert("httpGet".into(), Value::Mapping(get));
        probes.insert(path, target);
    }
    Ok(())
}

fn yaml(text: &str) -> Value {
    // The templates below are constant and valid.
    serde_yaml_ng::from_str(text).unwrap_or(Value::Null)
}

fn sidecar_container(options: &InjectOptions, probes: &BTreeMap<String, AppProbe>) -> Value {
    let mut c = yaml(&format!(
        r#"
name: {CONTAINER}
image: {image}
restartPolicy: Always
args: [run, --config, /etc/sidecar/sidecar.yaml, --cgroup-root, /host/cgroup]
env:
  - name: POD_UID
    valueFrom:
      fieldRef:
        fieldPath: metadata.uid
  - name: SIDECAR__PINS__DIR
    value: /sys/fs/bpf/sidecar
ports:
  - name: sidecar-health
    containerPort: {HEALTH_PORT}
  - name: hbone
    containerPort: {HBONE_PORT}
startupProbe:
  httpGet: {{path: /readyz, port: {HEALTH_PORT}}}
  periodSeconds: 1
  failureThreshold: 60
readinessProbe:
  httpGet: {{path: /readyz, port: {HEALTH_PORT}}}
  periodSeconds: 5
livenessProbe:
  httpGet: {{path: /healthz, port: {HEALTH_PORT}}}
  periodSeconds: 10
resources:
  requests: {{cpu: 50m, memory: 32Mi}}
  limits: {{memory: 128Mi}}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
    add: [{caps}]
volumeMounts:
  - {{name: sidecar-config, mountPath: /etc/sidecar, readOnly: true}}
  - {{name: host-cgroup, mountPath: /host/cgroup, readOnly: true}}
  - {{name: host-bpffs, mountPath: /sys/fs/bpf}}
  - {{name: sidecar-token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}}
"#,
        image = options.image,
        caps = CAPABILITIES.join(", "),
    ));
    if options.identity_secret.is_some() {
        if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_sequence_mut) {
            mounts.push(yaml(
                "{name: sidecar-identity, mountPath: /var/run/secrets/sidecar, readOnly: true}",
            ));
        }
    }
    if !probes.is_empty() {
        let json = serde_json::to_string(probes).unwrap_or_default();
        if let Some(env) = c.get_mut("env").and_then(Value::as_sequence_mut) {
            let mut var = Mapping::new();
            var.insert("name".into(), PROBES_ENV.into());
            var.insert("value".into(), json.into());
            env.push(Value::Mapping(var));
        }
    }
    c
}

fn sidecar_volumes(options: &InjectOptions) -> Vec<Value> {
    let mut volumes = vec![
        yaml(&format!(
            "{{name: sidecar-config, configMap: {{name: {}}}}}",
            options.config_map
        )),
        yaml("{name: host-cgroup, hostPath: {path: /sys/fs/cgroup, type: Directory}}"),
        yaml("{name: host-bpffs, hostPath: {path: /sys/fs/bpf, type: DirectoryOrCreate}}"),
        // The pod's service-account token for Kubernetes discovery, mounted into the
        // sidecar alone (also when the pod sets automountServiceAccountToken: false),
        // where kube-rs looks for it; 0444 so proxy.uid reads it after dropping root.
        yaml(
            "{name: sidecar-token, projected: {defaultMode: 292, sources: [\
             {serviceAccountToken: {path: token, expirationSeconds: 3600}}, \
             {configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}}, \
             {downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}}]}}",
        ),
    ];
    if let Some(secret) = &options.identity_secret {
        // 0444 (292): readable by proxy.uid after the sidecar gives up root; mounted
        // only into the sidecar container.
        volumes.push(yaml(&format!(
            "{{name: sidecar-identity, secret: {{secretName: {secret}, defaultMode: 292}}}}"
        )));
    }
    volumes
}

#[cfg(test)]
mod tests;
