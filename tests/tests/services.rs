//! Services: the application dials a virtual address that exists nowhere (no route
//! in the pods, so a capture bug fails instead of leaking), and the client pod's
//! sidecar balances the connections across real backend pods. Shares are read from
//! the backends' own answers (each echo server names its address first).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use sidecar_tests::{
    Certs, Net, Placement, Pod, Sidecar,
    tools::{Background, InFlight, pod_tool_bin, run_json, tally_by_server, wait_until as within},
};

const VIP: &str = "198.19.0.10:80";
const VIP2: &str = "198.19.0.11:80";
const PORT: u16 = 8080;

/// An echo server in `pod` on its IPv4 and IPv6 addresses, `delay_ms` slow.
fn echo(pod: &Pod, delay_ms: u64) -> Background {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["echo", "--delay-ms", &delay_ms.to_string()])
        .args(["--listen", &format!("{}:{PORT}", pod.ip4)])
        .args(["--listen", &format!("[{}]:{PORT}", pod.ip6)]);
    Background::start_ready(cmd)
}

/// A net with a client pod and `n` backend pods `b1..bn`, each running [`echo`]
/// (`slow` is the index of one that answers 200 ms late, if any).
fn rig(tag: &str, n: usize, slow: Option<usize>) -> (Net, Pod, Vec<Pod>, Vec<Option<Background>>) {
    let mut net = Net::new(tag);
    let client = net.pod("client");
    let b: Vec<Pod> = (1..=n).map(|i| net.pod(&format!("b{i}"))).collect();
    let apps = b
        .iter()
        .enumerate()
        .map(|(i, p)| Some(echo(p, if slow == Some(i) { 200 } else { 0 })))
        .collect();
    (net, client, b, apps)
}

/// `services:` with one service `web` at [`VIP`] over every pod in `b`, weight 1.
fn web_over(b: &[Pod], extra: &str) -> String {
    let all: Vec<(&Pod, u32)> = b.iter().map(|p| (p, 1)).collect();
    format!("services:\n{}", service("web", VIP, &all, extra))
}

/// `count` echo connections from `pod`'s app to `to`; the pod-tool summary.
fn tally(
    pod: &Pod,
    to: &str,
    count: usize,
    concurrency: usize,
    interval_ms: u64,
) -> serde_json::Value {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()]);
    run_json(cmd)
}

fn endpoint(pod: &Pod) -> String {
    format!("{}:{PORT}", pod.ip4)
}

