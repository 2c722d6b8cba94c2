//! Outbound capture: kernel programs redirect an app's connects into the proxy,
//! which carries them to the original destination. Needs root; fails loudly without.

use std::{net::SocketAddr, time::Instant};

use sidecar_tests::{
    Net, Placement, Sidecar,
    tools::{Background, attached_programs, firewall_rules, pod_tool_bin, run_json},
};

const CONFIG: &str = "proxy:\n  connect_timeout: 1s\n";

/// A client pod with a sidecar and a server pod running HTTP (+UDP echo) on :8080.
/// Fields drop in order: the server process goes before the net that holds its pod.
struct Rig {
    client: sidecar_tests::Pod,
    server: sidecar_tests::Pod,
    _http: Background,
    net: Net,
}

fn rig(test: &str) -> Rig {
    let mut net = Net::new(test);
    let client = net.pod("client");
    let server = net.pod("server");
    let mut cmd = server.app(&pod_tool_bin());
    cmd.args([
        "http",
        "--listen",
        &format!("{}:8080", server.ip4),
        "--listen",
        &format!("[{}]:8080", server.ip6),
    ]);
    let http = Background::start_ready(cmd);
    Rig {
        client,
        server,
        _http: http,
        net,
    }
}

fn curl_body(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "curl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn curl_reaches_server_through_the_proxy_without_firewall_rules() {
    let before = firewall_rules();
    let rig = rig("curl");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    let url = format!("http://{}:8080/", rig.server.ip4);
    let body = curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &url]));
    assert!(
        body.contains(&format!("served-by {}:8080", rig.server.ip4)),
        "{body}"
    );
    // curl's socket was redirected: its peer is the proxy on loopback.
    assert!(body.ends_with("remote=127.0.0.1"), "{body}");
    assert_eq!(sidecar.opened(), 1);
    assert_eq!(
        (sidecar.metric("sidecar_upstream_connect_duration_seconds_count", &[]) as u64),
        1
    );
    assert_eq!(sidecar.kernel_stat("captured"), 1);
    assert!(sidecar.logs().contains("sidecar ready"));
    assert_eq!(
        firewall_rules(),
        before,
        "the sidecar must not add iptables or nftables rules"
    );
    drop(rig.net);
}

#[test]
fn concurrent_connections_reach_the_right_destination_byte_exact() {
    let mut net = Net::new("concurrent");
    let client = net.pod("client");
    let server = net.pod("server");
    // Five destinations: five addresses of the server pod, each with its own echo server.
    let mut dsts: Vec<SocketAddr> = Vec::new();
    for i in 0..5u8 {
        let ip = std::net::Ipv4Addr::new(198, 18, 0, 100 + i);
        server.add_address(ip.into());
        dsts.push(SocketAddr::new(ip.into(), 9000 + u16::from(i)));
    }
    let mut cmd = server.app(&pod_tool_bin());
    cmd.arg("echo");
    for d in &dsts {
        cmd.args(["--listen", &d.to_string()]);
    }
    let _echo = Background::start_ready(cmd);
    let sidecar = Sidecar::start(&client, CONFIG, Placement::InPodCgroup);
    let mut cmd = client.app(&pod_tool_bin());
    cmd.args(["clients", "--connections", "200"]);
    for d in &dsts {
        cmd.args(["--to", &d.to_string()]);
    }
    let summary = run_json(cmd);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["ok"], 200, "{summary}");
    assert_eq!(summary["half_closed"], 100, "{summary}");
    assert_eq!(summary["big"], 10, "{summary}");
    assert_eq!(sidecar.opened(), 200);
    assert_eq!(
        (sidecar.metric("sidecar_orig_dst_lookups_total", &[("result", "missing")]) as u64),
        0
    );
    assert_eq!(
        (sidecar.metric("sidecar_connection_sent_bytes_total", &[]) as u64),
        summary["bytes_sent"].as_u64().expect("sent")
    );
    assert_eq!(
        (sidecar.metric("sidecar_connection_received_bytes_total", &[]) as u64),
        summary["bytes_received"].as_u64().expect("received")
    );
}

#[test]
fn thousands_of_concurrent_connections_work() {
    let mut net = Net::new("thousands");
    let client = net.pod("client");
    let server = net.pod("server");
    let dst = format!("{}:9100", server.ip4);
    let mut cmd = server.app(&pod_tool_bin());
    cmd.args(["echo", "--listen", &dst]);
    let _echo = Background::start_ready(cmd);
    let sidecar = Sidecar::start(&client, CONFIG, Placement::InPodCgroup);
    let mut cmd = client.app(&pod_tool_bin());
    cmd.args(["hold", "--to", &dst, "--count", "3000"]);
    let held = run_json(cmd);
    assert_eq!(held["open"], 3000, "{held}");
    assert_eq!(held["ok"], 3000, "{held}");
    assert_eq!(sidecar.opened(), 3000);
}

