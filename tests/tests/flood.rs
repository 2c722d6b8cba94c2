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

/// A server pod `b` with an echo app, its sidecar strict and capped at 8 HBONE
/// connections (4 per client), and pods `good` and `greedy` with certificates of
/// the mesh. Fields drop in order: the sidecar before the net.
struct Capped {
    server: Sidecar,
    dst: String,
    _echo: sidecar_tests::tools::Background,
    certs: Certs,
    b: sidecar_tests::Pod,
    good: sidecar_tests::Pod,
    greedy: sidecar_tests::Pod,
    _net: Net,
}

fn capped(tag: &str) -> Capped {
    let mut net = Net::new(tag);
    let b = net.pod("b");
    let good = net.pod("good");
    let greedy = net.pod("greedy");
    let certs = Certs::new(tag, &["b=shop/db", "good=shop/web", "greedy=shop/web"]);
    let (echo, dst) = echo_server(&b, 8080);
    let server = Sidecar::start(
        &b,
        &format!(
            "{}inbound:\n  mode: strict\n  max_hbone_connections: 8\n  \
             max_hbone_connections_per_client: 4\n",
            certs.identity("b")
        ),
        Placement::InPodCgroup,
    );
    Capped {
        server,
        dst,
        _echo: echo,
        certs,
        b,
        good,
        greedy,
        _net: net,
    }
}

