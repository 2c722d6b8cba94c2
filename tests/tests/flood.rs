//! Hostile clients on inbound ports: thousands of connections to the HBONE port that
//! never finish a ClientHello (or send nothing), and idle connections to the health
//! listener. The
//! sidecar must bound what they hold and keep serving a legitimate mTLS client.

use std::time::Duration;

use sidecar_tests::{
    Certs, Net, Placement, Sidecar,
    tools::{InFlight, echo_server, pod_tool_bin, run_json, wait_until as within},
};

/// Open descriptors and resident memory (KiB) of process `pid`.
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    (fds, rss)
}

/// Milliseconds for `count` sequential mTLS echo connections from `pod` to `to`.
fn echo_time(pod: &sidecar_tests::Pod, to: &str, count: usize) -> f64 {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()]);
    let summary = run_json(cmd);
    assert_eq!(summary["ok"], count, "{summary}");
    summary["elapsed_ms"].as_f64().expect("elapsed_ms")
}

#[test]
fn stalled_handshakes_are_bounded_and_a_real_client_keeps_working() {
    let mut net = Net::new("flood");
    let b = net.pod("b");
    let good = net.pod("good");
    let attacker = net.pod("attacker");
    let certs = Certs::new("flood", &["b=shop/db", "good=shop/web"]);
    let (_echo, dst) = echo_server(&b, 8080);
    let server = Sidecar::start(
        &b,
        &format!(
            "{}inbound:\n  mode: strict\n  handshake_timeout: 60s\n  \
             max_unauthenticated: 1000\n  max_unauthenticated_per_client: 128\n",
            certs.identity("b")
        ),
        Placement::InPodCgroup,
    );
    let _client = Sidecar::meshed_client(&good, &certs, "good");
    // Warm up (first handshakes, session tickets), then the unloaded figure.
    echo_time(&good, &dst, 20);
    let unloaded = echo_time(&good, &dst, 100);
    let (fds_before, rss_before) = footprint(server.pid());

    // 2,000 connections from one client to the HBONE port: half silent, half half a
    // ClientHello.
    let mut flood = attacker.app(&pod_tool_bin());
    let hbone = format!("{}:15008", b.ip4);
    flood.args([
        "stall",
        "--to",
        &hbone,
        "--count",
        "2000",
        "--hold-ms",
        "60000",
    ]);
    let _flood = InFlight::start(flood);
    let refused = |limit: &str| {
        server.metric(
            "sidecar_inbound_unauthenticated_refused_total",
            &[("limit", limit)],
        )
    };
    within(
        Duration::from_secs(30),
        "the flood is held at the cap",
        || {
            server.metric("sidecar_inbound_unauthenticated", &[]) == 128.0
                && refused("client") == 1872.0
        },
    );
    assert_eq!(refused("sidecar"), 0.0);
    let loaded = echo_time(&good, &dst, 100);
    let (fds_during, rss_during) = footprint(server.pid());
    eprintln!(
        "flood: 100 mTLS echoes {unloaded:.0} ms unloaded, {loaded:.0} ms under 2,000 stalled \
         connections; sidecar fds {fds_before} -> {fds_during}, RSS {rss_before} -> {rss_during} KiB"
    );
    assert!(
        loaded <= 2.0 * unloaded,
        "latency under the flood: {loaded:.0} ms vs {unloaded:.0} ms unloaded"
    );
    // The held connections (128) and the good client's few; nothing per refused one.
    assert!(
        fds_during <= fds_before + 128 + 16,
        "descriptors {fds_before} -> {fds_during}"
    );
    assert!(
        rss_during <= rss_before + 8 * 1024,
        "RSS {rss_before} -> {rss_during} KiB"
    );
    // The stalled connections never reached the application.
    assert_eq!(
        server.metric(
            "sidecar_connections_opened_total",
            &[("direction", "inbound"), ("tls", "true")]
        ),
        220.0
    );

    // The health listener, reachable from the whole cluster: 40 idle connections from
    // one client. 16 are served at once per client, the rest closed right away, and
    // the 16 are closed when no request headers arrive within 5 s.
    let mut idle = attacker.app(&pod_tool_bin());
    idle.args([
        "stall",
        "--to",
        &format!("{}:15020", b.ip4),
        "--count",
        "40",
        "--hold-ms",
        "8000",
    ]);
    let idle = InFlight::start(idle);
    // Meanwhile the kubelet's probe (another client) still gets its answer.
    let probe = good
        .outsider("curl")
        .args(["-sS", "--max-time", "3"])
        .arg(format!("http://{}:15020/readyz", b.ip4))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "ready\n");
    let summary = idle.finish();
    assert_eq!(summary["opened"], 40, "{summary}");
    assert_eq!(summary["closed_by_server"], 40, "{summary}");
}

/// A client that completes mTLS with a valid certificate of the mesh (any workload,
/// or a compromised one) is still held to its share of HBONE connections: past
/// `max_hbone_connections_per_client` its new connections are reset at accept, while
/// another pod's sidecar still gets in, and a closed connection frees its slot.
#[test]
fn an_authenticated_client_is_held_to_its_share_of_hbone_connections() {
    let mut net = Net::new("flood-auth");
    let b = net.pod("b");
    let good = net.pod("good");
    let greedy = net.pod("greedy");
    let certs = Certs::new(
        "flood-auth",
        &["b=shop/db", "good=shop/web", "greedy=shop/web"],
    );
    let (_echo, dst) = echo_server(&b, 8080);
    let server = Sidecar::start(
        &b,
        &format!(
            "{}inbound:\n  mode: strict\n  max_hbone_connections: 8\n  \
             max_hbone_connections_per_client: 4\n",
            certs.identity("b")
        ),
        Placement::InPodCgroup,
    );
    let _client = Sidecar::meshed_client(&good, &certs, "good");
    let hold = |count: usize, hold_ms: u64| {
        let mut cmd = greedy.outsider(&pod_tool_bin());
        cmd.args(["hbone-hold", "--to", &format!("{}:15008", b.ip4)])
            .arg("--cert")
            .arg(certs.dir().join("greedy"))
            .args(["--authority", &dst, "--count", &count.to_string()])
            .args(["--hold-ms", &hold_ms.to_string()]);
        InFlight::start(cmd)
    };
    let refused = |limit: &str| {
        server.metric(
            "sidecar_inbound_hbone_connections_refused_total",
            &[("limit", limit)],
        )
    };
    // Ten connections, one after another, each proving its identity and carrying
    // an echo: four are held, the other six reset at accept.
    let greedy_run = hold(10, 8_000);
    assert_eq!(refused("client"), 6.0);
    assert_eq!(refused("sidecar"), 0.0);
    assert_eq!(server.metric("sidecar_inbound_hbone_connections", &[]), 4.0);
    // Another pod is not refused for it.
    echo_time(&good, &dst, 20);
    let summary = greedy_run.finish();
    assert_eq!(summary["ok"], 4, "{summary}");
    assert_eq!(summary["refused"], 6, "{summary}");
    // Its connections closed, the greedy client gets slots again.
    within(Duration::from_secs(10), "the slots are freed", || {
        server.metric("sidecar_inbound_hbone_connections", &[]) <= 1.0
    });
    let again = hold(2, 0).finish();
    assert_eq!(again["ok"], 2, "{again}");
    assert_eq!(refused("client"), 6.0);
}
