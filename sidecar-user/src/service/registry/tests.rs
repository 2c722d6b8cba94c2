//! The registry: routing, limits, reloads and discovered services.

use super::*;

fn config(text: &str) -> Config {
    Config::from_yaml(text, "test", Vec::new()).expect("valid")
}

const TWO: &str = "services:\n- name: web\n  addresses: ['198.19.0.10:80']\n  endpoints: ['10.0.0.1:8080', {address: '10.0.0.2:8080', weight: 3, zone: b}]\n  limits: {max_connections: 2, max_pending: 1}\n";

#[test]
fn routes_vips_and_applies_the_outbound_policy() {
    let services = Services::new(&config(TWO));
    let reg = services.load();
    assert!(matches!(
        reg.route("198.19.0.10:80".parse().expect("addr")),
        Route::Service(_)
    ));
    assert!(matches!(
        reg.route("198.19.0.10:81".parse().expect("addr")),
        Route::Passthrough
    ));
    let strict =
        format!("{TWO}outbound:\n  policy: registry_only\n  allow_cidrs: [192.0.2.0/24]\n");
    services.apply(&config(&strict));
    let reg = services.load();
    assert!(matches!(
        reg.route("198.19.0.11:80".parse().expect("addr")),
        Route::Denied
    ));
    assert!(matches!(
        reg.route("192.0.2.7:443".parse().expect("addr")),
        Route::Passthrough
    ));
}

#[test]
fn config_services_win_over_discovered_ones_and_unchanged_ones_are_kept() {
    let services = Services::new(&config(TWO));
    let mut taken = ServiceConfig::named(
        "web.shop:80".into(),
        vec![
            "198.19.0.10:80".parse().expect("addr"),
            "198.19.0.20:80".parse().expect("addr"),
        ],
    );
    taken.endpoints = vec![EndpointConfig::at("10.1.0.1:8080".parse().expect("addr"))];
    let mut same_name =
        ServiceConfig::named("web".into(), vec!["198.19.0.30:80".parse().expect("addr")]);
    same_name.endpoints = taken.endpoints.clone();
    let discovered = Discovered {
        services: vec![taken.into(), same_name.into()],
        workloads: Arc::default(),
    };
    services.set_discovered(discovered.clone());
    let reg = services.load();
    let Route::Service(file) = reg.route("198.19.0.10:80".parse().expect("addr")) else {
        panic!("routed");
    };
    assert_eq!(file.name(), "web", "the config file's address wins");
    let Route::Service(found) = reg.route("198.19.0.20:80".parse().expect("addr")) else {
        panic!("routed");
    };
    assert_eq!(
        found.name(),
        "web.shop:80",
        "its other address is still routed"
    );
    assert!(
        matches!(
            reg.route("198.19.0.30:80".parse().expect("addr")),
            Route::Passthrough
        ),
        "a discovered service named like a config one is left out"
    );
    // The same discovery again: the very same service, endpoints' state and all.
    services.set_discovered(discovered);
    let again = services.load();
    let kept = again.get("web.shop:80").expect("kept");
    assert!(Arc::ptr_eq(&found, kept));
    // A config reload keeps discovered services too.
    services.apply(&config(TWO));
    assert!(services.load().get("web.shop:80").is_some());
}

#[test]
fn limits_refuse_the_overflow_and_free_slots_on_drop() {
    let services = Services::new(&config(TWO));
    let reg = services.load();
    let web = reg.get("web").expect("web");
    let mut a = web.admit().expect("first");
    assert_eq!(
        web.admit().err(),
        Some(Overflow::Pending),
        "one connect pending at a time"
    );
    a.connected();
    let b = web.admit().expect("second");
    drop(b);
    let _c = web.admit().expect("slot freed");
    assert_eq!(web.admit().err(), Some(Overflow::Connections));
    assert_eq!(web.limits_state(), (2, 1, 1));
}

#[test]
fn reload_keeps_endpoint_state_by_address() {
    let services = Services::new(&config(TWO));
    let first = services
        .load()
        .get("web")
        .expect("web")
        .choose(0, &[])
        .expect("endpoint");
    let lease = first.state.lease();
    let changed = TWO.replace("'10.0.0.1:8080', ", "'10.0.0.1:8080', '10.0.0.3:8080', ");
    services.apply(&config(&changed));
    let reg = services.load();
    let web = reg.get("web").expect("web");
    let b = web.balancer();
    assert_eq!(b.endpoints.len(), 3);
    let same = b
        .endpoints
        .iter()
        .find(|e| e.addr == first.addr)
        .expect("kept");
    assert_eq!(same.state.active(), 1, "live state carried over");
    drop(lease);
    assert_eq!(same.state.active(), 0);
}

