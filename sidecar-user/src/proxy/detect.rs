//! Telling a peer sidecar's mTLS from anything else by peeking at the first bytes,
//! without consuming them: a TLS ClientHello that offers our ALPN is a sidecar; any
//! other bytes (plaintext, or the application's own TLS) pass through untouched.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::tls::ALPN;

/// Largest ClientHello we wait for (one TLS record).
const MAX_RECORD: usize = 5 + 16 * 1024;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello offering the sidecar ALPN.
    SidecarTls,
    /// A TLS ClientHello without it: another TLS client.
    OtherTls,
    /// Not TLS.
    Plaintext,
    /// The client closed before sending anything.
    Closed,
    /// Nothing (or not enough to decide) within the timeout.
    TimedOut,
}

/// Peeks at `stream` until the first bytes decide, or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_RECORD];
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Detected::TimedOut),
        };
        match classify(&buf[..peeked]) {
            Some(detected) => return Ok(detected),
            // Part of a ClientHello: the rest is in flight. Peek returns at once while
            // bytes are queued, so wait a little before looking again.
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None => return Ok(Detected::TimedOut),
        }
    }
}

/// Classifies the bytes seen so far; `None` while a ClientHello is incomplete.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let Some(&first) = bytes.first() else {
        return Some(Detected::Closed);
    };
    // A TLS handshake record: type 22, version 3.x.
    if first != 0x16 {
        return Some(Detected::Plaintext);
    }
    if bytes.len() < 5 {
        let not_tls = bytes.len() >= 2 && bytes[1] != 0x03;
        return if not_tls {
            Some(Detected::Plaintext)
        } else {
            None
        };
    }
    if bytes[1] != 0x03 {
        return Some(Detected::Plaintext);
    }
    let length = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if bytes.len() < 5 + length.min(MAX_RECORD - 5) {
        return None;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    if acceptor.read_tls(&mut reader).is_err() {
        return Some(Detected::Plaintext);
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let offers_ours = accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ALPN));
            Some(if offers_ours {
                Detected::SidecarTls
            } else {
                Detected::OtherTls
            })
        }
        Ok(None) => None,
        Err(_) => Some(Detected::OtherTls),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls, offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut config =
            rustls::ClientConfig::builder_with_provider(crate::tls::rustls_config::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("x.invalid").expect("name");
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn tells_sidecars_from_other_tls_and_plaintext() {
        assert_eq!(
            classify(&client_hello(&[b"h2", ALPN])),
            Some(Detected::SidecarTls)
        );
        assert_eq!(classify(&client_hello(&[b"h2"])), Some(Detected::OtherTls));
        assert_eq!(classify(&client_hello(&[])), Some(Detected::OtherTls));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Plaintext));
        assert_eq!(classify(b""), Some(Detected::Closed));
    }

    #[test]
    fn waits_for_a_whole_client_hello() {
        let hello = client_hello(&[ALPN]);
        for cut in [1, 3, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), None, "cut at {cut}");
        }
    }
}
