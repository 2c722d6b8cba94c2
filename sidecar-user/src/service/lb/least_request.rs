//! Power of two choices (Linkerd's and Envoy's `least_request`): two distinct weighted
//! random candidates; the second wins only when it is clearly less loaded (by more
//! than [`MARGIN`]), so with equal loads the first draw decides and the shares follow
//! the weights, while a loaded or slow endpoint loses most contests. The load is the
//! caller's: active connections × a moving average of connect latency.

/// How much less loaded the second candidate must be to win: latency averages of
/// equally fast endpoints differ by noise, which must not override the weights.
pub const MARGIN: f64 = 1.25;

use super::{Candidates, random::WeightedRandom};

/// The less loaded of two distinct weighted draws.
pub fn pick(draws: &WeightedRandom, candidates: &impl Candidates) -> Option<usize> {
    let a = draws.pick(candidates)?;
    // A second, different candidate; with one eligible endpoint, that one.
    let b = (0..4)
        .filter_map(|_| draws.pick(candidates))
        .find(|&b| b != a)
        .unwrap_or(a);
    let (la, lb) = (candidates.load(a), candidates.load(b));
    Some(if lb * MARGIN < la { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::lb::testing::{Set, shares};

    #[test]
    fn equal_loads_follow_the_weights() {
        fastrand::seed(3);
        let r = WeightedRandom::new(&[1, 2, 3]);
        let set = Set::all(3);
        let s = shares((0..60_000).filter_map(|_| pick(&r, &set)), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.015, "{s:?}");
        }
    }

    #[test]
    fn a_loaded_endpoint_gets_fewer() {
        fastrand::seed(4);
        let r = WeightedRandom::new(&[1, 1, 1]);
        let set = Set {
            loads: vec![1.0, 1.1, 10.0],
            ..Set::all(3)
        };
        let s = shares((0..30_000).filter_map(|_| pick(&r, &set)), 3);
        // The loaded one never wins a contest; loads within the margin keep the
        // weights.
        assert!(s[2] < 0.01, "{s:?}");
        assert!((s[0] - 0.5).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn a_single_eligible_endpoint_is_chosen() {
        let r = WeightedRandom::new(&[1, 1, 1]);
        let set = Set {
            excluded: vec![0, 2],
            ..Set::all(3)
        };
        assert!((0..100).all(|_| pick(&r, &set) == Some(1)));
    }
}