#[test]
fn retries_skip_tried_endpoints_and_panic_mode_uses_all() {
    let services = Services::new(&config(TWO));
    let reg = services.load();
    let web = reg.get("web").expect("web");
    let a = web.choose(1, &[]).expect("a");
    let b = web.choose(1, &[a.addr]).expect("b");
    assert_ne!(a.addr, b.addr);
    assert!(web.choose(1, &[a.addr, b.addr]).is_none());
    // Eject one of two: 50% healthy is not below the 50% threshold, so only the
    // healthy one is chosen.
    let outlier = crate::config::OutlierConfig {
        consecutive_failures: 1,
        ..Default::default()
    };
    a.state.failed(&outlier);
    assert!((0..20).all(|k| web.choose(k, &[]).map(|e| e.addr) == Some(b.addr)));
    // Eject both: panic mode balances across all instead of none.
    b.state.failed(&outlier);
    assert!(web.choose(1, &[]).is_some());
}

/// A discovered service `web.shop:80` at 198.19.0.40:80 over `endpoints`.
fn discovered(endpoints: &[&str]) -> Discovered {
    let mut web = ServiceConfig::named(
        "web.shop:80".into(),
        vec!["198.19.0.40:80".parse().expect("addr")],
    );
    web.endpoints = endpoints
        .iter()
        .map(|a| EndpointConfig::at(a.parse().expect("addr")))
        .collect();
    Discovered {
        services: vec![web.into()],
        workloads: Arc::default(),
    }
}

#[test]
fn discovered_endpoint_changes_keep_the_state_of_those_that_stay() {
    let services = Services::new(&config(TWO));
    services.set_discovered(discovered(&["10.1.0.1:8080", "10.1.0.2:8080"]));
    let reg = services.load();
    let web = reg.get("web.shop:80").expect("discovered");
    let kept = web
        .balancer()
        .endpoints
        .iter()
        .find(|e| e.addr.to_string() == "10.1.0.1:8080")
        .expect("endpoint")
        .clone();
    let lease = kept.state.lease();
    services.set_discovered(discovered(&["10.1.0.1:8080", "10.1.0.3:8080"]));
    let reg = services.load();
    let web = reg.get("web.shop:80").expect("discovered");
    let b = web.balancer();
    let addrs: Vec<String> = b.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.3:8080"]);
    assert!(Arc::ptr_eq(&b.endpoints[0].state, &kept.state));
    assert_eq!(b.endpoints[0].state.active(), 1, "live state carried over");
    assert_eq!(
        b.endpoints[1].state.active(),
        0,
        "a new endpoint starts afresh"
    );
    drop(lease);
}

#[test]
fn discovered_endpoints_have_series_only_once_used() {
    let services = Arc::new(Services::new(&config(TWO)));
    services.set_discovered(discovered(&["10.1.0.1:8080", "10.1.0.2:8080"]));
    let mut registry = prometheus_client::registry::Registry::default();
    crate::service::metrics::ServiceCollector::register(
        services.clone(),
        Arc::default(),
        &mut registry,
    );
    let scrape = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    };
    let text = scrape();
    // The config file's endpoints always have their series, used or not.
    assert!(
        text.contains(r#"endpoint_healthy{service="web",endpoint="10.0.0.1:8080"} 1"#),
        "{text}"
    );
    assert!(!text.contains("web.shop:80"), "{text}");
    let reg = services.load();
    let web = reg.get("web.shop:80").expect("discovered");
    let used = web.choose(0, &[]).expect("endpoint");
    used.state.connected(std::time::Duration::from_millis(1));
    let text = scrape();
    let name = used.addr.to_string();
    assert!(
        text.contains(&format!(
            r#"endpoint_connect_attempts_total{{service="web.shop:80",endpoint="{name}",result="success"}} 1"#
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"service_overflow_total{service="web.shop:80""#),
        "{text}"
    );
    assert_eq!(
        text.matches(r#"endpoint_healthy{service="web.shop:80""#)
            .count(),
        1,
        "only the used endpoint: {text}"
    );
}
