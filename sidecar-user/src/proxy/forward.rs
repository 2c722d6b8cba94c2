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

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    drain::DrainWatcher,
    ebpf::KernelMaps,
    metrics::{CloseReason, ConnRecorder, Direction, ProxyMetrics, Tls},
    proxy::{
        ClientAddr, OrigDstAddr,
        connections::{ConnTable, Entry},
        copy::{self, CopyError},
        inbound::{Admitted, InboundPolicy},
    },
    tls::SpiffeId,
};

/// Connects to `dst`. Inbound, the source is bound to the destination address itself:
/// `sk_lookup` recognises a connection whose two ends share an address as the pod
/// talking to itself, so the delivery is never steered back into the proxy.
async fn open_upstream(dst: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    if direction == Direction::Outbound {
        return TcpStream::connect(dst).await;
    }
    let socket = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(dst.ip(), 0))?;
    socket.connect(dst).await
}

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
    #[error("connecting to {0} timed out after {1:?}")]
    ConnectTimeout(OrigDstAddr, Duration),
    #[error("connecting to {0}: {1}")]
    Connect(OrigDstAddr, io::Error),
    #[error("mTLS to {0}: {1}")]
    Tls(OrigDstAddr, String),
}

impl ForwardError {
    fn reason(&self) -> CloseReason {
        match self {
            ForwardError::NoOrigDst | ForwardError::OrigDstLookup(_) => CloseReason::NoDestination,
            ForwardError::Loop(_) => CloseReason::Loop,
            ForwardError::ConnectTimeout(..) => CloseReason::Timeout,
            ForwardError::Connect(..) => CloseReason::Refused,
            ForwardError::Tls(..) => CloseReason::HandshakeFailed,
        }
    }
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
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The connected side: a plain socket, or mTLS originated over one.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Downstream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Downstream::Plain(tcp) => tcp,
            Downstream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl Upstream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(tcp) => tcp,
            Upstream::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Copies both ways; plain-to-plain keeps the TCP fast path (lazy buffers).
async fn copy_between(
    down: &mut Downstream,
    up: &mut Upstream,
    idle: Duration,
    transfer: &copy::Transfer,
    totals: copy::Totals,
) -> Result<(), CopyError> {
    match (down, up) {
        (Downstream::Plain(d), Upstream::Plain(u)) => {
            copy::copy_bidirectional(d, u, idle, transfer, totals).await
        }
        (Downstream::Plain(d), Upstream::Tls(u)) => {
            copy::copy_bidirectional_io(d, u.as_mut(), idle, transfer, totals).await
        }
        (Downstream::Tls(d), Upstream::Plain(u)) => {
            copy::copy_bidirectional_io(d.as_mut(), u, idle, transfer, totals).await
        }
        (Downstream::Tls(d), Upstream::Tls(u)) => {
            copy::copy_bidirectional_io(d.as_mut(), u.as_mut(), idle, transfer, totals).await
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
    let connected = connect(&inputs, down.tcp(), peer, direction).await;
    // The peer identity is the client's inbound and the server's outbound.
    let (result, mtls) = match connected {
        Ok((up, dst, outbound_mtls)) => (Ok((up, dst)), inbound_mtls.or(outbound_mtls)),
        Err(error) => (Err(error), inbound_mtls),
    };
    let identity = mtls.as_ref().map(|(id, _)| id.to_string());
    let tls = if mtls.is_some() { Tls::Yes } else { Tls::No };
    let label = identity.as_deref().unwrap_or(NO_IDENTITY);
    let mut recorder = ConnRecorder::open(&inputs.metrics, direction, PASSTHROUGH, label, tls);
    if let Some((_, handshake)) = &mtls {
        inputs
            .metrics
            .tls_handshake
            .get_or_create(recorder.service())
            .observe(handshake.as_secs_f64());
    }
    let (mut up, dst) = match result {
        Ok(pair) => pair,
        Err(error) => {
            warn!(%error, "refusing connection");
            recorder.set_reason(error.reason());
            // Reset rather than FIN: the app sees a refused/reset connection, as it
            // would have without the proxy.
            let _ = down.tcp().set_zero_linger();
            return;
        }
    };
    let _ = down.tcp().set_nodelay(true);
    let _ = up.tcp().set_nodelay(true);
    let registration = inputs.connections.register(Entry {
        direction,
        client: peer.0,
        orig_dst: dst.0,
        endpoint: dst.0,
        peer_identity: identity.clone(),
        tls: mtls.is_some(),
        started: std::time::Instant::now(),
        transfer: recorder.transfer.clone(),
        upstream_fd: up.tcp().as_raw_fd(),
    });
    let transfer = recorder.transfer.clone();
    let copied = tokio::select! {
        result = copy_between(&mut down, &mut up, inputs.idle_timeout, &transfer, recorder.totals()) => Some(result),
        () = drain.forced() => None,
    };
    // Leave the table before the sockets close (see `ConnTable::snapshot`).
    drop(registration);
    let sent = transfer.sent.load(std::sync::atomic::Ordering::Relaxed);
    let received = transfer.received.load(std::sync::atomic::Ordering::Relaxed);
    let reason = match copied {
        Some(Ok(())) => CloseReason::Normal,
        Some(Err(CopyError::Idle(_))) => CloseReason::Idle,
        Some(Err(_)) => CloseReason::Reset,
        None => CloseReason::Drained,
    };
    recorder.set_reason(reason);
    let peer_identity = identity.as_deref().unwrap_or("-");
    match copied {
        Some(Ok(())) | Some(Err(CopyError::Idle(_))) => {
            debug!(%dst, peer_identity, sent, received, reason = reason.as_str(), "connection closed")
        }
        Some(Err(error)) => {
            // Pass a reset on to the other side, so neither end waits on a dead peer.
            let _ = down.tcp().set_zero_linger();
            let _ = up.tcp().set_zero_linger();
            debug!(%dst, peer_identity, sent, received, %error, reason = reason.as_str(), "connection closed");
        }
        None => {
            let _ = down.tcp().set_zero_linger();
            let _ = up.tcp().set_zero_linger();
            warn!(%dst, peer_identity, sent, received, "connection closed by drain after the grace period");
        }
    }
}

/// Finds the original destination and connects to it within the timeout; to a mesh
/// destination, over mTLS (the server must be a sidecar: our ALPN, a certificate from
/// the bundle).
async fn connect(
    inputs: &Inputs,
    client: &TcpStream,
    peer: ClientAddr,
    direction: Direction,
) -> Result<(Upstream, OrigDstAddr, Option<(SpiffeId, Duration)>), ForwardError> {
    let local = client.local_addr().map_err(ForwardError::OrigDstLookup)?;
    let dst = match direction {
        Direction::Inbound => OrigDstAddr(unmap(local)),
        Direction::Outbound => {
            let found = inputs.kernel.orig_dst.take(peer.0, local);
            inputs.metrics.orig_dst_lookup(matches!(found, Ok(Some(_))));
            match found {
                Ok(Some(dst)) => OrigDstAddr(dst),
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
    let deadline = tokio::time::Instant::now() + inputs.connect_timeout;
    let started = std::time::Instant::now();
    let tcp = match tokio::time::timeout_at(deadline, open_upstream(dst.0, direction)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(ForwardError::Connect(dst, e)),
        Err(_) => return Err(ForwardError::ConnectTimeout(dst, inputs.connect_timeout)),
    };
    let service = crate::metrics::ServiceLabels {
        direction,
        service: PASSTHROUGH.to_string(),
    };
    inputs.metrics.upstream_connected(&service, started);
    let mesh = inputs
        .mesh
        .as_ref()
        .filter(|m| direction == Direction::Outbound && m.contains(dst.0.ip()));
    let Some(mesh) = mesh else {
        return Ok((Upstream::Plain(tcp), dst, None));
    };
    // The handshake shares the connect budget.
    let handshake_started = std::time::Instant::now();
    let name = rustls::pki_types::ServerName::IpAddress(dst.0.ip().into());
    let tls = match tokio::time::timeout_at(deadline, mesh.connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(ForwardError::Tls(dst, e.to_string())),
        Err(_) => return Err(ForwardError::ConnectTimeout(dst, inputs.connect_timeout)),
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(crate::tls::ALPN) {
        return Err(ForwardError::Tls(
            dst,
            "the server is not a sidecar (no sidecar-mtls/1 ALPN)".into(),
        ));
    }
    let Some(id) = crate::tls::rustls_config::peer_identity(conn) else {
        return Err(ForwardError::Tls(
            dst,
            "the server certificate has no SPIFFE ID".into(),
        ));
    };
    Ok((
        Upstream::Tls(Box::new(tls)),
        dst,
        Some((id, handshake_started.elapsed())),
    ))
}

/// Where outbound connections originate mTLS.
pub struct Mesh {
    /// Destinations that have a sidecar.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Originates mTLS with the current identity.
    pub connector: tokio_rustls::TlsConnector,
}

impl Mesh {
    /// Whether `ip` is in the mesh.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.cidrs.iter().any(|net| net.contains(&ip))
    }
}
