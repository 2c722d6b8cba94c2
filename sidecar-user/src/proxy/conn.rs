//! The shared tail of every connection, whichever way it goes: one guard opened at
//! accept ([`Conn`], holding the [`ConnRecorder`]), then either a refusal or the copy
//! both ways, entered in the connection table, until EOF, an error, the idle timeout,
//! a forced drain or a revoked peer; and the close reason.
//!
//! [`crate::proxy::outbound`] and [`crate::proxy::inbound`] decide where a connection
//! goes and connect there; everything after the connect is here.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    drain::DrainWatcher,
    ebpf::KernelMaps,
    mesh::{
        MeshConnector, MeshTarget, PeerIdentity,
        hbone::H2Stream,
        peer_policy::{Admission as PeerAdmission, PeerPolicy},
    },
    proxy::{
        ClientAddr, CloseReason, Direction, OrigDstAddr,
        addr::unmap,
        admission::InboundPolicy,
        connections::{ConnTable, Entry},
        copy::{self, CopyError},
        gate::Gate,
        labels::{PASSTHROUGH, ServiceLabels},
        listener,
        metrics::{ConnRecorder, ProxyMetrics},
        pod_addrs::PodAddrs,
        socket_opts::DeadPeer,
        upstream::{self, Upstream, UpstreamError},
    },
    service::{Admission, EndpointLease, Overflow, Services},
    telemetry::LogBudget,
    tls::IdentityMatcher,
    woken::woken,
};

/// What every connection task shares.
pub struct Inputs {
    /// Kernel maps; `orig_dst` holds the original destinations of outbound connections.
    pub kernel: Arc<KernelMaps>,
    /// The sidecar's own ports: a destination on one of them is a loop.
    pub own_ports: Vec<u16>,
    /// Budget for connecting upstream.
    pub connect_timeout: Duration,
    /// Close after this long without bytes (shorter once half-closed).
    pub timeouts: copy::Timeouts,
    /// Connection metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// Open connections, for `/connections`.
    pub connections: Arc<ConnTable>,
    /// What inbound ports accept directly.
    pub inbound: InboundPolicy,
    /// The HBONE port (ours, and every peer's).
    pub hbone_port: u16,
    /// Budget for an inbound HBONE client's handshakes.
    pub handshake_timeout: Duration,
    /// Outbound destinations reached over mTLS, when an identity is configured.
    pub mesh: Option<Mesh>,
    /// Services (virtual addresses) and the outbound traffic policy.
    pub services: Arc<Services>,
    /// The pod's own addresses: a destination among them is reached in plaintext, and
    /// outbound affinity hashes the pod IP rather than loopback.
    pub pod: PodAddrs,
    /// Keepalive and user timeout of sockets to and from other hosts.
    pub dead_peer: DeadPeer,
    /// Bounds inbound HBONE connections still in their handshakes.
    pub unauthenticated: Arc<Gate>,
    /// Bounds inbound HBONE connections over their whole life.
    pub hbone_connections: Arc<Gate>,
    /// The live identity rules, when an identity is configured.
    pub peers: Option<Arc<PeerPolicy>>,
    /// With Kubernetes discovery: outbound connections wait for its first list.
    pub synced: Option<crate::kubernetes::Synced>,
}

/// Where outbound connections go over HBONE.
pub struct Mesh {
    /// Destinations that have a sidecar.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Opens HBONE streams and checks the server's identity.
    pub client: MeshConnector,
}

impl Mesh {
    /// Whether `ip` is in the mesh.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.cidrs.iter().any(|net| net.contains(&ip))
    }
}

/// The accepted side of a connection: a plain socket, or an HBONE stream from a peer
/// that proved its identity.
pub enum Downstream {
    /// Bytes pass as they are.
    Plain(TcpStream),
    /// A stream from a client sidecar (or ztunnel).
    Hbone(Box<H2Stream>, PeerIdentity),
}

impl Downstream {
    /// Resets this connection: a TCP reset, or a stream reset.
    pub fn reset(&mut self) {
        match self {
            Downstream::Plain(tcp) => {
                let _ = tcp.set_zero_linger();
            }
            Downstream::Hbone(stream, _) => stream.reset(),
        }
    }

    /// The client's proven identity.
    fn peer(&self) -> Option<&PeerIdentity> {
        match self {
            Downstream::Plain(_) => None,
            Downstream::Hbone(_, peer) => Some(peer),
        }
    }
}

