//! Active health checks: every `interval`, a connect to each endpoint of the service
//! (for a meshed service, the full mTLS handshake and the peer's status byte, since a
//! sidecar always accepts). A streak of failures marks the endpoint unhealthy, a
//! streak of passes healthy again.

use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::Services;
use crate::{
    config::HealthCheckConfig,
    metrics::Direction,
    proxy::upstream::{self, MeshConnector, MeshTarget},
};

/// Checks the endpoints of service `name` until it disappears from the registry.
pub async fn run(
    services: Arc<Services>,
    name: String,
    check: HealthCheckConfig,
    connector: Option<MeshConnector>,
) {
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(service) = services.load().get(&name).cloned() else {
            return;
        };
        let balancer = service.balancer();
        let mut checks = JoinSet::new();
        for endpoint in balancer.endpoints.iter().cloned() {
            let connector = connector.clone();
            let expected = service.config.server_identity.clone();
            let timeout = check.timeout;
            checks.spawn(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let mesh = match (&connector, endpoint.mtls) {
                    (Some(client), true) => Some(MeshTarget {
                        client,
                        expected: expected.as_ref(),
                    }),
                    _ => None,
                };
                let result =
                    upstream::open(endpoint.addr, Direction::Outbound, deadline, mesh, None).await;
                (endpoint, result.err())
            });
        }
        while let Some(Ok((endpoint, error))) = checks.join_next().await {
            let passed = error.is_none();
            match endpoint
                .state
                .checked(passed, check.unhealthy_threshold, check.healthy_threshold)
            {
                Some(true) => {
                    info!(service = %name, endpoint = %endpoint.addr, "health check passing: endpoint healthy")
                }
                Some(false) => {
                    warn!(service = %name, endpoint = %endpoint.addr, error = ?error.map(|e| e.to_string()), "health check failing: endpoint unhealthy")
                }
                None => {}
            }
        }
    }
}
