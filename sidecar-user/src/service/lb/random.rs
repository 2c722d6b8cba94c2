//! Weighted random choice: a uniform draw over the cumulative weights.

use super::{Candidates, scan};

/// Draws before falling back to a scan when the draws keep hitting ineligible ones.
const DRAWS: usize = 8;

/// Cumulative weights.
#[derive(Debug)]
pub struct WeightedRandom {
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    /// Over `weights`, in index order.
    pub fn new(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Self { cumulative }
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// One weighted draw, eligible or not.
    pub fn draw(&self) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let r = fastrand::u64(..total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }

    /// A weighted draw among the eligible endpoints.
    pub fn pick(&self, candidates: &impl Candidates) -> Option<usize> {
        for _ in 0..DRAWS {
            let i = self.draw()?;
            if candidates.eligible(i) {
                return Some(i);
            }
        }
        // Mostly ineligible: one weighted draw over the eligible ones only.
        let mut prev = 0;
        let weights: Vec<(usize, u64)> = self
            .cumulative
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let w = c - prev;
                prev = c;
                (i, w)
            })
            .filter(|&(i, _)| candidates.eligible(i))
            .collect();
        let total: u64 = weights.iter().map(|&(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        for (i, w) in weights {
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        scan(0, self.len(), candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::lb::testing::{Set, shares};

    #[test]
    fn draws_follow_the_weights() {
        fastrand::seed(7);
        let r = WeightedRandom::new(&[1, 2, 3]);
        let set = Set::all(3);
        let s = shares((0..60_000).filter_map(|_| r.pick(&set)), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn ineligible_endpoints_are_never_drawn() {
        fastrand::seed(8);
        let r = WeightedRandom::new(&[1, 100, 1]);
        let set = Set {
            excluded: vec![1],
            ..Set::all(3)
        };
        let s = shares((0..10_000).filter_map(|_| r.pick(&set)), 3);
        assert_eq!(s[1], 0.0, "{s:?}");
        assert!((s[0] - 0.5).abs() < 0.03, "{s:?}");
    }
}