/// An open upstream and what the connection needs to know about it.
pub struct Connected {
    /// The connected side.
    pub up: Upstream,
    /// Where the application was going.
    pub dst: OrigDstAddr,
    /// Where the proxy connected: the original destination, or a service endpoint.
    pub endpoint: SocketAddr,
    /// The server sidecar's identity, outbound over mTLS.
    pub server: Option<PeerIdentity>,
    /// What the destination itself required of the server when the connection was
    /// made (a service's `server_identity`, or the identity discovery knows for the
    /// pod at the address): a reload of the identity rules re-checks the peer against
    /// it, as a new connection would be checked (a reload that changes only the
    /// requirement applies to new connections).
    pub server_identity: Option<IdentityMatcher>,
    /// A service's connection slot and the endpoint's active count, held while open.
    pub leases: Option<(Admission, EndpointLease)>,
}

/// Why a connection was not carried.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The kernel has no original destination for this connection.
    #[error("no original destination recorded for this connection (not captured, or evicted)")]
    NoOrigDst,
    /// The application reset the connection before it was accepted.
    #[error("the client reset the connection before it was accepted: {0}")]
    ClientGone(std::io::Error),
    /// Reading the original destination failed.
    #[error("reading the original destination: {0}")]
    OrigDstLookup(std::io::Error),
    /// The destination is one of the sidecar's own ports.
    #[error("destination {0} is the proxy itself")]
    Loop(OrigDstAddr),
    /// `outbound.policy: registry_only` and not a service.
    #[error("destination {0} is not a service and outbound.policy is registry_only")]
    NotInRegistry(OrigDstAddr),
    /// The service's circuit breaker is open.
    #[error("service {0}: {1}, connection refused")]
    Overflow(String, Overflow),
    /// The service has no endpoint left to try.
    #[error("service {0} has no endpoint to try")]
    NoEndpoint(String),
    /// Every attempt failed.
    #[error("service {service}: all {attempts} attempts failed, last: {last}")]
    Exhausted {
        /// The service.
        service: String,
        /// How many endpoints were tried.
        attempts: usize,
        /// The last attempt's error.
        last: UpstreamError,
    },
    /// Connecting to the one destination failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The destination is a pod with no sidecar and `kubernetes.plaintext` is `deny`.
    #[error("destination {0} is pod {1}, which has no sidecar, and kubernetes.plaintext is deny")]
    Plaintext(OrigDstAddr, String),
    /// Discovery has not listed the cluster yet.
    #[error("the first list from the Kubernetes API did not complete within {0:?}")]
    NotSynced(Duration),
}

impl ConnError {
    /// The close reason recorded for it.
    pub fn reason(&self) -> CloseReason {
        match self {
            ConnError::NoOrigDst | ConnError::OrigDstLookup(_) => CloseReason::NoDestination,
            ConnError::ClientGone(_) => CloseReason::Reset,
            ConnError::Loop(_) => CloseReason::Loop,
            ConnError::NotInRegistry(_) => CloseReason::PolicyDenied,
            ConnError::Overflow(..) => CloseReason::Overflow,
            ConnError::NoEndpoint(_) => CloseReason::Refused,
            ConnError::Exhausted { last, .. } => last.reason(),
            ConnError::Upstream(e) => e.reason(),
            ConnError::Plaintext(..) => CloseReason::PolicyDenied,
            ConnError::NotSynced(_) => CloseReason::Refused,
        }
    }
}

/// One accepted connection on its way through the proxy: what it shares with the
/// others, and its metrics guard (opened at accept, closed when this is dropped).
pub struct Conn {
    /// Shared state.
    pub inputs: Arc<Inputs>,
    /// Which way it goes.
    pub direction: Direction,
    /// The peer that connected to the proxy.
    pub client: ClientAddr,
    /// The metrics guard.
    pub recorder: ConnRecorder,
    drain: DrainWatcher,
}

/// Accepts on `listener` until a drain starts; each connection is a tracked task
/// running `handle`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    inputs: Arc<Inputs>,
    drain: DrainWatcher,
    handle: F,
) where
    F: Fn(Conn, TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener::accept(&listener) => accepted,
            () = drain.wait_for_drain() => break,
        };
        // Before anything is written: a handshake or the mesh status byte held back
        // by Nagle's algorithm waits for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let client = ClientAddr(unmap(peer));
        let span = info_span!("conn", direction = direction.as_str(), %client);
        let conn = Conn::start(inputs.clone(), direction, client, drain.clone());
        drain.spawn(handle(conn, stream).instrument(span));
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

