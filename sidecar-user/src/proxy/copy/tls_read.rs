//! Copying out of a TLS stream. A TLS reader cannot wait for data without a buffer
//! (rustls may hold decrypted bytes already), so an idle direction waits on a small
//! one, and takes a record-sized one only while data streams.

use std::{io, pin::Pin, task::Poll, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{CopyError, Meter, SCRATCH_SIZE, Side};

/// Size of the buffer an idle TLS reader waits on: a message this size or smaller is
/// copied on from it, so an idle or chatty connection holds no larger buffer.
pub(super) const WAIT_SIZE: usize = 1024;
/// Size of a TLS reader's buffer while data streams: one TLS record's plaintext.
pub(super) const BUF_SIZE: usize = 16 * 1024;
/// How long a TLS reader keeps its record-sized buffer without new data.
pub(super) const RELEASE_AFTER: Duration = Duration::from_millis(100);
impl Meter<'_> {
    /// Copies out of a TLS stream until its EOF. A TLS reader cannot wait for data
    /// without a buffer (rustls may hold decrypted bytes already), so an idle
    /// direction waits on a small one ([`WAIT_SIZE`]), which carries a short message
    /// on by itself. A read that fills it moves to a record-sized buffer, kept while
    /// records stream in and released after [`RELEASE_AFTER`] without data. rustls
    /// hands out one record per read: while records stream, the buffer grows to
    /// [`SCRATCH_SIZE`] and collects every record already readable, so one write
    /// carries up to four.
    pub(super) async fn tls_to_any<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        reader: &mut R,
        writer: &mut W,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        let mut wait = vec![0u8; WAIT_SIZE];
        let mut buf = Vec::new();
        loop {
            let mut n = if buf.is_empty() {
                let n = reader.read(&mut wait).await.map_err(|e| from.error(e))?;
                if n < WAIT_SIZE {
                    // EOF (0) or a message that fits: no larger buffer needed.
                    if n == 0 {
                        return Ok(());
                    }
                    self.write_out(writer, &wait[..n], to).await?;
                    continue;
                }
                buf = vec![0u8; BUF_SIZE];
                buf[..n].copy_from_slice(&wait);
                n
            } else {
                match tokio::time::timeout(RELEASE_AFTER, reader.read(&mut buf)).await {
                    Ok(read) => read.map_err(|e| from.error(e))?,
                    Err(_) => {
                        // Quiet: give the buffer back and wait on the small one.
                        buf = Vec::new();
                        continue;
                    }
                }
            };
            if n == 0 {
                return Ok(());
            }
            let mut eof = false;
            let streaming = n >= WAIT_SIZE;
            if streaming && n >= BUF_SIZE && buf.len() < SCRATCH_SIZE {
                buf.resize(SCRATCH_SIZE, 0);
            }
            if streaming {
                while n < buf.len() {
                    match read_now(reader, &mut buf[n..]).await {
                        Some(Ok(0)) => eof = true,
                        Some(Ok(m)) => {
                            n += m;
                            continue;
                        }
                        Some(Err(e)) => return Err(from.error(e)),
                        None => {}
                    }
                    break;
                }
            }
            self.write_out(writer, &buf[..n], to).await?;
            if eof {
                return Ok(());
            }
            if n < BUF_SIZE && buf.len() > BUF_SIZE {
                // Records stopped streaming: back to one record's worth.
                buf.truncate(BUF_SIZE);
                buf.shrink_to_fit();
            }
        }
    }

    /// Writes `bytes` read out of a TLS stream and counts them.
    async fn write_out<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        bytes: &[u8],
        to: Side,
    ) -> Result<(), CopyError> {
        writer.write_all(bytes).await.map_err(|e| to.error(e))?;
        // A TLS writer (both sides TLS) may hold bytes back: see `plain_to_tls`.
        writer.flush().await.map_err(|e| to.error(e))?;
        self.moved(bytes.len());
        Ok(())
    }
}

/// Reads what `reader` has without waiting: `None` when a read would wait.
async fn read_now<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Option<io::Result<usize>> {
    let mut read_buf = ReadBuf::new(buf);
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) => Some(Ok(read_buf.filled().len())),
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Pending => None,
        })
    })
    .await
}
