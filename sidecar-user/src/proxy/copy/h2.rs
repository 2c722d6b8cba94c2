//! Copying into and out of an HBONE stream without buffers of the copy's own: the
//! stream splits into its HTTP/2 halves without a lock; a plain socket's reads go
//! into buffers HTTP/2 sends and frees, and received chunks are written on as HTTP/2
//! holds them.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::{CopyError, Halves, Meter, ReadTcp, SCRATCH, SCRATCH_SIZE, Side, WriteTcp};
use crate::mesh::hbone::stream::{H2Reader, H2Stream, H2Writer, MAX_WRITE};

/// An HBONE stream splits into its HTTP/2 halves without a lock.
impl Halves for H2Stream {
    type Read<'a> = &'a mut H2Reader;
    type Write<'a> = &'a mut H2Writer;
    fn halves(&mut self) -> (&mut H2Reader, &mut H2Writer) {
        (&mut self.read, &mut self.write)
    }
}

impl ReadTcp for &mut H2Reader {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    fn h2(&mut self) -> Option<&mut H2Reader> {
        Some(self)
    }
}

impl WriteTcp for &mut H2Writer {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    fn h2(&mut self) -> Option<&mut H2Writer> {
        Some(self)
    }
}

impl Meter<'_> {
    /// Copies from a plain socket into an HBONE stream until the socket's EOF. Once
    /// bytes are waiting, it waits for window, then reads at most that much. Small
    /// messages are read into the thread's scratch buffer and only the bytes read are
    /// copied into the chunk HTTP/2 sends (a read of 70 bytes allocates 70, not the
    /// 64 KiB window). After a read of [`SMALL_READ`] or more the transfer is bulk:
    /// reads go straight into buffers of the window's size, which HTTP/2 sends and
    /// frees, no copy; a shorter read goes back to the scratch buffer. An idle
    /// direction holds no buffer either way. A read that leaves room in the buffer
    /// drained the socket (epoll is edge-triggered): the next round waits for
    /// readiness instead of trying a read that would find nothing, so the
    /// connection's task writes the frame one system call sooner.
    pub(super) async fn plain_to_h2<R: ReadTcp>(
        &self,
        src: &mut R,
        writer: &mut H2Writer,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        let mut bulk = false;
        loop {
            if let Some(tcp) = src.tcp() {
                tcp.readable().await.map_err(|e| from.error(e))?;
            }
            // Bulk reads take up to what one write may hand to HTTP/2 (fewer, larger
            // DATA frames). Branch-free, so the PGO profile of this loop still applies.
            let want = SCRATCH_SIZE << (BULK_SHIFT * usize::from(bulk));
            let window = std::future::poll_fn(|cx| writer.poll_reserve(cx, want))
                .await
                .map_err(|e| to.error(e))?;
            let chunk = if bulk {
                let mut buf = bytes::BytesMut::with_capacity(window);
                src.read_buf(&mut buf).await.map_err(|e| from.error(e))?;
                buf.freeze()
            } else {
                std::future::poll_fn(|cx| read_small(&mut *src, window, cx))
                    .await
                    .map_err(|e| from.error(e))?
            };
            let n = chunk.len();
            if n == 0 {
                return Ok(());
            }
            writer.send(chunk).map_err(|e| to.error(e))?;
            self.moved(n);
            bulk = n >= SMALL_READ;
        }
    }

    /// Copies out of an HBONE stream until its end: each chunk HTTP/2 received is
    /// written on as it is, and its window reopened only once it is written (a
    /// destination that stops reading stops its own stream, never the others).
    pub(super) async fn h2_to_any<W: AsyncWrite + Unpin>(
        &self,
        reader: &mut H2Reader,
        writer: &mut W,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        loop {
            let chunk = std::future::poll_fn(|cx| reader.poll_chunk(cx)).await;
            let chunk = match chunk {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Err(from.error(e)),
                None => return Ok(()),
            };
            writer.write_all(&chunk).await.map_err(|e| to.error(e))?;
            writer.flush().await.map_err(|e| to.error(e))?;
            reader.release(chunk.len());
            self.moved(chunk.len());
        }
    }
}

/// A read of at least this much marks a bulk transfer (the next reads go in place);
/// a shorter one, small messages (the next reads go through the scratch buffer).
const SMALL_READ: usize = 4 * 1024;

/// `MAX_WRITE` as a shift of [`SCRATCH_SIZE`] (the copy loop shifts, without a branch).
const BULK_SHIFT: usize = (MAX_WRITE / SCRATCH_SIZE).trailing_zeros() as usize;
const _: () = assert!(SCRATCH_SIZE << BULK_SHIFT == MAX_WRITE);

/// One read of at most `max` bytes from `src` into the thread's scratch buffer, the
/// bytes read copied out (empty at EOF). Through `poll_read`, so a short read clears
/// the socket's readiness as a drained socket's should.
fn read_small<R: AsyncRead + Unpin>(
    src: &mut R,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Bytes>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let len = max.min(scratch.len());
        let mut buf = ReadBuf::new(&mut scratch[..len]);
        ready!(Pin::new(src).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(Bytes::copy_from_slice(buf.filled())))
    })
}
