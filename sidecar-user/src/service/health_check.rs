//! Active health checks: every `interval`, a connect to each endpoint of the service
//! (for a meshed service, an HBONE stream, answered 200 only once the peer's
//! application took the connection, since a sidecar always accepts). A streak of failures marks the endpoint unhealthy, a
//! streak of passes healthy again.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, task::JoinSet, time::Instant};
use tracing::{info, warn};

use super::Services;
use crate::mesh::server_identity::Required;
use crate::{
    config::HealthCheckConfig,
    mesh::{MeshConnector, MeshError, MeshTarget, client},
};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no answer within the check's timeout")]
    Timeout,
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

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
                        expected: expected.as_ref().map(Required::Service),
                    }),
                    _ => None,
                };
                let result = probe(endpoint.addr, deadline, mesh).await;
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

/// One check before `deadline`: a TCP connect to `addr`, or (meshed) an HBONE stream
/// to it, up to the peer's answer.
async fn probe(
    addr: SocketAddr,
    deadline: Instant,
    mesh: Option<MeshTarget<'_>>,
) -> Result<(), ProbeError> {
    let check = async {
        match mesh {
            Some(mesh) => drop(client::connect(addr, mesh, None).await?),
            None => drop(
                TcpStream::connect(addr)
                    .await
                    .map_err(ProbeError::Connect)?,
            ),
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, check)
        .await
        .unwrap_or(Err(ProbeError::Timeout))
}
