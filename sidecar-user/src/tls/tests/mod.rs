//! mTLS handshakes over in-memory streams with certificates from the dev CA.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    Identity, IdentityFiles, IdentityStore, SpiffeId,
    dev_ca::{DevCa, KeyType, Validity},
    rustls_config::{client_config, peer_identity, provider, server_config},
};
use crate::mesh::hbone::ALPN;

mod resumption;

fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid ID")
}

fn files(dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        bundle: dir.join("bundle.pem"),
        federated: Vec::new(),
    }
}

fn store(
    ca: &DevCa,
    dir: &Path,
    who: &str,
    key: KeyType,
    validity: Validity,
) -> Arc<IdentityStore> {
    ca.write_workload(dir, &id(who), key, validity)
        .expect("issue");
    Arc::new(IdentityStore::load(&files(dir), &provider()).expect("load"))
}

/// Runs one handshake plus a byte each way; returns what each side saw of the other.
async fn handshake(
    client: Arc<IdentityStore>,
    server: Arc<IdentityStore>,
) -> Result<(SpiffeId, SpiffeId, Vec<u8>), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor =
        TlsAcceptor::from(server_config(server, provider(), ALPN).expect("server config"));
    let connector =
        TlsConnector::from(client_config(client, provider(), ALPN).expect("client config"));
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor
            .accept(s)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let peer = peer_identity(tls.get_ref().1).ok_or("server: no peer identity")?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(&b)
            .await
            .map_err(|e| format!("server write: {e}"))?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let name = ServerName::try_from("sidecar.invalid").expect("name");
    let client_side = async {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| format!("client: {e}"))?;
        let peer = peer_identity(tls.get_ref().1).ok_or("client: no peer identity")?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        tls.write_all(b"x")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        Ok::<_, String>((peer, alpn))
    };
    let client_result = client_side.await;
    let server_result = server_side.await.map_err(|e| e.to_string())?;
    match (server_result, client_result) {
        (Ok(client_id), Ok((server_id, alpn))) => Ok((client_id, server_id, alpn)),
        (server, client) => Err(format!("{:?} / {:?}", server.err(), client.err())),
    }
}