fn no_loop(placement: Placement) {
    let rig = rig("noloop");
    let sidecar = Sidecar::start(&rig.client, CONFIG, placement);
    for _ in 0..3 {
        let url = format!("http://{}:8080/", rig.server.ip4);
        curl_body(&rig.client.curl(&[&url]));
    }
    // Three app connects captured; the proxy's three upstream connects were not.
    assert_eq!(sidecar.kernel_stat("captured"), 3);
    assert_eq!(sidecar.opened(), 3);
    assert_eq!(sidecar.closed("loop"), 0);
    if placement == Placement::InPodCgroup {
        assert_eq!(
            sidecar.kernel_stat("skipped_proxy"),
            3,
            "the proxy's own connects ran the hook"
        );
    }
}

#[test]
fn proxy_upstream_is_not_recaptured_when_inside_the_cgroup() {
    no_loop(Placement::InPodCgroup);
}

#[test]
fn proxy_upstream_is_not_recaptured_when_outside_the_cgroup() {
    no_loop(Placement::Outside);
}

#[test]
fn process_outside_the_pod_cgroup_is_not_captured() {
    let rig = rig("outsider");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    let url = format!("http://{}:8080/", rig.server.ip4);
    let out = rig
        .client
        .outsider("curl")
        .args(["-sS", "--max-time", "10", "-w", "remote=%{remote_ip}", &url])
        .output()
        .expect("curl");
    let body = curl_body(&out);
    assert!(
        body.ends_with(&format!("remote={}", rig.server.ip4)),
        "went direct: {body}"
    );
    assert_eq!(sidecar.opened(), 0);
    assert_eq!(sidecar.kernel_stat("captured"), 0);
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() {
    let rig = rig("exclude");
    // A second server address inside an excluded CIDR, and port 8081 excluded.
    rig.server.add_address("198.18.0.200".parse().expect("ip"));
    let mut cmd = rig.server.app(&pod_tool_bin());
    cmd.args([
        "http",
        "--listen",
        "198.18.0.200:8080",
        "--listen",
        &format!("{}:8081", rig.server.ip4),
    ]);
    let _more = Background::start_ready(cmd);
    let config =
        format!("{CONFIG}capture:\n  exclude_ports: [8081]\n  exclude_cidrs: [198.18.0.192/26]\n");
    let sidecar = Sidecar::start(&rig.client, &config, Placement::InPodCgroup);
    for url in [
        "http://198.18.0.200:8080/".to_string(),
        format!("http://{}:8081/", rig.server.ip4),
    ] {
        let body = curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &url]));
        assert!(
            !body.ends_with("remote=127.0.0.1"),
            "{url} was captured: {body}"
        );
    }
    assert_eq!(sidecar.kernel_stat("excluded_cidr"), 1);
    assert_eq!(sidecar.kernel_stat("excluded_port"), 1);
    // A port that is not excluded still is captured.
    let body = curl_body(&rig.client.curl(&[
        "-w",
        "remote=%{remote_ip}",
        &format!("http://{}:8080/", rig.server.ip4),
    ]));
    assert!(body.ends_with("remote=127.0.0.1"), "{body}");
    assert_eq!(sidecar.opened(), 1);
}

#[test]
fn include_ports_limits_capture() {
    let rig = rig("include");
    let config = format!("{CONFIG}capture:\n  include_ports: [443]\n");
    let sidecar = Sidecar::start(&rig.client, &config, Placement::InPodCgroup);
    let body = curl_body(&rig.client.curl(&[
        "-w",
        "remote=%{remote_ip}",
        &format!("http://{}:8080/", rig.server.ip4),
    ]));
    assert!(
        body.ends_with(&format!("remote={}", rig.server.ip4)),
        "{body}"
    );
    assert_eq!(sidecar.kernel_stat("captured"), 0);
}

