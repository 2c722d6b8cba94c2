//! Bounds on inbound connections held at once, sidecar-wide and per client address;
//! past the per-client cap a new connection is reset at once and counted. Two gates
//! for HBONE, one per HTTP listener:
//! - [`Gate::unauthenticated`]: connections that have not proved anything yet (in the
//!   mTLS and HTTP/2 handshakes). Each holds a socket and a task for up to
//!   `inbound.handshake_timeout`, so a client that opens connections and stalls would
//!   otherwise grow descriptors and memory without limit.
//! - [`Gate::hbone`]: every HBONE connection, from accept to close. A peer that did
//!   prove its identity (any workload of the mesh, or a compromised one) could
//!   otherwise open connections without end, each allowed its streams.
//! - [`Gate::new`]: the health and admin listeners' connections.
//!
//! Admission is fair: when the sidecar-wide cap is reached, a new client is still
//! admitted if another client holds at least two more connections than it and one of
//! them is idle (no stream or request in progress): the oldest such connection of the
//! busiest client is asked to close ([`Pass::evicted`]). So a few clients holding
//! their maximum cannot lock out a new one (the kubelet on the health port, a new
//! peer on the HBONE port); only a new client that would hold as many as the busiest
//! is refused.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire},
    },
};

use tokio::sync::Notify;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The sidecar-wide cap (`inbound.max_unauthenticated`, `max_hbone_connections`).
    Sidecar,
    /// The per-client cap (`..._per_client`).
    Client,
}

/// Admits connections up to the caps.
#[derive(Debug)]
pub struct Gate {
    /// Metric names (and what the gate holds, for logs).
    name: &'static str,
    held: &'static str,
    max: usize,
    max_per_client: usize,
    state: Mutex<State>,
    in_progress: Gauge,
    refused: Family<RefusedLabels, Counter>,
    evicted: Counter,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    /// Slots asked to close and not yet dropped.
    evicting: usize,
    /// Admissions so far (each slot's order, for "oldest").
    admitted: u64,
    by_client: HashMap<IpAddr, Vec<Arc<Slot>>>,
}

/// What the gate knows of one admitted connection.
#[derive(Debug)]
pub struct Slot {
    /// Admission order.
    order: u64,
    /// Streams or requests in progress (a slot with none is idle), and [`EVICTED`]:
    /// one word, so that a slot is evicted only while idle and takes no work once
    /// evicted.
    state: AtomicUsize,
    notify: Notify,
}

/// The bit of [`Slot::state`] that says the connection was asked to close.
const EVICTED: usize = 1 << (usize::BITS - 1);

/// Keeps its slot busy (not evictable) while it lives: one stream or request.
#[derive(Debug)]
pub struct Busy(Arc<Slot>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    limit: &'static str,
}

/// A slot held while a connection is in the gate; dropping it frees the slot.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    client: IpAddr,
    slot: Arc<Slot>,
}

impl Limit {
    /// The label value and config field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::Sidecar => "sidecar",
            Limit::Client => "client",
        }
    }
}

impl Gate {
    /// The gate on HBONE connections in their handshakes (metrics
    /// `sidecar_inbound_unauthenticated`, `..._refused_total`).
    pub fn unauthenticated(max: usize, max_per_client: usize) -> Arc<Self> {
        Self::named(
            ("inbound_unauthenticated", "in the mTLS or HTTP/2 handshake"),
            max,
            max_per_client,
        )
    }

    /// The gate on HBONE connections over their whole life (metrics
    /// `sidecar_inbound_hbone_connections`, `..._refused_total`).
    pub fn hbone(max: usize, max_per_client: usize) -> Arc<Self> {
        Self::named(
            ("inbound_hbone_connections", "open, from accept to close"),
            max,
            max_per_client,
        )
    }

    /// A gate with these caps and no metrics of its own (the admin listeners').
    pub fn new(max: usize, max_per_client: usize) -> Arc<Self> {
        Self::named(("", ""), max, max_per_client)
    }

