//! HBONE interop with a real Istio ztunnel, **by hand only**: ztunnel cannot be built
//! or run in CI (no network to its git dependencies there). Build it from its source
//! (`cargo build --no-default-features --features tls-ring,testing`; `protoc` needed)
//! and run `ZTUNNEL_BIN=<ztunnel> ZTUNNEL_SRC=<its checkout> cargo test -p
//! sidecar-tests --test ztunnel_interop -- --ignored`. ztunnel runs in dedicated mode
//! with its fake CA and a local workload file (no istiod); our certificates are
//! signed by that CA's key from its checkout, so both trust the same root with the
//! trust domain `cluster.local`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    tools::{Background, pod_tool_bin},
};

fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("sh")
        .success();
    assert!(ok, "{cmd}");
}

/// cert.pem/key.pem/bundle.pem for `sa` signed by ztunnel's fake CA.
fn cert(dir: &Path, sa: &str) {
    let z = PathBuf::from(std::env::var("ZTUNNEL_SRC").expect("ZTUNNEL_SRC")).join("src/tls");
    std::fs::create_dir_all(dir).expect("cert dir");
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out key.pem && \
        openssl req -new -key key.pem -subj /O=cluster.local -out c.csr && \
        printf 'basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=serverAuth,clientAuth\\nsubjectAltName=URI:spiffe://cluster.local/ns/shop/sa/{sa}\\n' > ext && \
        openssl x509 -req -in c.csr -CA {z}/root-cert.pem -CAkey {z}/ca-key.pem -CAcreateserial -days 2 -sha256 -extfile ext -out cert.pem && \
        cp {z}/root-cert.pem bundle.pem && chmod 644 *.pem",
        z = z.display()
    ));
}

fn identity(dir: &Path) -> String {
    format!(
        "identity:\n  cert: {d}/cert.pem\n  key: {d}/key.pem\n  bundle: {d}/bundle.pem\n",
        d = dir.display()
    )
}

/// ztunnel's local workload file: `a` is shop/web (service account web), `b` and
/// any of `more` are shop/db, shop/db2, ... (service account db).
fn local_config(path: &Path, a: &Pod, b: &Pod, more: &[&Pod]) {
    let workload = |name: &str, sa: &str, pod: &Pod| {
        format!(
            "- uid: cluster1//v1/Pod/shop/{name}\n  name: {name}\n  namespace: shop\n  serviceAccount: {sa}\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  services: {{}}\n",
            pod.ip4
        )
    };
    let mut yaml = format!(
        "workloads:\n{}{}",
        workload("web", "web", a),
        workload("db", "db", b)
    );
    for (i, pod) in more.iter().enumerate() {
        yaml.push_str(&workload(&format!("db{}", i + 2), "db", pod));
    }
    std::fs::write(path, yaml).expect("local config");
}

/// A client sidecar in `pod` with the certificate in `cert`, expecting the pod
/// network to present service account `sa` of shop.
fn client_sidecar(pod: &Pod, cert: &Path, sa: &str) -> Sidecar {
    Sidecar::start(
        pod,
        &format!(
            "{}mesh:\n  cidrs: [198.18.0.0/24]\n  identities: [{{cidrs: [198.18.0.0/24], allow: ['spiffe://cluster.local/ns/shop/sa/{sa}']}}]\n",
            identity(cert)
        ),
        Placement::InPodCgroup,
    )
}

/// `curl` from the app in `pod` (captured by its sidecar).
fn app_curl(pod: &Pod, url: &str) -> std::process::Output {
    pod.app("curl")
        .args(["-sS", "--max-time", "5", url])
        .output()
        .expect("curl")
}

/// `curl` from `pod` through ztunnel's SOCKS5 listener.
fn socks_curl(pod: &Pod, url: &str) -> std::process::Output {
    pod.outsider("curl")
        .args(["-sS", "--max-time", "5", "--socks5", "127.0.0.1:15080", url])
        .output()
        .expect("curl")
}

/// A running ztunnel, stopped (and reaped) when dropped, also when a test fails.
struct Ztunnel(std::process::Child);

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ztunnel(pod: &Pod, config: &Path, who: &str, socks: bool) -> Ztunnel {
    let mut cmd = pod.outsider(&std::env::var("ZTUNNEL_BIN").expect("ZTUNNEL_BIN"));
    cmd.env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", config)
        .env("PROXY_MODE", "dedicated")
        .env("ENABLE_ORIG_SRC", "false")
        .env("IPV6_ENABLED", "false")
        .env("PROXY_WORKLOAD_INFO", who)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if socks {
        cmd.env("UNSTABLE_ENABLE_SOCKS5", "true");
    }
    let child = Ztunnel(cmd.spawn().expect("ztunnel"));
    // Ready once its readiness port answers.
    sidecar_tests::tools::wait_until(Duration::from_secs(20), "ztunnel ready", || {
        pod.outsider("curl")
            .args([
                "-sf",
                "--max-time",
                "1",
                "http://127.0.0.1:15021/healthz/ready",
            ])
            .status()
            .is_ok_and(|s| s.success())
    });
    child
}