impl Conn {
    /// A connection just accepted (or a stream just opened): its metrics start now.
    pub fn start(
        inputs: Arc<Inputs>,
        direction: Direction,
        client: ClientAddr,
        drain: DrainWatcher,
    ) -> Self {
        Self {
            recorder: ConnRecorder::start(&inputs.metrics, direction),
            inputs,
            direction,
            client,
            drain,
        }
    }

    /// Records a connection refused before it had a downstream to carry: by `peer`'s
    /// identity (when proven), with `error`'s reason.
    pub fn refused(
        mut self,
        peer: Option<&PeerIdentity>,
        error: &dyn std::fmt::Display,
        reason: CloseReason,
    ) {
        self.recorder.label_refused(peer.map(|p| &p.id));
        self.recorder.set_reason(reason);
        // Anyone who reaches a port can cause these: a bounded number of lines per
        // reason (the metrics count every one).
        static LINES: LogBudget = LogBudget::new(Duration::from_secs(10), 20);
        match LINES.admit(reason.as_str()) {
            Some(0) => warn!(%error, "refusing connection"),
            Some(suppressed) => {
                warn!(%error, suppressed, reason = reason.as_str(), "refusing connection (and {suppressed} more for this reason, not logged)")
            }
            None => {}
        }
    }

    /// Connects straight to `dst`, not to a service: the application inbound, a
    /// passthrough destination outbound (over the mesh protocol when `mesh` says so).
    pub async fn connect_direct(
        &self,
        dst: OrigDstAddr,
        mesh: Option<MeshTarget<'_>>,
    ) -> Result<Connected, ConnError> {
        let inputs = &self.inputs;
        let deadline = tokio::time::Instant::now() + inputs.connect_timeout;
        let started = std::time::Instant::now();
        // Outbound sockets go to other hosts: dead ones must be noticed.
        let dead_peer = (self.direction == Direction::Outbound).then_some(&inputs.dead_peer);
        // `Forwarded: for=`, only for an HBONE stream.
        let client = mesh.map(|_| inputs.pod.app_addr(self.client.0, dst.0));
        let required = mesh.and_then(|m| m.expected).map(|r| r.matcher().clone());
        let (up, server) =
            upstream::open(dst.0, self.direction, deadline, mesh, dead_peer, client).await?;
        let labels = ServiceLabels {
            direction: self.direction,
            service: PASSTHROUGH.into(),
        };
        inputs.metrics.upstream_connected(&labels, started);
        Ok(Connected {
            up,
            dst,
            endpoint: dst.0,
            server,
            server_identity: required,
            leases: None,
        })
    }

