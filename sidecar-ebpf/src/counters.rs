//! Bumping the per-CPU counters read by the proxy's metrics.

use sidecar_common::Counter;

use crate::maps::COUNTERS;

/// Adds one to `counter` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of an existing array entry; programs
        // on one CPU do not preempt each other for this map.
        unsafe { *slot += 1 };
    }
}
