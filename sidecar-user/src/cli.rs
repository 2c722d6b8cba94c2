//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use sidecar::telemetry::LogFormat;

/// eBPF-assisted transparent sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "sidecar", version, about)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "SIDECAR_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach capture to a pod's cgroup and run the proxy until SIGTERM.
    Run(RunArgs),
    /// Validate a config file and exit (non-zero, naming the field, if invalid).
    Check(CheckArgs),
    /// Show the open connections of a running sidecar (from its admin listener).
    Connections(ConnectionsArgs),
    /// Create a throwaway CA and workload certificates (for demos and tests only).
    Certs(CertsArgs),
    /// Add the sidecar to Kubernetes workloads (YAML on stdin or from FILE, to stdout).
    Inject(InjectArgs),
    /// List the cluster once and print what the sidecar would route (no capture).
    Discovery(DiscoveryArgs),
}

/// `sidecar discovery`.
#[derive(Debug, Args)]
pub struct DiscoveryArgs {
    /// Config file (its `services` and `kubernetes` sections apply).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kubeconfig to reach the API server; default: `kubernetes.kubeconfig`, else
    /// the pod's service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace to list (repeatable); default: `kubernetes.namespaces`, else all.
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Trust domain of the pods' identities; default: `kubernetes.trust_domain`,
    /// else cluster.local.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sidecar inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// YAML file (one or more documents); default: stdin.
    pub file: Option<PathBuf>,
    /// Sidecar image.
    #[arg(long, default_value = crate::cmd::inject::DEFAULT_IMAGE)]
    pub image: String,
    /// ConfigMap holding sidecar.yaml.
    #[arg(long, default_value = "sidecar-config")]
    pub config_map: String,
    /// Secret holding cert.pem, key.pem and bundle.pem (the workload identity).
    #[arg(long, default_value = "sidecar-identity")]
    pub identity_secret: String,
    /// Mount no identity Secret (plaintext only).
    #[arg(long)]
    pub no_identity: bool,
    /// Let the application containers keep the pod's service-account token (by
    /// default only the sidecar gets one: `automountServiceAccountToken: false`,
    /// unless the pod sets it).
    #[arg(long)]
    pub keep_app_token: bool,
}

/// `sidecar certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Output folder: `ca.pem`, `ca-key.pem`, and one folder per workload holding
    /// `cert.pem`, `key.pem` and `bundle.pem`.
    #[arg(long)]
    pub out: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// A workload as NAME=NAMESPACE/SERVICE_ACCOUNT (repeatable); its SPIFFE ID is
    /// spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    #[arg(long = "workload", required = true)]
    pub workloads: Vec<String>,
    /// Key algorithm of the workload certificates.
    #[arg(long, value_enum, default_value_t = sidecar::tls::dev_ca::KeyType::EcdsaP256)]
    pub key_type: sidecar::tls::dev_ca::KeyType,
    /// Validity of the workload certificates, in hours.
    #[arg(long, default_value_t = 24)]
    pub hours: i64,
    /// Validity in seconds instead (short-lived certificates, for trying expiry).
    #[arg(long)]
    pub seconds: Option<i64>,
    /// Issue from the CA in this folder (`ca.pem`, `ca-key.pem` from an earlier run)
    /// instead of making a new one: for rotating a workload's certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

/// `sidecar connections`.
#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    /// The sidecar's admin listener.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: std::net::SocketAddr,
    /// Print the JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sidecar run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// YAML config file; without it, every field takes its default.
    #[arg(long, env = "SIDECAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// cgroup v2 directory to capture (absolute, or relative to the cgroup root).
    /// Default: the cgroup of --pod-uid, else the sidecar's own cgroup (its pod's, in
    /// a Kubernetes pod).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The pod's UID (downward API `metadata.uid`): its cgroup is found under
    /// --cgroup-root, which works from a private cgroup namespace.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// Where the host's cgroup2 hierarchy is mounted (a hostPath in a container).
    /// Default: this host's cgroup2 mount point from /proc/mounts.
    #[arg(long, env = "SIDECAR_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Network namespace to enter before binding (e.g. /run/netns/NAME or
    /// /proc/PID/ns/net). Default: the current one.
    #[arg(long)]
    pub netns: Option<PathBuf>,
}

/// `sidecar check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// YAML config file to validate.
    #[arg(long)]
    pub config: PathBuf,
}
