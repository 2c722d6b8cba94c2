//! Inbound HBONE: the listener on port 15008 (every pod address, never captured).
//! Each connection from a client sidecar (or ztunnel) gets the mTLS and HTTP/2
//! handshakes ([`crate::mesh::hbone::server`]) within the caps on open and on
//! unauthenticated connections ([`super::gate`]); each `CONNECT` stream on it is then one inbound connection: checked
//! (400 for a bad target, 503 for the sidecar's own ports, 401 for a peer the
//! allow-list refuses), delivered to the application like a direct connection
//! ([`super::inbound::deliver`]: 503 when it refuses), answered 200, and carried.
//!
//! A stream task holds one of its connection's stream permits (as many as the
//! advertised `SETTINGS_MAX_CONCURRENT_STREAMS`) for its whole life: h2 frees a
//! stream's slot when the peer resets it, the permit only when the task has ended, so
//! resets cannot start more tasks than the cap (a stream over it is refused with
//! `REFUSED_STREAM`). A reset stops the stream's delivery at once, and a connection
//! whose streams are mostly reset before their answer is closed with `GOAWAY
//! ENHANCE_YOUR_CALM`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    drain::DrainWatcher,
    mesh::{
        PeerIdentity,
        hbone::{
            H2Stream, Settings, keepalive,
            metrics::{Abuse, HboneMetrics, Side},
            server::{self, Reject},
        },
        peer_policy::PeerPolicy,
    },
    proxy::{
        ClientAddr, CloseReason, Direction, OrigDstAddr,
        addr::unmap,
        conn::{Conn, ConnError, Downstream, Inputs},
        gate::{Busy, Gate, Pass},
        inbound::deliver,
        listener,
    },
    tls::IdentityStore,
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
    /// The identity whose bundle verified each client: a bundle change ends the
    /// connections verified under the old one.
    pub store: Arc<IdentityStore>,
}

