//! Zero-copy forwarding between two plain TCP sockets with `splice(2)`: bytes move
//! from one socket's receive queue into a pipe and from the pipe into the other
//! socket's send queue as page references, never through a userspace buffer.
//!
//! Used for bulk transfers only (see `copy`): a small request is cheaper to read and
//! write once than to splice twice.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Most bytes moved by one `splice` call: the default pipe capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe that carries one direction's bytes.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe (two descriptors, no memory until bytes pass).
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }

    /// Moves up to [`CHUNK`] bytes from `src` into the (empty) pipe, waiting until
    /// `src` has some. `Ok(0)` is EOF.
    pub async fn fill(&self, src: &TcpStream) -> io::Result<usize> {
        loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), self.write.as_raw_fd(), CHUNK)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Moves exactly `len` bytes (what the pipe holds) into `dst`, waiting whenever
    /// its send buffer is full.
    pub async fn drain(&self, dst: &TcpStream, mut len: usize) -> io::Result<()> {
        while len > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(self.read.as_raw_fd(), dst.as_raw_fd(), len)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => len -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets
    // mean "the descriptor's own position", as required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::test_support::tcp_pair as pair;

    #[tokio::test]
    async fn moves_every_byte_through_the_pipe_and_reports_eof() {
        let (mut writer, src) = pair().await;
        let (dst, mut reader) = pair().await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let feeder = tokio::spawn(async move {
            writer.write_all(&sent).await.expect("write");
            writer.shutdown().await.expect("fin");
        });
        let relay = tokio::spawn(async move {
            let pipe = Pipe::new().expect("pipe");
            let mut total = 0;
            loop {
                let n = pipe.fill(&src).await.expect("fill");
                if n == 0 {
                    return total;
                }
                pipe.drain(&dst, n).await.expect("drain");
                total += n;
            }
        });
        let mut got = Vec::new();
        let read = async {
            let mut buf = vec![0u8; 65536];
            while got.len() < data.len() {
                let n = reader.read(&mut buf).await.expect("read");
                assert!(n > 0, "early EOF");
                got.extend_from_slice(&buf[..n]);
            }
        };
        read.await;
        feeder.await.expect("feeder");
        assert_eq!(relay.await.expect("relay"), data.len());
        assert!(got == data, "bytes differ");
    }
}
