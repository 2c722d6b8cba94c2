//! The outbound proxy: accepts connections the kernel redirected from the app,
//! recovers their original destination and carries them there.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    drain::DrainWatcher,
    ebpf::KernelMaps,
    proxy::{
        ClientAddr, OrigDstAddr, ProxyStats,
        copy::{self, CopyError, Totals, Transfer},
    },
};

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
    /// Counters.
    pub stats: Arc<ProxyStats>,
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

/// Counts a connection as closed however its task ends.
struct ClosedGuard(Arc<ProxyStats>);

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        ProxyStats::inc(&self.0.closed);
    }
}

async fn serve(inputs: Arc<Inputs>, mut client: TcpStream, peer: ClientAddr, drain: DrainWatcher) {
    let stats = &inputs.stats;
    ProxyStats::inc(&stats.accepted);
    let _closed = ClosedGuard(stats.clone());
    let (mut upstream, dst) = match connect(&inputs, &client, peer).await {
        Ok(pair) => pair,
        Err(error) => {
            warn!(%error, "refusing connection");
            // Reset rather than FIN: the app sees a refused/reset connection, as it
            // would have without the proxy.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let transfer = Transfer::default();
    let totals = Totals {
        sent: &stats.bytes_sent,
        received: &stats.bytes_received,
    };
    let copied = tokio::select! {
        result = copy::copy_bidirectional(&mut client, &mut upstream, inputs.idle_timeout, &transfer, totals) => Some(result),
        () = drain.forced() => None,
    };
    let sent = transfer.sent.load(std::sync::atomic::Ordering::Relaxed);
    let received = transfer.received.load(std::sync::atomic::Ordering::Relaxed);
    match copied {
        Some(Ok(())) => debug!(%dst, sent, received, "connection closed"),
        Some(Err(CopyError::Idle(idle))) => {
            ProxyStats::inc(&stats.idle_closed);
            debug!(%dst, sent, received, ?idle, "connection closed: idle");
        }
        Some(Err(error)) => {
            ProxyStats::inc(&stats.io_errors);
            // Pass a reset on to the other side, so neither end waits on a dead peer.
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            debug!(%dst, sent, received, %error, "connection ended by an error");
        }
        None => {
            ProxyStats::inc(&stats.drain_closed);
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
) -> Result<(TcpStream, OrigDstAddr), OutboundError> {
    let stats = &inputs.stats;
    let local = client.local_addr().map_err(OutboundError::OrigDstLookup)?;
    let dst = match inputs.kernel.orig_dst.take(peer.0, local) {
        Ok(Some(dst)) => OrigDstAddr(dst),
        Ok(None) => {
            ProxyStats::inc(&stats.orig_dst_missing);
            return Err(OutboundError::NoOrigDst);
        }
        Err(e) => {
            ProxyStats::inc(&stats.orig_dst_missing);
            return Err(OutboundError::OrigDstLookup(e));
        }
    };
    ProxyStats::inc(&stats.orig_dst_found);
    if inputs.own_addrs.contains(&dst.0) {
        ProxyStats::inc(&stats.loop_refused);
        return Err(OutboundError::Loop(dst));
    }
    match tokio::time::timeout(inputs.connect_timeout, TcpStream::connect(dst.0)).await {
        Ok(Ok(upstream)) => {
            ProxyStats::inc(&stats.upstream_connected);
            Ok((upstream, dst))
        }
        Ok(Err(e)) => {
            ProxyStats::inc(&stats.connect_failed);
            Err(OutboundError::Connect(dst, e))
        }
        Err(_) => {
            ProxyStats::inc(&stats.connect_timeout);
            Err(OutboundError::ConnectTimeout(dst, inputs.connect_timeout))
        }
    }
}
