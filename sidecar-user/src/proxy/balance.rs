//! Balancing an outbound connection over a service's endpoints: the circuit
//! breaker's admission, the policy's choice, retries on another endpoint within the
//! service's connect budget, and the feedback to outlier detection and the latency
//! average.

use tracing::{debug, warn};

use crate::{
    mesh::{MeshError, MeshTarget, server_identity::Required},
    proxy::{
        ClientAddr, Direction, OrigDstAddr,
        conn::{ConnError, Connected, Inputs},
        labels::ServiceLabels,
        upstream::{self, UpstreamError},
    },
    service::Service,
};

/// Connects to one of `service`'s endpoints: within the circuit breaker's limits,
/// trying up to `retries` further endpoints after a failed attempt, all within the
/// service's connect budget (each attempt gets an equal share of what is left).
/// Failures feed outlier detection; successes the latency average.
pub async fn connect(
    inputs: &Inputs,
    service: &Service,
    peer: ClientAddr,
    dst: OrigDstAddr,
) -> Result<Connected, ConnError> {
    let name = service.name();
    let mut admission = service
        .admit()
        .map_err(|o| ConnError::Overflow(name.to_string(), o))?;
    // The app reached us from loopback; hash the address it would have had.
    let key = service.hash_key(inputs.pod.app_addr(peer.0, dst.0));
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + service.connect_timeout;
    let attempts = service.config.retries as usize + 1;
    let mut tried = Vec::with_capacity(attempts);
    let mut last = None;
    while tried.len() < attempts {
        let Some(endpoint) = service.choose(key, &tried) else {
            break;
        };
        tried.push(endpoint.addr);
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let share = (deadline - now) / (attempts - tried.len() + 1) as u32;
        let lease = endpoint.state.lease();
        // An endpoint that is this pod is reached directly, as without a sidecar.
        let mtls = endpoint.mtls && !inputs.pod.is_self(endpoint.addr.ip());
        let expected = match (&endpoint.identity, &service.config.server_identity) {
            (Some(pod), _) => Some(Required::Pod(pod)),
            (None, Some(m)) => Some(Required::Service(m)),
            (None, None) => None,
        };
        let mesh = match (mtls, &inputs.mesh) {
            (false, _) => None,
            (true, Some(mesh)) => Some(MeshTarget {
                client: &mesh.client,
                expected,
            }),
            // Config validation requires an identity for mTLS services.
            (true, None) => {
                last = Some(UpstreamError::Mesh(MeshError::Tls(
                    endpoint.addr,
                    "no workload identity".into(),
                )));
                break;
            }
        };
        let attempt_started = std::time::Instant::now();
        let opened = upstream::open(
            endpoint.addr,
            Direction::Outbound,
            now + share,
            mesh,
            Some(&inputs.dead_peer),
            mesh.map(|_| inputs.pod.app_addr(peer.0, dst.0)),
        );
        match opened.await {
            Ok((up, server)) => {
                endpoint.state.connected(attempt_started.elapsed());
                admission.connected();
                inputs.metrics.upstream_connected(
                    &ServiceLabels {
                        direction: Direction::Outbound,
                        service: name.to_string(),
                    },
                    started,
                );
                if tried.len() > 1 {
                    debug!(service = name, endpoint = %endpoint.addr, attempts = tried.len(), "connected after retrying");
                }
                return Ok(Connected {
                    up,
                    dst,
                    endpoint: endpoint.addr,
                    server,
                    server_identity: expected.map(|r| r.matcher().clone()),
                    leases: Some((admission, lease)),
                });
            }
            Err(error) => {
                if let Some(backoff) = endpoint.state.failed(&service.config.outlier) {
                    warn!(service = name, endpoint = %endpoint.addr, ?backoff, %error, "endpoint ejected");
                } else {
                    debug!(service = name, endpoint = %endpoint.addr, %error, "attempt failed");
                }
                last = Some(error);
            }
        }
    }
    Err(match last {
        Some(last) => ConnError::Exhausted {
            service: name.to_string(),
            attempts: tried.len(),
            last,
        },
        None => ConnError::NoEndpoint(name.to_string()),
    })
}
