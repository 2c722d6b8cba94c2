//! One HBONE stream as a byte stream: the data frames of an HTTP/2 `CONNECT` stream,
//! read and written like a socket. End-of-stream is a half-close both ways; a stream
//! reset is a connection reset (`RST_STREAM` with `CONNECT_ERROR`, as RFC 9113 §8.5
//! says a proxy passes on a TCP reset).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk one write hands to HTTP/2: at most this much of a connection's
/// send window is reserved by one stream at a time, so streams sharing a connection
/// take turns.
pub(crate) const MAX_WRITE: usize = 256 * 1024;

/// An open HBONE stream, either side.
pub struct H2Stream {
    /// The receiving half.
    pub read: H2Reader,
    /// The sending half.
    pub write: H2Writer,
    /// Kept until the stream is dropped (the tunnel's stream count).
    _guard: Option<Box<dyn Send + Sync>>,
    /// The socket of the connection carrying it (client streams), for `TCP_INFO`.
    pub socket: Option<Arc<super::tunnel::SharedSocket>>,
}

/// The receiving half: data frames in, flow-control capacity given back as they are
/// read.
pub struct H2Reader {
    recv: RecvStream,
    /// The rest of the last data frame.
    pending: Bytes,
}

/// The sending half.
pub struct H2Writer {
    send: SendStream<Bytes>,
    /// End-of-stream sent.
    finished: bool,
}

impl H2Stream {
    /// A stream over `send` and `recv`; `guard` is dropped with it.
    pub fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Self {
            read: H2Reader {
                recv,
                pending: Bytes::new(),
            },
            write: H2Writer {
                send,
                finished: false,
            },
            _guard: guard,
            socket: None,
        }
    }

    /// Names the socket of the connection carrying it.
    pub fn with_socket(mut self, socket: Arc<super::tunnel::SharedSocket>) -> Self {
        self.socket = Some(socket);
        self
    }

    /// Resets the stream (`RST_STREAM` with `CONNECT_ERROR`): the peer passes it on
    /// to its side as a TCP reset.
    pub fn reset(&mut self) {
        self.write.send.send_reset(h2::Reason::CONNECT_ERROR);
    }
}

/// An HTTP/2 error as an I/O error: a reset from the peer is a connection reset.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl H2Reader {
    /// The next data chunk as HTTP/2 received it (no copy): `None` at the end of the
    /// stream. Its capacity must be given back with [`H2Reader::release`] once the
    /// bytes are handed on.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut self.pending))));
        }
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(data))),
            Some(Err(e)) if e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR) => {
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(io_error(e)))),
            None => Poll::Ready(None),
        }
    }

    /// Reopens the window by `n` bytes handed on.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl AsyncRead for H2Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                // A peer done with the stream may stop ours with NO_ERROR: an EOF.
                Some(Err(e)) if e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                // End of stream: EOF.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        // Only bytes handed on reopen the window: a reader that stops reading stops
        // its own stream, never the connection's other streams.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl H2Writer {
    /// Waits until the stream may send: some of up to `max` bytes of window
    /// reserved for it (how many, at least one).
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        if self.send.capacity() == 0 {
            self.send.reserve_capacity(max.min(MAX_WRITE));
        }
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    /// Sends `data`, at most what [`H2Writer::poll_reserve`] granted.
    pub fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.send.send_data(data, false).map_err(io_error)
    }
}

impl AsyncWrite for H2Writer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    self.send.send_data(chunk, false).map_err(io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                // The stream closed under us (reset, or the connection went).
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
