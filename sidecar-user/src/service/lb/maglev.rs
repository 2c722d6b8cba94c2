//! Maglev consistent hashing (Google's paper, as Envoy implements it): a lookup table
//! of prime size filled by each endpoint's permutation, taking turns in proportion to
//! weight. Lookups are one index; when the set changes few keys move (a little more
//! than the removed endpoint's share).

use super::{Candidates, Weighted, hash, scan};

/// Envoy's default table size (a prime).
pub const MAGLEV_TABLE_SIZE: usize = 65537;
const SEED_OFFSET: u64 = 0;
const SEED_SKIP: u64 = 1;
/// Rehashes tried when the owner is ineligible, before a scan.
const PROBES: u64 = 32;

/// The lookup table (endpoint index per slot).
#[derive(Debug)]
pub struct Table {
    slots: Vec<u32>,
    len: usize,
}

impl Table {
    /// The table of `endpoints`.
    pub fn new(endpoints: &[Weighted<'_>]) -> Self {
        Self::with_size(endpoints, MAGLEV_TABLE_SIZE)
    }

    fn with_size(endpoints: &[Weighted<'_>], m: usize) -> Self {
        if endpoints.is_empty() {
            return Self {
                slots: Vec::new(),
                len: 0,
            };
        }
        let m64 = m as u64;
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let offset = hash(e.name.as_bytes(), SEED_OFFSET) % m64;
                let skip = hash(e.name.as_bytes(), SEED_SKIP) % (m64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = endpoints.iter().map(|e| e.weight.max(1)).max().unwrap_or(1);
        let norm: Vec<f64> = endpoints
            .iter()
            .map(|e| f64::from(e.weight.max(1)) / f64::from(max_weight))
            .collect();
        let mut next = vec![0u64; endpoints.len()];
        let mut credit = vec![0f64; endpoints.len()];
        let mut slots = vec![u32::MAX; m];
        let mut filled = 0;
        // Each round every endpoint earns its normalised weight; a whole unit buys
        // the next free slot of its permutation.
        'fill: loop {
            for i in 0..endpoints.len() {
                credit[i] += norm[i];
                if credit[i] < 1.0 {
                    continue;
                }
                credit[i] -= 1.0;
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m64) as usize;
                    next[i] += 1;
                    if slots[slot] == u32::MAX {
                        slots[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self {
            slots,
            len: endpoints.len(),
        }
    }

    /// The slot owner for `key`; if ineligible, the owners of rehashed keys.
    pub fn pick(&self, key: u64, candidates: &impl Candidates) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let m = self.slots.len() as u64;
        let mut k = key;
        for probe in 0..PROBES {
            let i = self.slots[(k % m) as usize] as usize;
            if candidates.eligible(i) {
                return Some(i);
            }
            k = hash(&key.to_le_bytes(), probe + 1);
        }
        scan(0, self.len, candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::lb::testing::{Set, names, shares};

    fn table(names: &[String], weights: &[u32]) -> Table {
        let endpoints: Vec<Weighted<'_>> = names
            .iter()
            .zip(weights)
            .map(|(n, &w)| Weighted { name: n, weight: w })
            .collect();
        Table::new(&endpoints)
    }

    fn key(i: u64) -> u64 {
        hash(
            format!("198.18.{}.{}:{}", i / 250, i % 250, 40000 + i).as_bytes(),
            0,
        )
    }

    #[test]
    fn keys_stick_and_removal_moves_few_others() {
        let n = names(4);
        let all = table(&n, &[1; 4]);
        let set = Set::all(4);
        let before: Vec<usize> = (0..10_000)
            .map(|k| all.pick(key(k), &set).expect("pick"))
            .collect();
        for k in 0..10_000 {
            assert_eq!(all.pick(key(k), &set), Some(before[k as usize]));
        }
        let rest = vec![n[0].clone(), n[1].clone(), n[3].clone()];
        let three = table(&rest, &[1; 3]);
        let set3 = Set::all(3);
        let (mut removed, mut other_moved) = (0, 0);
        for k in 0..10_000u64 {
            let now = &rest[three.pick(key(k), &set3).expect("pick")];
            let was = &n[before[k as usize]];
            if was == &n[2] {
                removed += 1;
            } else if now != was {
                other_moved += 1;
            }
        }
        assert!((2000..3000).contains(&removed), "{removed}");
        // Maglev's promise: beyond the removed endpoint's keys, only a few percent move.
        assert!(
            other_moved < 10_000 * 4 / 100,
            "{other_moved} other keys moved"
        );
    }

    #[test]
    fn slots_follow_weights() {
        let n = names(3);
        let t = table(&n, &[1, 2, 3]);
        let s = shares(t.slots.iter().map(|&i| i as usize), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
        let set = Set::all(3);
        let s = shares((0..30_000).map(|k| t.pick(key(k), &set).expect("pick")), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.02, "{s:?}");
        }
    }

    #[test]
    fn ineligible_owner_moves_only_its_keys() {
        let n = names(4);
        let t = table(&n, &[1; 4]);
        let all = Set::all(4);
        let without = Set {
            excluded: vec![3],
            ..Set::all(4)
        };
        for k in 0..3000 {
            let owner = t.pick(key(k), &all).expect("pick");
            let now = t.pick(key(k), &without).expect("pick");
            if owner == 3 {
                assert_ne!(now, 3);
            } else {
                assert_eq!(owner, now);
            }
        }
        assert_eq!(
            t.pick(
                1,
                &Set {
                    excluded: vec![0, 1, 2, 3],
                    ..Set::all(4)
                }
            ),
            None
        );
    }
}
