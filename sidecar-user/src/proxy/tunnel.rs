//! Inbound HBONE: the listener on port 15008 (every pod address, never captured).
//! Each connection from a client sidecar (or ztunnel) gets the mTLS and HTTP/2
//! handshakes ([`crate::mesh::hbone::server`]) within the caps on open and on
//! unauthenticated connections ([`super::gate`]); each `CONNECT` stream on it is then one inbound connection: checked
//! (400 for a bad target, 503 for the sidecar's own ports, 401 for a peer the
//! allow-list refuses), delivered to the application like a direct connection
//! ([`super::inbound::deliver`]: 503 when it refuses), answered 200, and carried.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    drain::DrainWatcher,
    mesh::{
        PeerIdentity,
        hbone::{
            H2Stream, Settings, keepalive,
            metrics::{HboneMetrics, Side},
            server::{self, Reject},
        },
        peer_policy::PeerPolicy,
    },
    proxy::{
        ClientAddr, CloseReason, Direction, OrigDstAddr,
        addr::unmap,
        conn::{Conn, ConnError, Downstream, Inputs},
        gate::{Gate, Pass},
        inbound::deliver,
        listener,
    },
    woken::woken,
};

/// What the HBONE listener needs beyond the shared inputs.
pub struct TunnelServer {
    /// Terminates mTLS (client certificate required).
    pub acceptor: TlsAcceptor,
    /// HTTP/2 settings, keepalive.
    pub settings: Settings,
    /// Who may open streams (live).
    pub peers: Arc<PeerPolicy>,
    /// Connection and stream counts.
    pub metrics: Arc<HboneMetrics>,
}

/// Accepts HBONE connections on `listener` until a drain starts; each connection's
/// streams are served until it closes (after a drain: once its streams end).
pub async fn serve(
    listener: TcpListener,
    inputs: Arc<Inputs>,
    server: Arc<TunnelServer>,
    drain: DrainWatcher,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener::accept(&listener) => accepted,
            () = drain.wait_for_drain() => break,
        };
        let _ = tcp.set_nodelay(true);
        let client = ClientAddr(unmap(peer));
        let span = info_span!("hbone", %client);
        let task = connection(inputs.clone(), server.clone(), tcp, client, drain.clone());
        tokio::spawn(task.instrument(span));
    }
}

/// One HBONE connection: handshakes, then its streams.
async fn connection(
    inputs: Arc<Inputs>,
    server: Arc<TunnelServer>,
    tcp: TcpStream,
    client: ClientAddr,
    drain: DrainWatcher,
) {
    inputs.dead_peer.apply(&tcp);
    let local = match tcp.local_addr() {
        Ok(local) => unmap(local).ip(),
        Err(_) => return,
    };
    // Held for the connection's life, whoever the client turns out to be.
    let gate = &inputs.hbone_connections;
    let Some(_held) = enter_or_reset(gate, "open HBONE", &inputs, &tcp, client, &drain) else {
        return;
    };
    // Held until the client has proved who it is (or failed).
    let gate = &inputs.unauthenticated;
    let Some(pass) = enter_or_reset(gate, "unauthenticated", &inputs, &tcp, client, &drain) else {
        return;
    };
    let budget = inputs.handshake_timeout;
    let (mut h2, peer) =
        match server::handshake(&server.acceptor, tcp, &server.settings, budget).await {
            Ok(ok) => ok,
            Err(error) => {
                let reason = match error {
                    server::HandshakeError::Timeout(_) => CloseReason::Timeout,
                    _ => CloseReason::HandshakeFailed,
                };
                let conn = Conn::start(inputs.clone(), Direction::Inbound, client, drain);
                conn.refused(None, &error, reason);
                return;
            }
        };
    drop(pass);
    server.metrics.connection_opened(Side::Server);
    debug!(peer = %peer.id, "HBONE connection accepted");
    // The branches beside `accept` are polled when they fire, not on every frame.
    let keepalive = woken(keepalive(
        h2.ping_pong(),
        server.settings.keepalive_interval,
        server.settings.keepalive_timeout,
    ));
    // Only the first stream waited for the handshake.
    let mut first = Some(peer.clone());
    let mut draining = false;
    // A connection that carries no stream for a whole idle period (between one and
    // two `idle_timeout`s) is closed: a peer cannot keep connections it does not use.
    let open = Arc::new(AtomicUsize::new(0));
    let used = AtomicBool::new(false);
    let unused = woken(async {
        let mut idle = tokio::time::interval(server.settings.idle_timeout);
        idle.reset();
        loop {
            idle.tick().await;
            if !used.swap(false, Relaxed) && open.load(Relaxed) == 0 {
                return;
            }
        }
    });
    let drained = woken(drain.wait_for_drain());
    tokio::pin!(keepalive, unused, drained);
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((request, respond))) => {
                    used.store(true, Relaxed);
                    let peer = first.take().unwrap_or_else(|| PeerIdentity { id: peer.id.clone(), handshake: None });
                    let conn = Conn::start(inputs.clone(), Direction::Inbound, client, drain.clone());
                    let span = info_span!("stream", peer = %peer.id);
                    let guard = Open::new(server.metrics.clone(), open.clone());
                    drain.spawn(stream(conn, server.clone(), local, request, respond, peer, guard).instrument(span));
                }
                Some(Err(error)) => {
                    debug!(%error, "HBONE connection failed");
                    break;
                }
                None => break,
            },
            () = &mut keepalive => {
                warn!(timeout = ?server.settings.keepalive_timeout, "HBONE connection closed: PING unanswered");
                break;
            }
            () = &mut unused, if !draining => {
                debug!("HBONE connection idle: closing");
                draining = true;
                h2.graceful_shutdown();
            }
            () = &mut drained, if !draining => {
                // GOAWAY: no new streams; the open ones finish.
                draining = true;
                h2.graceful_shutdown();
            }
        }
    }
    server.metrics.connection_closed(Side::Server);
}