/// A service block: `name` at `vip`, endpoints with weights, extra YAML lines.
fn service(name: &str, vip: &str, endpoints: &[(&Pod, u32)], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(p, w)| format!("{{address: '{}', weight: {w}}}", endpoint(p)))
        .collect();
    let mut s = format!(
        "- name: {name}\n  addresses: ['{vip}']\n  endpoints: [{}]\n",
        eps.join(", ")
    );
    for line in extra.lines() {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn assert_shares(summary: &serde_json::Value, backends: &[&Pod], want: &[f64], tolerance: f64) {
    let c = tally_by_server(summary);
    let total: u64 = c.values().sum();
    assert_eq!(summary["failed"], 0, "{summary}");
    for (pod, want) in backends.iter().zip(want) {
        let got = *c.get(&endpoint(pod)).unwrap_or(&0) as f64 / total as f64;
        assert!(
            (got - want).abs() <= tolerance,
            "{}: share {got:.4}, want {want:.4} ± {tolerance}: {summary}",
            endpoint(pod)
        );
    }
}

#[test]
fn round_robin_gives_equal_shares_and_weights_are_honoured() {
    let (_net, client, b, _apps) = rig("svc-rr", 3, None);
    let config = |w: [u32; 3]| {
        format!(
            "services:\n{}",
            service(
                "web",
                VIP,
                &[(&b[0], w[0]), (&b[1], w[1]), (&b[2], w[2])],
                ""
            )
        )
    };
    let sidecar = Sidecar::start(&client, &config([1, 1, 1]), Placement::InPodCgroup);
    let backends: Vec<&Pod> = b.iter().collect();

    let summary = tally(&client, VIP, 3000, 8, 0);
    assert_eq!(summary["ok"], 3000, "{summary}");
    assert_shares(&summary, &backends, &[1.0 / 3.0; 3], 0.02);
    // A pod IP the app chose itself (a headless service) is never rebalanced.
    let direct = tally(&client, &endpoint(&b[2]), 30, 1, 0);
    assert_eq!(
        tally_by_server(&direct).get(&endpoint(&b[2])),
        Some(&30),
        "{direct}"
    );

    // Weights 1:2:3, by editing the file the sidecar watches.
    sidecar.write_config(&config([1, 2, 3]));
    within(Duration::from_secs(5), "reload", || {
        sidecar.metric("sidecar_config_reloads_total", &[("result", "applied")]) == 1.0
    });
    let summary = tally(&client, VIP, 3000, 8, 0);
    assert_eq!(summary["ok"], 3000, "{summary}");
    assert_shares(
        &summary,
        &backends,
        &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0],
        0.03,
    );
    assert_eq!(
        sidecar.metric("sidecar_connections_opened_total", &[("service", "web")]),
        6000.0
    );
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("service", "passthrough")]
        ),
        30.0
    );
    // Per-endpoint series: every endpoint healthy, nothing left open.
    for pod in &backends {
        let labels = [("service", "web"), ("endpoint", &endpoint(pod) as &str)];
        assert_eq!(sidecar.metric("sidecar_endpoint_healthy", &labels), 1.0);
        assert_eq!(
            sidecar.metric("sidecar_endpoint_active_connections", &labels),
            0.0
        );
    }
}

#[test]
fn ring_hash_and_maglev_keep_each_client_pod_on_one_backend_and_spread_pods() {
    // Six client pods: each must stick to one backend, and together they must not all
    // land on one (the key is the pod's address, not the loopback address the
    // redirected connect arrives from, which is the same in every pod).
    let mut net = Net::new("svc-hash");
    let clients: Vec<Pod> = (1..=6).map(|i| net.pod(&format!("c{i}"))).collect();
    let b: Vec<Pod> = (1..=3).map(|i| net.pod(&format!("b{i}"))).collect();
    let _apps: Vec<Background> = b.iter().map(|p| echo(p, 0)).collect();
    let all: Vec<(&Pod, u32)> = b.iter().map(|p| (p, 1)).collect();
    let config = format!(
        "services:\n{}{}",
        service("ring", VIP, &all, "policy: ring_hash"),
        service("maglev", VIP2, &all, "policy: maglev")
    );
    let _sidecars: Vec<Sidecar> = clients
        .iter()
        .map(|c| Sidecar::start(c, &config, Placement::InPodCgroup))
        .collect();
    for vip in [VIP, VIP2] {
        let mut chosen = BTreeMap::new();
        for client in &clients {
            let summary = tally(client, vip, 10, 1, 0);
            let c = tally_by_server(&summary);
            assert_eq!(summary["ok"], 10, "{summary}");
            assert_eq!(c.len(), 1, "{} to {vip} spread over {c:?}", client.ip4);
            let backend = c.keys().next().cloned().unwrap_or_default();
            *chosen.entry(backend).or_insert(0) += 1;
        }
        assert!(
            chosen.len() >= 2,
            "{vip}: all six client pods hashed to one backend: {chosen:?}"
        );
    }
}

