//! Every map of the object, in one place. Names come from `sidecar_common::map_names`
//! by matching the static's identifier.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockMap},
};
use sidecar_common::{
    COUNTER_SLOTS, EXCLUDED_CIDRS_CAPACITY, FlowKey, INBOUND_PORTS_CAPACITY, KernelSettings,
    ORIG_DST_MAP_CAPACITY, PORT_RULES_CAPACITY, SockAddr,
};

/// Capture settings at index 0, written by the loader before attaching.
#[map]
pub static CONFIG: Array<KernelSettings> = Array::with_max_entries(1, 0);

/// Destination port → `port_rule` bits.
#[map]
pub static PORT_RULES: HashMap<u16, u32> = HashMap::with_max_entries(PORT_RULES_CAPACITY, 0);

/// IPv4 destinations never captured (key bytes in network order).
#[map]
pub static EXCLUDED_V4: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(EXCLUDED_CIDRS_CAPACITY, 0);

/// IPv6 destinations never captured (key bytes in network order).
#[map]
pub static EXCLUDED_V6: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(EXCLUDED_CIDRS_CAPACITY, 0);

/// Socket cookie → original destination, from `connect` until `sock_ops` re-keys it.
/// LRU: a connect that fails before SYN leaves an entry that simply ages out.
#[map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(ORIG_DST_MAP_CAPACITY, 0);

/// 4-tuple → original destination, consumed by the proxy at accept. A plain hash,
/// not LRU: nothing is ever evicted silently. A connect that closes before the proxy
/// accepts it has its entry removed by `sock_ops` when the app's socket closes, so the
/// map holds only connections waiting in the proxy's accept queue; when it is full
/// anyway, the insert fails and is counted (`orig_dst_rekey_failed`).
#[map]
pub static ORIG_DST_BY_FLOW: HashMap<FlowKey, SockAddr> =
    HashMap::with_max_entries(ORIG_DST_MAP_CAPACITY, 0);

/// Per-CPU event counters indexed by `counter_index(program, counter)`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Local port → `inbound_rule` bits.
#[map]
pub static INBOUND_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(INBOUND_PORTS_CAPACITY, 0);

/// The proxy's inbound listeners at `INBOUND_LISTENER_V4` / `_V6`. The kernel removes
/// a socket from a SOCKMAP when it closes, so a dead proxy leaves the slots empty.
#[map]
pub static INBOUND_LISTENER: SockMap = SockMap::with_max_entries(2, 0);
