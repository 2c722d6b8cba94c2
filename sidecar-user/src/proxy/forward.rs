//! The forwarding proxy: accepts a captured connection, recovers where it was going
//! and carries it there.
//!
//! * Outbound: the app's connect was redirected by `connect4/6`; the original
//!   destination comes from the kernel's table, keyed by the 4-tuple.
//! * Inbound: `sk_lookup` handed the connection to our listener; the socket's own local
//!   address (`getsockname`) is the address the client dialed, so the proxy delivers
//!   to the pod IP and port, never to loopback (an app bound only to 127.0.0.1 stays
//!   unreachable from outside, as without a sidecar).

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    drain::DrainWatcher,
    ebpf::KernelMaps,
    metrics::{CloseReason, ConnRecorder, Direction, ProxyMetrics, ServiceLabels, Tls},
    proxy::{
        ClientAddr, OrigDstAddr,
        connections::{ConnTable, Entry},
        copy::{self, CopyError},
        inbound::{Admitted, InboundPolicy},
        peer_policy::{Admission as PeerAdmission, PeerPolicy},
        pod_addrs::PodAddrs,
        read_ahead::ReadAhead,
        socket_opts::DeadPeer,
        unauthenticated::Gate,
        upstream::{self, MeshConnector, MeshTarget, PeerTls, Upstream, UpstreamError},
    },
    service::{Admission, EndpointLease, Overflow, Route, Service, Services},
    tls::{SpiffeId, status},
};

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for IPv4 peers) as
/// plain IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Service label of connections to destinations that are not services.
const PASSTHROUGH: &str = "passthrough";
/// Peer identity label without mTLS.
const NO_IDENTITY: &str = "none";

/// What every connection task shares.
pub struct Inputs {
    /// Kernel maps; `orig_dst` holds the original destinations of outbound connections.
    pub kernel: Arc<KernelMaps>,
    /// The sidecar's own ports: a destination on one of them is a loop.
    pub own_ports: Vec<u16>,
    /// Budget for connecting upstream.
    pub connect_timeout: Duration,
    /// Close after this long without bytes.
    pub idle_timeout: Duration,
    /// Connection metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// Open connections, for `/connections`.
    pub connections: Arc<ConnTable>,
    /// What inbound ports accept.
    pub inbound: InboundPolicy,
    /// Outbound destinations reached over mTLS, when an identity is configured.
    pub mesh: Option<Mesh>,
    /// Services (virtual addresses) and the outbound traffic policy.
    pub services: Arc<Services>,
    /// The pod's own addresses: a destination among them is reached in plaintext, and
    /// outbound affinity hashes the pod IP rather than loopback.
    pub pod: PodAddrs,
    /// Keepalive and user timeout of sockets to and from other hosts.
    pub dead_peer: DeadPeer,
    /// Bounds inbound connections still in detection or handshake.
    pub unauthenticated: Arc<Gate>,
    /// The live identity rules, when an identity is configured.
    pub peers: Option<Arc<PeerPolicy>>,
}

