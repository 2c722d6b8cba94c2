//! The data path's vocabulary (which way a connection goes, whether it carried TLS,
//! why it ended) and the label sets of its metrics. Values are lower-case words, as
//! Prometheus users expect.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// Service label of connections to destinations that are not services.
pub const PASSTHROUGH: &str = "passthrough";
/// Peer identity label without mTLS.
pub const NO_IDENTITY: &str = "none";

/// Which way a connection goes through the pod.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Into the pod, to its application.
    Inbound,
    /// Out of the pod's application.
    Outbound,
}

/// Whether the connection carried TLS between sidecars.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Tls {
    /// mTLS.
    Yes,
    /// Plaintext.
    No,
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed cleanly.
    Normal,
    /// A reset or I/O error on either side.
    Reset,
    /// A peer stopped answering (keepalive probes or sent data unacknowledged for
    /// `proxy.user_timeout`): the node or link is gone.
    PeerLost,
    /// Connecting upstream took longer than `connect_timeout`.
    Timeout,
    /// No bytes either way for `idle_timeout`.
    Idle,
    /// One side had closed, then no bytes for `half_close_timeout`.
    HalfClosedIdle,
    /// The destination refused or was unreachable.
    Refused,
    /// The kernel recorded no original destination.
    NoDestination,
    /// The destination was the proxy itself.
    Loop,
    /// Authorization refused the peer, or `registry_only` the destination.
    PolicyDenied,
    /// A service's circuit breaker (connection or pending limit) was open.
    Overflow,
    /// The TLS handshake failed.
    HandshakeFailed,
    /// The peer's identity is not one the destination may be served by (outbound).
    IdentityMismatch,
    /// Closed by drain after the grace period.
    Drained,
    /// The connection task ended without a recorded reason (cancelled).
    Aborted,
}

impl Direction {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl Tls {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tls::Yes => "true",
            Tls::No => "false",
        }
    }
}

impl CloseReason {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::Reset => "reset",
            CloseReason::PeerLost => "peer_lost",
            CloseReason::Timeout => "timeout",
            CloseReason::Idle => "idle",
            CloseReason::HalfClosedIdle => "half_closed_idle",
            CloseReason::Refused => "refused",
            CloseReason::Overflow => "overflow",
            CloseReason::NoDestination => "no_destination",
            CloseReason::Loop => "loop",
            CloseReason::PolicyDenied => "policy_denied",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::IdentityMismatch => "identity_mismatch",
            CloseReason::Drained => "drained",
            CloseReason::Aborted => "aborted",
        }
    }
}

macro_rules! label_value {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(Direction, Tls, CloseReason);

/// Labels of connection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// inbound / outbound.
    pub direction: Direction,
    /// Service name, or `passthrough` for destinations that are not services.
    pub service: String,
    /// Peer SPIFFE ID, `none` without mTLS (bounded, see `LabelLimiter`).
    pub peer_identity: String,
    /// Whether mTLS was used.
    pub tls: Tls,
}

/// Labels of per-service gauges and histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// inbound / outbound.
    pub direction: Direction,
    /// Service name or `passthrough`.
    pub service: String,
}

/// Labels of the close counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// inbound / outbound.
    pub direction: Direction,
    /// Service name or `passthrough`.
    pub service: String,
    /// Peer SPIFFE ID or `none`.
    pub peer_identity: String,
    /// Whether mTLS was used.
    pub tls: Tls,
    /// Why it closed.
    pub reason: CloseReason,
}

impl CloseLabels {
    /// `conn`'s labels plus `reason`.
    pub fn new(conn: &ConnLabels, reason: CloseReason) -> Self {
        Self {
            direction: conn.direction,
            service: conn.service.clone(),
            peer_identity: conn.peer_identity.clone(),
            tls: conn.tls,
            reason,
        }
    }
}

/// Labels of the original-destination lookup counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// found / missing.
    pub result: &'static str,
}
