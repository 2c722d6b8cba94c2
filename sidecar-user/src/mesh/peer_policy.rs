//! Who may talk to this workload and who may serve its destinations, as one live
//! policy: `inbound.allow` and `mesh.identities` reload with the services section,
//! and connections already open are re-checked on every change, so a peer that is no
//! longer allowed loses its open connections too, not only new ones.

use std::{net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    config::{AllowEntry, Config},
    mesh::server_identity::{Expected, ServerIdentityPolicy},
    tls::{IdentityMatcher, SpiffeId},
};

/// The identity rules in force.
#[derive(Debug)]
pub struct PeerPolicy {
    inbound_allow: ArcSwap<Vec<AllowEntry>>,
    outbound: ArcSwap<ServerIdentityPolicy>,
    local_trust_domain: String,
    changed: watch::Sender<u64>,
}

/// What an open mTLS connection was admitted as, to be checked again on a change.
#[derive(Clone, Debug)]
pub enum Admission {
    /// An inbound client with this identity.
    Client(SpiffeId),
    /// An outbound server with this identity at this address, under the service's
    /// own `server_identity` when it has one.
    Server {
        /// The server's address.
        ip: IpAddr,
        /// Its identity.
        id: SpiffeId,
        /// The service's `server_identity`.
        service: Option<IdentityMatcher>,
    },
}

impl PeerPolicy {
    /// The rules of `config` for a workload of `local_trust_domain`.
    pub fn new(config: &Config, local_trust_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            inbound_allow: ArcSwap::from_pointee(config.inbound.allow.clone()),
            outbound: ArcSwap::from_pointee(ServerIdentityPolicy::new(
                config.mesh.identities.clone(),
                local_trust_domain,
            )),
            local_trust_domain: local_trust_domain.to_string(),
            changed: watch::Sender::new(0),
        })
    }

    /// Swaps in the rules of `next` when they differ; open connections are told.
    pub fn apply(&self, next: &Config) {
        let allow_changed = **self.inbound_allow.load() != next.inbound.allow;
        let outbound =
            ServerIdentityPolicy::new(next.mesh.identities.clone(), &self.local_trust_domain);
        let outbound_changed = **self.outbound.load() != outbound;
        if !allow_changed && !outbound_changed {
            return;
        }
        self.inbound_allow
            .store(Arc::new(next.inbound.allow.clone()));
        self.outbound.store(Arc::new(outbound));
        self.changed.send_modify(|generation| *generation += 1);
        tracing::info!("identity rules reloaded: open connections are checked again");
    }

    /// Whether an inbound client `id` may connect: on `inbound.allow`, or, with no
    /// identity in the list, of the local trust domain (a federated one only when
    /// listed).
    pub fn allows_client(&self, id: &SpiffeId) -> bool {
        let allow = self.inbound_allow.load();
        let mut peers = allow
            .iter()
            .filter_map(|entry| match entry {
                AllowEntry::Peer(m) => Some(m),
                AllowEntry::Unauthenticated => None,
            })
            .peekable();
        if peers.peek().is_none() {
            return id.trust_domain() == self.local_trust_domain;
        }
        peers.any(|m| m.matches(id))
    }

    /// Whether a client without an identity (plaintext, on a port that is not
    /// strict) may connect: with an empty `inbound.allow`, or one that lists
    /// `unauthenticated`.
    pub fn allows_unauthenticated(&self) -> bool {
        AllowEntry::admits_unauthenticated(&self.inbound_allow.load())
    }

    /// Checks server `id` at `ip` (see [`ServerIdentityPolicy::check`]).
    pub fn check_server(
        &self,
        ip: IpAddr,
        id: &SpiffeId,
        required: Option<super::server_identity::Required<'_>>,
    ) -> Result<(), Expected> {
        self.outbound.load().check(ip, id, required)
    }

    /// Whether a connection admitted as `admission` is still allowed.
    pub fn still_allows(&self, admission: &Admission) -> bool {
        match admission {
            Admission::Client(id) => self.allows_client(id),
            Admission::Server { ip, id, service } => self
                .check_server(
                    *ip,
                    id,
                    service
                        .as_ref()
                        .map(super::server_identity::Required::Service),
                )
                .is_ok(),
        }
    }

    /// Resolves once the rules change so that `admission` is no longer allowed.
    pub async fn revoked(&self, admission: &Admission) {
        let mut changes = self.changed.subscribe();
        // A reload between the admission and this subscription is not lost.
        if !self.still_allows(admission) {
            return;
        }
        while changes.changed().await.is_ok() {
            if !self.still_allows(admission) {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_yaml(text, "t", Vec::new()).expect("config")
    }

    #[tokio::test]
    async fn a_reload_revokes_exactly_the_connections_it_no_longer_allows() {
        let policy = PeerPolicy::new(&config("inbound:\n  allow: ['spiffe://td/ns/a/*']\n"), "td");
        let a: SpiffeId = "spiffe://td/ns/a/sa/x".parse().expect("id");
        let b: SpiffeId = "spiffe://td/ns/b/sa/y".parse().expect("id");
        let (as_a, as_b) = (Admission::Client(a.clone()), Admission::Client(b.clone()));
        assert!(policy.still_allows(&as_a) && !policy.still_allows(&as_b));
        let policy2 = policy.clone();
        let a_revoked = tokio::spawn(async move { policy2.revoked(&as_a).await });
        // A reload that changes nothing for `a` leaves it alone.
        policy.apply(&config(
            "inbound:\n  allow: ['spiffe://td/ns/a/*', 'spiffe://td/ns/c/*']\n",
        ));
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!a_revoked.is_finished());
        policy.apply(&config("inbound:\n  allow: ['spiffe://td/ns/b/*']\n"));
        tokio::time::timeout(std::time::Duration::from_secs(1), a_revoked)
            .await
            .expect("a is revoked")
            .expect("task");
        assert!(policy.still_allows(&as_b));
    }
}