/// Why a connection was not carried.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no original destination recorded for this connection (not captured, or evicted)")]
    NoOrigDst,
    #[error("reading the original destination: {0}")]
    OrigDstLookup(io::Error),
    #[error("destination {0} is the proxy itself")]
    Loop(OrigDstAddr),
    #[error("destination {0} is not a service and outbound.policy is registry_only")]
    NotInRegistry(OrigDstAddr),
    #[error("service {0}: {1}, connection refused")]
    Overflow(String, Overflow),
    #[error("service {0} has no endpoint to try")]
    NoEndpoint(String),
    #[error("service {service}: all {attempts} attempts failed, last: {last}")]
    Exhausted {
        service: String,
        attempts: usize,
        last: UpstreamError,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ForwardError {
    fn reason(&self) -> CloseReason {
        match self {
            ForwardError::NoOrigDst | ForwardError::OrigDstLookup(_) => CloseReason::NoDestination,
            ForwardError::Loop(_) => CloseReason::Loop,
            ForwardError::NotInRegistry(_) => CloseReason::PolicyDenied,
            ForwardError::Overflow(..) => CloseReason::Overflow,
            ForwardError::NoEndpoint(_) => CloseReason::Refused,
            ForwardError::Exhausted { last, .. } => last.reason(),
            ForwardError::Upstream(e) => e.reason(),
        }
    }
}

/// An open upstream and what the connection needs to know about it.
struct Connected {
    up: Upstream,
    dst: OrigDstAddr,
    /// Where the proxy connected: the original destination, or a service endpoint.
    endpoint: SocketAddr,
    /// The server sidecar's identity, outbound over mTLS.
    peer_tls: Option<PeerTls>,
    /// The service's `server_identity` when the connection was made: a reload of the
    /// identity rules re-checks the peer against it (a reload that changes only the
    /// service's `server_identity` applies to new connections).
    server_identity: Option<crate::tls::IdentityMatcher>,
    /// A service's connection slot and the endpoint's active count, held while open.
    _leases: Option<(Admission, EndpointLease)>,
}

/// Accepts on `listener` until a drain starts; each connection is a tracked task.
pub async fn accept_loop(
    listener: TcpListener,
    direction: Direction,
    inputs: Arc<Inputs>,
    drain: DrainWatcher,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.wait_for_drain() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of fds or buffers: back off briefly, never stop accepting.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Before anything is written: a handshake or the mesh status byte held back
        // by Nagle's algorithm waits for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        // Inbound clients are other hosts; outbound ones are the app, over loopback.
        if direction == Direction::Inbound {
            inputs.dead_peer.apply(&stream);
        }
        let client = ClientAddr(unmap(peer));
        let span = info_span!("conn", direction = direction.as_str(), %client);
        let inputs = inputs.clone();
        let watcher = drain.clone();
        drain.spawn(serve(inputs, stream, client, direction, watcher).instrument(span));
    }
}

async fn serve(
    inputs: Arc<Inputs>,
    client: TcpStream,
    peer: ClientAddr,
    direction: Direction,
    drain: DrainWatcher,
) {
    // Inbound, the port's policy (detection, mTLS, allow-list) comes first.
    let admitted = match direction {
        Direction::Outbound => Admitted::Plain(client),
        Direction::Inbound => {
            let port = client.local_addr().map(|a| a.port()).unwrap_or(0);
            // Held until the client has proved who it is (or was refused).
            let _pass = if inputs.inbound.authenticates(port) {
                match inputs.unauthenticated.enter(peer.0.ip()) {
                    Ok(pass) => Some(pass),
                    Err(limit) => {
                        let mut recorder = ConnRecorder::open(
                            &inputs.metrics,
                            direction,
                            PASSTHROUGH,
                            NO_IDENTITY,
                            Tls::No,
                        );
                        recorder.set_reason(CloseReason::Overflow);
                        debug!(
                            port,
                            limit = limit.as_str(),
                            "too many unauthenticated connections: reset"
                        );
                        let _ = client.set_zero_linger();
                        return;
                    }
                }
            } else {
                None
            };
            match inputs.inbound.admit(port, client).await {
                Ok(admitted) => admitted,
                Err((refusal, io)) => {
                    let identity = refusal.identity().map(ToString::to_string);
                    let label = identity.as_deref().unwrap_or(NO_IDENTITY);
                    let tls = if identity.is_some() {
                        Tls::Yes
                    } else {
                        Tls::No
                    };
                    let mut recorder =
                        ConnRecorder::open(&inputs.metrics, direction, PASSTHROUGH, label, tls);
                    recorder.set_reason(refusal.reason());
                    warn!(%refusal, port, "refusing inbound connection");
                    if let Some(io) = io {
                        let _ = io.set_zero_linger();
                    }
                    return;
                }
            }
        }
    };
    match admitted {
        Admitted::Plain(client) => {
            relay(
                inputs,
                Downstream::Plain(client),
                peer,
                direction,
                None,
                drain,
            )
            .await
        }
        Admitted::Mtls(tls, id, handshake) => {
            relay(
                inputs,
                Downstream::Tls(tls),
                peer,
                direction,
                Some((id, handshake)),
                drain,
            )
            .await
        }
    }
}

