//! Per-endpoint state shared by every connection: active connections, a peak-EWMA of
//! connect latency, passive outlier detection (ejection with a growing back-off) and
//! the active health-check verdict. All atomics: updated without locks on the data path.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::config::OutlierConfig;

/// Decay of the latency average (Linkerd's default for its peak-EWMA balancer).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed before the first sample.
const DEFAULT_LATENCY: Duration = Duration::from_millis(1);

/// Nanoseconds since the first call: a cheap monotonic clock for atomics.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// An endpoint of a service as the balancer sees it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Where it listens (as text, its metric label and consistent-hashing name).
    pub addr: SocketAddr,
    /// Relative share.
    pub weight: u32,
    /// Locality.
    pub zone: Option<Arc<str>>,
    /// Reach it over mTLS.
    pub mtls: bool,
    /// The identity it must present, when it has one of its own (a discovered pod's
    /// service account); otherwise the service's `server_identity` applies.
    pub identity: Option<Arc<crate::tls::IdentityMatcher>>,
    /// Shared live state (kept across reloads while the address stays).
    pub state: Arc<EndpointState>,
}

/// What every connection to one endpoint updates.
#[derive(Debug)]
pub struct EndpointState {
    active: AtomicUsize,
    ewma_ns: AtomicU64,
    ewma_at: AtomicU64,
    consecutive_failures: AtomicU32,
    ejected_until: AtomicU64,
    ejection_level: AtomicU32,
    ejections: AtomicU64,
    check_healthy: AtomicBool,
    check_streak: AtomicU32,
    attempts_ok: AtomicU64,
    attempts_failed: AtomicU64,
}

/// Holds one of the endpoint's active connections (or connects in progress).
#[derive(Debug)]
pub struct EndpointLease(Arc<EndpointState>);

/// A health snapshot, for metrics and `/services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Eligible.
    Healthy,
    /// Ejected by outlier detection until the back-off ends.
    Ejected,
    /// Failing active health checks.
    Unhealthy,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_LATENCY.as_nanos() as u64),
            ewma_at: AtomicU64::new(now_ns()),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejection_level: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            check_healthy: AtomicBool::new(true),
            check_streak: AtomicU32::new(0),
            attempts_ok: AtomicU64::new(0),
            attempts_failed: AtomicU64::new(0),
        }
    }
}

// === impl EndpointState ===

impl EndpointState {
    /// Counts a connection (attempt) until the lease drops.
    pub fn lease(self: &Arc<Self>) -> EndpointLease {
        self.active.fetch_add(1, Relaxed);
        EndpointLease(self.clone())
    }

    /// Connections (and connects in progress) now.
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// The latency average, in seconds.
    pub fn latency(&self) -> f64 {
        self.ewma_ns.load(Relaxed) as f64 / 1e9
    }

    /// The least-request load: (active + 1) × latency average.
    pub fn load(&self) -> f64 {
        (self.active() + 1) as f64 * self.latency()
    }

    /// Health at `now` (from [`now_ns`]).
    pub fn health(&self, now: u64) -> Health {
        if self.ejected_until.load(Relaxed) > now {
            Health::Ejected
        } else if !self.check_healthy.load(Relaxed) {
            Health::Unhealthy
        } else {
            Health::Healthy
        }
    }

    /// Has carried a connection (or tried to), or is out of rotation: from then on
    /// its series are reported even for a discovered service.
    pub fn used(&self, now: u64) -> bool {
        let (ok, failed) = self.attempts();
        ok + failed > 0 || self.active() > 0 || self.health(now) != Health::Healthy
    }

    /// Times outlier detection ejected it.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    /// Connect attempts that succeeded and failed.
    pub fn attempts(&self) -> (u64, u64) {
        (
            self.attempts_ok.load(Relaxed),
            self.attempts_failed.load(Relaxed),
        )
    }

