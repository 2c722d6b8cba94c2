//! Config parsing, overrides and validation errors.

use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, "test.yaml", Vec::new())
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_file_is_the_defaults() {
    assert_eq!(parse("").expect("empty is valid"), Config::default());
    assert_eq!(
        parse("# only a comment\n").expect("comment is valid"),
        Config::default()
    );
    assert_eq!(parse("{}").expect("{} is valid"), Config::default());
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../../examples/sidecar.yaml");
    let config = parse(text).expect("the documented example is valid");
    assert_eq!(config.proxy.connect_timeout, Duration::from_secs(5));
}

#[test]
fn full_file_parses() {
    let config = parse(
        "proxy:\n  uid: 1500\n  connect_timeout: 250ms\n  idle_timeout: 2m\n\
         capture:\n  exclude_ports: [22, 6443]\n  exclude_cidrs: [10.96.0.1/32, 'fd00::/8']\n",
    )
    .expect("valid");
    assert_eq!(config.proxy.uid, 1500);
    assert_eq!(config.proxy.connect_timeout, Duration::from_millis(250));
    assert_eq!(config.capture.exclude_ports, vec![22, 6443]);
    assert_eq!(config.capture.exclude_cidrs.len(), 2);
}

#[test]
fn unknown_field_is_named() {
    let e = error("proxy:\n  conect_timeout: 1s\n");
    assert!(e.contains("proxy") && e.contains("conect_timeout"), "{e}");
    let e = error("bogus: 1\n");
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_cidr_is_named() {
    let e = error("capture:\n  exclude_cidrs: [10.0.0.0/8, 10.0.0.300/8]\n");
    assert!(e.contains("capture.exclude_cidrs[1]"), "{e}");
}

#[test]
fn port_out_of_range_is_named() {
    let e = error("capture:\n  exclude_ports: [80, 70000]\n");
    assert!(e.contains("capture.exclude_ports[1]"), "{e}");
    let e = error("capture:\n  include_ports: [0]\n");
    assert!(e.contains("capture.include_ports"), "{e}");
}

#[test]
fn bad_duration_is_named() {
    let e = error("proxy:\n  connect_timeout: soon\n");
    assert!(
        e.contains("proxy.connect_timeout") && e.contains("soon"),
        "{e}"
    );
}

#[test]
fn admin_must_be_loopback() {
    let e = error("admin:\n  address: 0.0.0.0:15000\n");
    assert!(e.contains("admin.address") && e.contains("loopback"), "{e}");
}

#[test]
fn port_clash_is_named() {
    let e = error("proxy:\n  outbound_port: 15020\n");
    assert!(
        e.contains("health.address") && e.contains("proxy.outbound_port"),
        "{e}"
    );
}

#[test]
fn inbound_settings_are_checked() {
    let e = error("inbound:\n  ports: [80]\n  exclude_ports: [80]\n");
    assert!(e.contains("inbound.ports"), "{e}");
    let e = error("inbound:\n  port: 15000\n");
    assert!(
        e.contains("inbound.port") && e.contains("admin.address"),
        "{e}"
    );
    let config = parse("inbound:\n  ports: [8080]\n  fail_closed: false\n").expect("valid");
    assert_eq!(config.inbound.ports, vec![8080]);
    assert!(!config.inbound.fail_closed);
    assert_eq!(config.own_ports(), [15001, 15006, 15000, 15020, 15008]);
}

#[test]
fn inbound_modes_need_an_identity_and_resolve_per_port() {
    let e = error("inbound:\n  mode: strict\n");
    assert!(e.contains("inbound.mode") && e.contains("identity"), "{e}");
    let e = error("inbound:\n  allow: ['spiffe://td/ns/a/sa/b', 'nope']\n");
    assert!(e.contains("inbound.allow[1]"), "{e}");
    let config = parse(
        "identity:\n  cert: c.pem\n  key: k.pem\n  bundle: b.pem\n\
         inbound:\n  port_modes:\n    8080: strict\n    9090: disabled\n  allow: ['spiffe://td/ns/a/*']\n",
    )
    .expect("valid");
    assert_eq!(config.inbound_mode(8080), InboundMode::Strict);
    assert_eq!(config.inbound_mode(9090), InboundMode::Disabled);
    assert_eq!(config.inbound_mode(7070), InboundMode::Permissive);
    assert_eq!(Config::default().inbound_mode(7070), InboundMode::Disabled);
}

#[test]
fn settings_that_would_skip_a_policy_are_refused() {
    let id = "identity:\n  cert: c.pem\n  key: k.pem\n  bundle: b.pem\n";
    let e = error(&format!(
        "{id}inbound:\n  exclude_ports: [9090]\n  port_modes:\n    9090: strict\n"
    ));
    assert!(e.contains("inbound.port_modes.9090"), "{e}");
    let e = error(&format!(
        "{id}inbound:\n  ports: [8080]\n  port_modes:\n    9090: permissive\n"
    ));
    assert!(e.contains("inbound.port_modes.9090"), "{e}");
    let e = error(&format!("{id}inbound:\n  port_modes:\n    15020: strict\n"));
    assert!(e.contains("inbound.port_modes.15020"), "{e}");
    let e = error(&format!("{id}inbound:\n  enabled: false\n  mode: strict\n"));
    assert!(e.contains("inbound.mode"), "{e}");
    let e = error(&format!(
        "{id}inbound:\n  enabled: false\n  port_modes:\n    8080: strict\n"
    ));
    assert!(e.contains("inbound.port_modes.8080"), "{e}");
    let e = error(&format!(
        "{id}mesh:\n  cidrs: [10.0.0.0/16]\ncapture:\n  exclude_cidrs: [10.0.5.0/24]\n"
    ));
    assert!(
        e.contains("capture.exclude_cidrs") && e.contains("mesh"),
        "{e}"
    );
    let svc =
        "services:\n- name: web\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.1:80']\n";
    let e = error(&format!("capture:\n  exclude_ports: [80]\n{svc}"));
    assert!(e.contains("services[0].addresses[0]"), "{e}");
    let e = error(&format!("capture:\n  include_ports: [443]\n{svc}"));
    assert!(e.contains("services[0].addresses[0]"), "{e}");
    let e = error(&format!(
        "capture:\n  exclude_cidrs: [198.19.0.0/16]\n{svc}"
    ));
    assert!(e.contains("services[0].addresses[0]"), "{e}");
    // Disabled is allowed anywhere: nothing to enforce.
    parse("inbound:\n  exclude_ports: [9090]\n  port_modes:\n    9090: disabled\n")
        .expect("disabled on an excluded port is fine");
}

#[test]
fn proxy_uid_zero_is_refused() {
    assert!(error("proxy:\n  uid: 0\n").contains("proxy.uid"));
}

#[test]
fn connection_caps_of_zero_are_refused_by_name() {
    for (yaml, field) in [
        (
            "inbound:\n  max_hbone_connections: 0\n",
            "inbound.max_hbone_connections",
        ),
        (
            "inbound:\n  max_hbone_connections_per_client: 0\n",
            "inbound.max_hbone_connections",
        ),
        (
            "inbound:\n  max_unauthenticated: 0\n",
            "inbound.max_unauthenticated",
        ),
    ] {
        let e = error(yaml);
        assert!(e.contains(field), "{yaml}: {e}");
    }
}

#[test]
fn env_overrides_fields_and_is_named_on_error() {
    let env = vec![
        (
            "SIDECAR__PROXY__CONNECT_TIMEOUT".to_string(),
            "2s".to_string(),
        ),
        (
            "SIDECAR__CAPTURE__EXCLUDE_PORTS".to_string(),
            "[22, 443]".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let config = Config::from_yaml("proxy:\n  connect_timeout: 9s\n", "f", env).expect("valid");
    assert_eq!(config.proxy.connect_timeout, Duration::from_secs(2));
    assert_eq!(config.capture.exclude_ports, vec![22, 443]);

    let env = vec![(
        "SIDECAR__PROXY__OUTBOUND_PORT".to_string(),
        "99999".to_string(),
    )];
    let e = Config::from_yaml("", "f", env)
        .expect_err("out of range")
        .to_string();
    assert!(
        e.contains("SIDECAR__PROXY__OUTBOUND_PORT") && e.contains("proxy.outbound_port"),
        "{e}"
    );

    let env = vec![("SIDECAR__PROXY__NOPE".to_string(), "1".to_string())];
    let e = Config::from_yaml("", "f", env)
        .expect_err("unknown")
        .to_string();
    assert!(
        e.contains("SIDECAR__PROXY__NOPE") && e.contains("nope"),
        "{e}"
    );
}

#[test]
fn services_parse_with_short_and_long_endpoints() {
    let config = parse(
        "services:\n- name: web\n  addresses: ['198.19.0.10:80', '[fd00:5d::10]:80']\n  \
         endpoints: ['10.0.0.1:8080', {address: '10.0.0.2:8080', weight: 3, zone: b}]\n  \
         policy: maglev\n  hash_key: source_address\n  connect_timeout: 2s\n\
         - name: db\n  addresses: ['198.19.0.11:5432']\n  dns: db.test:5432\n  dns_refresh: 5s\n\
         outbound:\n  policy: registry_only\n  allow_cidrs: [192.0.2.0/24]\n\
         dns:\n  resolver: 127.0.0.1:5353\n",
    )
    .expect("valid");
    let web = &config.services[0];
    assert_eq!(web.addresses.len(), 2);
    assert_eq!(web.endpoints[0].weight, 1);
    assert_eq!(web.endpoints[1].weight, 3);
    assert_eq!(web.endpoints[1].zone.as_deref(), Some("b"));
    assert_eq!(web.policy, LbPolicy::Maglev);
    assert_eq!(web.hash_key, HashKey::SourceAddress);
    assert_eq!(web.retries, 2);
    assert_eq!(web.outlier, OutlierConfig::default());
    let db = &config.services[1];
    assert_eq!(
        db.dns.as_ref().map(|d| (d.name.as_str(), d.port)),
        Some(("db.test", 5432))
    );
    assert_eq!(db.policy, LbPolicy::RoundRobin);
    assert_eq!(config.outbound.policy, OutboundPolicy::RegistryOnly);
}

#[test]
fn service_errors_name_the_service_and_field() {
    let svc =
        |body: &str| format!("services:\n- name: web\n  addresses: ['198.19.0.10:80']\n{body}");
    let e = error(&svc("  endpoints: [{address: '10.0.0.1:80', weight: 0}]\n"));
    assert!(e.contains("services[0].endpoints[0].weight"), "{e}");
    let e = error(&svc("  endpoints: ['10.0.0.1']\n"));
    assert!(
        e.contains("services[0].endpoints[0]") && e.contains("10.0.0.1"),
        "{e}"
    );
    let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  dns: a.b:80\n"));
    assert!(e.contains("services[0].dns"), "{e}");
    let e = error(&svc(""));
    assert!(e.contains("services[0].endpoints"), "{e}");
    let e = error(&svc("  dns: 'bad name:80'\n"));
    assert!(e.contains("services[0].dns"), "{e}");
    let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  policy: fastest\n"));
    assert!(
        e.contains("services[0].policy") && e.contains("fastest"),
        "{e}"
    );
    let e = error(&svc("  endpoints: ['10.0.0.1:80']\n  mtls: true\n"));
    assert!(
        e.contains("services[0].mtls") && e.contains("identity"),
        "{e}"
    );
    let two = format!(
        "{}- name: api\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.2:80']\n",
        svc("  endpoints: ['10.0.0.1:80']\n")
    );
    let e = error(&two);
    assert!(
        e.contains("services[1].addresses") && e.contains("services[0]"),
        "{e}"
    );
    let e = error(&svc(
        "  endpoints: ['10.0.0.1:80']\n  outlier: {base_ejection: 10s, max_ejection: 1s}\n",
    ));
    assert!(e.contains("services[0].outlier.max_ejection"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = Config::load(Some(Path::new("/nonexistent/sidecar.yaml")), Vec::new())
        .expect_err("missing")
        .to_string();
    assert!(e.contains("/nonexistent/sidecar.yaml"), "{e}");
}

#[test]
fn kubernetes_section_names_the_field_at_fault() {
    let err = Config::from_yaml("kubernetes:\n  namespaces: [Shop]\n", "t", Vec::new())
        .expect_err("upper case");
    assert!(err.to_string().contains("kubernetes.namespaces"), "{err}");
    let err = Config::from_yaml("kubernetes:\n  plaintext: maybe\n", "t", Vec::new())
        .expect_err("bad policy");
    assert!(err.to_string().contains("kubernetes.plaintext"), "{err}");
    let ok = Config::from_yaml(
        "kubernetes:\n  enabled: true\n  namespaces: [shop, db-2]\n  plaintext: deny\n",
        "t",
        Vec::new(),
    )
    .expect("valid");
    assert_eq!(
        ok.kubernetes.plaintext,
        crate::config::PlaintextPolicy::Deny
    );
}