#[test]
fn a_pod_reaching_itself_in_the_mesh_gets_plaintext_and_no_ejection() {
    // Pod `a` is in mesh.cidrs and is one of the endpoints of the service it calls.
    let mut net = Net::new("svc-self");
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new("self", &["a=shop/web", "b=shop/web"]);
    let _apps = [echo(&a, 0), echo(&b, 0)];
    let mesh = "mesh:\n  cidrs: [198.18.0.0/24]\n";
    let _b_sidecar = Sidecar::start(
        &b,
        &format!("{}{mesh}", certs.identity("b")),
        Placement::InPodCgroup,
    );
    let config = format!(
        "{}{mesh}services:\n{}",
        certs.identity("a"),
        service(
            "web",
            VIP,
            &[(&a, 1), (&b, 1)],
            "outlier: {consecutive_failures: 1, base_ejection: 60s}"
        )
    );
    let sidecar = Sidecar::start(&a, &config, Placement::InPodCgroup);

    // Directly to its own IP: byte-exact echo, no handshake.
    let direct = tally(&a, &endpoint(&a), 20, 2, 0);
    assert_eq!(direct["ok"], 20, "{direct}");
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("service", "passthrough"), ("tls", "false")]
        ),
        20.0
    );
    // Through the service: both endpoints serve, the pod itself without mTLS, the
    // other over mTLS, and nothing is ejected.
    let summary = tally(&a, VIP, 40, 1, 0);
    assert_eq!(summary["ok"], 40, "{summary}");
    let c = tally_by_server(&summary);
    assert_eq!(c.get(&endpoint(&a)), Some(&20), "{summary}");
    assert_eq!(c.get(&endpoint(&b)), Some(&20), "{summary}");
    for pod in [&a, &b] {
        let labels = [("service", "web"), ("endpoint", &endpoint(pod) as &str)];
        assert_eq!(
            sidecar.metric("sidecar_endpoint_ejections_total", &labels),
            0.0
        );
        assert_eq!(
            sidecar.metric(
                "sidecar_endpoint_connect_attempts_total",
                &[labels[0], labels[1], ("result", "failure")]
            ),
            0.0
        );
    }
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("service", "web"), ("tls", "true")]
        ),
        20.0
    );
    assert_eq!(sidecar.closed("handshake_failed"), 0);
}

#[test]
fn meshed_backend_whose_app_stopped_is_retried_and_ejected() {
    let mut net = Net::new("svc-mesh");
    let client = net.pod("client");
    let b: Vec<Pod> = (1..=3).map(|i| net.pod(&format!("b{i}"))).collect();
    let certs = Certs::new(
        "mesh",
        &["client=shop/web", "b1=shop/db", "b2=shop/db", "b3=shop/db"],
    );
    let mut apps: Vec<Option<Background>> = b.iter().map(|p| Some(echo(p, 0))).collect();
    let backend_sidecars: Vec<Sidecar> = b
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let config = format!(
                "{}inbound:\n  mode: strict\n  allow: ['spiffe://cluster.local/ns/shop/*']\n",
                certs.identity(&format!("b{}", i + 1))
            );
            Sidecar::start(p, &config, Placement::InPodCgroup)
        })
        .collect();
    let all: Vec<(&Pod, u32)> = b.iter().map(|p| (p, 1)).collect();
    let config = format!(
        "{}services:\n{}",
        certs.identity("client"),
        service(
            "db",
            VIP,
            &all,
            "mtls: true\nserver_identity: spiffe://cluster.local/ns/shop/sa/db\noutlier: {consecutive_failures: 2, base_ejection: 60s}"
        )
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    let summary = tally(&client, VIP, 30, 1, 0);
    assert_eq!(
        tally_by_server(&summary).len(),
        3,
        "all three serve at first: {summary}"
    );
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[
                ("service", "db"),
                ("tls", "true"),
                ("peer_identity", "spiffe://cluster.local/ns/shop/sa/db")
            ]
        ),
        30.0
    );

    // Stop b2's application; its sidecar keeps accepting TCP and TLS.
    apps[1] = None;
    let summary = tally(&client, VIP, 60, 1, 0);
    assert_eq!(summary["ok"], 60, "no client-visible failure: {summary}");
    let c = tally_by_server(&summary);
    assert!(!c.contains_key(&endpoint(&b[1])), "{summary}");
    let labels = [("service", "db"), ("endpoint", &endpoint(&b[1]) as &str)];
    assert_eq!(
        sidecar.metric("sidecar_endpoint_ejections_total", &labels),
        1.0
    );
    assert_eq!(sidecar.metric("sidecar_endpoint_ejected", &labels), 1.0);
    let failed = sidecar.metric(
        "sidecar_endpoint_connect_attempts_total",
        &[labels[0], labels[1], ("result", "failure")],
    );
    assert_eq!(
        failed, 2.0,
        "ejected after exactly consecutive_failures attempts"
    );
    // b2's sidecar said why: its app refused (the distinct signal the client retried on).
    let refused = backend_sidecars[1].metric(
        "sidecar_connections_closed_total",
        &[("direction", "inbound"), ("reason", "refused")],
    );
    assert_eq!(refused, 2.0);
    assert_eq!(sidecar.closed("refused"), 0);
    // The admin view says the same.
    let view = sidecar.admin_json("/services");
    let eps = view[0]["endpoints"].as_array().expect("endpoints");
    let b2 = eps
        .iter()
        .find(|e| e["address"] == endpoint(&b[1]))
        .expect("b2 listed");
    assert_eq!(b2["health"], "ejected", "{view}");
    assert_eq!(b2["mtls"], true, "{view}");
    assert_eq!(view[0]["policy"], "round_robin", "{view}");
}