    /// A connect succeeded after `latency`: resets the failure streak and the
    /// back-off, and feeds the peak-EWMA (a slower sample is taken at once, faster
    /// ones decay in over [`EWMA_DECAY`]).
    pub fn connected(&self, latency: Duration) {
        self.attempts_ok.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.ejection_level.store(0, Relaxed);
        let now = now_ns();
        let sample = latency.as_nanos() as u64;
        let prev = self.ewma_ns.load(Relaxed);
        let elapsed = now.saturating_sub(self.ewma_at.swap(now, Relaxed));
        let next = if sample > prev {
            sample
        } else {
            let w = (-(elapsed as f64) / EWMA_DECAY.as_nanos() as f64).exp();
            (prev as f64 * w + sample as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next.max(1), Relaxed);
    }

    /// A connect failed. Returns the ejection when this failure crossed the
    /// threshold: the back-off doubles with each ejection in a row (capped), and an
    /// endpoint that fails again right after its back-off is ejected again at once.
    pub fn failed(&self, outlier: &OutlierConfig) -> Option<Duration> {
        self.attempts_failed.fetch_add(1, Relaxed);
        let streak = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let now = now_ns();
        if streak < outlier.consecutive_failures || self.ejected_until.load(Relaxed) > now {
            return None;
        }
        let level = self.ejection_level.fetch_add(1, Relaxed).min(16);
        let backoff = outlier
            .base_ejection
            .saturating_mul(1u32 << level)
            .min(outlier.max_ejection);
        self.ejected_until
            .store(now + backoff.as_nanos() as u64, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        Some(backoff)
    }

    /// Records an active health check; returns the new verdict when it changed.
    pub fn checked(&self, passed: bool, unhealthy_after: u32, healthy_after: u32) -> Option<bool> {
        let healthy = self.check_healthy.load(Relaxed);
        if passed == healthy {
            self.check_streak.store(0, Relaxed);
            return None;
        }
        let streak = self.check_streak.fetch_add(1, Relaxed) + 1;
        let needed = if healthy {
            unhealthy_after
        } else {
            healthy_after
        };
        if streak < needed {
            return None;
        }
        self.check_streak.store(0, Relaxed);
        self.check_healthy.store(passed, Relaxed);
        if passed {
            // A passing check also ends an ejection: the endpoint is back.
            self.ejected_until.store(0, Relaxed);
            self.consecutive_failures.store(0, Relaxed);
        }
        Some(passed)
    }
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: n,
            base_ejection: Duration::from_millis(40),
            max_ejection: Duration::from_millis(100),
        }
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff() {
        let s = EndpointState::default();
        let o = outlier(3);
        assert_eq!(s.failed(&o), None);
        assert_eq!(s.failed(&o), None);
        assert_eq!(s.failed(&o), Some(Duration::from_millis(40)));
        assert_eq!(s.health(now_ns()), Health::Ejected);
        // While ejected, further failures do not extend it.
        assert_eq!(s.failed(&o), None);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.health(now_ns()), Health::Healthy);
        // Failing right after the back-off: ejected again, for twice as long.
        assert_eq!(s.failed(&o), Some(Duration::from_millis(80)));
        std::thread::sleep(Duration::from_millis(90));
        assert_eq!(s.failed(&o), Some(Duration::from_millis(100)), "capped");
        assert_eq!(s.ejections(), 3);
        // A success resets the streak and the back-off.
        std::thread::sleep(Duration::from_millis(110));
        s.connected(Duration::from_micros(100));
        assert_eq!(s.failed(&o), None);
        assert_eq!(s.attempts(), (1, 7));
    }

    #[test]
    fn a_failure_between_successes_does_not_eject() {
        let s = EndpointState::default();
        let o = outlier(2);
        for _ in 0..10 {
            assert_eq!(s.failed(&o), None);
            s.connected(Duration::from_micros(100));
        }
        assert_eq!(s.ejections(), 0);
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointState::default();
        s.connected(Duration::from_millis(50));
        assert!((s.latency() - 0.050).abs() < 1e-6);
        // A fast sample right after barely moves it (the peak holds).
        s.connected(Duration::from_micros(10));
        assert!(s.latency() > 0.045, "{}", s.latency());
        let lease = Arc::new(EndpointState::default());
        let held = lease.lease();
        assert_eq!(lease.active(), 1);
        assert!((lease.load() - 2.0 * 0.001).abs() < 1e-9);
        drop(held);
        assert_eq!(lease.active(), 0);
    }

    #[test]
    fn health_checks_need_a_streak_to_flip() {
        let s = EndpointState::default();
        assert_eq!(s.checked(false, 2, 1), None);
        assert_eq!(s.checked(false, 2, 1), Some(false));
        assert_eq!(s.health(now_ns()), Health::Unhealthy);
        assert_eq!(s.checked(true, 2, 1), Some(true));
        assert_eq!(s.health(now_ns()), Health::Healthy);
    }
}
