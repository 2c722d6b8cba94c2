//! Proxy-wide counters, shown by the admin `/stats` endpoint. Plain atomics: the
//! accept and copy paths only ever add.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Counters of the outbound proxy since start.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted on the outbound listeners.
    pub accepted: AtomicU64,
    /// Connections whose original destination was found.
    pub orig_dst_found: AtomicU64,
    /// Connections with no recorded original destination (refused).
    pub orig_dst_missing: AtomicU64,
    /// Connections refused because the destination was the proxy itself.
    pub loop_refused: AtomicU64,
    /// Upstream connects that failed (refused, unreachable, ...).
    pub connect_failed: AtomicU64,
    /// Upstream connects that ran out of time.
    pub connect_timeout: AtomicU64,
    /// Connections that reached their destination.
    pub upstream_connected: AtomicU64,
    /// Connections finished, whatever the outcome.
    pub closed: AtomicU64,
    /// Connections closed for inactivity.
    pub idle_closed: AtomicU64,
    /// Connections ended by a reset or I/O error on either side.
    pub io_errors: AtomicU64,
    /// Connections closed by drain after the grace period.
    pub drain_closed: AtomicU64,
    /// Bytes from applications to destinations.
    pub bytes_sent: AtomicU64,
    /// Bytes from destinations back to applications.
    pub bytes_received: AtomicU64,
}

/// A point-in-time copy of [`ProxyStats`], for JSON.
#[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ProxyStatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub orig_dst_found: u64,
    pub orig_dst_missing: u64,
    pub loop_refused: u64,
    pub connect_failed: u64,
    pub connect_timeout: u64,
    pub upstream_connected: u64,
    pub closed: u64,
    pub idle_closed: u64,
    pub io_errors: u64,
    pub drain_closed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

// === impl ProxyStats ===

impl ProxyStats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        let accepted = self.accepted.load(Relaxed);
        let closed = self.closed.load(Relaxed);
        ProxyStatsSnapshot {
            accepted,
            active: accepted.saturating_sub(closed),
            orig_dst_found: self.orig_dst_found.load(Relaxed),
            orig_dst_missing: self.orig_dst_missing.load(Relaxed),
            loop_refused: self.loop_refused.load(Relaxed),
            connect_failed: self.connect_failed.load(Relaxed),
            connect_timeout: self.connect_timeout.load(Relaxed),
            upstream_connected: self.upstream_connected.load(Relaxed),
            closed,
            idle_closed: self.idle_closed.load(Relaxed),
            io_errors: self.io_errors.load(Relaxed),
            drain_closed: self.drain_closed.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }
}
