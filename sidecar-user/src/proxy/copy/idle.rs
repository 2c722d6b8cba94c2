//! When a connection without bytes is closed: [`Timeouts`], and the timer that
//! follows the last byte moved.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::time::Instant;

/// How long a connection may go without bytes before it is closed.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// While both directions are open.
    pub idle: Duration,
    /// Once one direction has ended (never longer than `idle`).
    pub half_closed: Duration,
}

/// Resolves once `idle` has passed since the last recorded activity.
pub(super) async fn idle_expired(last_activity: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last = Duration::from_millis(last_activity.load(Relaxed));
        let deadline = start + last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