/// A client that completes mTLS with a valid certificate of the mesh (any workload,
/// or a compromised one) is still held to its share of HBONE connections: past
/// `max_hbone_connections_per_client` its new connections are reset at accept, while
/// another pod's sidecar still gets in, and a closed connection frees its slot.
#[test]
fn an_authenticated_client_is_held_to_its_share_of_hbone_connections() {
    // Bound in this order so the sidecar goes first and the net last.
    let Capped {
        _net,
        _echo,
        certs,
        b,
        good,
        greedy,
        dst,
        server,
    } = capped("flood-auth");
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

/// Sockets of the sidecar in `pod` toward `port` on the pod's own address (its
/// deliveries to the application), in any state but listening.
fn deliveries(pod: &sidecar_tests::Pod, port: u16) -> usize {
    let out = sidecar_tests::tools::output_within(
        pod.outsider("ss").args([
            "-Htn",
            "state",
            "all",
            "dst",
            &format!("{}:{port}", pod.ip4),
        ]),
        Duration::from_secs(5),
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn streams_reset_after_their_headers_cannot_pile_up_deliveries() {
    // Rapid reset: an admitted peer opens CONNECT streams and resets each a few
    // milliseconds later (after the server accepted it), toward an application that
    // never accepts. h2 frees a reset stream's slot at once; a server whose stream
    // tasks kept connecting ran far more deliveries than its stream cap (thousands).
    let mut net = Net::new("rst-flood");
    let b = net.pod("b");
    let attacker = net.pod("attacker");
    let good = net.pod("good");
    let certs = Certs::new("rst", &["b=shop/db", "attacker=shop/web", "good=shop/web"]);
    // Listens with a backlog of one and never accepts: connects to it hang.
    let mut sink = b.app("python3");
    sink.args([
        "-c",
        "import socket,sys,time\n\
         s=socket.socket(); s.bind((sys.argv[1], 9090)); s.listen(1)\n\
         print('ready', flush=True)\n\
         time.sleep(600)",
        &b.ip4.to_string(),
    ]);
    let _sink = sidecar_tests::tools::Background::start_ready(sink);
    let (_echo, dst) = echo_server(&b, 8080);
    let server = Sidecar::start(
        &b,
        &format!("{}inbound:\n  mode: strict\n", certs.identity("b")),
        Placement::InPodCgroup,
    );
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (peak, done, b) = (peak.clone(), done.clone(), b.clone());
        move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(deliveries(&b, 9090), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let mut flood = attacker.outsider(&pod_tool_bin());
    flood
        .args(["reset-flood", "--to", &format!("{}:15008", b.ip4)])
        .arg("--cert")
        .arg(certs.dir().join("attacker"))
        .args(["--authority", &format!("{}:9090", b.ip4), "--count", "3000"])
        .args(["--batch", "25", "--reset-after-ms", "20"]);
    let summary = run_json(flood);
    // Past the flood, the sampler sees what is still connecting.
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    // The stream cap (200) bounds the deliveries of one connection, and resets stop
    // them: far fewer than the streams sent.
    assert!(
        peak <= 200,
        "{peak} deliveries at once on one connection: {summary}"
    );
    assert_eq!(
        summary["ended"], "goaway Some(ENHANCE_YOUR_CALM)",
        "the server tolerated the resets: {summary}"
    );
    let abuse = |kind: &str| server.metric("sidecar_hbone_server_abuse_total", &[("kind", kind)]);
    assert_eq!(abuse("goaway_enhance_your_calm"), 1.0);
    let resets = abuse("reset_before_answer");
    assert!(resets >= 100.0, "{resets}");
    // Each refusal is counted, but the log holds a bounded number of lines per reason
    // (20 per 10 s), with a count of the rest.
    let log = server.logs();
    let lines = log.matches("refusing connection").count();
    assert!(
        lines <= 40,
        "{lines} refusal lines for {resets} resets:\n{log}"
    );
    within(Duration::from_secs(10), "every delivery to end", || {
        deliveries(&b, 9090) == 0
    });
    // A legitimate peer is still served.
    let _client = Sidecar::meshed_client(&good, &certs, "good");
    echo_time(&good, &dst, 5);
}

#[test]
fn the_kubelet_gets_through_while_other_pods_hold_every_health_connection() {
    // Sixteen client addresses each hold the per-client maximum (16) of keep-alive
    // connections to the health port: all 256 of the listener's slots. The kubelet
    // (a client holding none) must still get its probe answered: the oldest idle
    // connection of a client holding the most makes room.
    let mut net = Net::new("health-fair");
    let b = net.pod("b");
    let pods = net.pod("pods");
    let kubelet = net.pod("kubelet");
    let _server = Sidecar::start(&b, "", Placement::InPodCgroup);
    let sources: Vec<String> = (0..16).map(|i| format!("198.18.0.{}", 100 + i)).collect();
    for s in &sources {
        pods.add_address(s.parse().expect("ip"));
    }
    let mut hold = pods.outsider(&pod_tool_bin());
    hold.args(["http-hold", "--to", &format!("{}:15020", b.ip4)])
        .args([
            "--per-source",
            "16",
            "--path",
            "/readyz",
            "--every-ms",
            "1000",
        ])
        .args(["--hold-ms", "8000"]);
    for s in &sources {
        hold.args(["--from", s]);
    }
    let holding = InFlight::start(hold);
    for i in 0..5 {
        let out = sidecar_tests::tools::output_within(
            kubelet.outsider("curl").args([
                "-sS",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}:15020/readyz", b.ip4),
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "probe {i} while every slot was held: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary = holding.finish();
    assert_eq!(summary["opened"], 256, "{summary}");
    // Only idle connections made room, one per probe connection at most.
    let closed = summary["closed_by_server"].as_u64().unwrap_or(0);
    assert!((1..=5).contains(&closed), "{summary}");
}

#[test]
fn a_new_peer_is_served_while_others_hold_every_hbone_connection() {
    // Two addresses of one pod hold their maximum (4 each) of authenticated,
    // idle HBONE connections: the sidecar-wide cap of 8. A new peer is still served:
    // the oldest idle connection of a client holding the most is closed (GOAWAY).
    // Bound in this order so the sidecar goes first and the net last.
    let Capped {
        _net,
        _echo,
        certs,
        b,
        good,
        greedy,
        dst,
        server,
    } = capped("hbone-fair");
    let sources = ["198.18.0.120", "198.18.0.121"];
    for s in sources {
        greedy.add_address(s.parse().expect("ip"));
    }
    let mut hold = greedy.outsider(&pod_tool_bin());
    hold.args(["hbone-hold", "--to", &format!("{}:15008", b.ip4)])
        .arg("--cert")
        .arg(certs.dir().join("greedy"))
        .args(["--authority", &dst, "--count", "4", "--hold-ms", "6000"])
        .args(["--from", sources[0], "--from", sources[1]]);
    let holding = InFlight::start(hold);
    assert_eq!(server.metric("sidecar_inbound_hbone_connections", &[]), 8.0);
    let _client = Sidecar::meshed_client(&good, &certs, "good");
    echo_time(&good, &dst, 10);
    let evicted = server.metric("sidecar_inbound_hbone_connections_evicted_total", &[]);
    assert_eq!(evicted, 1.0, "one idle connection made room");
    let summary = holding.finish();
    assert_eq!(summary["ok"], 8, "{summary}");
    assert_eq!(summary["open_at_end"], 7, "{summary}");
    assert_eq!(
        server.metric(
            "sidecar_inbound_hbone_connections_refused_total",
            &[("limit", "sidecar")]
        ),
        0.0
    );
}