#[tokio::test]
async fn mutual_tls_exchanges_spiffe_ids_and_alpn() {
    let tmp = TempDir::new("mtls");
    let ca = DevCa::new("td").expect("ca");
    let a = store(
        &ca,
        &tmp.0.join("a"),
        "spiffe://td/ns/shop/sa/cart",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    let b = store(
        &ca,
        &tmp.0.join("b"),
        "spiffe://td/ns/shop/sa/db",
        KeyType::Ed25519,
        Validity::default(),
    );
    let (client_seen_by_server, server_seen_by_client, alpn) =
        handshake(a, b).await.expect("handshake");
    assert_eq!(client_seen_by_server, id("spiffe://td/ns/shop/sa/cart"));
    assert_eq!(server_seen_by_client, id("spiffe://td/ns/shop/sa/db"));
    assert_eq!(alpn, ALPN);
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused() {
    let tmp = TempDir::new("otherca");
    let ours = DevCa::new("td").expect("ca");
    let theirs = DevCa::new("td").expect("other ca");
    let server = store(
        &ours,
        &tmp.0.join("s"),
        "spiffe://td/ns/a/sa/s",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    // The intruder trusts our CA (so it completes its side) but its certificate is
    // signed by another CA with the same name: the server must refuse it.
    let dir = tmp.0.join("c");
    theirs
        .write_workload(
            &dir,
            &id("spiffe://td/ns/a/sa/c"),
            KeyType::EcdsaP256,
            Validity::default(),
        )
        .expect("issue");
    std::fs::write(dir.join("bundle.pem"), ours.ca_pem()).expect("bundle");
    let intruder = Arc::new(IdentityStore::load(&files(&dir), &provider()).expect("load"));
    let err = handshake(intruder, server).await.expect_err("must fail");
    assert!(err.contains("server: invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let tmp = TempDir::new("expired");
    let ca = DevCa::new("td").expect("ca");
    let server = store(
        &ca,
        &tmp.0.join("s"),
        "spiffe://td/ns/a/sa/s",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    let expired = Validity {
        backdate: Duration::from_secs(7200),
        lifetime: time::Duration::hours(-1),
    };
    // The sidecar refuses to load an expired certificate of its own; a peer may still
    // present one, loaded here as it was two hours ago, when it was valid.
    let dir = tmp.0.join("c");
    ca.write_workload(
        &dir,
        &id("spiffe://td/ns/a/sa/c"),
        KeyType::EcdsaP256,
        expired,
    )
    .expect("issue");
    let two_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        - 7000;
    let then = Identity::load_at(&files(&dir), &provider(), two_hours_ago).expect("then");
    let client = Arc::new(IdentityStore::new(&files(&dir), then));
    let err = handshake(client, server).await.expect_err("must fail");
    assert!(
        err.contains("server: invalid peer certificate: Expired"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let tmp = TempDir::new("nocert");
    let ca = DevCa::new("td").expect("ca");
    let server = store(
        &ca,
        &tmp.0.join("s"),
        "spiffe://td/ns/a/sa/s",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor =
        TlsAcceptor::from(server_config(server.clone(), provider(), ALPN).expect("config"));
    // A plain TLS client with no certificate of its own, which (like `openssl s_client`
    // by default) does not check the server's.
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
        .with_no_client_auth();
    let server_side = tokio::spawn(async move { acceptor.accept(s).await.map(|_| ()) });
    let name = ServerName::try_from("sidecar.invalid").expect("name");
    let _ = TlsConnector::from(Arc::new(config)).connect(name, c).await;
    let err = server_side
        .await
        .expect("join")
        .expect_err("server must refuse");
    assert!(
        err.to_string().contains("peer sent no certificates"),
        "{err}"
    );
}

/// Test-only verifier that trusts any server.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[test]
fn load_errors_name_the_file() {
    let tmp = TempDir::new("loaderr");
    let ca = DevCa::new("td").expect("ca");
    let dir = tmp.0.join("w");
    ca.write_workload(
        &dir,
        &id("spiffe://td/ns/a/sa/w"),
        KeyType::EcdsaP256,
        Validity::default(),
    )
    .expect("issue");
    // Key of another workload: mismatch.
    let other = tmp.0.join("o");
    ca.write_workload(
        &other,
        &id("spiffe://td/ns/a/sa/o"),
        KeyType::EcdsaP256,
        Validity::default(),
    )
    .expect("issue");
    let mut f = files(&dir);
    f.key = other.join("key.pem");
    let err = Identity::load(&f, &provider())
        .expect_err("mismatch")
        .to_string();
    assert!(
        err.contains("does not match") && err.contains("o/key.pem"),
        "{err}"
    );
    // Garbage certificate.
    std::fs::write(dir.join("cert.pem"), "not a certificate").expect("write");
    let err = Identity::load(&files(&dir), &provider())
        .expect_err("garbage")
        .to_string();
    assert!(err.contains("cert.pem"), "{err}");
}

#[test]
fn rsa_keys_load() {
    let tmp = TempDir::new("rsa");
    let dir = &tmp.0;
    // rcgen with ring cannot generate RSA keys; openssl makes one, as an operator would.
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "bundle.pem",
        "-days",
        "1",
        "-subj",
        "/CN=rsa ca",
    ]);
    run(&[
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "w.csr", "-subj",
        "/CN=w",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=URI:spiffe://td/ns/a/sa/rsa\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "w.csr",
        "-CA",
        "bundle.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    let identity = Identity::load(&files(dir), &provider()).expect("RSA identity loads");
    assert_eq!(identity.id, id("spiffe://td/ns/a/sa/rsa"));
}

/// Writes a workload's files the way the kubelet does: into a timestamped directory,
/// then an atomic rename of the `..data` symlink the visible names point through.
fn kubelet_write(mount: &Path, generation: u32, cert: &str, key: &str, bundle: &str) {
    let versioned = mount.join(format!("..2026_{generation}"));
    std::fs::create_dir_all(&versioned).expect("dir");
    std::fs::write(versioned.join("cert.pem"), cert).expect("cert");
    std::fs::write(versioned.join("key.pem"), key).expect("key");
    std::fs::write(versioned.join("bundle.pem"), bundle).expect("bundle");
    let tmp_link = mount.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(versioned.file_name().expect("name"), &tmp_link).expect("symlink");
    std::fs::rename(&tmp_link, mount.join("..data")).expect("swap ..data");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        let link = mount.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("link");
        }
    }
}

#[tokio::test]
async fn rotation_by_data_symlink_swap_is_picked_up_and_broken_rotation_is_refused() {
    let tmp = TempDir::new("rotate");
    let ca = DevCa::new("td").expect("ca");
    let me = id("spiffe://td/ns/a/sa/rotating");
    let first = ca
        .issue(&me, KeyType::EcdsaP256, Validity::default())
        .expect("issue");
    let mount = tmp.0.join("mount");
    std::fs::create_dir_all(&mount).expect("mount");
    kubelet_write(&mount, 1, &first.cert_pem, &first.key_pem, &ca.ca_pem());
    let store = Arc::new(IdentityStore::load(&files(&mount), &provider()).expect("load"));
    let first_serial = store.current().serial.clone();
    let watcher = tokio::spawn(store.clone().watch(
        files(&mount),
        provider(),
        Duration::from_millis(50),
    ));

    let second = ca
        .issue(&me, KeyType::EcdsaP256, Validity::default())
        .expect("issue");
    kubelet_write(&mount, 2, &second.cert_pem, &second.key_pem, &ca.ca_pem());
    let rotated = wait_for(|| store.current().serial != first_serial).await;
    assert!(rotated, "rotation not picked up");
    let second_serial = store.current().serial.clone();

    // A broken rotation (certificate of the new pair with the old key) is refused.
    kubelet_write(
        &mount,
        3,
        &ca.issue(&me, KeyType::EcdsaP256, Validity::default())
            .expect("issue")
            .cert_pem,
        &first.key_pem,
        &ca.ca_pem(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.current().serial,
        second_serial,
        "a broken rotation replaced the identity"
    );
    watcher.abort();
}

async fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A temporary directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sidecar-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
