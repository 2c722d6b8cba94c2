//! Session resumption between sidecars (and what must end it), trust domains bound to
//! their bundles, and the validity of our own certificate.

use super::*;

/// What one connection between an acceptor and a connector saw: the client's
/// handshake kind, and the server's (kind, peer identity, expired-resumption flag).
type Seen = (
    Option<rustls::HandshakeKind>,
    (
        Option<rustls::HandshakeKind>,
        Option<SpiffeId>,
        Option<String>,
    ),
);

/// One connection with a byte each way, kept open until the client has read (session
/// tickets arrive with the echo), so a later connection can resume.
async fn exchange(acceptor: TlsAcceptor, connector: TlsConnector) -> Result<Seen, String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let _ = tls.read(&mut byte).await;
        let conn = tls.get_ref().1;
        Ok::<_, String>((
            conn.handshake_kind(),
            peer_identity(conn),
            crate::tls::rustls_config::resumed_with_expired_certificate(conn),
        ))
    });
    let name = ServerName::try_from("sidecar.invalid").expect("name");
    let client = async {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        let kind = tls.get_ref().1.handshake_kind();
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(kind)
    };
    let kind = client.await;
    let served = server.await.map_err(|e| e.to_string()).and_then(|r| r);
    Ok((kind?, served?))
}

/// A second connection between the same two sidecars resumes the TLS 1.3 session
/// (a PSK with a fresh key exchange): no certificate signatures or chain checks.
#[tokio::test]
async fn a_second_handshake_between_the_same_sidecars_resumes() {
    let tmp = TempDir::new("resume");
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
        KeyType::EcdsaP256,
        Validity::default(),
    );
    let acceptor = TlsAcceptor::from(server_config(b, provider(), ALPN).expect("server config"));
    let connector = TlsConnector::from(client_config(a, provider(), ALPN).expect("client config"));
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (kind, (_, peer, _)) = exchange(acceptor.clone(), connector.clone())
            .await
            .expect("exchange");
        kinds.push(kind);
        assert_eq!(
            peer,
            Some(id("spiffe://td/ns/shop/sa/cart")),
            "the resumed session keeps the client's identity"
        );
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

/// A session made while the peer's CA was trusted is not resumed after the CA leaves
/// the bundle: the next handshake is a full one, and the peer is refused.
#[tokio::test]
async fn a_bundle_change_ends_resumption() {
    let tmp = TempDir::new("resume-revoked");
    let ca1 = DevCa::new("td").expect("ca1");
    let ca2 = DevCa::new("td").expect("ca2");
    let both = format!("{}{}", ca1.ca_pem(), ca2.ca_pem());
    // The client's certificate comes from CA 2; the server's from CA 1.
    let client_dir = tmp.0.join("client");
    ca2.write_workload(
        &client_dir,
        &id("spiffe://td/ns/shop/sa/cart"),
        KeyType::EcdsaP256,
        Validity::default(),
    )
    .expect("issue");
    std::fs::write(client_dir.join("bundle.pem"), &both).expect("bundle");
    let server_dir = tmp.0.join("server");
    ca1.write_workload(
        &server_dir,
        &id("spiffe://td/ns/shop/sa/db"),
        KeyType::EcdsaP256,
        Validity::default(),
    )
    .expect("issue");
    std::fs::write(server_dir.join("bundle.pem"), &both).expect("bundle");
    let client = Arc::new(IdentityStore::load(&files(&client_dir), &provider()).expect("load"));
    let server = Arc::new(IdentityStore::load(&files(&server_dir), &provider()).expect("load"));
    let acceptor =
        TlsAcceptor::from(server_config(server.clone(), provider(), ALPN).expect("server"));
    let connector = TlsConnector::from(client_config(client, provider(), ALPN).expect("client"));
    let kind = |seen: Result<Seen, String>| seen.map(|(kind, _)| kind);
    assert_eq!(
        kind(exchange(acceptor.clone(), connector.clone()).await),
        Ok(Some(rustls::HandshakeKind::Full))
    );
    assert_eq!(
        kind(exchange(acceptor.clone(), connector.clone()).await),
        Ok(Some(rustls::HandshakeKind::Resumed)),
        "the same bundle resumes"
    );
    // The server stops trusting CA 2.
    std::fs::write(server_dir.join("bundle.pem"), ca1.ca_pem()).expect("bundle");
    server.replace(Identity::load(&files(&server_dir), &provider()).expect("reload"));
    let after = exchange(acceptor, connector).await;
    assert!(
        after.is_err(),
        "a peer from a removed CA resumed its session: {after:?}"
    );
}