    fn named(
        (name, held): (&'static str, &'static str),
        max: usize,
        max_per_client: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            held,
            max,
            max_per_client,
            state: Mutex::default(),
            in_progress: Gauge::default(),
            refused: Family::default(),
            evicted: Counter::default(),
        })
    }

    /// Registers the gate's metrics.
    pub fn register(&self, registry: &mut Registry) {
        if self.name.is_empty() {
            return;
        }
        registry.register(
            self.name,
            format!("Inbound HBONE connections {} now", self.held),
            self.in_progress.clone(),
        );
        registry.register(
            format!("{}_refused", self.name),
            format!(
                "Inbound HBONE connections reset because too many were {}, by cap",
                self.held
            ),
            self.refused.clone(),
        );
        registry.register(
            format!("{}_evicted", self.name),
            format!(
                "Idle inbound HBONE connections ({}) closed to admit a client holding \
                 fewer (the cap was reached)",
                self.held
            ),
            self.evicted.clone(),
        );
        // Declared at zero, so a dashboard sees the series before the first refusal.
        for limit in [Limit::Sidecar, Limit::Client] {
            let _ = self.refused.get_or_create(&RefusedLabels {
                limit: limit.as_str(),
            });
        }
    }

    /// A slot for a connection from `client`, or the cap that is full. At the
    /// sidecar-wide cap, the oldest idle connection of the busiest other client is
    /// asked to close, if that client holds at least two more than `client`.
    pub fn enter(self: &Arc<Self>, client: IpAddr) -> Result<Pass, Limit> {
        let client = client.to_canonical();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = state.by_client.get(&client).map_or(0, Vec::len);
        let refused = if held >= self.max_per_client {
            Some(Limit::Client)
        } else if state.total - state.evicting >= self.max {
            match self.evict_for(&mut state, client, held) {
                true => None,
                false => Some(Limit::Sidecar),
            }
        } else {
            None
        };
        if let Some(limit) = refused {
            self.refused
                .get_or_create(&RefusedLabels {
                    limit: limit.as_str(),
                })
                .inc();
            return Err(limit);
        }
        state.total += 1;
        state.admitted += 1;
        let slot = Arc::new(Slot {
            order: state.admitted,
            state: AtomicUsize::new(0),
            notify: Notify::new(),
        });
        state
            .by_client
            .entry(client)
            .or_default()
            .push(slot.clone());
        self.in_progress.set(state.total as i64);
        Ok(Pass {
            gate: self.clone(),
            client,
            slot,
        })
    }

    /// Asks the oldest idle connection of the busiest client other than `client`
    /// (which holds `held`) to close, among the clients holding at least two more
    /// and having an idle one (ties: the oldest idle connection).
    fn evict_for(&self, state: &mut State, client: IpAddr, held: usize) -> bool {
        // Connections asked to close are closing: at most an eighth of the cap (at
        // least one) at once, so the gate never holds more than that over its cap.
        if state.evicting >= (self.max / 8).max(1) {
            return false;
        }
        let mut candidates: Vec<(usize, u64, &Arc<Slot>)> = state
            .by_client
            .iter()
            .filter(|(ip, _)| **ip != client)
            .filter_map(|(_, slots)| {
                let live = slots.iter().filter(|s| !s.is_evicted()).count();
                let oldest_idle = slots
                    .iter()
                    .filter(|s| s.state.load(Acquire) == 0)
                    .min_by_key(|s| s.order)?;
                (live > held + 1).then_some((live, oldest_idle.order, oldest_idle))
            })
            .collect();
        // The busiest first; among equals, the oldest idle connection.
        candidates.sort_by_key(|&(live, order, _)| (std::cmp::Reverse(live), order));
        // A slot that took work since it was looked at is passed over.
        let Some(victim) = candidates.into_iter().map(|(_, _, s)| s).find(|s| {
            s.state
                .compare_exchange(0, EVICTED, AcqRel, Acquire)
                .is_ok()
        }) else {
            return false;
        };
        victim.notify.notify_one();
        state.evicting += 1;
        self.evicted.inc();
        true
    }
}

impl Slot {
    fn is_evicted(&self) -> bool {
        self.state.load(Acquire) & EVICTED != 0
    }
}

impl Pass {
    /// Marks the connection busy (not evictable) while the guard lives; `None`
    /// once it was asked to close (it must take no more work).
    pub fn busy(&self) -> Option<Busy> {
        let mut current = self.slot.state.load(Acquire);
        loop {
            if current & EVICTED != 0 {
                return None;
            }
            match self
                .slot
                .state
                .compare_exchange_weak(current, current + 1, AcqRel, Acquire)
            {
                Ok(_) => return Some(Busy(self.slot.clone())),
                Err(now) => current = now,
            }
        }
    }

