//! `sidecar discovery`: lists the cluster once from a kubeconfig and prints what a
//! sidecar with this configuration would route (the config file's services first,
//! then the discovered ones), without starting capture.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::json;
use sidecar::{
    config::Config,
    kubernetes::{self, translate::Rules},
    service::{Discovered, Services},
};

/// Trust domain when neither `--trust-domain` nor `kubernetes.trust_domain` says.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Lists and translates; returns the table (or JSON).
pub fn run(mut config: Config, trust_domain: Option<String>, json: bool) -> Result<String> {
    let rules = Rules {
        trust_domain: trust_domain
            .or_else(|| config.kubernetes.trust_domain.clone())
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string()),
        zone: config.kubernetes.zone.clone(),
        // Not in a pod: only `kubernetes.zone` says where it would be.
        pod_ips: Vec::new(),
        plaintext: config.kubernetes.plaintext,
        limits: config.kubernetes.limits,
    };
    let discovered = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = kubernetes::client(&config.kubernetes).await?;
            kubernetes::snapshot(&client, &config.kubernetes, &rules)
                .await
                .context("listing from the API server")
        })?;
    config.kubernetes.enabled = true;
    Ok(render(&config, discovered, json))
}

fn render(config: &Config, discovered: Discovered, as_json: bool) -> String {
    let pods = discovered.workloads.len();
    let hbone = discovered.workloads.values().filter(|w| w.hbone).count();
    let services = Services::new(config);
    services.set_discovered(discovered);
    let snapshot = services.load();
    let from_file = |name: &str| config.services.iter().any(|s| s.name == name);
    if as_json {
        let list: Vec<_> = snapshot
            .services
            .iter()
            .map(|s| {
                let endpoints: Vec<_> = s
                    .balancer()
                    .endpoints
                    .iter()
                    .map(|e| {
                        json!({"address": e.addr.to_string(), "zone": e.zone.as_deref(), "mtls": e.mtls,
                               "identity": e.identity.as_ref().map(ToString::to_string)})
                    })
                    .collect();
                json!({"name": s.name(), "source": if from_file(s.name()) { "config" } else { "kubernetes" },
                       "addresses": s.config.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                       "policy": s.config.policy, "endpoints": endpoints})
            })
            .collect();
        return format!(
            "{:#}\n",
            json!({"services": list, "pods": pods, "pods_hbone": hbone})
        );
    }
    let mut out = String::new();
    for s in &snapshot.services {
        let source = if from_file(s.name()) {
            "config"
        } else {
            "kubernetes"
        };
        let addresses: Vec<String> = s.config.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{} ({source}, {:?}) {}",
            s.name(),
            s.config.policy,
            addresses.join(" ")
        );
        let balancer = s.balancer();
        if balancer.endpoints.is_empty() {
            let _ = writeln!(out, "  (no ready endpoint)");
        }
        for e in &balancer.endpoints {
            let how = match (&e.identity, e.mtls) {
                (Some(id), _) => format!("HBONE, must be {id}"),
                (None, true) => match &s.config.server_identity {
                    Some(id) => format!("HBONE, must be {id}"),
                    None => "HBONE, any identity of the trust domain".to_string(),
                },
                (None, false) => "plaintext".to_string(),
            };
            let zone = e
                .zone
                .as_deref()
                .map(|z| format!(" zone={z}"))
                .unwrap_or_default();
            let _ = writeln!(out, "  {}{zone} {how}", e.addr);
        }
    }
    let _ = writeln!(
        out,
        "pods with a known identity: {pods} ({hbone} over HBONE); dialed by IP, each must present its service account's identity"
    );
    out
}
