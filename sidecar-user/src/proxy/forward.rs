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
}

impl ForwardError {
    fn reason(&self) -> CloseReason {
        match self {
            ForwardError::NoOrigDst | ForwardError::OrigDstLookup(_) => CloseReason::NoDestination,
            ForwardError::Loop(_) => CloseReason::Loop,
            ForwardError::ConnectTimeout(..) => CloseReason::Timeout,
            ForwardError::Connect(..) => CloseReason::Refused,
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
        Admitted::Plain(client) => relay(inputs, client, peer, direction, None, drain).await,
        Admitted::Mtls(tls, id, handshake) => {
            relay(inputs, *tls, peer, direction, Some((id, handshake)), drain).await
        }
    }
}

/// The accepted side of a connection: a plain socket, or TLS terminated over one.
trait ClientStream: Send {
    /// The underlying socket.
    fn tcp(&self) -> &TcpStream;

    /// Copies both ways between this stream and `upstream`.
    fn relay<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: Duration,
        transfer: &'a copy::Transfer,
        totals: copy::Totals,
    ) -> impl std::future::Future<Output = Result<(), CopyError>> + Send + 'a;
}

impl ClientStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn relay<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: Duration,
        transfer: &'a copy::Transfer,
        totals: copy::Totals,
    ) -> impl std::future::Future<Output = Result<(), CopyError>> + Send + 'a {
        copy::copy_bidirectional(self, upstream, idle, transfer, totals)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn relay<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: Duration,
        transfer: &'a copy::Transfer,
        totals: copy::Totals,
    ) -> impl std::future::Future<Output = Result<(), CopyError>> + Send + 'a {
        copy::copy_bidirectional_io(self, upstream, idle, transfer, totals)
    }
}

/// Connects to the destination and copies until the connection ends, recording it.
async fn relay<C: ClientStream>(
    inputs: Arc<Inputs>,
    mut client: C,
    peer: ClientAddr,
    direction: Direction,
    mtls: Option<(SpiffeId, Duration)>,
    drain: DrainWatcher,
) {
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
    let (mut upstream, dst) = match connect(&inputs, client.tcp(), peer, direction, &recorder).await
    {
        Ok(pair) => pair,
        Err(error) => {
            warn!(%error, "refusing connection");
            recorder.set_reason(error.reason());
            // Reset rather than FIN: the app sees a refused/reset connection, as it
            // would have without the proxy.
            let _ = client.tcp().set_zero_linger();
            return;
        }
    };
    let _ = client.tcp().set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let registration = inputs.connections.register(Entry {
        direction,
        client: peer.0,
        orig_dst: dst.0,
        endpoint: dst.0,
        peer_identity: identity.clone(),
        tls: mtls.is_some(),
        started: std::time::Instant::now(),
        transfer: recorder.transfer.clone(),
        upstream_fd: upstream.as_raw_fd(),
    });
    let transfer = recorder.transfer.clone();
    let copied = tokio::select! {
        result = client.relay(&mut upstream, inputs.idle_timeout, &transfer, recorder.totals()) => Some(result),
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
            let _ = client.tcp().set_zero_linger();
            let _ = upstream.set_zero_linger();
            debug!(%dst, peer_identity, sent, received, %error, reason = reason.as_str(), "connection closed");
        }
        None => {
            let _ = client.tcp().set_zero_linger();
            let _ = upstream.set_zero_linger();
            warn!(%dst, peer_identity, sent, received, "connection closed by drain after the grace period");
        }
    }
}

/// Finds the original destination and connects to it within the timeout.
async fn connect(
    inputs: &Inputs,
    client: &TcpStream,
    peer: ClientAddr,
    direction: Direction,
    recorder: &ConnRecorder,
) -> Result<(TcpStream, OrigDstAddr), ForwardError> {
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
    let started = std::time::Instant::now();
    let connecting = open_upstream(dst.0, direction);
    match tokio::time::timeout(inputs.connect_timeout, connecting).await {
        Ok(Ok(upstream)) => {
            inputs
                .metrics
                .upstream_connected(recorder.service(), started);
            Ok((upstream, dst))
        }
        Ok(Err(e)) => Err(ForwardError::Connect(dst, e)),
        Err(_) => Err(ForwardError::ConnectTimeout(dst, inputs.connect_timeout)),
    }
}