#[test]
fn udp_connect_is_not_captured() {
    let rig = rig("udp");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    for to in [
        format!("{}:8080", rig.server.ip4),
        format!("[{}]:8080", rig.server.ip6),
    ] {
        let mut cmd = rig.client.app(&pod_tool_bin());
        cmd.args(["udp", "--to", &to]);
        let echo = run_json(cmd);
        assert_eq!(echo["echo"], "ping", "{echo}");
    }
    assert_eq!(sidecar.kernel_stat("captured"), 0);
    assert_eq!(sidecar.kernel_stat("skipped_not_tcp"), 2);
    assert_eq!(sidecar.opened(), 0);
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_captured() {
    let rig = rig("ipv6");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    let v6 = format!("http://[{}]:8080/", rig.server.ip6);
    let body = curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &v6]));
    assert!(
        body.contains(&format!("served-by [{}]:8080", rig.server.ip6)),
        "{body}"
    );
    assert!(body.ends_with("remote=::1"), "{body}");
    // An AF_INET6 socket dialing ::ffff:a.b.c.d runs only connect6.
    let mapped = format!("http://[::ffff:{}]:8080/", rig.server.ip4);
    let body = curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &mapped]));
    assert!(
        body.contains(&format!("served-by {}:8080", rig.server.ip4)),
        "{body}"
    );
    assert!(body.ends_with("remote=::ffff:127.0.0.1"), "{body}");
    assert_eq!(sidecar.opened(), 2);
    assert_eq!(
        (sidecar.metric("sidecar_orig_dst_lookups_total", &[("result", "missing")]) as u64),
        0
    );
}

#[test]
fn aborted_connects_leave_the_map_bounded_and_later_connects_work() {
    let rig = rig("abort");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    // Freeze the proxy so nothing is accepted: every connect is aborted before accept.
    sidecar.signal(libc::SIGSTOP);
    let count = sidecar_common::ORIG_DST_MAP_CAPACITY as usize + 7_000;
    let mut cmd = rig.client.app(&pod_tool_bin());
    cmd.args([
        "abort",
        "--to",
        &format!("{}:8080", rig.server.ip4),
        "--count",
        &count.to_string(),
    ]);
    let aborted = run_json(cmd);
    sidecar.signal(libc::SIGCONT);
    assert_eq!(aborted["aborted"], count, "{aborted}");
    // Every entry was removed when its app socket closed, counted one by one: the map
    // (a plain hash, nothing is evicted) holds none of them, and none failed to fit.
    assert!(
        sidecar.kernel_stat("orig_dst_rekeyed") >= count as u64,
        "{}",
        sidecar.stats()
    );
    let abandoned = sidecar.kernel_stat("orig_dst_abandoned");
    assert!(
        abandoned + 128 >= count as u64,
        "{abandoned} of {count} removed"
    );
    assert_eq!(sidecar.kernel_stat("orig_dst_rekey_failed"), 0);
    assert_eq!(sidecar.kernel_stat("orig_dst_rekey_missing"), 0);
    let stats = sidecar.stats();
    let by_flow = stats["orig_dst_map"]["by_flow"].as_u64().expect("by_flow");
    assert!(by_flow <= 128, "{stats}");
    let filled = sidecar.metric("sidecar_kernel_map_entries", &[("map", "ORIG_DST_BY_FLOW")]);
    assert!(filled <= 128.0, "{filled}");
    // New connections still reach the right destination.
    for _ in 0..20 {
        let body = curl_body(
            &rig.client
                .curl(&[&format!("http://{}:8080/", rig.server.ip4)]),
        );
        assert!(
            body.contains(&format!("served-by {}:8080", rig.server.ip4)),
            "{body}"
        );
    }
}

/// curl failed the way a reset connection fails: depending on whether the reset comes
/// before or after curl sends its request, that is exit 7 (couldn't connect), 52 (empty
/// reply) or 56 (receive failure), never a timeout (28) or an HTTP answer.
fn assert_reset(out: &std::process::Output) {
    let code = out.status.code();
    assert!(
        matches!(code, Some(7 | 52 | 56)),
        "curl exit {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn refused_and_unreachable_destinations_are_reset_within_the_timeout() {
    let rig = rig("refused");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    // Nothing listens on 8099: the upstream refuses, the app gets a reset at once.
    let started = Instant::now();
    let out = rig
        .client
        .curl(&[&format!("http://{}:8099/", rig.server.ip4)]);
    assert_reset(&out);
    assert!(
        started.elapsed().as_secs_f64() < 2.0,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(sidecar.closed("refused"), 1);

    // Via a gateway that never answers ARP, the connect hangs: the proxy gives up at
    // connect_timeout (1 s) and resets the app's connection.
    rig.client
        .ip(&["route", "add", "198.18.7.0/24", "via", "198.18.0.250"]);
    let started = Instant::now();
    let out = rig.client.curl(&["http://198.18.7.7:80/"]);
    let took = started.elapsed();
    assert_reset(&out);
    assert!(
        took.as_secs_f64() >= 0.9 && took.as_secs_f64() < 3.0,
        "took {took:?}"
    );
    assert_eq!(sidecar.closed("timeout"), 1);
    assert!(sidecar.logs().contains("timed out"), "{}", sidecar.logs());
}

#[test]
fn sigterm_detaches_and_later_connects_go_direct() {
    let rig = rig("sigterm");
    let sidecar = Sidecar::start(&rig.client, CONFIG, Placement::InPodCgroup);
    let url = format!("http://{}:8080/", rig.server.ip4);
    assert!(
        curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &url]))
            .ends_with("remote=127.0.0.1")
    );
    assert_eq!(
        attached_programs(&rig.client.cgroup).len(),
        3,
        "connect4, connect6, sock_ops"
    );
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert!(
        attached_programs(&rig.client.cgroup).is_empty(),
        "programs left attached"
    );
    let body = curl_body(&rig.client.curl(&["-w", "remote=%{remote_ip}", &url]));
    assert!(
        body.ends_with(&format!("remote={}", rig.server.ip4)),
        "{body}"
    );
}