    /// Resolves once the gate has asked this connection to close (it was idle, and
    /// a client holding fewer connections needed its place).
    pub async fn evicted(&self) {
        loop {
            let notified = self.slot.notify.notified();
            if self.slot.is_evicted() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, AcqRel);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total = state.total.saturating_sub(1);
        if self.slot.is_evicted() {
            state.evicting = state.evicting.saturating_sub(1);
        }
        if let Some(slots) = state.by_client.get_mut(&self.client) {
            slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
            if slots.is_empty() {
                state.by_client.remove(&self.client);
            }
        }
        self.gate.in_progress.set(state.total as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_sidecar_and_each_client_and_frees_on_drop() {
        let gate = Gate::unauthenticated(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let a1 = gate.enter(a).expect("a1");
        let _a2 = gate.enter(a).expect("a2");
        assert_eq!(gate.enter(a).expect_err("a3"), Limit::Client);
        // The same client as an IPv4-mapped address counts as the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(gate.enter(mapped).expect_err("mapped"), Limit::Client);
        let b1 = gate.enter(b).expect("b1");
        // Full: c takes the place of a's oldest idle connection (a holds two more
        // than c would), which is asked to close.
        let _c1 = gate.enter(c).expect("fair admission");
        assert!(a1.slot.is_evicted());
        let d: IpAddr = "10.0.0.4".parse().expect("ip");
        // One eviction in flight at most; then nobody holds two more than d.
        assert_eq!(gate.enter(d).expect_err("closing"), Limit::Sidecar);
        drop(a1);
        assert_eq!(gate.enter(d).expect_err("full and fair"), Limit::Sidecar);
        drop(b1);
        let _d1 = gate.enter(d).expect("a slot was freed");
        assert_eq!(gate.in_progress.get(), 3);
        let refused = |limit: Limit| {
            gate.refused
                .get_or_create(&RefusedLabels {
                    limit: limit.as_str(),
                })
                .get()
        };
        assert_eq!(refused(Limit::Client), 2);
        assert_eq!(refused(Limit::Sidecar), 2);
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[tokio::test]
    async fn at_the_cap_a_new_client_takes_the_oldest_idle_slot_of_the_busiest() {
        let gate = Gate::hbone(6, 4);
        // Two hostile clients fill the gate: four and two connections.
        let a: Vec<Pass> = (0..4).map(|_| gate.enter(ip(1)).expect("a")).collect();
        let b: Vec<Pass> = (0..2).map(|_| gate.enter(ip(2)).expect("b")).collect();
        // a's oldest is busy (a stream in progress): the next oldest idle one goes.
        let _stream = a[0].busy().expect("not evicted");
        let newcomer = gate.enter(ip(3)).expect("a new client is admitted");
        assert!(
            !a[0].slot.is_evicted(),
            "a busy connection is never evicted"
        );
        let evicted = tokio::time::timeout(std::time::Duration::from_secs(1), a[1].evicted()).await;
        assert!(
            evicted.is_ok(),
            "the oldest idle connection of the busiest client is asked to close"
        );
        assert!(a[2..].iter().chain(&b).all(|p| !p.slot.is_evicted()));
        assert_eq!(gate.evicted.get(), 1);
        assert!(
            a[1].busy().is_none(),
            "an evicted connection takes no more work"
        );
        // While it closes, the gate holds one more than its cap, and no more.
        assert_eq!(
            gate.enter(ip(4)).expect_err("one eviction in flight"),
            Limit::Sidecar
        );
        let mut a = a;
        drop(a.remove(1));
        // Closed: a holds 3 (one busy), two more than a new client's 0 + 1.
        let second = gate.enter(ip(4)).expect("a takes its turn again");
        assert!(a[1].slot.is_evicted(), "a's next oldest idle one");
        drop(a.remove(1));
        drop((newcomer, second, a, b));
        assert_eq!(gate.in_progress.get(), 0);
        let state = gate.state.lock().expect("state");
        assert_eq!((state.total, state.evicting), (0, 0));
        assert!(state.by_client.is_empty());
    }

    #[tokio::test]
    async fn clients_are_evicted_toward_equal_shares_and_no_further() {
        let gate = Gate::hbone(4, 4);
        let mut held: Vec<Pass> = (0..4).map(|_| gate.enter(ip(1)).expect("fill")).collect();
        // One client holds everything; newcomers take from it, one at a time, until
        // it holds no more than one above any of them.
        for n in 2..=3 {
            held.push(gate.enter(ip(n)).expect("admitted"));
            let gone = held
                .iter()
                .position(|p| p.slot.is_evicted())
                .expect("one asked to close");
            drop(held.remove(gone));
        }
        // Now 1 holds 2, 2 and 3 hold 1: a fourth client takes 1's idle one.
        held.push(gate.enter(ip(4)).expect("admitted"));
        let gone = held
            .iter()
            .position(|p| p.slot.is_evicted())
            .expect("one asked to close");
        drop(held.remove(gone));
        // Every client holds 1: a fifth is refused.
        assert_eq!(gate.enter(ip(5)).expect_err("equal shares"), Limit::Sidecar);
        assert_eq!(gate.evicted.get(), 3);
    }

    #[test]
    fn a_busiest_client_with_only_busy_connections_does_not_shield_the_others() {
        let gate = Gate::hbone(8, 8);
        // x holds 5, each with a stream open; y holds 3 idle ones.
        let x: Vec<Pass> = (0..5).map(|_| gate.enter(ip(1)).expect("x")).collect();
        let _streams: Vec<Busy> = x.iter().map(|p| p.busy().expect("busy")).collect();
        let y: Vec<Pass> = (0..3).map(|_| gate.enter(ip(2)).expect("y")).collect();
        let _z = gate
            .enter(ip(3))
            .expect("y's oldest idle connection makes room");
        assert!(y[0].slot.is_evicted());
        assert!(x.iter().all(|p| !p.slot.is_evicted()));
    }
}
