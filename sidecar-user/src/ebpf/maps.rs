//! Views of the maps the running proxy reads (original destinations, counters),
//! independent of the loader's lifetime.

use aya::maps::{HashMap, MapData, PerCpuArray};
use sidecar_common::{Counter, FlowKey, Program, SockAddr, counter_index};

use super::orig_dst::OrigDstTable;

/// Views of the maps the running proxy reads; independent of [`Capture`]'s lifetime.
pub struct KernelMaps {
    /// Original destinations by 4-tuple.
    pub orig_dst: OrigDstTable,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) by_cookie: HashMap<MapData, u64, SockAddr>,
    pub(super) by_flow: HashMap<MapData, FlowKey, SockAddr>,
}

// === impl KernelMaps ===

impl KernelMaps {
    /// Each kernel counter of each program, summed over CPUs.
    pub fn counters(&self) -> Vec<(Program, Counter, u64)> {
        let mut all = Vec::with_capacity(Program::ALL.len() * Counter::ALL.len());
        for program in Program::ALL {
            for counter in Counter::ALL {
                let sum = self
                    .counters
                    .get(&counter_index(program, counter), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                all.push((program, counter, sum));
            }
        }
        all
    }

    /// `counter` summed over programs and CPUs.
    pub fn counter_total(&self, counter: Counter) -> u64 {
        self.counters()
            .into_iter()
            .filter(|(_, c, _)| *c == counter)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Entries in the (cookie, flow) original-destination maps: connects recorded but
    /// not yet re-keyed, and re-keyed but not yet accepted.
    pub fn orig_dst_entries(&self) -> (usize, usize) {
        (self.by_cookie.keys().count(), self.by_flow.keys().count())
    }
}
