//! Inbound mTLS with real TLS peers (`openssl s_client`) and certificates from
//! `sidecar certs`: strict ports admit only sidecar mTLS from allowed identities;
//! permissive ports also pass plaintext through; nothing refused reaches the app.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    tools::{Background, InFlight, pod_tool_bin, sidecar_bin},
};

const ALPN: &str = "sidecar-mtls/1";

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
         inbound:\n  detect_timeout: 1s\n  port_modes:\n    8080: strict\n    8090: permissive\n\
         \x20 allow: ['spiffe://cluster.local/ns/shop/*']\n",
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
        sidecar,
        _echo: echo,
        _net: net,
    }
}

/// `openssl s_client` from pod A presenting `who`'s certificate (or none); sends the
/// echo mode byte and a marker, returns what came back within 3 s.
fn s_client(rig: &Rig, target: &str, who: Option<&str>) -> String {
    s_client_alpn(rig, target, who, Some(ALPN))
}

/// As [`s_client`], offering `alpn` (or no ALPN at all).
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
fn strict_port_admits_an_allowed_sidecar_peer_and_refuses_the_rest() {
    let rig = rig("strict");
    let strict = format!("{}:8080", rig.b.ip4);
    let reply = s_client(&rig, &strict, Some("good"));
    assert!(
        reply.contains(&strict) && reply.contains("marker-7f3a"),
        "allowed peer: {reply:?}"
    );
    let opened = rig.sidecar.metric(
        "sidecar_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", "spiffe://cluster.local/ns/shop/sa/cart"),
        ],
    );
    assert_eq!(opened, 1.0);

    for (who, reason) in [
        (None, "handshake_failed"),
        (Some("foreign"), "handshake_failed"),
        (Some("expired"), "handshake_failed"),
    ] {
        let before = closed(&rig, reason);
        let reply = s_client(&rig, &strict, who);
        assert!(
            !reply.contains(&strict) && !reply.contains("marker"),
            "{who:?} reached the app: {reply:?}"
        );
        assert_eq!(closed(&rig, reason), before + 1, "{who:?}");
    }
    let reply = s_client(&rig, &strict, Some("outsider"));
    assert!(
        !reply.contains(&strict),
        "outsider reached the app: {reply:?}"
    );
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

    // TLS from a client with a good certificate but without our ALPN (not a sidecar:
    // the application's own TLS, say) is refused on a strict port, offered h2 or none.
    for alpn in [Some("h2"), None] {
        let before = closed(&rig, "policy_denied");
        let reply = s_client_alpn(&rig, &strict, Some("good"), alpn);
        assert!(
            !reply.contains(&strict) && !reply.contains("marker"),
            "TLS without our ALPN ({alpn:?}) reached the app: {reply:?}"
        );
        assert_eq!(closed(&rig, "policy_denied"), before + 1, "{alpn:?}");
    }

    // Plaintext on a strict port is refused too.
    let before = closed(&rig, "policy_denied");
    let reply = plaintext(&rig, &strict);
    assert!(
        !reply.contains(&strict),
        "plaintext reached the app: {reply:?}"
    );
    assert_eq!(closed(&rig, "policy_denied"), before + 1);

    // IPv6 inbound mTLS.
    let strict6 = format!("[{}]:8080", rig.b.ip6);
    let reply = s_client(&rig, &strict6, Some("good"));
    assert!(reply.contains("marker-7f3a"), "IPv6: {reply:?}");
}

#[test]
fn permissive_port_takes_mtls_and_plaintext_and_drops_silent_clients() {
    let rig = rig("permissive");
    let port = format!("{}:8090", rig.b.ip4);
    let reply = plaintext(&rig, &port);
    assert!(
        reply.contains(&port) && reply.contains("marker-7f3a"),
        "plaintext: {reply:?}"
    );
    let reply = s_client(&rig, &port, Some("good"));
    assert!(
        reply.contains(&port) && reply.contains("marker-7f3a"),
        "mTLS: {reply:?}"
    );

    // A client that connects and says nothing is dropped after detect_timeout (1 s),
    // and does not hold up others meanwhile.
    let mut silent = rig
        .a
        .outsider("nc")
        .args([&rig.b.ip4.to_string(), "8090"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("nc");
    // The silent client is in detection before the next one arrives.
    sidecar_tests::tools::wait_until(Duration::from_secs(3), "silent client accepted", || {
        rig.sidecar.metric("sidecar_inbound_unauthenticated", &[]) == 1.0
    });
    let started = Instant::now();
    let reply = plaintext(&rig, &port);
    assert!(reply.contains("marker-7f3a"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed(&rig, "timeout") == 0 {
        assert!(Instant::now() < deadline, "silent client not dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = silent.kill();
    let _ = silent.wait();
}

#[test]
fn two_sidecars_speak_mtls_on_the_wire() {
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

    // Capture on the bridge between the pods.
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
            "tcp port 8080",
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
    let out = a
        .app("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/marker-5c1e", b.ip4),
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
            .args(["-d", "tcp.port==8080,tls", "-r"])
            .arg(&pcap)
            .args(["-Y", filter, "-T", "fields", "-e", field])
            .output()
            .expect("tshark -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let alpn = fields(
        "tls.handshake.type == 1",
        "tls.handshake.extensions_alpn_str",
    );
    assert!(
        alpn.contains("sidecar-mtls/1"),
        "ClientHello ALPN: {alpn:?}"
    );
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
        1.0
    );
    assert_eq!(
        seen(
            &b_sidecar,
            "inbound",
            "spiffe://cluster.local/ns/shop/sa/cart"
        ),
        1.0
    );
}

/// Writes cert/key/bundle the way the kubelet updates a Secret volume: a new timestamped
/// folder, then an atomic rename of `..data`; the visible names link through `..data`.
fn kubelet_write(mount: &Path, generation: u32, from: &Path) {
    let versioned = mount.join(format!("..2026_11_23_{generation}"));
    std::fs::create_dir_all(&versioned).expect("dir");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        std::fs::copy(from.join(name), versioned.join(name)).expect("copy");
        // Readable by the proxy's UID, as a Secret volume's files are by default.
        std::fs::set_permissions(
            versioned.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
    }
    let tmp = mount.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(versioned.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        let link = mount.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("link");
        }
    }
}

fn serial_of(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_lowercase()
}

#[test]
fn rotation_by_data_swap_keeps_open_connections_and_new_handshakes_use_the_new_certificate() {
    let mut net = Net::new("rotate");
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new("rotate");
    let mount = certs.0.join("b-mount");
    std::fs::create_dir_all(&mount).expect("mount");
    kubelet_write(&mount, 1, &certs.workload("b"));
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
            "timeout 3 openssl s_client -connect {}:9500 -alpn {ALPN} -cert {c}/cert.pem -key {c}/key.pem </dev/null 2>/dev/null | openssl x509 -noout -serial",
            b.ip4,
            c = a_dir.display()
        ));
        String::from_utf8_lossy(&cmd.output().expect("s_client").stdout)
            .trim()
            .to_lowercase()
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
    let out = Command::new(sidecar_bin())
        .args(["certs", "--out"])
        .arg(&next)
        .arg("--ca")
        .arg(&certs.0)
        .args(["--workload", "b=shop/db"])
        .output()
        .expect("sidecar certs --ca");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubelet_write(&mount, 2, &next.join("b"));
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
    kubelet_write(&mount, 3, &broken);
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
