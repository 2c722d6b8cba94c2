//! HBONE between sidecars, and the HBONE server as any peer sees it: a raw HTTP/2
//! client (`pod-tool hbone`, the `h2` crate) and `openssl s_client` with certificates
//! from `sidecar certs`. Strict ports admit only HBONE streams from allowed
//! identities; permissive ports also pass plaintext through; nothing refused reaches
//! the app.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    certs::serial_of,
    tools::{Background, InFlight, pod_tool_bin, sidecar_bin},
};

/// Dev certificates: `b` (the server pod), `good` (allowed), `outsider` (another
/// namespace), `expired`, and `foreign` (another CA). Removed on drop.
struct Certs(PathBuf);

impl Certs {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sidecar-mtls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = |out: &Path, extra: &[&str]| {
            let out = Command::new(sidecar_bin())
                .args(["certs", "--out"])
                .arg(out)
                .args(extra)
                .output()
                .expect("sidecar certs");
            assert!(
                out.status.success(),
                "sidecar certs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        certs(
            &dir,
            &[
                "--workload",
                "b=shop/db",
                "--workload",
                "good=shop/cart",
                "--workload",
                "outsider=other/x",
            ],
        );
        // `sidecar certs` makes a new CA per run, so the expired certificate has its own
        // CA, which the server trusts (below): it then fails only for being expired.
        certs(
            &dir.join("old"),
            &["--workload", "expired=shop/cart", "--hours=-1"],
        );
        certs(&dir.join("other-ca"), &["--workload", "foreign=shop/cart"]);
        Self(dir)
    }