/// A certificate's trust domain must be the one its issuing bundle is configured for:
/// the local CA signing an ID of another trust domain does not make it trusted.
#[tokio::test]
async fn an_id_of_another_trust_domain_needs_that_domains_bundle() {
    let tmp = TempDir::new("td-bound");
    let ca = DevCa::new("td").expect("ca");
    let server = store(
        &ca,
        &tmp.0.join("server"),
        "spiffe://td/ns/shop/sa/db",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    // The impostor trusts our CA for our trust domain, so only the server can object.
    let impostor_dir = tmp.0.join("impostor");
    ca.write_workload(
        &impostor_dir,
        &id("spiffe://other.td/ns/shop/sa/cart"),
        KeyType::EcdsaP256,
        Validity::default(),
    )
    .expect("issue");
    let mut impostor_files = files(&impostor_dir);
    impostor_files.federated = vec![("td".into(), impostor_dir.join("bundle.pem"))];
    let impostor = Arc::new(IdentityStore::load(&impostor_files, &provider()).expect("load"));
    let e = handshake(impostor.clone(), server.clone())
        .await
        .expect_err("another trust domain signed by our CA");
    assert!(
        e.contains("server: invalid peer certificate") && e.contains("other.td"),
        "{e}"
    );
    // Federated with a bundle for other.td (here the same CA), it is accepted.
    let dir = tmp.0.join("server");
    let mut federated = files(&dir);
    federated.federated = vec![("other.td".into(), dir.join("bundle.pem"))];
    server.replace(Identity::load(&federated, &provider()).expect("federated"));
    let (client, _, _) = handshake(impostor, server).await.expect("federated");
    assert_eq!(client, id("spiffe://other.td/ns/shop/sa/cart"));
}

/// rustls does not bound a stateful session's age: a client whose certificate expired
/// after its first handshake still resumes. The sidecar refuses such a resumption
/// (`resumed_with_expired_certificate`, checked after every handshake).
#[tokio::test]
async fn a_resumption_after_the_peer_certificate_expired_is_flagged() {
    let tmp = TempDir::new("resume-expired");
    let ca = DevCa::new("td").expect("ca");
    let server = store(
        &ca,
        &tmp.0.join("s"),
        "spiffe://td/ns/shop/sa/db",
        KeyType::EcdsaP256,
        Validity::default(),
    );
    // Valid for two more seconds.
    let short = Validity {
        lifetime: time::Duration::seconds(2),
        ..Validity::default()
    };
    let client = store(
        &ca,
        &tmp.0.join("c"),
        "spiffe://td/ns/shop/sa/cart",
        KeyType::EcdsaP256,
        short,
    );
    let acceptor = TlsAcceptor::from(server_config(server, provider(), ALPN).expect("server"));
    let connector = TlsConnector::from(client_config(client, provider(), ALPN).expect("client"));
    let mut seen = Vec::new();
    for wait in [Duration::ZERO, Duration::from_millis(3200)] {
        tokio::time::sleep(wait).await;
        let (_, (kind, _, expired)) = exchange(acceptor.clone(), connector.clone())
            .await
            .expect("exchange");
        seen.push((kind, expired));
    }
    assert_eq!(seen[0], (Some(rustls::HandshakeKind::Full), None));
    assert_eq!(seen[1].0, Some(rustls::HandshakeKind::Resumed));
    let reason = seen[1]
        .1
        .clone()
        .expect("an expired peer's resumption is flagged");
    assert!(reason.contains("expired"), "{reason}");
}

/// The sidecar's own certificate must be valid now: an expired one (or one not valid
/// yet) is refused at load, so a rotation to it is rejected and the old one kept.
#[test]
fn an_expired_or_future_own_certificate_is_refused() {
    let tmp = TempDir::new("own-validity");
    let ca = DevCa::new("td").expect("ca");
    let who = id("spiffe://td/ns/shop/sa/cart");
    let expired = Validity {
        lifetime: time::Duration::hours(-1),
        ..Validity::default()
    };
    let dir = tmp.0.join("expired");
    ca.write_workload(&dir, &who, KeyType::EcdsaP256, expired)
        .expect("issue");
    let e = IdentityStore::load(&files(&dir), &provider())
        .expect_err("expired")
        .to_string();
    assert!(e.contains("cert.pem") && e.contains("expired"), "{e}");

    let dir = tmp.0.join("valid");
    ca.write_workload(&dir, &who, KeyType::EcdsaP256, Validity::default())
        .expect("issue");
    let store = IdentityStore::load(&files(&dir), &provider()).expect("valid");
    let cert = &store.current().certified_key.cert[0];
    // A day from now it is fine; a year from now it has expired; before issue, not yet.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert_eq!(
        crate::tls::certs::check_validity(cert, now + 3600).expect("valid"),
        store.current().not_after
    );
    let later = crate::tls::certs::check_validity(cert, now + 365 * 86_400).expect_err("expired");
    assert!(later.contains("expired"), "{later}");
    let earlier = crate::tls::certs::check_validity(cert, now - 86_400).expect_err("not yet");
    assert!(earlier.contains("not valid before"), "{earlier}");
}