#[test]
fn limits_refuse_the_overflow_and_registry_only_refuses_unknown_destinations() {
    let (_net, client, b, _apps) = rig("svc-limit", 3, None);
    let config = format!(
        "outbound:\n  policy: registry_only\n  allow_cidrs: ['{}/32']\nservices:\n{}",
        b[1].ip4,
        service("web", VIP, &[(&b[0], 1)], "limits: {max_connections: 2}")
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    let open = || {
        sidecar.metric(
            "sidecar_connections_open",
            &[("direction", "outbound"), ("service", "web")],
        )
    };
    // Two connections held open by the app (nc waits on its stdin).
    let (host, port) = VIP.split_once(':').expect("vip");
    let mut holders: Vec<Child> = (0..2)
        .map(|_| {
            client
                .app("nc")
                .args([host, port])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("nc")
        })
        .collect();
    within(Duration::from_secs(5), "two open", || open() == 2.0);
    let summary = tally(&client, VIP, 1, 1, 0);
    assert_eq!(summary["failed"], 1, "the third is refused: {summary}");
    assert_eq!(sidecar.closed("overflow"), 1);
    assert_eq!(
        sidecar.metric(
            "sidecar_service_overflow_total",
            &[("service", "web"), ("limit", "max_connections")]
        ),
        1.0
    );
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    within(Duration::from_secs(5), "slots freed", || open() == 0.0);
    assert_eq!(tally(&client, VIP, 2, 1, 0)["ok"], 2);

    // Not a service and not allowed: refused and counted.
    let summary = tally(&client, &endpoint(&b[2]), 1, 1, 0);
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_closed_total",
            &[("direction", "outbound"), ("reason", "policy_denied")]
        ),
        1.0
    );
    assert!(
        sidecar.logs().contains("registry_only"),
        "the refusal says why"
    );
    // In allow_cidrs: passes through.
    let summary = tally(&client, &endpoint(&b[1]), 1, 1, 0);
    assert_eq!(summary["ok"], 1, "{summary}");
}

#[test]
fn least_request_sends_fewer_connections_to_a_slow_backend() {
    // b3 answers 200 ms late, so its connections stay open longer.
    let (_net, client, b, _apps) = rig("svc-lr", 3, Some(2));
    let config = web_over(&b, "policy: least_request");
    let _sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    let summary = tally(&client, VIP, 600, 12, 0);
    assert_eq!(summary["ok"], 600, "{summary}");
    let c = tally_by_server(&summary);
    let share = |p: &Pod| *c.get(&endpoint(p)).unwrap_or(&0) as f64 / 600.0;
    let (fast1, fast2, slow) = (share(&b[0]), share(&b[1]), share(&b[2]));
    eprintln!("least_request shares: fast {fast1:.3}, fast {fast2:.3}, slow {slow:.3}");
    assert!(
        slow < 0.5 * fast1.min(fast2),
        "the slow backend got {slow:.3} against {fast1:.3} and {fast2:.3}"
    );
}

