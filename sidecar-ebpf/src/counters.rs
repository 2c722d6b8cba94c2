//! Bumping the per-CPU counters read by the proxy's metrics.

use sidecar_common::{Counter, Program, counter_index};

use crate::maps::COUNTERS;

/// Adds one to `counter` of `program` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(program: Program, counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_index(program, counter)) {
        // SAFETY: the pointer is this CPU's slot of an existing array entry; programs
        // on one CPU do not preempt each other for this map.
        unsafe { *slot += 1 };
    }
}
