//! Kubelet probes rewritten by `sidecar inject` arrive at the health listener as
//! `/app-health/<container>/<probe>` and are carried out here against the app, on the
//! pod IP the kubelet dialed: an HTTP GET whose status code is passed back (the kubelet
//! passes 200–399), or a TCP connect. The sidecar's own connects are never captured,
//! and a connection from the pod IP to itself is never steered inbound, so the probe
//! reaches the app itself, not the proxy.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Upper bound on one forwarded probe (the kubelet's own timeout is usually shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable carrying the probes `sidecar inject` rewrote (JSON) to the
/// sidecar.
pub const PROBES_ENV: &str = "SIDECAR_APP_PROBES";

/// One rewritten probe: what the sidecar does for `/app-health/<container>/<kind>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppProbe {
    /// HTTP GET on the app's port and path (2xx/3xx passes, as the kubelet judges).
    HttpGet {
        /// The app's port.
        port: u16,
        /// Path and query.
        path: String,
    },
    /// A TCP connect to the app's port.
    TcpSocket {
        /// The app's port.
        port: u16,
    },
}

/// The rewritten probes, by path.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Reads the probes `sidecar inject` put in [`PROBES_ENV`]; empty when unset.
pub fn from_env() -> Result<AppProbes, String> {
    match std::env::var(PROBES_ENV) {
        Ok(json) => serde_json::from_str(&json)
            .map_err(|e| format!("environment variable {PROBES_ENV}: {e}")),
        Err(_) => Ok(AppProbes::new()),
    }
}

/// Runs `probe` against the app at `ip`; the HTTP status to answer the kubelet with.
pub async fn check(probe: &AppProbe, ip: IpAddr) -> (u16, String) {
    match tokio::time::timeout(PROBE_TIMEOUT, run(probe, ip)).await {
        Ok(Ok(code)) => (code, format!("app answered {code}\n")),
        Ok(Err(e)) => (503, format!("app probe failed: {e}\n")),
        Err(_) => (503, "app probe timed out\n".into()),
    }
}

async fn run(probe: &AppProbe, ip: IpAddr) -> std::io::Result<u16> {
    match probe {
        AppProbe::TcpSocket { port } => {
            TcpStream::connect((ip, *port)).await?;
            Ok(200)
        }
        AppProbe::HttpGet { port, path } => {
            let mut stream = TcpStream::connect((ip, *port)).await?;
            let host = match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            };
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe (via sidecar)\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await?;
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 512];
            while !head.contains(&b'\n') && head.len() < 4096 {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            status_code(&head).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the app's answer is not HTTP",
                )
            })
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts
        .next()?
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 503 Busy\r\nx"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc\r\n"), None);
    }
}
