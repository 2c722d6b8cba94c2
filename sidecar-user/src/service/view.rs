//! The admin listener's `/services`: every service and endpoint with its live state.

use std::{net::SocketAddr, sync::atomic::Ordering::Relaxed};

use super::{Health, Services, endpoint::now_ns};

/// A service as `/services` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// Where it comes from: `config` (the file) or `kubernetes` (discovery).
    pub source: &'static str,
    /// Virtual addresses.
    pub addresses: Vec<SocketAddr>,
    /// LB policy.
    pub policy: crate::config::LbPolicy,
    /// Connections open through it.
    pub active: usize,
    /// Its endpoints now.
    pub endpoints: Vec<EndpointView>,
}

/// An endpoint as `/services` shows it.
#[derive(Debug, serde::Serialize)]
pub struct EndpointView {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Zone, if configured.
    pub zone: Option<String>,
    /// Reached over mTLS.
    pub mtls: bool,
    /// The identity it must present: its pod's (discovered endpoints) or the
    /// service's `server_identity`; `None`: any identity of the trust domain.
    pub identity: Option<String>,
    /// Healthy, ejected or unhealthy.
    pub health: Health,
    /// Connections (and connects in progress).
    pub active: usize,
    /// Peak-EWMA connect latency, milliseconds.
    pub latency_ms: f64,
    /// Times ejected.
    pub ejections: u64,
    /// Successful connect attempts.
    pub attempts_ok: u64,
    /// Failed connect attempts.
    pub attempts_failed: u64,
}

impl Services {
    /// Every service and endpoint with its live state.
    pub fn view(&self) -> Vec<ServiceView> {
        let now = now_ns();
        self.load()
            .services
            .iter()
            .map(|s| ServiceView {
                name: s.name().to_string(),
                source: if s.discovered { "kubernetes" } else { "config" },
                addresses: s.config.addresses.clone(),
                policy: s.config.policy,
                active: s.state.active.load(Relaxed),
                endpoints: s
                    .balancer()
                    .endpoints
                    .iter()
                    .map(|e| {
                        let (ok, failed) = e.state.attempts();
                        EndpointView {
                            address: e.addr,
                            weight: e.weight,
                            zone: e.zone.as_deref().map(str::to_string),
                            mtls: e.mtls,
                            identity: e
                                .identity
                                .as_deref()
                                .or(s.config.server_identity.as_ref())
                                .filter(|_| e.mtls)
                                .map(ToString::to_string),
                            health: e.state.health(now),
                            active: e.state.active(),
                            latency_ms: e.state.latency() * 1e3,
                            ejections: e.state.ejections(),
                            attempts_ok: ok,
                            attempts_failed: failed,
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}