    fn workload(&self, name: &str) -> PathBuf {
        match name {
            "expired" => self.0.join("old/expired"),
            "foreign" => self.0.join("other-ca/foreign"),
            _ => self.0.join(name),
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rig {
    a: Pod,
    b: Pod,
    certs: Certs,
    /// B's sidecar config.
    config: String,
    sidecar: Sidecar,
    _echo: Background,
    _net: Net,
}

fn rig(tag: &str) -> Rig {
    let mut net = Net::new(tag);
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new(tag);
    // B trusts our CA and the CA of the expired certificate (so that certificate fails
    // only because it expired).
    let bundle = certs.0.join("b-bundle.pem");
    let ours = std::fs::read_to_string(certs.0.join("ca.pem")).expect("ca");
    let old = std::fs::read_to_string(certs.0.join("old/ca.pem")).expect("old ca");
    std::fs::write(&bundle, format!("{ours}{old}")).expect("bundle");
    let b_dir = certs.workload("b");
    let config = format!(
        "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n\
         inbound:\n  handshake_timeout: 1s\n  port_modes:\n    8080: strict\n    8090: permissive\n\
         \x20 allow: ['spiffe://cluster.local/ns/shop/*', unauthenticated]\n",
        b_dir.join("cert.pem").display(),
        b_dir.join("key.pem").display(),
        bundle.display()
    );
    let mut echo = b.app(&pod_tool_bin());
    echo.args([
        "echo",
        "--listen",
        &format!("{}:8080", b.ip4),
        "--listen",
        &format!("{}:8090", b.ip4),
    ]);
    echo.args(["--listen", &format!("[{}]:8080", b.ip6)]);
    let echo = Background::start_ready(echo);
    let sidecar = Sidecar::start(&b, &config, Placement::InPodCgroup);
    Rig {
        a,
        b,
        certs,
        config,
        sidecar,
        _echo: echo,
        _net: net,
    }
}

/// `pod-tool hbone` from pod A (outside its sidecar) to B's HBONE port, presenting
/// `who`'s certificate (or none): one stream per authority, `method` each, sending
/// the echo mode byte and a marker on 200.
fn hbone_as(rig: &Rig, who: Option<&str>, method: &str, authorities: &[&str]) -> serde_json::Value {
    hbone_to(
        rig,
        &format!("{}:15008", rig.b.ip4),
        who,
        method,
        authorities,
    )
}

/// As [`hbone_as`], to the HBONE address `to`.
fn hbone_to(
    rig: &Rig,
    to: &str,
    who: Option<&str>,
    method: &str,
    authorities: &[&str],
) -> serde_json::Value {
    let mut cmd = rig.a.outsider(&pod_tool_bin());
    cmd.args(["hbone", "--to", to, "--method", method]);
    if let Some(who) = who {
        cmd.arg("--cert").arg(rig.certs.workload(who));
    }
    for authority in authorities {
        cmd.args(["--authority", authority]);
    }
    sidecar_tests::tools::run_json(cmd)
}

/// The status of answer `i`.
fn status(reply: &serde_json::Value, i: usize) -> u64 {
    reply["answers"][i]["status"]
        .as_u64()
        .unwrap_or_else(|| panic!("no status for stream {i}: {reply}"))
}

/// `openssl s_client` from pod A straight to `target` (an application port),
/// offering `alpn`, presenting `who`'s certificate; returns what came back.
fn s_client_alpn(rig: &Rig, target: &str, who: Option<&str>, alpn: Option<&str>) -> String {
    let mut cmd = rig.a.outsider("timeout");
    cmd.args(["3", "openssl", "s_client", "-connect", target]);
    if let Some(alpn) = alpn {
        cmd.args(["-alpn", alpn]);
    }
    cmd.args(["-quiet", "-verify_quiet"]);
    cmd.arg("-CAfile").arg(rig.certs.0.join("ca.pem"));
    if let Some(who) = who {
        let dir = rig.certs.workload(who);
        cmd.arg("-cert")
            .arg(dir.join("cert.pem"))
            .arg("-key")
            .arg(dir.join("key.pem"));
    }
    run_with_input(cmd, b"Smarker-7f3a\n")
}

fn plaintext(rig: &Rig, target: &str) -> String {
    let (host, port) = target.rsplit_once(':').expect("host:port");
    let mut cmd = rig.a.outsider("timeout");
    cmd.args(["3", "nc", "-q", "2", host.trim_matches(['[', ']']), port]);
    run_with_input(cmd, b"Smarker-7f3a\n")
}

fn run_with_input(mut cmd: Command, input: &[u8]) -> String {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(input);
    // Keep stdin open a moment so the reply can arrive before the client quits.
    std::thread::sleep(Duration::from_millis(800));
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn closed(rig: &Rig, reason: &str) -> u64 {
    rig.sidecar.metric(
        "sidecar_connections_closed_total",
        &[("direction", "inbound"), ("reason", reason)],
    ) as u64
}

#[test]
fn the_hbone_server_answers_200_400_401_503_as_a_raw_http2_client_sees_them() {
    let rig = rig("answers");
    let b4 = rig.b.ip4.to_string();
    let strict = format!("{b4}:8080");
    let strict6 = format!("[{}]:8080", rig.b.ip6);
    let reply = hbone_as(&rig, Some("good"), "CONNECT", &[&strict, &strict]);
    assert_eq!(
        reply["server_identity"], "spiffe://cluster.local/ns/shop/sa/db",
        "{reply}"
    );
    for i in 0..2 {
        assert_eq!(status(&reply, i), 200, "{reply}");
        let body = reply["answers"][i]["body"].as_str().unwrap_or_default();
        // The echo server names the address it was reached on, then echoes.
        assert!(
            body.contains(&strict) && body.contains("marker-7f3a"),
            "{reply}"
        );
        assert_eq!(reply["answers"][i]["end"], "end", "{reply}");
    }
    let opened = rig.sidecar.metric(
        "sidecar_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", "spiffe://cluster.local/ns/shop/sa/cart"),
        ],
    );
    assert_eq!(opened, 2.0, "one connection per stream");
    // Two streams, one connection.
    assert_eq!(
        rig.sidecar.metric(
            "sidecar_hbone_connections_opened_total",
            &[("side", "server")]
        ),
        1.0
    );
    // IPv6: the authority's family follows the connection's.
    let reply = hbone_to(
        &rig,
        &format!("[{}]:15008", rig.b.ip6),
        Some("good"),
        "CONNECT",
        &[&strict6],
    );
    assert_eq!(status(&reply, 0), 200, "{reply}");
    assert!(
        reply["answers"][0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("marker-7f3a")
    );

    // 400: not CONNECT; an authority that is not ip:port; one that is not the address
    // the connection arrived on (another pod, or this pod's other family).
    let a_target = format!("{}:8080", rig.a.ip4);
    let reply = hbone_as(&rig, Some("good"), "GET", &[&format!("http://{strict}/")]);
    assert_eq!(status(&reply, 0), 400, "{reply}");
    let reply = hbone_as(
        &rig,
        Some("good"),
        "CONNECT",
        &["db.shop.svc:8080", &a_target, &strict6, &strict],
    );
    for i in 0..3 {
        assert_eq!(status(&reply, i), 400, "stream {i}: {reply}");
    }
    assert_eq!(
        status(&reply, 3),
        200,
        "a bad stream does not end the connection: {reply}"
    );
    assert_eq!(
        rig.sidecar.metric(
            "sidecar_hbone_streams_refused_total",
            &[("side", "server"), ("status", "400")]
        ),
        4.0
    );
    // 503: nothing listens there; a port of the sidecar itself.
    let reply = hbone_as(
        &rig,
        Some("good"),
        "CONNECT",
        &[
            &format!("{b4}:8099"),
            &format!("{b4}:15000"),
            &format!("{b4}:15008"),
        ],
    );
    for i in 0..3 {
        assert_eq!(status(&reply, i), 503, "stream {i}: {reply}");
    }
    // 401: a workload of the trust domain that the allow-list does not name.
    let reply = hbone_as(&rig, Some("outsider"), "CONNECT", &[&strict]);
    assert_eq!(status(&reply, 0), 401, "{reply}");
    assert!(!reply.to_string().contains("marker"), "{reply}");
    let denied = rig.sidecar.metric(
        "sidecar_connections_closed_total",
        &[
            ("reason", "policy_denied"),
            ("peer_identity", "spiffe://cluster.local/ns/other/sa/x"),
        ],
    );
    assert_eq!(denied, 1.0);
    assert!(
        rig.sidecar
            .logs()
            .contains("spiffe://cluster.local/ns/other/sa/x"),
        "the refusal names the peer"
    );

    // No certificate, another CA's, an expired one: no TLS session at all (in TLS
    // 1.3 the client learns it at its first read).
    for who in [None, Some("foreign"), Some("expired")] {
        let before = closed(&rig, "handshake_failed");
        let reply = hbone_as(&rig, who, "CONNECT", &[&strict]);
        // The TLS refusal (an alert, or a closed connection when the server's close
        // overtakes it): no HTTP answer at all.
        let error = reply["error"]
            .as_str()
            .or(reply["answers"][0]["error"].as_str());
        assert!(
            error.is_some() && reply["answers"][0]["status"].is_null(),
            "{who:?}: {reply}"
        );
        assert_eq!(closed(&rig, "handshake_failed"), before + 1, "{who:?}");
    }
}

#[test]
fn strict_ports_refuse_direct_connections_and_permissive_ports_pass_them() {
    let rig = rig("direct");
    let strict = format!("{}:8080", rig.b.ip4);
    // TLS straight to the application port, with a good certificate, offering h2,
    // nothing, or the old sidecar protocol: only HBONE gets in.
    for alpn in [Some("h2"), None, Some("sidecar-mtls/1")] {
        let before = closed(&rig, "policy_denied");
        let reply = s_client_alpn(&rig, &strict, Some("good"), alpn);
        assert!(
            !reply.contains(&strict) && !reply.contains("marker"),
            "direct TLS ({alpn:?}) reached the app: {reply:?}"
        );
        assert_eq!(closed(&rig, "policy_denied"), before + 1, "{alpn:?}");
    }
    let before = closed(&rig, "policy_denied");
    let reply = plaintext(&rig, &strict);
    assert!(
        !reply.contains(&strict),
        "plaintext reached the app: {reply:?}"
    );
    assert_eq!(closed(&rig, "policy_denied"), before + 1);

    // A permissive port, with `unauthenticated` on the allow-list: plaintext as it
    // is, and HBONE too.
    let port = format!("{}:8090", rig.b.ip4);
    let reply = plaintext(&rig, &port);
    assert!(
        reply.contains(&port) && reply.contains("marker-7f3a"),
        "plaintext: {reply:?}"
    );
    let reply = hbone_as(&rig, Some("good"), "CONNECT", &[&port]);
    assert_eq!(status(&reply, 0), 200, "{reply}");

    // The same allow-list without `unauthenticated` (reloaded): a plaintext client
    // has no identity to match, so the permissive port refuses it; allowed peers
    // still get in over HBONE.
    let narrowed = rig.config.replace(", unauthenticated]", "]");
    assert_ne!(narrowed, rig.config);
    rig.sidecar.write_config(&narrowed);
    let reloads = || {
        rig.sidecar
            .metric("sidecar_config_reloads_total", &[("result", "applied")])
    };
    sidecar_tests::tools::wait_until(Duration::from_secs(5), "the reload", || reloads() >= 1.0);
    let before = closed(&rig, "policy_denied");
    let reply = plaintext(&rig, &port);
    assert!(
        !reply.contains("marker-7f3a"),
        "plaintext walked around the allow-list: {reply:?}"
    );
    assert_eq!(closed(&rig, "policy_denied"), before + 1);
    let reply = hbone_as(&rig, Some("good"), "CONNECT", &[&port]);
    assert_eq!(status(&reply, 0), 200, "{reply}");
}

#[test]
fn two_sidecars_speak_hbone_on_the_wire_over_one_pooled_connection() {
    let mut net = Net::new("wire");
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new("wire");
    let identity = |who: &str| {
        let dir = certs.workload(who);
        format!(
            "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            dir.join("bundle.pem").display()
        )
    };
    let mut http = b.app(&pod_tool_bin());
    http.args(["http", "--listen", &format!("{}:8080", b.ip4)]);
    let _http = Background::start_ready(http);
    let b_config = format!(
        "{}inbound:\n  mode: strict\n  allow: ['spiffe://cluster.local/ns/shop/*']\n",
        identity("b")
    );
    let b_sidecar = Sidecar::start(&b, &b_config, Placement::InPodCgroup);
    let a_config = format!(
        "{}mesh:\n  cidrs: [198.18.0.0/24, 'fd00:5c::/64']\n",
        identity("good")
    );
    let a_sidecar = Sidecar::start(&a, &a_config, Placement::InPodCgroup);

    // Capture everything between the pods on the bridge.
    let pcap = certs.0.join("wire.pcap");
    let mut tshark = Command::new("ip")
        .args([
            "netns",
            "exec",
            net.node_netns(),
            "tshark",
            "-i",
            "br0",
            "-f",
            "tcp",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tshark (Debian package `tshark`) is required");
    {
        use std::io::{BufRead, BufReader};
        let stderr = tshark.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let started = lines.any(|l| l.is_ok_and(|l| l.contains("Capturing on")));
        assert!(started, "tshark did not start capturing");
        // "Capturing on" comes a moment before packets are really captured.
        std::thread::sleep(Duration::from_secs(1));
    }
    // Five application connections, one after the other.
    for i in 0..5 {
        let out = a
            .app("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://{}:8080/marker-5c1e-{i}", b.ip4),
            ])
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // B's application got it from B's sidecar.
        assert!(
            body.contains(&format!("served-by {}:8080 peer 127.0.0.6:", b.ip4)),
            "{body}"
        );
    }
    // The pool holds one connection to B, idle now, to B's identity.
    let pool = a_sidecar.admin_json("/pool");
    let tunnels = pool.as_array().expect("pool view");
    assert_eq!(tunnels.len(), 1, "{pool}");
    assert_eq!(
        tunnels[0]["destination"],
        format!("{}:15008", b.ip4),
        "{pool}"
    );
    assert_eq!(
        tunnels[0]["peer_identity"],
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    assert_eq!(tunnels[0]["streams"], 0, "{pool}");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) on our child; SIGINT makes tshark flush and exit.
    unsafe { libc::kill(tshark.id() as i32, libc::SIGINT) };
    let _ = tshark.wait();

    let raw = std::fs::read(&pcap).expect("capture file");
    assert!(raw.len() > 1000, "the capture is empty");
    assert!(
        !raw.windows(11).any(|w| w == b"marker-5c1e"),
        "the marker crossed the wire in cleartext"
    );
    let fields = |filter: &str, field: &str| {
        let out = Command::new("tshark")
            .args(["-d", "tcp.port==15008,tls", "-r"])
            .arg(&pcap)
            .args(["-Y", filter, "-T", "fields", "-e", field])
            .output()
            .expect("tshark -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Every packet between the pods is on port 15008: nothing on the app's port.
    let ports = fields("tcp", "tcp.dstport");
    let ports: std::collections::BTreeSet<&str> = ports.lines().collect();
    assert!(ports.contains("15008"), "{ports:?}");
    assert!(
        !ports.contains("8080"),
        "application port on the wire: {ports:?}"
    );
    // One TCP connection (one SYN) carried the five.
    let syns = fields("tcp.flags.syn == 1 && tcp.flags.ack == 0", "tcp.dstport");
    assert_eq!(
        syns.lines().collect::<Vec<_>>(),
        ["15008"],
        "SYNs: {syns:?}"
    );
    let alpn = fields(
        "tls.handshake.type == 1",
        "tls.handshake.extensions_alpn_str",
    );
    assert_eq!(alpn.trim(), "h2", "ClientHello ALPN: {alpn:?}");
    let sni = fields(
        "tls.handshake.type == 1",
        "tls.handshake.extensions_server_name",
    );
    assert!(sni.trim().is_empty(), "no SNI, as ztunnel: {sni:?}");
    let version = fields(
        "tls.handshake.type == 2",
        "tls.handshake.extensions.supported_version",
    );
    assert!(
        version.contains("0x0304"),
        "ServerHello version: {version:?}"
    );

    let seen = |sidecar: &Sidecar, direction: &str, id: &str| {
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[
                ("direction", direction),
                ("tls", "true"),
                ("peer_identity", id),
            ],
        )
    };
    assert_eq!(
        seen(
            &a_sidecar,
            "outbound",
            "spiffe://cluster.local/ns/shop/sa/db"
        ),
        5.0
    );
    assert_eq!(
        seen(
            &b_sidecar,
            "inbound",
            "spiffe://cluster.local/ns/shop/sa/cart"
        ),
        5.0
    );
    let hbone = |sidecar: &Sidecar, name: &str, side: &str| sidecar.metric(name, &[("side", side)]);
    assert_eq!(
        hbone(
            &a_sidecar,
            "sidecar_hbone_connections_opened_total",
            "client"
        ),
        1.0
    );
    assert_eq!(
        hbone(&a_sidecar, "sidecar_hbone_streams_opened_total", "client"),
        5.0
    );
    assert_eq!(hbone(&a_sidecar, "sidecar_hbone_streams", "client"), 0.0);
    assert_eq!(
        hbone(
            &b_sidecar,
            "sidecar_hbone_connections_opened_total",
            "server"
        ),
        1.0
    );
    assert_eq!(
        hbone(&b_sidecar, "sidecar_hbone_streams_opened_total", "server"),
        5.0
    );
    // Only the first stream waited for a handshake.
    assert_eq!(
        a_sidecar.metric("sidecar_tls_handshake_duration_seconds_count", &[]),
        1.0
    );
}

#[test]
fn rotation_by_data_swap_keeps_open_connections_and_new_handshakes_use_the_new_certificate() {
    let mut net = Net::new("rotate");
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new("rotate");
    let mount = certs.0.join("b-mount");
    std::fs::create_dir_all(&mount).expect("mount");
    sidecar_tests::certs::kubelet_write(&mount, 1, &certs.workload("b"));
    let mut echo = b.app(&pod_tool_bin());
    echo.args(["echo", "--listen", &format!("{}:9500", b.ip4)]);
    let _echo = Background::start_ready(echo);
    let b_config = format!(
        "identity:\n  cert: {m}/cert.pem\n  key: {m}/key.pem\n  bundle: {m}/bundle.pem\n  reload_interval: 200ms\n\
         inbound:\n  mode: strict\n",
        m = mount.display()
    );
    let b_sidecar = Sidecar::start(&b, &b_config, Placement::InPodCgroup);
    let a_dir = certs.workload("good");
    let a_config = format!(
        "identity:\n  cert: {d}/cert.pem\n  key: {d}/key.pem\n  bundle: {d}/bundle.pem\nmesh:\n  cidrs: [198.18.0.0/24]\n",
        d = a_dir.display()
    );
    let _a_sidecar = Sidecar::start(&a, &a_config, Placement::InPodCgroup);

    // The serial B presents to a new handshake.
    let presented = || {
        let mut cmd = a.outsider("sh");
        cmd.arg("-c").arg(format!(
            "timeout 3 openssl s_client -connect {}:15008 -alpn h2 -cert {c}/cert.pem -key {c}/key.pem </dev/null 2>/dev/null | openssl x509 -noout -serial",
            b.ip4,
            c = a_dir.display()
        ));
        let text = String::from_utf8_lossy(&cmd.output().expect("s_client").stdout).to_lowercase();
        text.trim()
            .trim_start_matches("serial=")
            .trim_start_matches('0')
            .to_string()
    };
    let first = serial_of(&certs.workload("b").join("cert.pem"));
    assert_eq!(presented(), first);

    // 50 long-lived connections from A's app, through both sidecars.
    let mut slow = a.app(&pod_tool_bin());
    slow.args([
        "slow",
        "--to",
        &format!("{}:9500", b.ip4),
        "--streams",
        "50",
        "--bytes",
        "30000",
        "--seconds",
        "6",
    ]);
    let slow = InFlight::start(slow);

    // Rotate: a new certificate from the same CA, swapped in by ..data.
    let next = certs.0.join("next");
    sidecar_tests::certs::reissue(&certs.0, &next, "b=shop/db");
    sidecar_tests::certs::kubelet_write(&mount, 2, &next.join("b"));
    let second = serial_of(&next.join("b/cert.pem"));
    assert_ne!(first, second);
    let deadline = Instant::now() + Duration::from_secs(5);
    while presented() != second {
        assert!(
            Instant::now() < deadline,
            "new handshakes still present the old certificate"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every long-lived connection survived the rotation.
    let summary = slow.finish();
    assert_eq!(summary["ok"], 50, "{summary}");

    // A broken rotation (unparsable certificate) keeps the current identity.
    let broken = certs.0.join("broken");
    std::fs::create_dir_all(&broken).expect("dir");
    std::fs::write(
        broken.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    std::fs::copy(next.join("b/key.pem"), broken.join("key.pem")).expect("key");
    std::fs::copy(next.join("b/bundle.pem"), broken.join("bundle.pem")).expect("bundle");
    sidecar_tests::certs::kubelet_write(&mount, 3, &broken);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        presented(),
        second,
        "a broken rotation replaced the identity"
    );
    let log = b_sidecar.logs();
    assert!(
        log.contains("rotation rejected") && log.contains("cert.pem"),
        "{log}"
    );
}

#[test]
fn ten_thousand_peer_identities_fold_into_a_bounded_label_set() {
    const PEERS: usize = 10_000;
    const CAP: usize = 50;
    let mut net = Net::new("flood");
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new("flood");
    let dir = certs.workload("b");
    let mut echo = b.app(&pod_tool_bin());
    echo.args(["echo", "--listen", &format!("{}:9600", b.ip4)]);
    let _echo = Background::start_ready(echo);
    let config = format!(
        "identity:\n  cert: {d}/cert.pem\n  key: {d}/key.pem\n  bundle: {d}/bundle.pem\n\
         inbound:\n  mode: strict\nmetrics:\n  max_peer_identities: {CAP}\n",
        d = dir.display()
    );
    let sidecar = Sidecar::start(&b, &config, Placement::InPodCgroup);
    // Real certificates from the dev CA, one identity per connection.
    let mut flood = a.outsider(&pod_tool_bin());
    flood.args([
        "identities",
        "--to",
        &format!("{}:9600", b.ip4),
        "--count",
        &PEERS.to_string(),
        "--ca",
    ]);
    flood.arg(&certs.0);
    let result = sidecar_tests::tools::run_json(flood);
    assert_eq!(result["ok"], PEERS, "{result}");

    let text = sidecar.metrics_text();
    let identities: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("sidecar_connections_opened_total{direction=\"inbound\""))
        .filter_map(|l| l.split("peer_identity=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        identities.len() <= CAP + 1,
        "{} identity series",
        identities.len()
    );
    assert!(identities.contains("other"), "{identities:?}");
    let folded = sidecar_tests::sidecar::metric_sum(
        &text,
        "sidecar_metric_label_folded_total",
        &[("label", "peer_identity")],
    );
    assert_eq!(
        folded as usize,
        PEERS - CAP,
        "every identity past the cap is folded once"
    );
    let opened = sidecar_tests::sidecar::metric_sum(
        &text,
        "sidecar_connections_opened_total",
        &[("direction", "inbound")],
    );
    assert_eq!(opened as usize, PEERS);
}
