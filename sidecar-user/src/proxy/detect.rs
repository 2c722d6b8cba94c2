//! Telling a peer sidecar's mTLS from anything else by peeking at the first bytes,
//! without consuming them: a TLS ClientHello that offers our ALPN is a sidecar; any
//! other bytes (plaintext, or the application's own TLS) pass through untouched.

use std::{os::fd::AsRawFd, time::Duration};

use tokio::{io::Interest, net::TcpStream};

use crate::{mesh::server::offers_mesh, proxy::socket_opts};

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

/// Looks at the first bytes of `stream` without consuming them until they decide, or
/// `timeout` passes.
///
/// Waiting costs no buffer and no polling: `SO_RCVLOWAT` is set to the number of bytes
/// still needed (1, then the 5-byte record header, then the whole record), so the
/// socket becomes readable only when they are all queued (or the client closes); the
/// count comes from `SIOCINQ`. A buffer is allocated only then, for as long as
/// classifying takes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let lowat = RcvLowat(stream);
    let mut need = 1;
    let mut set_for = 0;
    loop {
        // Only when it changes: setting it runs the kernel's data-ready check, which
        // can wake the socket again (memory pressure), and would spin this loop.
        if set_for != need {
            lowat.set(need)?;
            set_for = need;
        }
        let ready = match tokio::time::timeout_at(deadline, stream.ready(Interest::READABLE)).await
        {
            Ok(ready) => ready?,
            Err(_) => return Ok(Detected::TimedOut),
        };
        let closed = ready.is_read_closed();
        // Too few bytes: report WouldBlock, which clears the readiness (unless a newer
        // event came in meanwhile: tokio checks), so the next wait sleeps until more
        // arrive. With enough bytes the readiness stays set for the reads that follow.
        let enough = stream.try_io(Interest::READABLE, || match queued(stream)? {
            queued if queued >= need || closed => Ok(queued),
            _ => Err(std::io::ErrorKind::WouldBlock.into()),
        });
        let queued = match enough {
            Ok(queued) => queued,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; queued.clamp(need, MAX_RECORD)];
        let peeked = peek_now(stream, &mut buf)?;
        match classify(&buf[..peeked]) {
            Some(detected) => return Ok(detected),
            // A whole record that still is not a complete ClientHello: not ours (a
            // sidecar's always fits one record). Closed half-way: not a ClientHello.
            None if peeked >= record_len(&buf[..peeked]) || closed => {
                return Ok(Detected::OtherTls);
            }
            None => need = record_len(&buf[..peeked]),
        }
    }
}

/// Bytes needed to see the whole first record: the header, then header plus length.
fn record_len(bytes: &[u8]) -> usize {
    if bytes.len() < 5 {
        return 5;
    }
    5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]])).min(MAX_RECORD - 5)
}

/// Copies the queued bytes into `buf` without consuming them or waiting.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            e => Err(e),
        },
    }
}

/// Bytes queued for reading (`SIOCINQ`).
fn queued(stream: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `SO_RCVLOWAT` of a socket under detection, put back to 1 when dropped: the relay
/// that follows must see every byte as soon as it arrives.
struct RcvLowat<'a>(&'a TcpStream);

impl RcvLowat<'_> {
    fn set(&self, bytes: usize) -> std::io::Result<()> {
        let bytes = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
        socket_opts::set_int(self.0, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
    }
}

impl Drop for RcvLowat<'_> {
    fn drop(&mut self) {
        let _ = self.set(1);
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
            let offers_ours = accepted.client_hello().alpn().is_some_and(offers_mesh);
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
    use crate::mesh::ALPN;

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

    /// Detection on a loopback pair: the client writes `parts` with pauses between them.
    async fn detect_sent(parts: Vec<Vec<u8>>, close: bool) -> Detected {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.expect("connect");
            for part in parts {
                s.write_all(&part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if close {
                let _ = s.shutdown().await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
        let (server, _) = listener.accept().await.expect("accept");
        let detected = detect(&server, Duration::from_millis(300))
            .await
            .expect("detect");
        // Nothing consumed, and the low-water mark is back to 1 for the relay.
        assert_eq!(
            socket_opts::get_int(&server, libc::SOL_SOCKET, libc::SO_RCVLOWAT).expect("lowat"),
            1
        );
        client.abort();
        detected
    }

    #[tokio::test]
    async fn decides_at_once_on_a_client_hello_queued_before_detection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        use tokio::io::AsyncWriteExt;
        client
            .write_all(&client_hello(&[ALPN]))
            .await
            .expect("write");
        // Let it land and the readiness event pass before detection starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.readable().await.expect("readable");
        let detected = tokio::time::timeout(
            Duration::from_secs(2),
            detect(&server, Duration::from_secs(1)),
        )
        .await
        .expect("detection must not wait for a readiness event that already passed")
        .expect("detect");
        assert_eq!(detected, Detected::SidecarTls);
    }

    #[tokio::test]
    async fn waits_for_the_rest_of_a_client_hello_sent_in_pieces() {
        let hello = client_hello(&[ALPN]);
        let pieces = vec![
            hello[..3].to_vec(),
            hello[3..40].to_vec(),
            hello[40..].to_vec(),
        ];
        assert_eq!(detect_sent(pieces, false).await, Detected::SidecarTls);
        assert_eq!(
            detect_sent(vec![b"GET / HTTP/1.1\r\n".to_vec()], false).await,
            Detected::Plaintext
        );
        // A ClientHello that stalls half-way times out; one cut by a FIN is not ours.
        let half = hello[..hello.len() / 2].to_vec();
        assert_eq!(
            detect_sent(vec![half.clone()], false).await,
            Detected::TimedOut
        );
        assert_eq!(detect_sent(vec![half], true).await, Detected::OtherTls);
        assert_eq!(detect_sent(vec![], false).await, Detected::TimedOut);
        assert_eq!(detect_sent(vec![], true).await, Detected::Closed);
    }

    #[test]
    fn waits_for_a_whole_client_hello() {
        let hello = client_hello(&[ALPN]);
        for cut in [1, 3, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), None, "cut at {cut}");
        }
    }
}