    /// Carries the connection to `connected`, or refuses it with the error,
    /// recording either. The labels are set now; the returned future does the rest.
    ///
    /// It is one async block over values it owns, borrowed in place, rather than a
    /// chain of async functions each keeping its own copy of what it moved on: a
    /// connection's task holds this state for the connection's whole life, and the
    /// chain cost 2.3 KiB per connection (measured with `size_of_val`).
    pub fn carry(
        mut self,
        mut down: Downstream,
        mut connected: Result<Connected, ConnError>,
    ) -> impl Future<Output = ()> + Send {
        let client = down.peer().map(|peer| peer.id.clone());
        // The peer identity is the client's inbound and the server's outbound.
        let peer = match (down.peer(), &connected) {
            (Some(peer), _) => Some(peer),
            (None, Ok(c)) => c.server.as_ref(),
            (None, Err(_)) => None,
        };
        self.recorder.label(peer);
        let identity = peer.map(|p| p.id.to_string());
        // What the peer was admitted as, so a reload of the identity rules can end it.
        let admission = match (client, &connected) {
            (Some(client), _) => Some(PeerAdmission::Client(client)),
            (None, Ok(c)) => c.server.as_ref().map(|server| PeerAdmission::Server {
                ip: c.endpoint.ip(),
                id: server.id.clone(),
                service: c.server_identity.clone(),
            }),
            (None, Err(_)) => None,
        };
        async move {
            let connected = match &mut connected {
                Ok(c) => c,
                Err(error) => {
                    warn!(%error, "refusing connection");
                    self.recorder.set_reason(error.reason());
                    // Reset rather than FIN: the app sees a refused/reset connection,
                    // as it would have without the proxy.
                    down.reset();
                    return;
                }
            };
            let (dst, endpoint) = (connected.dst, connected.endpoint);
            let inputs = &self.inputs;
            let registration = inputs.connections.register(Entry {
                direction: self.direction,
                client: self.client.0,
                orig_dst: dst.0,
                endpoint,
                peer_identity: identity.clone(),
                tls: identity.is_some(),
                started: std::time::Instant::now(),
                transfer: self.recorder.transfer.clone(),
                upstream_fd: connected.up.own_fd(),
                shared_socket: connected.up.shared_socket(),
            });
            let transfer = self.recorder.transfer.clone();
            let totals = self.recorder.totals();
            let revoked = async {
                match (&admission, &inputs.peers) {
                    (Some(admission), Some(peers)) => peers.revoked(admission).await,
                    _ => std::future::pending().await,
                }
            };
            let up = &mut connected.up;
            let ended = tokio::select! {
                result = copy_between(&mut down, up, inputs.timeouts, &transfer, totals) => Ended::Copied(result),
                // Polled when they fire, not for every message copied.
                () = woken(self.drain.forced()) => Ended::Drained,
                () = woken(revoked) => Ended::Revoked,
            };
            // Leave the table before the sockets close (see `ConnTable::snapshot`).
            drop(registration);
            let reason = ended.reason();
            self.recorder.set_reason(reason);
            if !matches!(
                ended,
                Ended::Copied(Ok(()) | Err(CopyError::Idle(_) | CopyError::HalfClosedIdle(_)))
            ) {
                // Pass a reset on to the other side, so neither end waits on a dead
                // peer.
                down.reset();
                connected.up.reset();
            }
            let sent = transfer.sent.load(std::sync::atomic::Ordering::Relaxed);
            let received = transfer.received.load(std::sync::atomic::Ordering::Relaxed);
            let peer_identity = identity.as_deref().unwrap_or("-");
            match ended {
                Ended::Copied(Ok(()) | Err(CopyError::Idle(_) | CopyError::HalfClosedIdle(_))) => {
                    debug!(%dst, %endpoint, peer_identity, sent, received, reason = reason.as_str(), "connection closed")
                }
                Ended::Copied(Err(error)) => {
                    debug!(%dst, %endpoint, peer_identity, sent, received, %error, reason = reason.as_str(), "connection closed");
                }
                Ended::Drained => {
                    warn!(%dst, %endpoint, peer_identity, sent, received, "connection closed by drain after the grace period");
                }
                Ended::Revoked => {
                    warn!(%dst, %endpoint, peer_identity, sent, received, "connection closed: the reloaded identity rules no longer allow this peer");
                }
            }
        }
    }
}

impl Ended {
    /// The close reason recorded for it.
    fn reason(&self) -> CloseReason {
        match self {
            Ended::Copied(Ok(())) => CloseReason::Normal,
            Ended::Copied(Err(CopyError::Idle(_))) => CloseReason::Idle,
            Ended::Copied(Err(CopyError::HalfClosedIdle(_))) => CloseReason::HalfClosedIdle,
            // Keepalive probes or sent data went unanswered: the peer is gone.
            Ended::Copied(Err(CopyError::Client(e) | CopyError::Upstream(e)))
                if e.raw_os_error() == Some(libc::ETIMEDOUT) =>
            {
                CloseReason::PeerLost
            }
            Ended::Copied(Err(_)) => CloseReason::Reset,
            Ended::Drained => CloseReason::Drained,
            Ended::Revoked => CloseReason::PolicyDenied,
        }
    }
}

/// Copies both ways; plain sides are used as sockets (no buffer of their own, splice
/// between two of them).
async fn copy_between(
    down: &mut Downstream,
    up: &mut Upstream,
    idle: copy::Timeouts,
    transfer: &copy::Transfer,
    totals: copy::Totals,
) -> Result<(), CopyError> {
    use copy::copy_bidirectional as copy;
    match (down, up) {
        (Downstream::Plain(d), Upstream::Plain(u)) => copy(d, u, idle, transfer, totals).await,
        (Downstream::Plain(d), Upstream::Hbone(u)) => {
            copy(d, &mut **u, idle, transfer, totals).await
        }
        (Downstream::Hbone(d, _), Upstream::Plain(u)) => {
            copy(&mut **d, u, idle, transfer, totals).await
        }
        (Downstream::Hbone(d, _), Upstream::Hbone(u)) => {
            copy(&mut **d, &mut **u, idle, transfer, totals).await
        }
    }
}