#[test]
fn a_killed_backend_is_ejected_without_client_failures_and_readmitted() {
    let (_net, client, b, mut apps) = rig("svc-kill", 3, None);
    let config = web_over(
        &b,
        "outlier: {consecutive_failures: 2, base_ejection: 1s, max_ejection: 2s}",
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    // A steady stream (about 3 s) while b2 is killed.
    let stream = {
        let client = client.clone();
        std::thread::spawn(move || tally(&client, VIP, 300, 1, 10))
    };
    // Kill b2 once the stream is well under way.
    within(Duration::from_secs(10), "the stream is under way", || {
        sidecar.opened() >= 60
    });
    apps[1] = None;
    let summary = stream.join().expect("stream");
    // A connection already established to b2 when it dies is cut (nothing can replay
    // its bytes); every connect after that is retried elsewhere: at most that one fails.
    let failed = summary["failed"].as_u64().unwrap_or(u64::MAX);
    assert!(failed <= 1, "client-visible failures: {summary}");
    assert_eq!(
        summary["ok"].as_u64().unwrap_or(0) + failed,
        300,
        "{summary}"
    );
    let labels = [("service", "web"), ("endpoint", &endpoint(&b[1]) as &str)];
    assert!(sidecar.metric("sidecar_endpoint_ejections_total", &labels) >= 1.0);

    // b2 comes back; after its back-off it takes connections again.
    apps[1] = Some(echo(&b[1], 0));
    within(Duration::from_secs(10), "b2 re-admitted", || {
        let summary = tally(&client, VIP, 9, 1, 0);
        assert_eq!(summary["ok"], 9, "{summary}");
        tally_by_server(&summary).contains_key(&endpoint(&b[1]))
    });
    assert_eq!(sidecar.metric("sidecar_endpoint_healthy", &labels), 1.0);
}

#[test]
fn config_edits_apply_within_two_seconds_and_keep_established_connections() {
    let (_net, client, b, _apps) = rig("svc-edit", 2, None);
    let config = |eps: &str| {
        format!("services:\n- name: web\n  addresses: ['{VIP}']\n  endpoints: [{eps}]\n")
    };
    let sidecar = Sidecar::start(
        &client,
        &config(&format!("'{}'", endpoint(&b[0]))),
        Placement::InPodCgroup,
    );
    // Long transfers to b1 (the only endpoint), still running across the edits.
    let mut slow = client.app(&pod_tool_bin());
    slow.args([
        "slow",
        "--to",
        VIP,
        "--streams",
        "4",
        "--bytes",
        "400000",
        "--seconds",
        "4",
    ]);
    let transfers = InFlight::start(slow);

    // b1 out, b2 in.
    sidecar.write_config(&config(&format!("'{}'", endpoint(&b[1]))));
    let took = within(Duration::from_secs(2), "new endpoint used", || {
        tally_by_server(&tally(&client, VIP, 1, 1, 0)).contains_key(&endpoint(&b[1]))
    });
    eprintln!("endpoint change visible after {took:?}");
    // An invalid edit keeps the previous set.
    sidecar.write_config(&config(&format!(
        "{{address: '{}', weight: 0}}",
        endpoint(&b[0])
    )));
    within(Duration::from_secs(3), "rejected", || {
        sidecar.metric("sidecar_config_reloads_total", &[("result", "rejected")]) == 1.0
    });
    assert!(
        sidecar.logs().contains("services[0].endpoints[0].weight"),
        "the rejection names the field"
    );
    let summary = tally(&client, VIP, 10, 1, 0);
    assert_eq!(
        tally_by_server(&summary).get(&endpoint(&b[1])),
        Some(&10),
        "{summary}"
    );

    let done = transfers.finish();
    assert_eq!(done["ok"], 4, "established connections survived: {done}");
    assert_eq!(done["failed"], 0, "{done}");
}

/// dnsmasq answering from a hosts file on the pod's loopback; SIGHUP re-reads it.
struct Dns {
    child: Child,
    hosts: PathBuf,
}

impl Dns {
    fn start(pod: &Pod, hosts: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-hosts", pod.netns));
        std::fs::write(&path, hosts).expect("hosts");
        let child = pod
            .outsider("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=5353",
                "--local-ttl=1",
                "--pid-file=",
                "--user=root",
            ])
            .arg(format!("--addn-hosts={}", path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base) is required");
        Self { child, hosts: path }
    }

    fn answer(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

#[test]
fn dns_discovery_moves_new_connections_to_a_changed_answer() {
    let (_net, client, b, _apps) = rig("svc-dns", 2, None);
    let records = |p: &Pod| format!("{} backend.test\n{} backend.test\n", p.ip4, p.ip6);
    let dns = Dns::start(&client, &records(&b[0]));
    let config = format!(
        "dns:\n  resolver: 127.0.0.1:5353\nservices:\n- name: backend\n  addresses: ['{VIP}']\n  dns: backend.test:{PORT}\n"
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    let addrs = |p: &Pod| [endpoint(p), format!("[{}]:{PORT}", p.ip6)];
    within(Duration::from_secs(5), "first answer", || {
        tally(&client, VIP, 1, 1, 0)["ok"] == 1
    });
    // A and AAAA: both of b1's addresses are endpoints.
    let summary = tally(&client, VIP, 20, 1, 0);
    let c = tally_by_server(&summary);
    assert_eq!(
        c.keys().cloned().collect::<Vec<_>>(),
        addrs(&b[0]).to_vec(),
        "{summary}"
    );

    dns.answer(&records(&b[1]));
    within(Duration::from_secs(5), "moved to b2", || {
        let c = tally_by_server(&tally(&client, VIP, 4, 1, 0));
        c.keys().all(|k| addrs(&b[1]).contains(k))
    });
    let summary = tally(&client, VIP, 20, 1, 0);
    assert_eq!(
        tally_by_server(&summary)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        addrs(&b[1]).to_vec(),
        "{summary}"
    );
    assert!(sidecar.metric("sidecar_dns_lookups_total", &[("result", "success")]) >= 2.0);
}

#[test]
fn active_health_checks_take_a_dead_backend_out_without_traffic() {
    let (_net, client, b, mut apps) = rig("svc-check", 2, None);
    let config = web_over(
        &b,
        "health_check: {interval: 200ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 1}",
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    let labels = [("service", "web"), ("endpoint", &endpoint(&b[1]) as &str)];
    let healthy = || sidecar.metric("sidecar_endpoint_healthy", &labels);
    assert_eq!(healthy(), 1.0);
    // No client connection at all: only the checks can notice.
    apps[1] = None;
    within(Duration::from_secs(3), "marked unhealthy", || {
        healthy() == 0.0
    });
    assert_eq!(
        sidecar.metric("sidecar_endpoint_ejections_total", &labels),
        0.0
    );
    let summary = tally(&client, VIP, 10, 1, 0);
    assert_eq!(
        tally_by_server(&summary).get(&endpoint(&b[0])),
        Some(&10),
        "{summary}"
    );
    assert_eq!(
        sidecar.metric(
            "sidecar_endpoint_connect_attempts_total",
            &[labels[0], labels[1], ("result", "failure")]
        ),
        0.0,
        "no client connection was tried on the unhealthy endpoint"
    );
    apps[1] = Some(echo(&b[1], 0));
    within(Duration::from_secs(3), "healthy again", || healthy() == 1.0);
    let summary = tally(&client, VIP, 10, 1, 0);
    assert_eq!(tally_by_server(&summary).len(), 2, "{summary}");
}

#[test]
fn default_limits_hold_more_connections_than_envoys_defaults() {
    // Envoy's max_connections default (1,024) reset a busy pod's 1,025th connection.
    let (_net, client, b, _apps) = rig("svc-defaults", 1, None);
    let sidecar = Sidecar::start(&client, &web_over(&b, ""), Placement::InPodCgroup);
    let mut cmd = client.app(&pod_tool_bin());
    cmd.args(["hold", "--to", VIP, "--count", "1500"]);
    let summary = run_json(cmd);
    assert_eq!(summary["ok"], 1500, "{summary}");
    assert_eq!(
        sidecar.metric(
            "sidecar_service_overflow_total",
            &[("service", "web"), ("limit", "max_connections")]
        ),
        0.0
    );
}

/// `pod-tool tally` with close order `order` and a 5 s deadline per connection,
/// stopping after 10 errors (a hang fails in seconds).
fn churn(pod: &Pod, to: &str, count: usize, order: &str) -> std::process::Command {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()])
        .args(["--concurrency", "16", "--order", order])
        .args(["--conn-deadline-ms", "5000", "--max-errors", "10"]);
    cmd
}

#[test]
fn thousands_of_short_connections_all_finish_in_either_close_order_plain_and_over_hbone() {
    // One service over plain backends, one over meshed backends (HBONE), both loaded
    // at once: every connection must end (the client closing first and the server
    // closing first, alternately) within its deadline, and none may stay in any
    // sidecar's table. A direction that missed its EOF would leave the app waiting
    // here and its entry in `/connections`.
    let mut net = Net::new("svc-churn");
    let client = net.pod("client");
    let plain: Vec<Pod> = (1..=3).map(|i| net.pod(&format!("p{i}"))).collect();
    let meshed: Vec<Pod> = (1..=3).map(|i| net.pod(&format!("m{i}"))).collect();
    let certs = Certs::new(
        "churn",
        &["client=shop/web", "m1=shop/db", "m2=shop/db", "m3=shop/db"],
    );
    let _apps: Vec<Background> = plain.iter().chain(&meshed).map(|p| echo(p, 0)).collect();
    let servers: Vec<Sidecar> = meshed
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let identity = certs.identity(&format!("m{}", i + 1));
            Sidecar::start(
                p,
                &format!("{identity}inbound:\n  mode: strict\n"),
                Placement::InPodCgroup,
            )
        })
        .collect();
    let plain_w: Vec<(&Pod, u32)> = plain.iter().map(|p| (p, 1)).collect();
    let meshed_w: Vec<(&Pod, u32)> = meshed.iter().map(|p| (p, 1)).collect();
    let config = format!(
        "{}services:\n{}{}",
        certs.identity("client"),
        service("plain", VIP, &plain_w, ""),
        service(
            "meshed",
            VIP2,
            &meshed_w,
            "mtls: true\nserver_identity: spiffe://cluster.local/ns/shop/sa/db"
        )
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    const EACH: usize = 5000;
    let runs: Vec<(&str, std::process::Child)> = [(VIP, "plain"), (VIP2, "meshed")]
        .into_iter()
        .map(|(to, name)| {
            let child = churn(&client, to, EACH, "mixed")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn tally");
            (name, child)
        })
        .collect();
    for (name, child) in runs {
        let out = child.wait_with_output().expect("tally");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: tally failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("summary");
        assert_eq!(summary["ok"], EACH, "{name}: {summary}");
    }
    // Every connection left every table: the client's and each meshed backend's.
    for (who, s) in
        std::iter::once(("client", &sidecar)).chain(servers.iter().map(|s| ("server", s)))
    {
        within(
            Duration::from_secs(5),
            &format!("the {who} sidecar's table to empty"),
            || {
                s.admin_json("/connections")
                    .as_array()
                    .is_some_and(Vec::is_empty)
            },
        );
    }
    let closed = sidecar.metric("sidecar_connections_closed_total", &[]);
    assert_eq!(closed, (2 * EACH) as f64, "closed connections");
    assert_eq!(
        sidecar.closed("normal"),
        (2 * EACH) as u64,
        "every close was a clean one"
    );
}
