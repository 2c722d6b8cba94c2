//! Socket options of the proxy's connections to and from other hosts: keepalive and
//! `TCP_USER_TIMEOUT`, so a peer that vanished without a FIN or RST (node gone, link
//! down, a NAT that forgot the flow) is found in bounded time, on both sides of the
//! proxy. The application's side of an outbound connection and the delivery to the
//! application inbound stay inside the pod and get neither.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::ProxyConfig;

/// How sockets to and from other hosts find dead peers.
#[derive(Clone, Debug)]
pub struct DeadPeer {
    keepalive: Option<TcpKeepalive>,
    user_timeout: Duration,
}

impl DeadPeer {
    /// The settings of `proxy.keepalive` and `proxy.user_timeout`.
    pub fn new(config: &ProxyConfig) -> Self {
        let k = &config.keepalive;
        // The kernel counts in whole seconds; round a sub-second setting up, not to 0.
        let secs = |d: Duration| Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64);
        let keepalive = k.enabled.then(|| {
            TcpKeepalive::new()
                .with_time(secs(k.time))
                .with_interval(secs(k.interval))
                .with_retries(k.probes)
        });
        Self {
            keepalive,
            user_timeout: config.user_timeout,
        }
    }

    /// Applies the settings to `stream`. A failure is logged, never fatal: the
    /// connection still works, it only finds a dead peer later.
    pub fn apply(&self, stream: &TcpStream) {
        let sock = SockRef::from(stream);
        if let Some(keepalive) = &self.keepalive {
            if let Err(error) = sock.set_tcp_keepalive(keepalive) {
                tracing::debug!(%error, "setting TCP keepalive");
            }
        }
        if let Err(error) = sock.set_tcp_user_timeout(Some(self.user_timeout)) {
            tracing::debug!(%error, "setting TCP_USER_TIMEOUT");
        }
    }
}

/// Sets an integer socket option that socket2 does not cover (`SO_RCVLOWAT`,
/// `IP_BIND_ADDRESS_NO_PORT`).
pub fn set_int(
    fd: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid descriptor and an int option value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads an integer socket option.
pub fn get_int(
    fd: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid descriptor, and an int-sized buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settings_reach_the_socket() {
        let mut config = ProxyConfig::default();
        config.keepalive.time = Duration::from_millis(1500);
        config.keepalive.interval = Duration::from_secs(2);
        config.keepalive.probes = 4;
        config.user_timeout = Duration::from_millis(7500);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = TcpStream::connect(addr).await.expect("connect");
        DeadPeer::new(&config).apply(&stream);
        let sock = SockRef::from(&stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(2)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("count"), 4);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_millis(7500))
        );
    }
}
