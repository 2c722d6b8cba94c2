//! Logging setup: human-readable by default, JSON lines on request.

use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Plain,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber writing to stderr. `RUST_LOG` overrides the level
/// (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A budget of log lines per key (a refusal's reason): at most `per_window` lines
/// for each key in each `window`; the lines past it are not written but counted,
/// and the count is reported with the key's next line. Anyone who can reach a port
/// can cause a refusal, so refusals must not be able to flood the log (their metrics
/// still count every one). Keys are `'static` labels, so the table is bounded by
/// the set of labels.
pub struct LogBudget {
    window: std::time::Duration,
    per_window: u32,
    keys: std::sync::Mutex<Vec<(&'static str, Window)>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: std::time::Instant,
    written: u32,
    suppressed: u64,
}

impl LogBudget {
    /// `per_window` lines per key per `window`.
    pub const fn new(window: std::time::Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            keys: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Whether a line for `key` may be written now: `Some(n)` with the lines of
    /// `key` suppressed since its last written one, or `None` (counted).
    pub fn admit(&self, key: &'static str) -> Option<u64> {
        self.admit_at(key, std::time::Instant::now())
    }

    fn admit_at(&self, key: &'static str, now: std::time::Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let at = match keys.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let fresh = Window {
                    started: now,
                    written: 0,
                    suppressed: 0,
                };
                keys.push((key, fresh));
                keys.len() - 1
            }
        };
        let w = &mut keys[at].1;
        if now.duration_since(w.started) >= self.window {
            w.started = now;
            w.written = 0;
        }
        if w.written >= self.per_window {
            w.suppressed += 1;
            return None;
        }
        w.written += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LogBudget;

    #[test]
    fn lines_past_the_budget_are_counted_and_reported_with_the_next_window() {
        let budget = LogBudget::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..10).map(|_| budget.admit_at("reset", t0)).collect();
        assert_eq!(&admitted[..3], &[Some(0); 3]);
        assert!(admitted[3..].iter().all(Option::is_none), "{admitted:?}");
        // Another key has a budget of its own.
        assert_eq!(budget.admit_at("timeout", t0), Some(0));
        // Still inside the window: suppressed.
        assert_eq!(budget.admit_at("reset", t0 + Duration::from_secs(9)), None);
        // The next window's first line carries the count of what was left out.
        assert_eq!(
            budget.admit_at("reset", t0 + Duration::from_secs(10)),
            Some(8)
        );
        assert_eq!(
            budget.admit_at("reset", t0 + Duration::from_secs(10)),
            Some(0)
        );
    }
}
