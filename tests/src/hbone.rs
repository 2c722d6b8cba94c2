//! A raw HBONE client for pod tests: mTLS to a peer's port 15008 (ALPN `h2`, a
//! certificate of our choosing, or none), then HTTP/2 requests as written, so a test
//! sees the server's own answers (200, 400, 401, 503), not a sidecar's reading of
//! them. It trusts any server certificate: it tests servers, and reports who answered.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use h2::client::SendRequest;
use serde::Serialize;
use tokio::net::TcpStream;

/// What one request got.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// Everything the stream carried back until its end (or `read_for` passed).
    pub body: String,
    /// How the stream ended: `end` (END_STREAM), `reset <code>`, `timeout`.
    pub end: String,
}

/// An open HBONE connection.
pub struct Client {
    send: SendRequest<Bytes>,
    /// The server certificate's SPIFFE ID.
    pub server_identity: String,
    /// How the connection ended, once it has: `closed`, `goaway <reason>`, or the error.
    ended: Arc<std::sync::Mutex<Option<String>>>,
}

/// Client TLS with `cert_dir`'s cert.pem/key.pem (or no certificate), ALPN h2, no SNI.
pub fn tls_config(cert_dir: Option<&Path>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert_dir {
        Some(dir) => {
            let (chain, key) = load(dir)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Ok(config)
}

fn load(
    dir: &Path,
) -> Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))?
        .collect::<Result<Vec<_>, _>>()
        .context("cert.pem")?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).context("key.pem")?;
    Ok((chain, key))
}

impl Client {
    /// TCP, mTLS and the HTTP/2 handshake to `to` with `config`.
    pub async fn connect(to: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Self> {
        Self::connect_from(None, to, config).await
    }

    /// As [`Client::connect`], from source address `from` when given.
    pub async fn connect_from(
        from: Option<std::net::IpAddr>,
        to: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self> {
        let tcp = match from {
            None => TcpStream::connect(to).await.context("TCP connect")?,
            Some(from) => {
                let socket = match to {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket
                    .bind(SocketAddr::new(from, 0))
                    .context("bind the source")?;
                socket.connect(to).await.context("TCP connect")?
            }
        };
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let server_identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| spiffe_id(leaf.as_ref()))
            .unwrap_or_default();
        let (send, connection) = h2::client::handshake(tls)
            .await
            .context("HTTP/2 handshake")?;
        let ended = Arc::new(std::sync::Mutex::new(None));
        let record = ended.clone();
        tokio::spawn(async move {
            let how = match connection.await {
                Ok(()) => "closed".to_string(),
                Err(e) if e.is_go_away() => format!("goaway {:?}", e.reason()),
                Err(e) => format!("error {e}"),
            };
            if let Ok(mut ended) = record.lock() {
                *ended = Some(how);
            }
        });
        Ok(Self {
            send,
            server_identity,
            ended,
        })
    }

    /// How the connection ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().ok().and_then(|e| e.clone())
    }

    /// Rapid reset: `count` `CONNECT`s to `authority`, in batches of `batch`, each
    /// batch reset (`CANCEL`) `reset_after` after its HEADERS went out (after the
    /// server accepted the streams, not before). Returns how many streams were sent
    /// before the connection refused more.
    pub async fn reset_flood(
        &self,
        authority: &str,
        count: usize,
        batch: usize,
        reset_after: Duration,
    ) -> usize {
        let mut sent = 0;
        while sent < count {
            let mut streams = Vec::with_capacity(batch);
            for _ in 0..batch.min(count - sent) {
                let Ok(request) = http::Request::builder()
                    .method("CONNECT")
                    .uri(authority)
                    .body(())
                else {
                    return sent;
                };
                let Ok(mut send) = self.send.clone().ready().await else {
                    return sent;
                };
                match send.send_request(request, false) {
                    Ok((response, stream)) => streams.push((response, stream)),
                    Err(_) => return sent,
                }
                sent += 1;
            }
            tokio::time::sleep(reset_after).await;
            for (_, mut stream) in streams {
                stream.send_reset(h2::Reason::CANCEL);
            }
        }
        sent
    }

    /// Sends `method authority`, then (on 200) `payload` and END_STREAM, and reads
    /// the answer until the stream ends or `read_for` passes.
    pub async fn request(
        &self,
        method: &str,
        authority: &str,
        payload: &[u8],
        read_for: Duration,
    ) -> Result<Answer> {
        let request = http::Request::builder()
            .method(method)
            .uri(authority)
            .header("forwarded", "for=\"192.0.2.1:1234\"")
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(request, false)?;
        let response = tokio::time::timeout(read_for, response)
            .await
            .context("no response")??;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        if status == 200 {
            stream.send_data(Bytes::copy_from_slice(payload), true)?;
        }
        let mut got = Vec::new();
        let end = loop {
            match tokio::time::timeout(read_for, body.data()).await {
                Ok(Some(Ok(chunk))) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                Ok(Some(Err(e))) => {
                    break match e.reason() {
                        Some(reason) => format!("reset {reason:?}"),
                        None => format!("error {e}"),
                    };
                }
                Ok(None) => break "end".to_string(),
                Err(_) => break "timeout".to_string(),
            }
        };
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&got).into_owned(),
            end,
        })
    }
}

/// The `spiffe://` URI SAN of a DER certificate.
fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some(uri.to_string())
        }
        _ => None,
    })
}

/// Accepts any server certificate: the tests check servers, not this client.
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
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

/// Fails unless `answer` is a 200 whose echo carries `marker`.
pub fn expect_echo(answer: &Answer, marker: &str) -> Result<()> {
    if answer.status != 200 || !answer.body.contains(marker) {
        bail!("expected an echo of {marker}: {answer:?}");
    }
    Ok(())
}