/// A slot in `gate` for a connection from `client`; past a cap, the connection is
/// counted as refused (too many `what` connections) and reset at once.
fn enter_or_reset(
    gate: &Arc<Gate>,
    what: &str,
    inputs: &Arc<Inputs>,
    tcp: &TcpStream,
    client: ClientAddr,
    drain: &DrainWatcher,
) -> Option<Pass> {
    match gate.enter(client.0.ip()) {
        Ok(pass) => Some(pass),
        Err(limit) => {
            let conn = Conn::start(inputs.clone(), Direction::Inbound, client, drain.clone());
            conn.refused(
                None,
                &format_args!("too many {what} connections ({} cap)", limit.as_str()),
                CloseReason::Overflow,
            );
            let _ = tcp.set_zero_linger();
            None
        }
    }
}

/// A server stream, counted from its request to its end: in its connection's
/// count (idle detection) and, once answered 200, in the stream metrics.
struct Open {
    metrics: Arc<HboneMetrics>,
    open: Arc<AtomicUsize>,
    answered: bool,
}

impl Open {
    fn new(metrics: Arc<HboneMetrics>, open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Relaxed);
        Self {
            metrics,
            open,
            answered: false,
        }
    }

    /// Answered 200: an open stream from now on.
    fn answered(mut self) -> Self {
        self.metrics.stream_opened(Side::Server);
        self.answered = true;
        self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Relaxed);
        if self.answered {
            self.metrics.stream_closed(Side::Server);
        }
    }
}

/// One `CONNECT` stream: checks, delivery, the answer, then the copy.
async fn stream(
    conn: Conn,
    server: Arc<TunnelServer>,
    local: std::net::IpAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: PeerIdentity,
    guard: Open,
) {
    let metrics = server.metrics.clone();
    let refuse = |conn: Conn, respond: &mut SendResponse<Bytes>, reject: Reject, reason| {
        metrics.stream_refused(Side::Server, reject.status.as_u16());
        let _ = server::respond(respond, reject.status);
        conn.refused(Some(&peer), &reject, reason);
    };
    let dst = match server::target(&request, local) {
        Ok(dst) => OrigDstAddr(dst),
        Err(reject) => return refuse(conn, &mut respond, reject, CloseReason::PolicyDenied),
    };
    if conn.inputs.own_ports.contains(&dst.0.port()) {
        let reject = Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("{dst} is a port of the sidecar itself"),
        };
        return refuse(conn, &mut respond, reject, CloseReason::Loop);
    }
    if !server.peers.allows_client(&peer.id) {
        let reject = Reject {
            status: StatusCode::UNAUTHORIZED,
            reason: format!(
                "peer {} is not allowed by inbound.allow (an empty list allows the local trust domain)",
                peer.id
            ),
        };
        return refuse(conn, &mut respond, reject, CloseReason::PolicyDenied);
    }
    let connected = match deliver(&conn, dst).await {
        Ok(connected) => connected,
        Err(error) => {
            let reason = error.reason();
            let reject = Reject {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: error.to_string(),
            };
            return refuse(conn, &mut respond, reject, reason);
        }
    };
    let mut connected = connected;
    let send = match server::respond(&mut respond, StatusCode::OK) {
        Ok(send) => send,
        Err(error) => {
            // The client gave up (reset the stream) while we connected.
            connected.up.reset();
            let error = ConnError::ClientGone(std::io::Error::other(error));
            return conn.refused(Some(&peer), &error, CloseReason::Reset);
        }
    };
    let guard: Box<dyn Send + Sync> = Box::new(guard.answered());
    let stream = H2Stream::new(send, request.into_body(), Some(guard));
    conn.carry(Downstream::Hbone(Box::new(stream), peer), Ok(connected))
        .await;
}