#[test]
#[ignore]
fn our_client_against_a_ztunnel_server() {
    let mut net = Net::new("zt1");
    let a = net.pod("a");
    let b = net.pod("b");
    let dir = std::env::temp_dir().join("zt1");
    cert(&dir.join("web"), "web");
    local_config(&dir.join("local.yaml"), &a, &b, &[]);
    let mut http = b.app(&pod_tool_bin());
    http.args(["http", "--listen", &format!("{}:8080", b.ip4)]);
    let _http = Background::start_ready(http);
    let zt = ztunnel(&b, &dir.join("local.yaml"), "shop/db/db", false);
    let sidecar = client_sidecar(&a, &dir.join("web"), "db");
    let out = app_curl(&a, &format!("http://{}:8080/zt", b.ip4));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains(&format!("served-by {}:8080", b.ip4)),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Over HBONE, to ztunnel's identity for the pod.
    let pool = sidecar.admin_json("/pool");
    assert_eq!(
        pool[0]["peer_identity"], "spiffe://cluster.local/ns/shop/sa/db",
        "{pool}"
    );
    assert_eq!(pool[0]["destination"], format!("{}:15008", b.ip4), "{pool}");
    // Nothing listens on 8099: ztunnel's answer reads as the application refusing.
    let refused = app_curl(&a, &format!("http://{}:8099/", b.ip4));
    assert!(!refused.status.success());
    assert_eq!(sidecar.closed("refused"), 1, "{}", sidecar.logs());

    // A client that expects another identity there refuses ztunnel's before any
    // byte of the application's goes out.
    let c = net.pod("c");
    let strict_client = client_sidecar(&c, &dir.join("web"), "other");
    let mismatch = app_curl(&c, &format!("http://{}:8080/zt", b.ip4));
    assert!(!mismatch.status.success());
    assert_eq!(
        strict_client.closed("identity_mismatch"),
        1,
        "{}",
        strict_client.logs()
    );
    drop(zt);
}

#[test]
#[ignore]
fn a_ztunnel_client_against_our_server() {
    let mut net = Net::new("zt2");
    let a = net.pod("a");
    let b = net.pod("b");
    let dir = std::env::temp_dir().join("zt2");
    cert(&dir.join("db"), "db");
    cert(&dir.join("other"), "other");
    let c = net.pod("c");
    let d = net.pod("d");
    local_config(&dir.join("local.yaml"), &a, &b, &[&c, &d]);
    let mut http = b.app(&pod_tool_bin());
    http.args(["http", "--listen", &format!("{}:8080", b.ip4)]);
    let _http = Background::start_ready(http);
    let sidecar = Sidecar::start(
        &b,
        &format!("{}inbound:\n  mode: strict\n", identity(&dir.join("db"))),
        Placement::InPodCgroup,
    );
    // c: our sidecar, but with a certificate of another service account than the
    // one ztunnel's config gives the pod. d: our sidecar, allowing only sa/db in.
    let _c_http = {
        let mut http = c.app(&pod_tool_bin());
        http.args(["http", "--listen", &format!("{}:8080", c.ip4)]);
        Background::start_ready(http)
    };
    let c_sidecar = Sidecar::start(
        &c,
        &format!("{}inbound:\n  mode: strict\n", identity(&dir.join("other"))),
        Placement::InPodCgroup,
    );
    let d_sidecar = Sidecar::start(
        &d,
        &format!(
            "{}inbound:\n  mode: strict\n  allow: ['spiffe://cluster.local/ns/shop/sa/db']\n",
            identity(&dir.join("db"))
        ),
        Placement::InPodCgroup,
    );
    let zt = ztunnel(&a, &dir.join("local.yaml"), "shop/web/web", true);
    let out = socks_curl(&a, &format!("http://{}:8080/zt", b.ip4));
    // Nothing listens on b:8099: our 503 reads to ztunnel as a refusal.
    let refused = socks_curl(&a, &format!("http://{}:8099/", b.ip4));
    // ztunnel expects sa/db at c, which presents sa/other: ztunnel refuses it.
    let impostor = socks_curl(&a, &format!("http://{}:8080/zt", c.ip4));
    // d does not allow ztunnel's identity (sa/web): 401.
    let unauthorized = socks_curl(&a, &format!("http://{}:8080/zt", d.ip4));
    drop(zt);
    assert!(!refused.status.success());
    assert_eq!(
        sidecar.metric(
            "sidecar_hbone_streams_refused_total",
            &[("side", "server"), ("status", "503")]
        ),
        1.0
    );
    assert!(
        !impostor.status.success(),
        "{}",
        String::from_utf8_lossy(&impostor.stdout)
    );
    // ztunnel aborted the TLS handshake on the certificate: no stream, nothing
    // delivered.
    assert_eq!(
        c_sidecar.metric("sidecar_hbone_streams_opened_total", &[("side", "server")]),
        0.0,
        "nothing reached the impostor's application"
    );
    assert_eq!(
        c_sidecar.closed("handshake_failed"),
        1,
        "{}",
        c_sidecar.logs()
    );
    assert!(!unauthorized.status.success());
    assert_eq!(
        d_sidecar.metric(
            "sidecar_hbone_streams_refused_total",
            &[("side", "server"), ("status", "401")]
        ),
        1.0,
        "{}",
        d_sidecar.logs()
    );
    let body = String::from_utf8_lossy(&out.stdout);
    // Delivered by our sidecar (from 127.0.0.6), to a stream from ztunnel's identity.
    assert!(
        body.contains(&format!("served-by {}:8080 peer 127.0.0.6:", b.ip4)),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened = sidecar.metric(
        "sidecar_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", "spiffe://cluster.local/ns/shop/sa/web"),
        ],
    );
    // The stream answered 200, and the one answered 503.
    assert_eq!(opened, 2.0);
    assert_eq!(
        sidecar.metric("sidecar_hbone_streams_opened_total", &[("side", "server")]),
        1.0
    );
}
