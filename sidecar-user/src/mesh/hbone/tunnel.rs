//! One pooled HBONE connection as the pool keeps it: who the server proved to be,
//! how many streams it carries, when it went idle, and when it must leave the pool.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use serde::Serialize;
use tokio::sync::Notify;

use super::metrics::{HboneMetrics, Side};
use crate::tls::SpiffeId;

/// What a pooled connection is shared by.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) struct Key {
    /// The peer's HBONE address.
    pub(super) dst: SocketAddr,
    /// Serial of our certificate.
    pub(super) local: String,
    /// Hash of the trust bundle that verified the peer: after a bundle change (a CA
    /// removed, say), new streams go over a new handshake under the new bundle.
    pub(super) bundle: u64,
}

/// The socket of a pooled connection, for `TCP_INFO` in `/connections` (its streams
/// have none of their own): a duplicate descriptor, closed when the connection's
/// task ends. Readers hold the lock, so a closed number is never read.
#[derive(Debug, Default)]
pub struct SharedSocket(Mutex<Option<OwnedFd>>);

impl SharedSocket {
    /// A handle on `socket` (none if the descriptor cannot be duplicated).
    pub fn of(socket: &impl AsFd) -> Self {
        Self(Mutex::new(socket.as_fd().try_clone_to_owned().ok()))
    }

    /// `f` of the socket while its connection is open.
    pub fn with_fd<T>(&self, f: impl FnOnce(RawFd) -> Option<T>) -> Option<T> {
        let fd = self.0.lock().unwrap_or_else(|p| p.into_inner());
        fd.as_ref().and_then(|fd| f(fd.as_raw_fd()))
    }

    /// The connection has ended: let the socket go.
    pub fn close(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// One pooled mTLS connection.
pub struct Tunnel {
    pub(super) id: u64,
    pub(super) key: Key,
    /// The server's proven identity.
    pub peer: SpiffeId,
    pub(super) opened: Instant,
    pub(super) handshake: Duration,
    /// Unix seconds at which our or the peer's certificate expires.
    pub(super) not_after: i64,
    /// Taken (and dropped) when the connection leaves the pool: with no handle left
    /// and no stream open, HTTP/2 closes the connection.
    pub(super) send: Mutex<Option<SendRequest<Bytes>>>,
    pub(super) streams: AtomicUsize,
    /// Streams it has carried.
    pub(super) carried: AtomicU64,
    /// Milliseconds after `opened` when the last stream closed.
    pub(super) idle_since: AtomicU64,
    /// Out of the pool: takes no new stream.
    pub(super) retired: AtomicBool,
    /// Wakes the idle watcher when the last stream closes.
    pub(super) idle: Notify,
    /// Its socket, for `/connections`.
    pub(super) socket: Arc<SharedSocket>,
}

/// A stream's claim on its tunnel, released when the stream is dropped.
pub(super) struct Slot {
    pub(super) tunnel: Arc<Tunnel>,
    pub(super) metrics: Arc<HboneMetrics>,
}

/// A tunnel as `GET /pool` shows it.
#[derive(Debug, Serialize)]
pub struct TunnelView {
    /// Process-unique id.
    pub id: u64,
    /// The peer's HBONE address.
    pub destination: SocketAddr,
    /// The identity the server proved.
    pub peer_identity: String,
    /// Serial of the certificate we presented.
    pub local_serial: String,
    /// Streams open on it now.
    pub streams: usize,
    /// Streams it has carried since it opened.
    pub streams_carried: u64,
    /// Seconds since it was opened.
    pub age_secs: u64,
    /// Seconds since its last stream closed (0 while streams are open).
    pub idle_secs: u64,
    /// Seconds until a certificate on it expires.
    pub expires_in_secs: i64,
    /// Out of the pool, finishing its streams.
    pub retired: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.stream_closed(Side::Client);
        if self.tunnel.streams.fetch_sub(1, Relaxed) == 1 {
            let ms = self.tunnel.opened.elapsed().as_millis() as u64;
            self.tunnel.idle_since.store(ms, Relaxed);
            self.tunnel.idle.notify_one();
        }
    }
}

pub(super) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Tunnel {
    pub(super) fn usable(&self, max_streams: usize) -> bool {
        !self.retired.load(Relaxed)
            && self.streams.load(Relaxed) < max_streams
            && now_unix() < self.not_after
    }

    /// Resolves when the tunnel should leave the pool: idle for `idle`, or a
    /// certificate on it expired.
    pub(super) async fn retire_when_done(&self, idle: Duration) {
        let expires = Instant::now()
            + Duration::from_secs(self.not_after.saturating_sub(now_unix()).max(0) as u64);
        loop {
            let notified = self.idle.notified();
            let deadline = if self.streams.load(Relaxed) == 0 {
                let since = Duration::from_millis(self.idle_since.load(Relaxed));
                (self.opened + since + idle).min(expires)
            } else {
                expires
            };
            let now = Instant::now();
            if now >= expires || (self.streams.load(Relaxed) == 0 && now >= deadline) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = notified => {}
            }
        }
    }
}

impl Tunnel {
    /// Its socket, shared by its streams (for `TCP_INFO`).
    pub fn socket(&self) -> &Arc<SharedSocket> {
        &self.socket
    }

    /// How long the handshake that opened it took.
    pub fn handshake(&self) -> Duration {
        self.handshake
    }
}