#[test]
fn kernel_log_lines_reach_the_sidecar_log_at_the_configured_level() {
    let rig = rig("ebpflog");
    let url = format!("http://{}:8080/", rig.server.ip4);
    let line = format!("connect4: captured connect to {}:8080", rig.server.ip4);

    let sidecar = Sidecar::start_logged(
        &rig.client,
        CONFIG,
        Placement::InPodCgroup,
        "info,sidecar_ebpf=debug",
    );
    curl_body(&rig.client.curl(&[&url]));
    sidecar_tests::tools::wait_until(
        std::time::Duration::from_secs(5),
        "the kernel's log line reaches the sidecar log",
        || sidecar.logs().contains(&line),
    );
    let (_, log) = sidecar.terminate_with_log();
    assert!(
        log.contains(&line) && log.contains("sidecar_ebpf::connect"),
        "{log}"
    );

    // At info the programs are loaded with debug records disabled in the kernel.
    let sidecar = Sidecar::start_logged(&rig.client, CONFIG, Placement::InPodCgroup, "info");
    curl_body(&rig.client.curl(&[&url]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, log) = sidecar.terminate_with_log();
    assert!(!log.contains("captured connect"), "{log}");
}

#[test]
fn no_setting_lets_a_connection_leave_the_pod_uncaptured() {
    let rig = rig("holes");
    let mut net = rig.net;
    let other = net.pod("other");
    // A server on another host's sidecar health port (15020), outside allow_cidrs.
    let mut cmd = other.app(&pod_tool_bin());
    cmd.args(["http", "--listen", &format!("{}:15020", other.ip4)]);
    let _health_like = Background::start_ready(cmd);
    // The client pod's own server, reached at 0.0.0.0 (the kernel dials it locally).
    let mut cmd = rig.client.app(&pod_tool_bin());
    cmd.args(["echo", "--listen", "0.0.0.0:9090"]);
    let _local = Background::start_ready(cmd);
    let config = format!(
        "proxy:\n  ipv6: false\noutbound:\n  policy: registry_only\n  allow_cidrs: [{}/32]\n",
        rig.server.ip4
    );
    let sidecar = Sidecar::start(&rig.client, &config, Placement::InPodCgroup);
    let tally = |to: &str, count: usize| {
        let mut cmd = rig.client.app(&pod_tool_bin());
        cmd.args(["tally", "--to", to, "--count", &count.to_string()]);
        run_json(cmd)
    };

    // IPv4-mapped (Java's default for IPv4) is captured although IPv6 is off.
    let url = format!("http://[::ffff:{}]:8080/", rig.server.ip4);
    let body = curl_body(&rig.client.curl(&[&url]));
    assert!(body.contains("served-by"), "{body}");
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("direction", "outbound")]
        ),
        1.0
    );
    // Native IPv6 is refused in the kernel, not sent around the proxy.
    let url = format!("http://[{}]:8080/", rig.server.ip6);
    let out = rig.client.curl(&[&url]);
    assert!(!out.status.success(), "native IPv6 went through");
    assert_eq!(sidecar.kernel_stat("refused_ipv6_off"), 1);

    // Another host's 15020 is captured like any port, so registry_only applies.
    let out = rig.client.curl(&[&format!("http://{}:15020/", other.ip4)]);
    assert!(
        !out.status.success(),
        "registry_only bypassed on port 15020"
    );
    assert_eq!(sidecar.closed("policy_denied"), 1);

    // 0.0.0.0 is the pod itself: not captured, so registry_only does not refuse it.
    let local = tally("0.0.0.0:9090", 3);
    assert_eq!(local["ok"], 3, "{local}");
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("direction", "outbound")]
        ),
        2.0
    );
    drop(sidecar);
    drop(_health_like);
    drop(_local);
    drop(rig._http);
    drop(net);
}
