//! What the kernel programs are told, computed from the config alone (no syscalls,
//! unit-tested): the settings word, the per-port rule bits outbound and inbound.

use std::collections::BTreeMap;

use sidecar_common::{KernelSettings, capture_flags, port_rule};

use crate::config::Config;

/// The kernel's view of the proxy settings.
pub fn capture_settings(config: &Config) -> KernelSettings {
    let mut flags = 0;
    if !config.capture.include_ports.is_empty() {
        flags |= capture_flags::INCLUDE_PORTS_ONLY;
    }
    if config.inbound.ports.is_empty() {
        flags |= capture_flags::INBOUND_ALL_PORTS;
    }
    if config.inbound.fail_closed {
        flags |= capture_flags::INBOUND_FAIL_CLOSED;
    }
    if config.capture.fail_open {
        flags |= capture_flags::OUTBOUND_FAIL_OPEN;
    }
    if !config.proxy.ipv6 {
        flags |= capture_flags::IPV6_OFF;
    }
    KernelSettings {
        proxy_uid: config.proxy.uid,
        flags,
        outbound_ip4: u32::from_ne_bytes([127, 0, 0, 1]),
        outbound_ip6: sidecar_common::ipv6_words(std::net::Ipv6Addr::LOCALHOST.octets()),
        outbound_port: config.proxy.outbound_port,
        _pad: 0,
        inbound_enabled: u32::from(config.inbound.enabled),
    }
}

/// Local port → inbound rule bits: captured ports (when listed), exclusions, and the
/// sidecar's own ports (health, admin, listeners), which are never steered.
pub fn inbound_rules(config: &Config) -> BTreeMap<u16, u32> {
    use sidecar_common::inbound_rule::{CAPTURE, EXCLUDE};
    rule_map(
        (&config.inbound.ports, CAPTURE),
        (&config.inbound.exclude_ports, EXCLUDE),
        &config.own_ports(),
    )
}

/// Destination port → rule bits: configured exclusions and inclusions. The sidecar's
/// own ports are not excluded: its listeners are on loopback, which is never captured,
/// and excluding them for every destination would let `registry_only` be bypassed by
/// dialling any host on 15000, 15001, 15006 or 15020.
pub fn port_rules(config: &Config) -> BTreeMap<u16, u32> {
    let include = (config.capture.include_ports.as_slice(), port_rule::INCLUDE);
    rule_map(
        include,
        (&config.capture.exclude_ports, port_rule::EXCLUDE),
        &[],
    )
}

/// Port → bits: `listed` ports get their bit, `excluded` ports and `own` ports get the
/// exclusion bit (exclusion wins in the programs).
fn rule_map(listed: (&[u16], u32), excluded: (&[u16], u32), own: &[u16]) -> BTreeMap<u16, u32> {
    let mut rules = BTreeMap::new();
    for &port in listed.0 {
        *rules.entry(port).or_default() |= listed.1;
    }
    for &port in excluded.0.iter().chain(own) {
        *rules.entry(port).or_default() |= excluded.1;
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_ports_are_captured_outbound_and_never_steered_inbound() {
        let mut config = Config::default();
        config.capture.include_ports = vec![80];
        config.capture.exclude_ports = vec![22];
        let rules = port_rules(&config);
        assert_eq!(rules[&80], port_rule::INCLUDE);
        assert_eq!(rules[&22], port_rule::EXCLUDE);
        let inbound = inbound_rules(&config);
        for port in [15000, 15001, 15006, 15020] {
            assert!(!rules.contains_key(&port), "outbound port {port}");
            assert_eq!(
                inbound[&port],
                sidecar_common::inbound_rule::EXCLUDE,
                "inbound port {port}"
            );
        }
    }

    #[test]
    fn ipv6_off_is_a_kernel_flag() {
        let mut config = Config::default();
        assert_eq!(capture_settings(&config).flags & capture_flags::IPV6_OFF, 0);
        config.proxy.ipv6 = false;
        assert_ne!(capture_settings(&config).flags & capture_flags::IPV6_OFF, 0);
    }

    #[test]
    fn include_list_sets_the_flag() {
        let mut config = Config::default();
        let defaults = capture_settings(&config).flags;
        assert_eq!(defaults & capture_flags::INCLUDE_PORTS_ONLY, 0);
        // Inbound: every port, fail closed, unless configured otherwise.
        assert_eq!(
            defaults,
            capture_flags::INBOUND_ALL_PORTS | capture_flags::INBOUND_FAIL_CLOSED
        );
        config.capture.include_ports = vec![443];
        config.inbound.ports = vec![8080];
        config.inbound.fail_closed = false;
        assert_eq!(
            capture_settings(&config).flags,
            capture_flags::INCLUDE_PORTS_ONLY
        );
        let rules = inbound_rules(&config);
        assert_eq!(rules[&8080], sidecar_common::inbound_rule::CAPTURE);
        assert_eq!(rules[&15020], sidecar_common::inbound_rule::EXCLUDE);
        assert_eq!(
            capture_settings(&config).outbound_ip4.to_ne_bytes(),
            [127, 0, 0, 1]
        );
    }
}
