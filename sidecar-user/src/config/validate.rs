//! Validation: what types alone cannot check (ranges, overlaps, loopback-only admin,
//! settings that would let traffic skip a policy), each error naming the field.

use std::collections::BTreeSet;

use super::{Config, ConfigError, InboundMode, services};

impl Config {
    /// Checks what types alone cannot: ranges, overlaps, loopback-only admin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.proxy.uid == 0 {
            return invalid(
                "proxy.uid",
                "must not be 0: every root process would bypass capture",
            );
        }
        if self.proxy.outbound_port == 0 {
            return invalid("proxy.outbound_port", "port 0 is not a valid port");
        }
        for (field, d) in [
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("proxy.idle_timeout", self.proxy.idle_timeout),
            ("proxy.half_close_timeout", self.proxy.half_close_timeout),
            ("proxy.keepalive.time", self.proxy.keepalive.time),
            ("proxy.keepalive.interval", self.proxy.keepalive.interval),
            ("proxy.user_timeout", self.proxy.user_timeout),
        ] {
            if d.is_zero() {
                return invalid(field, "must be greater than 0");
            }
        }
        // The kernel's limits (seconds in an int for the times, TCP_KEEPCNT <= 127).
        let keepalive = &self.proxy.keepalive;
        if keepalive.time.as_secs() > 32_767 || keepalive.interval.as_secs() > 32_767 {
            return invalid(
                "proxy.keepalive",
                "time and interval must be at most 32767s",
            );
        }
        if !(1..=127).contains(&keepalive.probes) {
            return invalid("proxy.keepalive.probes", "must be between 1 and 127");
        }
        if self.proxy.user_timeout.as_millis() > i32::MAX as u128 {
            return invalid("proxy.user_timeout", "must be at most 24 days");
        }
        let kube = &self.kubernetes;
        if kube.initial_sync_timeout.is_zero() {
            return invalid("kubernetes.initial_sync_timeout", "must be greater than 0");
        }
        if kube.namespaces.iter().any(|n| {
            n.is_empty()
                || n.len() > 63
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }) {
            return invalid(
                "kubernetes.namespaces",
                "each must be a Kubernetes namespace name (lowercase letters, digits, '-')",
            );
        }
        if !(1..=64).contains(&self.proxy.worker_threads) {
            return invalid("proxy.worker_threads", "must be between 1 and 64");
        }
        if self.capture.exclude_ports.contains(&0) {
            return invalid("capture.exclude_ports", "port 0 is not a valid port");
        }
        if self.capture.include_ports.contains(&0) {
            return invalid("capture.include_ports", "port 0 is not a valid port");
        }
        let excluded: BTreeSet<u16> = self.capture.exclude_ports.iter().copied().collect();
        if let Some(port) = self
            .capture
            .include_ports
            .iter()
            .find(|p| excluded.contains(p))
        {
            return Err(ConfigError::Invalid {
                field: "capture.include_ports",
                reason: format!("port {port} is also in capture.exclude_ports"),
            });
        }
        for (field, ports) in [
            ("inbound.ports", &self.inbound.ports),
            ("inbound.exclude_ports", &self.inbound.exclude_ports),
        ] {
            if ports.contains(&0) {
                return invalid(field, "port 0 is not a valid port");
            }
        }
        if let Some(port) = self
            .inbound
            .ports
            .iter()
            .find(|p| self.inbound.exclude_ports.contains(p))
        {
            return Err(ConfigError::Invalid {
                field: "inbound.ports",
                reason: format!("port {port} is also in inbound.exclude_ports"),
            });
        }
        if self.inbound.port == 0 {
            return invalid("inbound.port", "port 0 is not a valid port");
        }
        let needs_identity = self
            .inbound
            .mode
            .into_iter()
            .chain(self.inbound.port_modes.values().copied())
            .any(|m| m != InboundMode::Disabled);
        if needs_identity && self.identity.is_none() {
            return invalid(
                "inbound.mode",
                "strict and permissive need an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        if !self.mesh.cidrs.is_empty() && self.identity.is_none() {
            return invalid(
                "mesh.cidrs",
                "mTLS origination needs an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        self.validate_no_silent_bypass()?;
        for (i, rule) in self.mesh.identities.iter().enumerate() {
            if rule.cidrs.is_empty() || rule.allow.is_empty() {
                return Err(ConfigError::InvalidAt {
                    field: format!("mesh.identities[{i}]"),
                    reason: "needs at least one network in cidrs and one identity in allow".into(),
                });
            }
        }
        if !self.mesh.identities.is_empty() && self.identity.is_none() {
            return invalid(
                "mesh.identities",
                "identity rules need an identity (identity.cert, identity.key, identity.bundle)",
            );
        }
        if let Some(identity) = &self.identity {
            for td in identity.federated_bundles.keys() {
                if format!("spiffe://{td}/x")
                    .parse::<crate::tls::SpiffeId>()
                    .is_err()
                {
                    return Err(ConfigError::InvalidAt {
                        field: format!("identity.federated_bundles.{td}"),
                        reason:
                            "not a valid trust domain (lower-case letters, digits, '-', '.', '_')"
                                .into(),
                    });
                }
            }
        }
        services::validate(&self.services)?;
        for (i, s) in self.services.iter().enumerate() {
            let wants_mtls = s.mtls == Some(true) || s.server_identity.is_some();
            if wants_mtls && self.identity.is_none() {
                return Err(ConfigError::InvalidAt {
                    field: format!("services[{i}].mtls"),
                    reason: "mTLS to a service needs an identity (identity.cert, identity.key, identity.bundle)".into(),
                });
            }
            if s.mtls == Some(false) && s.server_identity.is_some() {
                return Err(ConfigError::InvalidAt {
                    field: format!("services[{i}].server_identity"),
                    reason: "an expected server identity needs mtls".into(),
                });
            }
        }
        if self.inbound.max_unauthenticated == 0 || self.inbound.max_unauthenticated_per_client == 0
        {
            return invalid(
                "inbound.max_unauthenticated",
                "must be greater than 0 (as must max_unauthenticated_per_client)",
            );
        }
        if self.inbound.max_hbone_connections == 0
            || self.inbound.max_hbone_connections_per_client == 0
        {
            return invalid(
                "inbound.max_hbone_connections",
                "must be greater than 0 (as must max_hbone_connections_per_client)",
            );
        }
        if self.inbound.handshake_timeout.is_zero() {
            return invalid("inbound.handshake_timeout", "must be greater than 0");
        }
        let hbone = &self.mesh.hbone;
        if hbone.max_streams_per_connection == 0
            || hbone.max_inbound_streams_per_connection == 0
            || hbone.max_connections_per_destination == 0
        {
            return invalid(
                "mesh.hbone",
                "max_streams_per_connection, max_inbound_streams_per_connection and \
                 max_connections_per_destination must be greater than 0",
            );
        }
        if hbone.keepalive_interval.is_zero() || hbone.keepalive_timeout.is_zero() {
            return invalid(
                "mesh.hbone.keepalive_interval",
                "must be greater than 0 (as must keepalive_timeout)",
            );
        }
        if !self.admin.address.ip().is_loopback() {
            return invalid(
                "admin.address",
                "must be a loopback address: debug endpoints name peers",
            );
        }
        if self.admin.address.port() == 0 || self.health.address.port() == 0 {
            let field = if self.admin.address.port() == 0 {
                "admin.address"
            } else {
                "health.address"
            };
            return invalid(field, "port 0 is not a valid port");
        }
        let ports = [
            ("proxy.outbound_port", self.proxy.outbound_port),
            ("inbound.port", self.inbound.port),
            ("admin.address", self.admin.address.port()),
            ("health.address", self.health.address.port()),
            ("mesh.hbone.port", self.mesh.hbone.port),
        ];
        for (i, (field, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("port {port} is already used by {other}"),
                });
            }
        }
        Ok(())
    }

    /// Refuses settings that would let traffic skip a policy the same file asks for:
    /// a port mode on a port inbound capture never steers, mTLS networks or service
    /// addresses that capture excludes.
    fn validate_no_silent_bypass(&self) -> Result<(), ConfigError> {
        let steered = |port: u16| {
            self.inbound.enabled
                && !self.inbound.exclude_ports.contains(&port)
                && !self.own_ports().contains(&port)
                && (self.inbound.ports.is_empty() || self.inbound.ports.contains(&port))
        };
        for (port, mode) in &self.inbound.port_modes {
            if *mode != InboundMode::Disabled && !steered(*port) {
                return Err(ConfigError::InvalidAt {
                    field: format!("inbound.port_modes.{port}"),
                    reason: format!(
                        "port {port} is not captured inbound (inbound.enabled, inbound.ports, \
                         inbound.exclude_ports or a sidecar port), so {mode:?} would not be enforced"
                    ),
                });
            }
        }
        if !self.inbound.enabled
            && self
                .inbound
                .mode
                .is_some_and(|m| m != InboundMode::Disabled)
        {
            return Err(ConfigError::Invalid {
                field: "inbound.mode",
                reason: "inbound.enabled is false, so no inbound port mode is enforced".into(),
            });
        }
        for mesh in &self.mesh.cidrs {
            if let Some(excluded) = self
                .capture
                .exclude_cidrs
                .iter()
                .find(|e| e.contains(mesh) || mesh.contains(*e))
            {
                return Err(ConfigError::Invalid {
                    field: "capture.exclude_cidrs",
                    reason: format!(
                        "{excluded} overlaps mesh.cidrs {mesh}: connections there would skip mTLS"
                    ),
                });
            }
        }
        for (i, service) in self.services.iter().enumerate() {
            for (j, addr) in service.addresses.iter().enumerate() {
                let port_excluded = self.capture.exclude_ports.contains(&addr.port())
                    || (!self.capture.include_ports.is_empty()
                        && !self.capture.include_ports.contains(&addr.port()));
                let net_excluded = self
                    .capture
                    .exclude_cidrs
                    .iter()
                    .any(|net| net.contains(&addr.ip()));
                if port_excluded || net_excluded {
                    return Err(ConfigError::InvalidAt {
                        field: format!("services[{i}].addresses[{j}]"),
                        reason: format!(
                            "{addr} is excluded from capture (capture.exclude_cidrs, \
                             exclude_ports or include_ports), so the service would never be used"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}