/// The accepted side of a connection: a plain socket, or mTLS terminated over one.
enum Downstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<ReadAhead>>),
}

impl Downstream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Downstream::Plain(tcp) => tcp,
            Downstream::Tls(tls) => tls.get_ref().0.tcp(),
        }
    }
}

/// Copies both ways; plain sides are used as sockets (no buffer of their own, splice
/// between two of them).
async fn copy_between(
    down: &mut Downstream,
    up: &mut Upstream,
    idle: Duration,
    transfer: &copy::Transfer,
    totals: copy::Totals,
) -> Result<(), CopyError> {
    use copy::copy_bidirectional as copy;
    match (down, up) {
        (Downstream::Plain(d), Upstream::Plain(u)) => copy(d, u, idle, transfer, totals).await,
        (Downstream::Plain(d), Upstream::Tls(u)) => copy(d, &mut **u, idle, transfer, totals).await,
        (Downstream::Tls(d), Upstream::Plain(u)) => copy(&mut **d, u, idle, transfer, totals).await,
        (Downstream::Tls(d), Upstream::Tls(u)) => {
            copy(&mut **d, &mut **u, idle, transfer, totals).await
        }
    }
}

/// Connects to the destination and copies until the connection ends, recording it.
/// `inbound_mtls` is the peer's identity and handshake time when mTLS was terminated.
async fn relay(
    inputs: Arc<Inputs>,
    mut down: Downstream,
    peer: ClientAddr,
    direction: Direction,
    inbound_mtls: Option<(SpiffeId, Duration)>,
    drain: DrainWatcher,
) {
    let (service, connected) = connect(&inputs, down.tcp(), peer, direction).await;
    // A client sidecar waits for our status byte before sending anything: tell it
    // whether the application took the connection.
    if let Downstream::Tls(tls) = &mut down {
        let byte = if connected.is_ok() {
            status::READY
        } else {
            status::APP_REFUSED
        };
        let sent = async {
            tls.write_all(&[byte]).await?;
            tls.flush().await
        };
        if let Err(error) = sent.await {
            debug!(%error, "peer sidecar left before the status byte");
        }
    }
    // What the peer was admitted as, so a reload of the identity rules can end it.
    let admission = match (&connected, &inbound_mtls) {
        (_, Some((id, _))) => Some(PeerAdmission::Client(id.clone())),
        (Ok(c), None) => c.peer_tls.as_ref().map(|(id, _)| PeerAdmission::Server {
            ip: c.endpoint.ip(),
            id: id.clone(),
            service: c.server_identity.clone(),
        }),
        (Err(_), None) => None,
    };
    // The peer identity is the client's inbound and the server's outbound.
    let mtls = match &connected {
        Ok(c) => inbound_mtls.or_else(|| c.peer_tls.clone()),
        Err(_) => inbound_mtls,
    };
    let identity = mtls.as_ref().map(|(id, _)| id.to_string());
    let tls = if mtls.is_some() { Tls::Yes } else { Tls::No };
    let label = identity.as_deref().unwrap_or(NO_IDENTITY);
    let mut recorder = ConnRecorder::open(&inputs.metrics, direction, &service, label, tls);
    if let Some((_, handshake)) = &mtls {
        inputs
            .metrics
            .tls_handshake
            .get_or_create(recorder.service())
            .observe(handshake.as_secs_f64());
    }
    let Connected {
        mut up,
        dst,
        endpoint,
        _leases,
        ..
    } = match connected {
        Ok(c) => c,
        Err(error) => {
            warn!(%error, "refusing connection");
            recorder.set_reason(error.reason());
            if let Downstream::Tls(tls) = &mut down {
                let _ = tls.shutdown().await;
            } else {
                // Reset rather than FIN: the app sees a refused/reset connection, as
                // it would have without the proxy.
                let _ = down.tcp().set_zero_linger();
            }
            return;
        }
    };
    let registration = inputs.connections.register(Entry {
        direction,
        client: peer.0,
        orig_dst: dst.0,
        endpoint,
        peer_identity: identity.clone(),
        tls: mtls.is_some(),
        started: std::time::Instant::now(),
        transfer: recorder.transfer.clone(),
        upstream_fd: up.tcp().as_raw_fd(),
    });
    let transfer = recorder.transfer.clone();
    let revoked = async {
        match (&admission, &inputs.peers) {
            (Some(admission), Some(peers)) => peers.revoked(admission).await,
            _ => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        result = copy_between(&mut down, &mut up, inputs.idle_timeout, &transfer, recorder.totals()) => Ended::Copied(result),
        () = drain.forced() => Ended::Drained,
        () = revoked => Ended::Revoked,
    };
    // Leave the table before the sockets close (see `ConnTable::snapshot`).
    drop(registration);
    let sent = transfer.sent.load(std::sync::atomic::Ordering::Relaxed);
    let received = transfer.received.load(std::sync::atomic::Ordering::Relaxed);
    let reason = match &ended {
        Ended::Copied(Ok(())) => CloseReason::Normal,
        Ended::Copied(Err(CopyError::Idle(_))) => CloseReason::Idle,
        // Keepalive probes or sent data went unanswered: the peer is gone.
        Ended::Copied(Err(CopyError::Client(e) | CopyError::Upstream(e)))
            if e.raw_os_error() == Some(libc::ETIMEDOUT) =>
        {
            CloseReason::PeerLost
        }
        Ended::Copied(Err(_)) => CloseReason::Reset,
        Ended::Drained => CloseReason::Drained,
        Ended::Revoked => CloseReason::PolicyDenied,
    };
    recorder.set_reason(reason);
    let peer_identity = identity.as_deref().unwrap_or("-");
    match ended {
        Ended::Copied(Ok(())) | Ended::Copied(Err(CopyError::Idle(_))) => {
            debug!(%dst, %endpoint, peer_identity, sent, received, reason = reason.as_str(), "connection closed")
        }
        Ended::Copied(Err(error)) => {
            // Pass a reset on to the other side, so neither end waits on a dead peer.
            let _ = down.tcp().set_zero_linger();
            let _ = up.tcp().set_zero_linger();
            debug!(%dst, %endpoint, peer_identity, sent, received, %error, reason = reason.as_str(), "connection closed");
        }
        Ended::Drained => {
            let _ = down.tcp().set_zero_linger();
            let _ = up.tcp().set_zero_linger();
            warn!(%dst, %endpoint, peer_identity, sent, received, "connection closed by drain after the grace period");
        }
        Ended::Revoked => {
            let _ = down.tcp().set_zero_linger();
            let _ = up.tcp().set_zero_linger();
            warn!(%dst, %endpoint, peer_identity, sent, received, "connection closed: the reloaded identity rules no longer allow this peer");
        }
    }
}

/// How the copying phase of a connection ended.
enum Ended {
    /// Both ways finished, or one failed.
    Copied(Result<(), CopyError>),
    /// The drain's grace period ran out.
    Drained,
    /// The identity rules changed and no longer allow the peer.
    Revoked,
}

/// Finds where the connection goes and connects there: inbound, the application;
/// outbound, a service's endpoint (balanced, retried) or the original destination.
/// Returns the service label with the result.
async fn connect(
    inputs: &Inputs,
    client: &TcpStream,
    peer: ClientAddr,
    direction: Direction,
) -> (String, Result<Connected, ForwardError>) {
    let passthrough = || PASSTHROUGH.to_string();
    let dst = match original_destination(inputs, client, peer, direction) {
        Ok(dst) => dst,
        Err(e) => return (passthrough(), Err(e)),
    };
    if direction == Direction::Outbound {
        let route = inputs.services.load().route(dst.0);
        match route {
            Route::Service(service) => {
                let name = service.name().to_string();
                return (name, balance(inputs, &service, peer, dst).await);
            }
            Route::Denied => return (passthrough(), Err(ForwardError::NotInRegistry(dst))),
            Route::Passthrough => {}
        }
    }
    let deadline = tokio::time::Instant::now() + inputs.connect_timeout;
    let started = std::time::Instant::now();
    let mesh = inputs
        .mesh
        .as_ref()
        .filter(|m| direction == Direction::Outbound && m.contains(dst.0.ip()))
        // The pod calling itself never leaves the pod: no sidecar answers there. A
        // peer sidecar's own ports (its health port, say) are plaintext by design.
        .filter(|_| !inputs.pod.is_self(dst.0.ip()) && !inputs.own_ports.contains(&dst.0.port()))
        .map(|m| MeshTarget {
            client: &m.client,
            expected: None,
        });
    let dead_peer = (direction == Direction::Outbound).then_some(&inputs.dead_peer);
    let result = match upstream::open(dst.0, direction, deadline, mesh, dead_peer).await {
        Ok((up, peer_tls)) => {
            inputs.metrics.upstream_connected(
                &ServiceLabels {
                    direction,
                    service: passthrough(),
                },
                started,
            );
            Ok(Connected {
                up,
                dst,
                endpoint: dst.0,
                peer_tls,
                server_identity: None,
                _leases: None,
            })
        }
        Err(e) => Err(e.into()),
    };
    (passthrough(), result)
}

/// The original destination: inbound, the address the client dialed (our socket's
/// local address); outbound, what the kernel recorded at connect.
fn original_destination(
    inputs: &Inputs,
    client: &TcpStream,
    peer: ClientAddr,
    direction: Direction,
) -> Result<OrigDstAddr, ForwardError> {
    let local = client.local_addr().map_err(ForwardError::OrigDstLookup)?;
    let dst = match direction {
        Direction::Inbound => OrigDstAddr(unmap(local)),
        Direction::Outbound => {
            let found = inputs.kernel.orig_dst.take(peer.0, local);
            inputs.metrics.orig_dst_lookup(matches!(found, Ok(Some(_))));
            match found {
                Ok(Some(dst)) => OrigDstAddr(unmap(dst)),
                Ok(None) => return Err(ForwardError::NoOrigDst),
                Err(e) => return Err(ForwardError::OrigDstLookup(e)),
            }
        }
    };
    // Outbound, the kernel never redirects to the sidecar's ports; inbound, they are
    // never steered. Either way such a destination would loop back into the sidecar.
    if inputs.own_ports.contains(&dst.0.port())
        && (dst.0.ip().is_loopback() || direction == Direction::Inbound)
    {
        return Err(ForwardError::Loop(dst));
    }
    Ok(dst)
}

/// Connects to one of `service`'s endpoints: within the circuit breaker's limits,
/// trying up to `retries` further endpoints after a failed attempt, all within the
/// service's connect budget (each attempt gets an equal share of what is left).
/// Failures feed outlier detection; successes the latency average.
async fn balance(
    inputs: &Inputs,
    service: &Service,
    peer: ClientAddr,
    dst: OrigDstAddr,
) -> Result<Connected, ForwardError> {
    let name = service.name();
    let mut admission = service
        .admit()
        .map_err(|o| ForwardError::Overflow(name.to_string(), o))?;
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
        let mesh = match (mtls, &inputs.mesh) {
            (false, _) => None,
            (true, Some(mesh)) => Some(MeshTarget {
                client: &mesh.client,
                expected: service.config.server_identity.as_ref(),
            }),
            // Config validation requires an identity for mTLS services.
            (true, None) => {
                last = Some(UpstreamError::Tls(
                    endpoint.addr,
                    "no workload identity".into(),
                ));
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
        );
        match opened.await {
            Ok((up, peer_tls)) => {
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
                    peer_tls,
                    server_identity: service.config.server_identity.clone(),
                    _leases: Some((admission, lease)),
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
        Some(last) => ForwardError::Exhausted {
            service: name.to_string(),
            attempts: tried.len(),
            last,
        },
        None => ForwardError::NoEndpoint(name.to_string()),
    })
}

/// Where outbound connections originate mTLS.
pub struct Mesh {
    /// Destinations that have a sidecar.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Originates mTLS and checks the server's identity.
    pub client: MeshConnector,
}

impl Mesh {
    /// Whether `ip` is in the mesh.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.cidrs.iter().any(|net| net.contains(&ip))
    }
}
