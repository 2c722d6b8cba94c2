//! Ketama-style consistent hashing: each endpoint owns points on a 64-bit ring
//! (xxHash64 of `address_i`), as many as its weight × [`POINTS_PER_WEIGHT`]; a key goes
//! to the first point at or after its hash. An endpoint's points depend only on its
//! own name and weight, so removing one moves exactly the keys it owned.

use super::{Candidates, Weighted, hash, scan};

/// Points per unit of weight (Envoy's default minimum ring is 1024 for a few hosts).
const POINTS_PER_WEIGHT: u64 = 160;
/// Largest ring; bigger weight sums get fewer points per weight.
const MAX_POINTS: u64 = 1 << 20;

/// Sorted points.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, u32)>,
    len: usize,
}

impl Ring {
    /// The ring of `endpoints`.
    pub fn new(endpoints: &[Weighted<'_>]) -> Self {
        let total: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
        let per_weight = POINTS_PER_WEIGHT.min((MAX_POINTS / total.max(1)).max(1));
        let mut points = Vec::with_capacity((total * per_weight) as usize);
        for (i, e) in endpoints.iter().enumerate() {
            let n = u64::from(e.weight.max(1)) * per_weight;
            let mut label = String::with_capacity(e.name.len() + 8);
            for k in 0..n {
                label.clear();
                label.push_str(e.name);
                label.push('_');
                label.push_str(&k.to_string());
                points.push((hash(label.as_bytes(), 0), i as u32));
            }
        }
        points.sort_unstable();
        Self {
            points,
            len: endpoints.len(),
        }
    }

    /// The owner of `key`, or the next eligible endpoint clockwise.
    pub fn pick(&self, key: u64, candidates: &impl Candidates) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(h, _)| h < key);
        // Walk a bounded stretch of the ring; past it every endpoint was seen (or
        // ineligible), so scan.
        for k in 0..self.points.len().min(4096) {
            let (_, i) = self.points[(start + k) % self.points.len()];
            if candidates.eligible(i as usize) {
                return Some(i as usize);
            }
        }
        scan(0, self.len, candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::lb::testing::{Set, names, shares};

    fn ring(names: &[String], weights: &[u32]) -> Ring {
        let endpoints: Vec<Weighted<'_>> = names
            .iter()
            .zip(weights)
            .map(|(n, &w)| Weighted { name: n, weight: w })
            .collect();
        Ring::new(&endpoints)
    }

    fn key(i: u64) -> u64 {
        hash(format!("198.18.{}.{}", i / 250, i % 250).as_bytes(), 0)
    }

    #[test]
    fn keys_stick_and_removing_one_moves_only_its_keys() {
        let n = names(4);
        let all = ring(&n, &[1; 4]);
        let set = Set::all(4);
        let before: Vec<usize> = (0..5000)
            .map(|k| all.pick(key(k), &set).expect("pick"))
            .collect();
        // The same key always lands on the same endpoint.
        for k in 0..5000 {
            assert_eq!(all.pick(key(k), &set), Some(before[k as usize]));
        }
        // Remove endpoint 2: a ring of the other three (indices shift).
        let rest = vec![n[0].clone(), n[1].clone(), n[3].clone()];
        let three = ring(&rest, &[1; 3]);
        let set3 = Set::all(3);
        let mut moved = 0;
        for k in 0..5000u64 {
            let now = &rest[three.pick(key(k), &set3).expect("pick")];
            let was = &n[before[k as usize]];
            if was != &n[2] {
                assert_eq!(now, was, "key {k} moved though its endpoint stayed");
            } else {
                moved += 1;
            }
        }
        // The removed endpoint owned about a quarter of the keys.
        assert!((900..1600).contains(&moved), "{moved}");
    }

    #[test]
    fn shares_follow_weights() {
        let n = names(3);
        let r = ring(&n, &[1, 2, 3]);
        let set = Set::all(3);
        let s = shares((0..30_000).map(|k| r.pick(key(k), &set).expect("pick")), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.04, "{s:?}");
        }
    }

    #[test]
    fn an_ineligible_owner_sends_its_keys_to_the_next_point_only() {
        let n = names(4);
        let r = ring(&n, &[1; 4]);
        let all = Set::all(4);
        let without = Set {
            excluded: vec![1],
            ..Set::all(4)
        };
        for k in 0..3000 {
            let owner = r.pick(key(k), &all).expect("pick");
            let now = r.pick(key(k), &without).expect("pick");
            if owner != 1 {
                assert_eq!(owner, now);
            } else {
                assert_ne!(now, 1);
            }
        }
    }
}
