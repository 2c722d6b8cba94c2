//! Bounds on inbound HBONE connections held at once, sidecar-wide and per client
//! address (so that one client cannot take every slot from the others); past either,
//! a new connection is reset at once and counted. Two gates:
//! - [`Gate::unauthenticated`]: connections that have not proved anything yet (in the
//!   mTLS and HTTP/2 handshakes). Each holds a socket and a task for up to
//!   `inbound.handshake_timeout`, so a client that opens connections and stalls would
//!   otherwise grow descriptors and memory without limit.
//! - [`Gate::hbone`]: every HBONE connection, from accept to close. A peer that did
//!   prove its identity (any workload of the mesh, or a compromised one) could
//!   otherwise open connections without end, each allowed its streams.

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

/// A slot held while a connection is in the gate; dropping it frees the slot.
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
