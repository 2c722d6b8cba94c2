//! The part of a Pod the sidecar reads: its name, annotations, service account,
//! network mode, phase and addresses. Watching `k8s_openapi`'s whole `Pod` would
//! parse (and link the parsers of) every container, volume and affinity field of
//! every pod in the cluster only to drop them; the API server's JSON is read into
//! this instead, and every field not named here is skipped.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A Pod as the API serves it, reduced to the fields identity needs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIdentity {
    /// Name, namespace, annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, reduced.
    pub spec: Option<Spec>,
    /// `status`, reduced.
    pub status: Option<Status>,
}

/// `spec.serviceAccountName` and `spec.hostNetwork`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The service account the pod runs as (`default` when unset).
    pub service_account_name: Option<String>,
    /// On the node's network: its IP is the node's.
    pub host_network: Option<bool>,
}

/// `status.phase`, `status.podIP` and `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: Option<String>,
    /// The first address.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Every address (one per family).
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

/// One entry of `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

impl kube::Resource for PodIdentity {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