/// After a connection's trust ends (its peer's certificate expired, or the bundle
/// that verified it changed), its open streams get this long to finish after the
/// GOAWAY before the connection is closed.
const TRUST_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// An evicted connection carries nothing (only idle ones are evicted, and they take
/// no new stream): it is closed this long after its GOAWAY at the latest.
const EVICTED_CLOSE: std::time::Duration = std::time::Duration::from_secs(1);

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
    let Some(held) = enter_or_reset(gate, "open HBONE", &inputs, &tcp, client, &drain) else {
        return;
    };
    // Held until the client has proved who it is (or failed).
    let gate = &inputs.unauthenticated;
    let Some(pass) = enter_or_reset(gate, "unauthenticated", &inputs, &tcp, client, &drain) else {
        return;
    };
    let budget = inputs.handshake_timeout;
    // The bundle the handshake verifies against (read before it, so a change during
    // the handshake ends the connection too).
    let mut bundles = server.store.bundle_changes();
    let verified_under = *bundles.borrow_and_update();
    let handshake = server::handshake(&server.acceptor, tcp, &server.settings, budget);
    let handshaken = tokio::select! {
        handshaken = handshake => handshaken,
        // A client holding fewer connections needed this one's place.
        () = evicted(&pass, &held) => {
            let conn = Conn::start(inputs.clone(), Direction::Inbound, client, drain);
            conn.refused(None, &"closed in its handshake to admit a client holding fewer connections", CloseReason::Overflow);
            return;
        }
    };
    let (mut h2, peer, not_after) = match handshaken {
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
    let evicted = woken(held.evicted());
    let trust_ends = woken(trust_ends(not_after, bundles, verified_under));
    // Armed once trust has ended or the gate asked the connection to go: the time
    // left before it is closed, whatever it still carries.
    let cut = tokio::time::sleep(std::time::Duration::MAX / 4);
    tokio::pin!(keepalive, unused, drained, evicted, trust_ends, cut);
    let (mut distrusted, mut cut_armed) = (false, false);
    let book = Arc::new(StreamBook::new(server.settings.max_inbound_streams));
    let mut calmed = false;
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((request, mut respond))) => {
                    used.store(true, Relaxed);
                    let Some(busy) = held.busy() else {
                        // Asked to close (it was idle, and a client holding fewer
                        // connections needed its place): no more streams.
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let Some(permit) = book.admit() else {
                        server.metrics.abuse(Abuse::OverStreamCap);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    if !calmed && book.resets_dominate() {
                        calmed = true;
                        warn!(peer = %peer.id, resets = book.early_resets.load(Relaxed), "HBONE connection closed with GOAWAY ENHANCE_YOUR_CALM: most of its streams were reset before their answer");
                        server.metrics.abuse(Abuse::EnhanceYourCalm);
                        h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let peer = first.take().unwrap_or_else(|| PeerIdentity { id: peer.id.clone(), handshake: None });
                    let conn = Conn::start(inputs.clone(), Direction::Inbound, client, drain.clone());
                    let span = info_span!("stream", peer = %peer.id);
                    let guard = Open::new(server.metrics.clone(), open.clone(), busy);
                    let task = Stream { server: server.clone(), local, peer, guard, book: book.clone(), _permit: permit };
                    drain.spawn(task.serve(conn, request, respond).instrument(span));
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
            why = &mut trust_ends, if !distrusted => {
                // No new streams; the open ones get TRUST_DRAIN.
                info!(peer = %peer.id, why, "HBONE connection closing (GOAWAY): the peer is no longer trusted");
                distrusted = true;
                draining = true;
                h2.graceful_shutdown();
                if !cut_armed {
                    cut_armed = true;
                    cut.as_mut().reset(tokio::time::Instant::now() + TRUST_DRAIN);
                }
            }
            () = &mut cut, if cut_armed => {
                debug!(peer = %peer.id, "HBONE connection closed at the end of its drain");
                break;
            }
            () = &mut evicted, if !cut_armed => {
                // It was idle, takes no new stream (refused), and a client holding
                // fewer connections needs its place: GOAWAY, and closed soon after
                // even if the peer does not finish the shutdown.
                debug!("HBONE connection closed to admit a client holding fewer connections");
                draining = true;
                h2.graceful_shutdown();
                cut_armed = true;
                cut.as_mut().reset(tokio::time::Instant::now() + EVICTED_CLOSE);
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

/// Resolves, saying why, when a client verified under bundle `verified_under`
/// stops being trusted: at its certificate's `not_after` (seconds since the epoch),
/// or when the bundle changes.
async fn trust_ends(
    not_after: i64,
    mut bundles: tokio::sync::watch::Receiver<u64>,
    verified_under: u64,
) -> &'static str {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = std::time::Duration::from_secs(not_after.saturating_sub(now).max(0) as u64);
    let changed = async {
        let changed = bundles.wait_for(|h| *h != verified_under).await.is_ok();
        match changed {
            true => "the trust bundle changed",
            // The store is gone: the sidecar is stopping.
            false => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep(left) => "its certificate expired",
        why = changed => why,
    }
}

/// Resolves when either gate asks the connection to close.
async fn evicted(unauthenticated: &Pass, open: &Pass) {
    tokio::select! {
        () = unauthenticated.evicted() => {}
        () = open.evicted() => {}
    }
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
/// count (idle detection), as work of its connection's gate slot (not evictable),
/// and, once answered 200, in the stream metrics.
struct Open {
    metrics: Arc<HboneMetrics>,
    open: Arc<AtomicUsize>,
    answered: bool,
    _busy: Busy,
}

impl Open {
    fn new(metrics: Arc<HboneMetrics>, open: Arc<AtomicUsize>, busy: Busy) -> Self {
        open.fetch_add(1, Relaxed);
        Self {
            metrics,
            open,
            answered: false,
            _busy: busy,
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

/// Resets before the answer, past which (and past half of a connection's streams)
/// the connection is closed with `ENHANCE_YOUR_CALM`: a client that gives up on a
/// slow application now and then stays well below it.
const CALM_AFTER_RESETS: usize = 100;

/// One inbound connection's stream permits and what its peer did with its streams.
struct StreamBook {
    permits: Arc<Semaphore>,
    /// Streams admitted.
    streams: AtomicUsize,
    /// Streams the peer reset before they were answered.
    early_resets: AtomicUsize,
}

impl StreamBook {
    fn new(cap: u32) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cap as usize)),
            streams: AtomicUsize::new(0),
            early_resets: AtomicUsize::new(0),
        }
    }

    /// A permit for a new stream's task, if one is free.
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.streams.fetch_add(1, Relaxed);
        Some(permit)
    }

    fn resets_dominate(&self) -> bool {
        let resets = self.early_resets.load(Relaxed);
        resets >= CALM_AFTER_RESETS && resets * 2 > self.streams.load(Relaxed)
    }
}

/// One `CONNECT` stream's task and what it holds until it ends.
struct Stream {
    server: Arc<TunnelServer>,
    local: std::net::IpAddr,
    peer: PeerIdentity,
    guard: Open,
    book: Arc<StreamBook>,
    /// The connection's stream permit, released when the task ends.
    _permit: OwnedSemaphorePermit,
}

/// Resolves when the peer resets the stream.
async fn reset_by_peer(respond: &mut SendResponse<Bytes>) {
    let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
}

impl Stream {
    /// Checks, delivery (stopped if the peer resets the stream), the answer, then the
    /// copy.
    async fn serve(
        self,
        conn: Conn,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let Stream {
            server,
            local,
            peer,
            guard,
            book,
            _permit,
        } = self;
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
        let gone = |conn: Conn, what: &str| {
            book.early_resets.fetch_add(1, Relaxed);
            server.metrics.abuse(Abuse::ResetBeforeAnswer);
            let error = ConnError::ClientGone(std::io::Error::other(what.to_string()));
            conn.refused(Some(&peer), &error, CloseReason::Reset);
        };
        let delivered = tokio::select! {
            delivered = deliver(&conn, dst) => delivered,
            () = reset_by_peer(&mut respond) => {
                return gone(conn, "the peer reset the stream while it was delivered");
            }
        };
        let mut connected = match delivered {
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
        let send = match server::respond(&mut respond, StatusCode::OK) {
            Ok(send) => send,
            Err(_) => {
                // The client gave up (reset the stream) as we connected.
                connected.up.reset();
                return gone(conn, "the peer reset the stream before its answer");
            }
        };
        let guard: Box<dyn Send + Sync> = Box::new(guard.answered());
        let stream = H2Stream::new(send, request.into_body(), Some(guard));
        conn.carry(Downstream::Hbone(Box::new(stream), peer), Ok(connected))
            .await;
    }
}
