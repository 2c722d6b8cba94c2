//! Endpoint choice. A [`Picker`] is built once per endpoint set (on reload or a DNS
//! change) and then only read: choosing takes no lock. It works on endpoint indices;
//! the caller says which are eligible (healthy, not yet tried) and, for
//! `least_request`, what each one's load is.

mod least_request;
mod maglev;
mod random;
mod ring_hash;
mod round_robin;

use crate::config::LbPolicy;

pub use maglev::MAGLEV_TABLE_SIZE;

/// What a picker needs to know about the endpoints at choice time.
pub trait Candidates {
    /// Whether endpoint `i` may be chosen now.
    fn eligible(&self, i: usize) -> bool;
    /// Load of endpoint `i` (lower is better); only `least_request` asks.
    fn load(&self, i: usize) -> f64;
}

/// A policy's precomputed state for one endpoint set.
#[derive(Debug)]
pub enum Picker {
    /// Weighted round robin.
    RoundRobin(round_robin::RoundRobin),
    /// Weighted random.
    Random(random::WeightedRandom),
    /// Power of two (weighted) random choices, the less loaded wins.
    LeastRequest(random::WeightedRandom),
    /// Ketama ring.
    RingHash(ring_hash::Ring),
    /// Maglev lookup table.
    Maglev(maglev::Table),
}

/// An endpoint as the pickers see it: a stable name (its address) and a weight.
#[derive(Clone, Debug)]
pub struct Weighted<'a> {
    /// Stable across sidecars and reloads, so consistent hashing agrees.
    pub name: &'a str,
    /// Relative share (≥ 1).
    pub weight: u32,
}

// === impl Picker ===

impl Picker {
    /// Precomputes `policy` over `endpoints` (in index order).
    pub fn new(policy: LbPolicy, endpoints: &[Weighted<'_>]) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight.max(1)).collect();
        match policy {
            LbPolicy::RoundRobin => Picker::RoundRobin(round_robin::RoundRobin::new(&weights)),
            LbPolicy::Random => Picker::Random(random::WeightedRandom::new(&weights)),
            LbPolicy::LeastRequest => Picker::LeastRequest(random::WeightedRandom::new(&weights)),
            LbPolicy::RingHash => Picker::RingHash(ring_hash::Ring::new(endpoints)),
            LbPolicy::Maglev => Picker::Maglev(maglev::Table::new(endpoints)),
        }
    }

    /// Chooses an eligible endpoint; `key` is the connection's hash key (only the
    /// consistent-hashing policies use it). `None` when nothing is eligible.
    pub fn pick(&self, key: u64, candidates: &impl Candidates) -> Option<usize> {
        match self {
            Picker::RoundRobin(rr) => rr.pick(candidates),
            Picker::Random(r) => r.pick(candidates),
            Picker::LeastRequest(r) => least_request::pick(r, candidates),
            Picker::RingHash(ring) => ring.pick(key, candidates),
            Picker::Maglev(table) => table.pick(key, candidates),
        }
    }
}

/// The 64-bit hash every policy uses (xxHash64, as Envoy does).
pub fn hash(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, seed)
}

/// Falls back to the first eligible index at or after `start`, wrapping.
fn scan(start: usize, len: usize, candidates: &impl Candidates) -> Option<usize> {
    (0..len)
        .map(|k| (start + k) % len)
        .find(|&i| candidates.eligible(i))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Candidate sets for the policy tests.
    use super::Candidates;

    /// Every endpoint eligible except `excluded`; loads as given (or 0).
    pub struct Set {
        pub len: usize,
        pub excluded: Vec<usize>,
        pub loads: Vec<f64>,
    }

    impl Set {
        pub fn all(len: usize) -> Self {
            Self {
                len,
                excluded: Vec::new(),
                loads: vec![0.0; len],
            }
        }
    }

    impl Candidates for Set {
        fn eligible(&self, i: usize) -> bool {
            i < self.len && !self.excluded.contains(&i)
        }
        fn load(&self, i: usize) -> f64 {
            self.loads.get(i).copied().unwrap_or(0.0)
        }
    }

    /// Shares of `picks` over `len` endpoints.
    pub fn shares(picks: impl Iterator<Item = usize>, len: usize) -> Vec<f64> {
        let mut counts = vec![0usize; len];
        let mut total = 0;
        for i in picks {
            counts[i] += 1;
            total += 1;
        }
        counts.iter().map(|&c| c as f64 / total as f64).collect()
    }

    pub fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }
}
