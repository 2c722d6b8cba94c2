//! Inbound capture: `sk_lookup` steers connections arriving at a pod into its sidecar,
//! which delivers them to the address the client dialed.

use std::time::{Duration, Instant};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    tools::{Background, InFlight, attached_programs, pod_tool_bin},
};

/// Pod A (a plain client, no sidecar) and pod B (servers and a sidecar).
struct Rig {
    a: Pod,
    b: Pod,
    _servers: Background,
    net: Net,
}

fn rig(test: &str) -> Rig {
    let mut net = Net::new(test);
    let a = net.pod("a");
    let b = net.pod("b");
    let mut cmd = b.app(&pod_tool_bin());
    cmd.arg("http");
    for addr in [
        format!("{}:8080", b.ip4),
        format!("[{}]:8080", b.ip6),
        "127.0.0.1:8081".to_string(),
        format!("{}:8082", b.ip4),
    ] {
        cmd.args(["--listen", &addr]);
    }
    let servers = Background::start_ready(cmd);
    Rig {
        a,
        b,
        _servers: servers,
        net,
    }
}

fn curl(pod: &Pod, url: &str) -> Result<String, String> {
    let out = pod
        .outsider("curl")
        .args(["-sS", "--max-time", "3", url])
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn inbound(sidecar: &Sidecar, reason: Option<&str>) -> u64 {
    match reason {
        None => sidecar.metric(
            "sidecar_connections_opened_total",
            &[("direction", "inbound")],
        ) as u64,
        Some(r) => sidecar.metric(
            "sidecar_connections_closed_total",
            &[("direction", "inbound"), ("reason", r)],
        ) as u64,
    }
}

#[test]
fn inbound_connections_reach_the_pod_ip_through_the_sidecar() {
    let rig = rig("inbound");
    let sidecar = Sidecar::start(&rig.b, "", Placement::InPodCgroup);
    // The application sees the sidecar's delivery, not A: from 127.0.0.6 over IPv4
    // (reusable TIME_WAIT, and not the 127.0.0.1 apps trust), from B's own address
    // over IPv6.
    let body = curl(&rig.a, &format!("http://{}:8080/", rig.b.ip4)).expect("IPv4 inbound");
    assert!(
        body.contains(&format!("served-by {}:8080 peer 127.0.0.6:", rig.b.ip4)),
        "{body}"
    );
    let body = curl(&rig.a, &format!("http://[{}]:8080/", rig.b.ip6)).expect("IPv6 inbound");
    assert!(
        body.contains(&format!(
            "served-by [{}]:8080 peer [{}]:",
            rig.b.ip6, rig.b.ip6
        )),
        "{body}"
    );
    assert_eq!(inbound(&sidecar, None), 2);
    assert_eq!(inbound(&sidecar, Some("normal")), 2);
    assert_eq!(sidecar.kernel_stat("captured"), 2);
    drop(rig.net);
}

#[test]
fn an_application_bound_to_loopback_stays_unreachable() {
    let rig = rig("loopback");
    let sidecar = Sidecar::start(&rig.b, "", Placement::InPodCgroup);
    let err = curl(&rig.a, &format!("http://{}:8081/", rig.b.ip4))
        .expect_err("must not reach 127.0.0.1:8081");
    // The sidecar accepted, found nothing at the pod IP, and reset the client: curl
    // sees the reset while connecting (exit 7) or reading (56), never a timeout.
    assert!(
        ["curl: (7)", "curl: (52)", "curl: (56)"]
            .iter()
            .any(|code| err.starts_with(code)),
        "{err}"
    );
    // The sidecar delivered to B's pod IP, where nothing listens, not to loopback.
    assert_eq!(inbound(&sidecar, Some("refused")), 1);
}

#[test]
fn health_and_excluded_ports_are_not_steered() {
    let rig = rig("excluded");
    let sidecar = Sidecar::start(
        &rig.b,
        "inbound:\n  exclude_ports: [8082]\n",
        Placement::InPodCgroup,
    );
    let ready = curl(&rig.a, &format!("http://{}:15020/readyz", rig.b.ip4))
        .expect("health port from outside");
    assert_eq!(ready.trim(), "ready");
    // Excluded: A reaches the application directly (it sees A's address).
    let body = curl(&rig.a, &format!("http://{}:8082/", rig.b.ip4)).expect("excluded port");
    assert!(body.contains(&format!("peer {}:", rig.a.ip4)), "{body}");
    assert_eq!(inbound(&sidecar, None), 0);
    assert_eq!(sidecar.kernel_stat("captured"), 0);
}

/// Holds B's sidecar in its drain (listeners closed, programs still attached) with a slow
/// transfer, then connects from A to a captured port.
fn connect_while_draining(fail_closed: bool) -> (Result<String, String>, u64, Rig) {
    let rig = rig("draining");
    let config = format!("proxy:\n  drain_timeout: 30s\ninbound:\n  fail_closed: {fail_closed}\n");
    let sidecar = Sidecar::start(&rig.b, &config, Placement::InPodCgroup);
    let mut echo = rig.b.app(&pod_tool_bin());
    echo.args(["echo", "--listen", &format!("{}:9400", rig.b.ip4)]);
    let _echo = Background::start_ready(echo);
    let mut slow = rig.a.outsider(&pod_tool_bin());
    slow.args([
        "slow",
        "--to",
        &format!("{}:9400", rig.b.ip4),
        "--bytes",
        "20000",
        "--seconds",
        "4",
    ]);
    let slow = InFlight::start(slow);

    sidecar.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&rig.a, &format!("http://{}:15020/readyz", rig.b.ip4))
        .is_ok_and(|r| r.trim() == "ready")
    {
        assert!(Instant::now() < deadline, "sidecar never started draining");
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = curl(&rig.a, &format!("http://{}:8080/", rig.b.ip4));
    let dropped = sidecar.kernel_stat("listener_missing_dropped");
    let summary = slow.finish().to_string();
    assert!(
        summary.contains("\"ok\":1"),
        "the in-flight transfer must finish: {summary}"
    );
    let (status, log) = sidecar.terminate_with_log();
    assert!(status.success(), "{status}\n{log}");
    (result, dropped, rig)
}

#[test]
fn fail_closed_drops_captured_connections_while_the_proxy_cannot_take_them() {
    let (result, dropped, _rig) = connect_while_draining(true);
    let err = result.expect_err("nothing may reach the app around the proxy");
    // Dropped by sk_lookup: curl could not connect at all (exit 7), not a reset later.
    assert!(err.starts_with("curl: (7)"), "{err}");
    assert_eq!(dropped, 1);
}

#[test]
fn fail_open_lets_connections_through_while_the_proxy_cannot_take_them() {
    let (result, dropped, rig) = connect_while_draining(false);
    let body = result.expect("fail open passes to the app");
    assert!(
        body.contains(&format!("peer {}:", rig.a.ip4)),
        "went direct: {body}"
    );
    assert_eq!(dropped, 0);
}

#[test]
fn a_crashed_sidecar_fails_closed_and_a_restarted_one_takes_over() {
    let rig = rig("crash");
    let mut http = rig.a.app(&pod_tool_bin());
    http.args(["http", "--listen", &format!("{}:8080", rig.a.ip4)]);
    let _a_http = Background::start_ready(http);
    let inbound_url = format!("http://{}:8080/", rig.b.ip4);
    let outbound_url = format!("http://{}:8080/", rig.a.ip4);
    let app_curl = |url: &str| {
        rig.b
            .app("curl")
            .args(["-sS", "--max-time", "3", url])
            .output()
            .expect("curl")
    };

    let sidecar = Sidecar::start(&rig.b, "", Placement::InPodCgroup);
    assert!(
        curl(&rig.a, &inbound_url)
            .expect("inbound")
            .contains("peer 127.0.0.6:")
    );
    assert!(app_curl(&outbound_url).status.success());
    sidecar.crash();

    // The pinned programs stay: inbound is dropped, outbound refused, nothing goes direct.
    assert_eq!(
        attached_programs(&rig.b.cgroup).len(),
        3,
        "capture must outlive the crash"
    );
    let err =
        curl(&rig.a, &inbound_url).expect_err("inbound must not reach the app around the proxy");
    // Dropped by sk_lookup: curl could not connect at all (exit 7), not a reset later.
    assert!(err.starts_with("curl: (7)"), "{err}");
    let out = app_curl(&outbound_url);
    assert_eq!(
        out.status.code(),
        Some(7),
        "outbound must be refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A restarted sidecar takes the pinned links over: no second set of programs.
    let sidecar = Sidecar::start(&rig.b, "", Placement::InPodCgroup);
    assert!(
        sidecar.logs().contains("took over the pinned link"),
        "{}",
        sidecar.logs()
    );
    assert_eq!(attached_programs(&rig.b.cgroup).len(), 3);
    assert!(
        curl(&rig.a, &inbound_url)
            .expect("inbound after restart")
            .contains("peer 127.0.0.6:")
    );
    assert!(app_curl(&outbound_url).status.success());
    assert_eq!(
        sidecar.opened(),
        2,
        "both directions go through the new proxy"
    );

    // A clean stop detaches every link through its descriptor (the pins, root's
    // alone, are left for the next start to remove): the cgroup programs are gone, and
    // inbound traffic reaches the app directly, so the inbound program is too.
    let status = sidecar.terminate();
    assert!(status.success());
    assert!(attached_programs(&rig.b.cgroup).is_empty());
    let body = curl(&rig.a, &inbound_url).expect("direct after a clean stop");
    assert!(body.contains(&format!("peer {}:", rig.a.ip4)), "{body}");
}
