//! A bound on inbound connections that have not proved anything yet: those in
//! protocol detection or in the mTLS handshake on a strict or permissive port. Each
//! holds a socket and a task for up to twice `inbound.detect_timeout` (detection, then
//! the handshake, each with that budget), so without a bound a
//! client that opens connections and stalls grows descriptors and memory without
//! limit. Past the sidecar-wide cap, or past the per-client-address cap (so that one
//! flooding client cannot take every slot from the others), a new connection is reset
//! at once and counted.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `inbound.max_unauthenticated`.
    Sidecar,
    /// `inbound.max_unauthenticated_per_client`.
    Client,
}

/// Admits unauthenticated connections up to the caps.
#[derive(Debug)]
pub struct Gate {
    max: usize,
    max_per_client: usize,
    state: Mutex<State>,
    in_progress: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    limit: &'static str,
}

/// A slot held while a connection is unauthenticated; dropping it frees the slot.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    client: IpAddr,
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
    /// A gate with these caps.
    pub fn new(max: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            max_per_client,
            state: Mutex::default(),
            in_progress: Gauge::default(),
            refused: Family::default(),
        })
    }

    /// Registers the gate's metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "inbound_unauthenticated",
            "Inbound connections in protocol detection or the mTLS handshake now",
            self.in_progress.clone(),
        );
        registry.register(
            "inbound_unauthenticated_refused",
            "Inbound connections reset because too many were unauthenticated, by cap",
            self.refused.clone(),
        );
        // Declared at zero, so a dashboard sees the series before the first refusal.
        for limit in [Limit::Sidecar, Limit::Client] {
            let _ = self.refused.get_or_create(&RefusedLabels {
                limit: limit.as_str(),
            });
        }
    }

    /// A slot for a connection from `client`, or the cap that is full.
    pub fn enter(self: &Arc<Self>, client: IpAddr) -> Result<Pass, Limit> {
        let client = client.to_canonical();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let refused = if state.total >= self.max {
            Some(Limit::Sidecar)
        } else if state.by_client.get(&client).copied().unwrap_or(0) >= self.max_per_client {
            Some(Limit::Client)
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
        *state.by_client.entry(client).or_default() += 1;
        self.in_progress.set(state.total as i64);
        Ok(Pass {
            gate: self.clone(),
            client,
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
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
        let gate = Gate::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let a1 = gate.enter(a).expect("a1");
        let _a2 = gate.enter(a).expect("a2");
        assert_eq!(gate.enter(a).expect_err("a3"), Limit::Client);
        // The same client as an IPv4-mapped address counts as the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(gate.enter(mapped).expect_err("mapped"), Limit::Client);
        let _b1 = gate.enter(b).expect("b1");
        assert_eq!(gate.enter(c).expect_err("full"), Limit::Sidecar);
        drop(a1);
        let _c1 = gate.enter(c).expect("a slot was freed");
        assert_eq!(gate.in_progress.get(), 3);
        let refused = |limit: Limit| {
            gate.refused
                .get_or_create(&RefusedLabels {
                    limit: limit.as_str(),
                })
                .get()
        };
        assert_eq!(refused(Limit::Client), 2);
        assert_eq!(refused(Limit::Sidecar), 1);
    }
}
