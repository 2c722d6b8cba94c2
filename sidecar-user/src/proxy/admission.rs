//! Inbound policy for connections that arrive on application ports, around the HBONE
//! port: per port, `disabled` and `permissive` pass them through (plaintext, or the
//! application's own TLS), `strict` refuses them (reset before anything reaches the
//! application): on a strict port only streams through HBONE, from a peer that proved
//! its identity, get in.

use std::collections::BTreeMap;

use crate::{
    config::{AllowEntry, Config, InboundMode},
    proxy::CloseReason,
};

/// What inbound connections must be, per port.
pub struct InboundPolicy {
    default_mode: InboundMode,
    port_modes: BTreeMap<u16, InboundMode>,
    /// The allow-list at start admits clients without an identity (the live
    /// [`crate::mesh::peer_policy::PeerPolicy`] decides where there is one).
    pub unauthenticated: bool,
}

/// Why a direct inbound connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A strict port takes connections only through HBONE.
    #[error("strict port: only connections through HBONE (port {0}) get in")]
    NotMesh(u16),
    /// `inbound.allow` names the peers that may connect, and a client without an
    /// identity is not one of them.
    #[error(
        "a client without an identity: inbound.allow lists who may connect and not `unauthenticated`"
    )]
    NoIdentity,
}

impl Refusal {
    /// The close reason recorded in metrics.
    pub fn reason(&self) -> CloseReason {
        match self {
            Refusal::NotMesh(_) | Refusal::NoIdentity => CloseReason::PolicyDenied,
        }
    }
}

// === impl InboundPolicy ===

impl InboundPolicy {
    /// The policy of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            default_mode: config.inbound_default_mode(),
            port_modes: config.inbound.port_modes.clone(),
            unauthenticated: AllowEntry::admits_unauthenticated(&config.inbound.allow),
        }
    }

    /// The mode of local `port`.
    pub fn mode(&self, port: u16) -> InboundMode {
        self.port_modes
            .get(&port)
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// Applies the mode of local `port` to a connection that arrived there directly
    /// (not through HBONE, so without an identity); `unauthenticated`: whether the
    /// allow-list admits clients without one.
    pub fn admit_direct(
        &self,
        port: u16,
        hbone_port: u16,
        unauthenticated: bool,
    ) -> Result<(), Refusal> {
        match self.mode(port) {
            InboundMode::Strict => Err(Refusal::NotMesh(hbone_port)),
            InboundMode::Permissive | InboundMode::Disabled if !unauthenticated => {
                Err(Refusal::NoIdentity)
            }
            InboundMode::Permissive | InboundMode::Disabled => Ok(()),
        }
    }

    /// What each port admits under `config`, one line per port with its own mode
    /// and one for the rest (`sidecar check`).
    pub fn describe(config: &Config) -> Vec<String> {
        let policy = Self::new(config);
        let allow = &config.inbound.allow;
        let unauthenticated = policy.unauthenticated;
        let peers: Vec<String> = allow
            .iter()
            .filter(|e| matches!(e, AllowEntry::Peer(_)))
            .map(ToString::to_string)
            .collect();
        let mesh = match (config.identity.is_some(), peers.is_empty()) {
            (false, _) => "no mesh peers (no identity)".to_string(),
            (true, true) => format!(
                "mesh peers of the local trust domain over HBONE (port {})",
                config.mesh.hbone.port
            ),
            (true, false) => format!(
                "mesh peers {} over HBONE (port {})",
                peers.join(", "),
                config.mesh.hbone.port
            ),
        };
        let line = |what: String, mode: InboundMode| {
            let plaintext = match mode {
                InboundMode::Strict => "plaintext refused (strict)",
                _ if unauthenticated => "plaintext admitted",
                _ => "plaintext refused (inbound.allow does not list `unauthenticated`)",
            };
            format!("{what}: {}: {mesh}; {plaintext}", mode.as_str())
        };
        let mut lines: Vec<String> = policy
            .port_modes
            .iter()
            .map(|(port, mode)| line(format!("port {port}"), *mode))
            .collect();
        lines.push(line("every other port".into(), policy.default_mode));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mesh::peer_policy::PeerPolicy, tls::SpiffeId};

    fn policy(allow: &str) -> std::sync::Arc<PeerPolicy> {
        let config = Config::from_yaml(&format!("inbound:\n  allow: {allow}\n"), "t", Vec::new())
            .expect("config");
        PeerPolicy::new(&config, "td")
    }

    #[test]
    fn an_empty_allow_list_admits_the_local_trust_domain_only() {
        let local: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let federated: SpiffeId = "spiffe://partner/ns/a/sa/b".parse().expect("id");
        let empty = policy("[]");
        assert!(empty.allows_client(&local));
        assert!(!empty.allows_client(&federated));
        let listed = policy("['spiffe://partner/*']");
        assert!(listed.allows_client(&federated));
        assert!(!listed.allows_client(&local));
    }

    #[test]
    fn strict_ports_refuse_direct_connections_and_the_others_pass_them() {
        let policy = InboundPolicy {
            default_mode: InboundMode::Permissive,
            port_modes: [(8443, InboundMode::Strict), (9000, InboundMode::Disabled)].into(),
            unauthenticated: true,
        };
        assert!(policy.admit_direct(8443, 15008, true).is_err());
        assert!(policy.admit_direct(9000, 15008, true).is_ok());
        assert!(policy.admit_direct(8080, 15008, true).is_ok());
        // An allow-list without `unauthenticated`: no plaintext on any port.
        for port in [8443, 9000, 8080] {
            assert!(policy.admit_direct(port, 15008, false).is_err(), "{port}");
        }
    }
}
