//! Bumping the per-CPU counters read by the proxy's metrics.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use sidecar_common::{Counter, Program, counter_index};

use crate::maps::COUNTERS;

/// Adds one to `counter` of `program` on this CPU. Per-CPU slots are not enough on
/// their own: since Linux 5.7 programs run with migration disabled but preemptible, so
/// two tasks on one CPU can interleave a plain read-modify-write and lose a count; the
/// add is atomic.
#[inline(always)]
pub fn bump(program: Program, counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_index(program, counter)) {
        // SAFETY: the pointer is this CPU's slot of an existing array entry, 8-byte
        // aligned, and only ever accessed atomically by the programs (the loader reads
        // it through the syscall).
        // The BPF target has no `AtomicU64::fetch_add`; the intrinsic compiles to the
        // `lock xadd` instruction (result unused, so no BPF_FETCH is needed).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}
