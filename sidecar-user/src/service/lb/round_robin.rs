//! Weighted round robin: a schedule interleaving endpoints by weight (nginx's smooth
//! weighted round robin), walked by one atomic counter, so `1:2:3` gives exact
//! shares over every 6 connections and no endpoint gets a burst.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, scan};

/// Longest schedule; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

/// The schedule and the position in it.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    next: AtomicUsize,
    len: usize,
}

impl RoundRobin {
    /// A schedule for `weights`, starting at a random place so that many sidecars do
    /// not all begin with the same endpoint.
    pub fn new(weights: &[u32]) -> Self {
        let schedule = smooth_schedule(&scale(weights));
        let start = if schedule.is_empty() {
            0
        } else {
            fastrand::usize(..schedule.len())
        };
        Self {
            schedule,
            next: AtomicUsize::new(start),
            len: weights.len(),
        }
    }

    /// The next eligible endpoint in the schedule.
    pub fn pick(&self, candidates: &impl Candidates) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        for _ in 0..self.schedule.len() {
            let at = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
            let i = self.schedule[at] as usize;
            if candidates.eligible(i) {
                return Some(i);
            }
        }
        scan(0, self.len, candidates)
    }
}

/// Divides weights by their gcd, and scales them down when the sum is too long a
/// schedule (every weight stays ≥ 1).
fn scale(weights: &[u32]) -> Vec<u64> {
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let mut scaled: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
    let sum: u64 = scaled.iter().sum();
    if sum > MAX_SCHEDULE {
        scaled = scaled
            .iter()
            .map(|&w| (w * MAX_SCHEDULE / sum).max(1))
            .collect();
    }
    scaled
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// nginx's smooth weighted round robin, unrolled for one full cycle.
fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::lb::testing::{Set, shares};

    #[test]
    fn equal_weights_take_exact_turns() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let set = Set::all(3);
        let picks: Vec<usize> = (0..3000).filter_map(|_| rr.pick(&set)).collect();
        assert_eq!(shares(picks.iter().copied(), 3), vec![1.0 / 3.0; 3]);
        // Never the same endpoint twice in a row.
        assert!(picks.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn weights_give_exact_shares_without_bursts() {
        let rr = RoundRobin::new(&[1, 2, 3]);
        let set = Set::all(3);
        let s = shares((0..6000).filter_map(|_| rr.pick(&set)), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 1e-9, "{s:?}");
        }
        // Smooth: the heaviest endpoint never gets more than 2 in a row at 1:2:3.
        let picks: Vec<usize> = (0..60).filter_map(|_| rr.pick(&set)).collect();
        assert!(
            picks.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
            "{picks:?}"
        );
    }

    #[test]
    fn ineligible_endpoints_are_skipped() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let set = Set {
            excluded: vec![1],
            ..Set::all(3)
        };
        let s = shares((0..1000).filter_map(|_| rr.pick(&set)), 3);
        assert_eq!(s[1], 0.0);
        assert!(
            (s[0] - 0.5).abs() < 0.01 && (s[2] - 0.5).abs() < 0.01,
            "{s:?}"
        );
        let none = Set {
            excluded: vec![0, 1, 2],
            ..Set::all(3)
        };
        assert_eq!(rr.pick(&none), None);
    }

    #[test]
    fn huge_weights_are_scaled_to_a_bounded_schedule() {
        let rr = RoundRobin::new(&[10_000, 10_000, 5_000, 1]);
        assert!(rr.schedule.len() <= MAX_SCHEDULE as usize + 4);
        let set = Set::all(4);
        let s = shares((0..40_000).filter_map(|_| rr.pick(&set)), 4);
        assert!(
            (s[0] - 0.4).abs() < 0.01 && (s[2] - 0.2).abs() < 0.01,
            "{s:?}"
        );
        assert!(s[3] > 0.0);
    }
}
