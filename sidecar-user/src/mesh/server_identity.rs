//! Which identity a server sidecar must present, checked on every outbound mTLS
//! handshake: a certificate from the bundle proves membership of the mesh, not that
//! the peer is the workload the destination should be.
//!
//! In order: a service's `server_identity`; else the most specific `mesh.identities`
//! rule whose networks hold the destination; else any ID of the local trust domain.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;

use crate::{
    config::MeshIdentityRule,
    tls::{IdentityMatcher, SpiffeId},
};

/// The outbound identity rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerIdentityPolicy {
    rules: Vec<MeshIdentityRule>,
    local_trust_domain: String,
}

/// An identity a destination requires, and where the requirement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Required<'a> {
    /// A service's `server_identity` (or a config endpoint's `identity`).
    Service(&'a IdentityMatcher),
    /// The service account of the pod at the destination, from Kubernetes.
    Pod(&'a IdentityMatcher),
}

impl Required<'_> {
    /// The identities that satisfy it.
    pub fn matcher(&self) -> &IdentityMatcher {
        match self {
            Required::Service(m) | Required::Pod(m) => m,
        }
    }
}

/// What a destination's server was expected to be, for errors and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A service's `server_identity`.
    Service(IdentityMatcher),
    /// The destination pod's service account (Kubernetes discovery).
    Pod(IdentityMatcher),
    /// A `mesh.identities` rule.
    Rule {
        /// Its index in the config.
        index: usize,
        /// Its allowed identities.
        allow: Vec<IdentityMatcher>,
    },
    /// Any workload of the local trust domain.
    LocalTrustDomain(String),
}

impl ServerIdentityPolicy {
    /// The policy of `rules`, with `local_trust_domain` for uncovered destinations.
    pub fn new(rules: Vec<MeshIdentityRule>, local_trust_domain: &str) -> Self {
        Self {
            rules,
            local_trust_domain: local_trust_domain.to_string(),
        }
    }

    /// Checks `id`, presented by the server at `dst`; `required` is what the
    /// destination itself requires, when known. On a mismatch, returns what was
    /// expected.
    pub fn check(
        &self,
        dst: IpAddr,
        id: &SpiffeId,
        required: Option<Required<'_>>,
    ) -> Result<(), Expected> {
        let expected = self.expected(dst, required);
        let ok = match &expected {
            Expected::Service(m) | Expected::Pod(m) => m.matches(id),
            Expected::Rule { allow, .. } => allow.iter().any(|m| m.matches(id)),
            Expected::LocalTrustDomain(td) => id.trust_domain() == td,
        };
        if ok { Ok(()) } else { Err(expected) }
    }

    fn expected(&self, dst: IpAddr, required: Option<Required<'_>>) -> Expected {
        match required {
            Some(Required::Service(m)) => return Expected::Service(m.clone()),
            Some(Required::Pod(m)) => return Expected::Pod(m.clone()),
            None => {}
        }
        let dst = dst.to_canonical();
        let best = self
            .rules
            .iter()
            .enumerate()
            .flat_map(|(i, rule)| rule.cidrs.iter().map(move |net| (i, rule, net)))
            .filter(|(_, _, net)| net.contains(&dst))
            .max_by_key(|(_, _, net): &(usize, &MeshIdentityRule, &IpNet)| net.prefix_len());
        match best {
            Some((index, rule, _)) => Expected::Rule {
                index,
                allow: rule.allow.clone(),
            },
            None => Expected::LocalTrustDomain(self.local_trust_domain.clone()),
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Service(m) => write!(f, "{m} (the service's server_identity)"),
            Expected::Pod(m) => write!(f, "{m} (the pod's service account, from Kubernetes)"),
            Expected::Rule { index, allow } => {
                let list: Vec<String> = allow.iter().map(ToString::to_string).collect();
                write!(f, "one of [{}] (mesh.identities[{index}])", list.join(", "))
            }
            Expected::LocalTrustDomain(td) => {
                write!(
                    f,
                    "an ID of the local trust domain {td} (no mesh.identities rule)"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidrs: &[&str], allow: &[&str]) -> MeshIdentityRule {
        MeshIdentityRule {
            cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
            allow: allow.iter().map(|a| a.parse().expect("matcher")).collect(),
        }
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("id")
    }

    #[test]
    fn the_most_specific_rule_then_the_local_trust_domain() {
        let policy = ServerIdentityPolicy::new(
            vec![
                rule(&["10.0.0.0/16"], &["spiffe://td/ns/shop/*"]),
                rule(&["10.0.5.0/24"], &["spiffe://td/ns/db/sa/postgres"]),
            ],
            "td",
        );
        let db = id("spiffe://td/ns/db/sa/postgres");
        let web = id("spiffe://td/ns/shop/sa/web");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(policy.check(ip("10.0.5.7"), &db, None).is_ok());
        let e = policy
            .check(ip("10.0.5.7"), &web, None)
            .expect_err("not db");
        assert!(e.to_string().contains("mesh.identities[1]"), "{e}");
        assert!(policy.check(ip("10.0.9.7"), &web, None).is_ok());
        assert!(policy.check(ip("10.0.9.7"), &db, None).is_err());
        // IPv4-mapped destinations match IPv4 rules.
        assert!(policy.check(ip("::ffff:10.0.9.7"), &web, None).is_ok());
        // Uncovered: any workload of the local trust domain, no other.
        assert!(policy.check(ip("192.0.2.1"), &db, None).is_ok());
        let foreign = id("spiffe://other/ns/db/sa/postgres");
        let e = policy
            .check(ip("192.0.2.1"), &foreign, None)
            .expect_err("foreign");
        assert!(e.to_string().contains("local trust domain td"), "{e}");
        // A service's server_identity wins over the rules.
        let wanted: IdentityMatcher = "spiffe://td/ns/shop/sa/web".parse().expect("m");
        assert!(
            policy
                .check(ip("10.0.5.7"), &web, Some(Required::Service(&wanted)))
                .is_ok()
        );
        assert!(
            policy
                .check(ip("10.0.5.7"), &db, Some(Required::Service(&wanted)))
                .is_err()
        );
    }
}
