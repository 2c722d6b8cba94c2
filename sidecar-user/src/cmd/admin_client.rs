//! A minimal HTTP/1.0 client for the admin listener (`sidecar connections`). The admin
//! listener is loopback-only and speaks plain HTTP/1, so a blocking GET is enough.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Why a request to the admin listener failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Connecting, writing or reading failed.
    #[error("admin listener at {addr}: {source}")]
    Io {
        /// The admin address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The response was not a 200 with a body.
    #[error("admin listener at {addr} answered {path} with: {status}")]
    Status {
        /// The admin address.
        addr: SocketAddr,
        /// The path requested.
        path: String,
        /// The status line.
        status: String,
    },
}

/// `GET path` on `addr`; returns the body of a 200 response.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, AdminClientError> {
    let io = |source| AdminClientError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    if !status.contains(" 200 ") {
        return Err(AdminClientError::Status {
            addr,
            path: path.to_string(),
            status,
        });
    }
    Ok(body.to_string())
}
