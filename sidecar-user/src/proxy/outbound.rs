//! The outbound proxy: accepts connections the kernel redirected from the app,
//! recovers their original destination and carries them there.

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
    },
};

/// Service label of connections to destinations that are not services.
const PASSTHROUGH: &str = "passthrough";
/// Peer identity label without mTLS.
const NO_IDENTITY: &str = "none";

/// What every outbound connection task shares.
pub struct Inputs {
    /// Kernel maps; `orig_dst` holds the original destinations.
    pub kernel: Arc<KernelMaps>,
    /// The proxy's own listener addresses: a destination among them is a loop.
    pub own_addrs: Vec<SocketAddr>,
    /// Budget for connecting upstream.
    pub connect_timeout: Duration,
    /// Close after this long without bytes.
    pub idle_timeout: Duration,
    /// Connection metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// Open connections, for `/connections`.
    pub connections: Arc<ConnTable>,
}

/// Why an outbound connection was not carried.
#[derive(Debug, thiserror::Error)]
enum OutboundError {
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

impl OutboundError {
    fn reason(&self) -> CloseReason {
        match self {
            OutboundError::NoOrigDst | OutboundError::OrigDstLookup(_) => {
                CloseReason::NoDestination
            }
            OutboundError::Loop(_) => CloseReason::Loop,
            OutboundError::ConnectTimeout(..) => CloseReason::Timeout,
            OutboundError::Connect(..) => CloseReason::Refused,
        }
    }
}

/// Accepts on `listener` until a drain starts; each connection is a tracked task.
pub async fn accept_loop(listener: TcpListener, inputs: Arc<Inputs>, drain: DrainWatcher) {
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
        let client = ClientAddr(peer);
        let span = info_span!("outbound", %client);
        let inputs = inputs.clone();
        let watcher = drain.clone();
        drain.spawn(serve(inputs, stream, client, watcher).instrument(span));
    }
}

async fn serve(inputs: Arc<Inputs>, mut client: TcpStream, peer: ClientAddr, drain: DrainWatcher) {
    let mut recorder = ConnRecorder::open(
        &inputs.metrics,
        Direction::Outbound,
        PASSTHROUGH,
        NO_IDENTITY,
        Tls::No,
    );
    let (mut upstream, dst) = match connect(&inputs, &client, peer, &recorder).await {
        Ok(pair) => pair,
        Err(error) => {
            warn!(%error, "refusing connection");
            recorder.set_reason(error.reason());
            // Reset rather than FIN: the app sees a refused/reset connection, as it
            // would have without the proxy.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let registration = inputs.connections.register(Entry {
        direction: Direction::Outbound,
        client: peer.0,
        orig_dst: dst.0,
        endpoint: dst.0,
        peer_identity: None,
        tls: false,
        started: std::time::Instant::now(),
        transfer: recorder.transfer.clone(),
        upstream_fd: upstream.as_raw_fd(),
    });
    let transfer = recorder.transfer.clone();
    let copied = tokio::select! {
        result = copy::copy_bidirectional(&mut client, &mut upstream, inputs.idle_timeout, &transfer, recorder.totals()) => Some(result),
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
    match copied {
        Some(Ok(())) | Some(Err(CopyError::Idle(_))) => {
            debug!(%dst, sent, received, reason = reason.as_str(), "connection closed")
        }
        Some(Err(error)) => {
            // Pass a reset on to the other side, so neither end waits on a dead peer.
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            debug!(%dst, sent, received, %error, reason = reason.as_str(), "connection closed");
        }
        None => {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            warn!(%dst, sent, received, "connection closed by drain after the grace period");
        }
    }
}

/// Finds the original destination and connects to it within the timeout.
async fn connect(
    inputs: &Inputs,
    client: &TcpStream,
    peer: ClientAddr,
    recorder: &ConnRecorder,
) -> Result<(TcpStream, OrigDstAddr), OutboundError> {
    let local = client.local_addr().map_err(OutboundError::OrigDstLookup)?;
    let found = inputs.kernel.orig_dst.take(peer.0, local);
    inputs.metrics.orig_dst_lookup(matches!(found, Ok(Some(_))));
    let dst = match found {
        Ok(Some(dst)) => OrigDstAddr(dst),
        Ok(None) => return Err(OutboundError::NoOrigDst),
        Err(e) => return Err(OutboundError::OrigDstLookup(e)),
    };
    if inputs.own_addrs.contains(&dst.0) {
        return Err(OutboundError::Loop(dst));
    }
    let started = std::time::Instant::now();
    match tokio::time::timeout(inputs.connect_timeout, TcpStream::connect(dst.0)).await {
        Ok(Ok(upstream)) => {
            inputs
                .metrics
                .upstream_connected(recorder.service(), started);
            Ok((upstream, dst))
        }
        Ok(Err(e)) => Err(OutboundError::Connect(dst, e)),
        Err(_) => Err(OutboundError::ConnectTimeout(dst, inputs.connect_timeout)),
    }
}
