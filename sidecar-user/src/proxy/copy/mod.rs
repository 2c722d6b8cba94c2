//! Copying bytes both ways between the application and its destination.
//!
//! Each direction runs until its reader sends EOF, then half-closes the other side
//! (FIN) while the opposite direction keeps flowing. An error in either direction ends
//! both, and so does a period with no bytes either way: `idle` while both directions
//! are open, the shorter `half_closed` once one of them has passed its EOF on (a peer
//! that said it is done and whose other side has gone silent is not held for the
//! whole idle timeout).
//!
//! Between two plain sockets a connection owns no buffer: each read goes into the
//! worker thread's scratch buffer and is written on at once, and a direction that fills
//! the whole buffer in one read (a bulk transfer) switches to `splice(2)` through a
//! pipe, so its bytes no longer pass through userspace. Out of a TLS stream, an idle
//! direction waits on a 1 KiB buffer, and takes a record-sized one only while data
//! streams.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    task::Poll,
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

use crate::{
    mesh::hbone::stream::{H2Reader, H2Writer},
    proxy::splice::Pipe,
    woken::woken,
};

mod h2;
mod idle;
mod tls_read;

pub use idle::Timeouts;
use idle::idle_expired;

/// Size of each worker thread's buffer for reads from plain sockets: a read this
/// full starts splicing (plain to plain) or becomes four TLS records in one `writev`.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Why a copy ended before both sides closed cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading from or writing to the application failed (typically a reset).
    #[error("client disconnected: {0}")]
    Client(#[source] io::Error),
    /// Reading from or writing to the destination failed.
    #[error("upstream disconnected: {0}")]
    Upstream(#[source] io::Error),
    /// No bytes moved either way for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// One direction had ended, and no bytes moved for the half-closed timeout.
    #[error("half-closed and idle for {0:?}")]
    HalfClosedIdle(Duration),
}

/// Byte counts of one connection, readable while it runs.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Application → destination.
    pub sent: AtomicU64,
    /// Destination → application.
    pub received: AtomicU64,
}

impl Transfer {
    /// Bytes moved both ways so far.
    pub fn total(&self) -> u64 {
        self.sent.load(Relaxed) + self.received.load(Relaxed)
    }
}

/// Metric counters each direction also adds to, as bytes flow.
#[derive(Clone, Debug)]
pub struct Totals {
    /// Initiator → destination.
    pub sent: Counter,
    /// Destination → initiator.
    pub received: Counter,
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn error(self, e: io::Error) -> CopyError {
        match self {
            Side::Client => CopyError::Client(e),
            Side::Upstream => CopyError::Upstream(e),
        }
    }
}

/// A stream the copy can split into a read and a write half, each of which says
/// whether it is a plain TCP socket (so the copy can use the socket directly).
pub trait Halves: Send {
    /// The read half.
    type Read<'a>: ReadTcp
    where
        Self: 'a;
    /// The write half.
    type Write<'a>: WriteTcp
    where
        Self: 'a;
    /// Splits the stream for the duration of the copy.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

impl Halves for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;
    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        self.split()
    }
}

/// Streams that are not plain sockets: split with `tokio::io::split`.
#[cfg(test)]
macro_rules! opaque_halves {
    ($($ty:ty),*) => {$(
        impl<IO: AsyncRead + AsyncWrite + Unpin + Send> Halves for $ty {
            type Read<'a> = tokio::io::ReadHalf<&'a mut Self> where Self: 'a;
            type Write<'a> = tokio::io::WriteHalf<&'a mut Self> where Self: 'a;
            fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
                tokio::io::split(self)
            }
        }
    )*};
}

#[cfg(test)]
opaque_halves!(tokio::io::BufWriter<IO>);

/// Copies until both directions are closed, one fails, or a timeout of `timeouts`
/// passes with no bytes.
pub async fn copy_bidirectional<C: Halves, U: Halves>(
    client: &mut C,
    upstream: &mut U,
    timeouts: Timeouts,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError> {
    copy_halves(
        client.halves(),
        upstream.halves(),
        timeouts,
        transfer,
        totals,
    )
    .await
}

async fn copy_halves<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
    timeouts: Timeouts,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError>
where
    CR: ReadTcp,
    UR: ReadTcp,
    CW: WriteTcp,
    UW: WriteTcp,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, in either direction.
    let last_activity = AtomicU64::new(0);
    let out = OneWay {
        from: (client.0, Side::Client),
        to: (upstream.1, Side::Upstream),
        meter: Meter {
            bytes: (&transfer.sent, totals.sent),
            last_activity: &last_activity,
            start,
        },
    };
    let back = OneWay {
        from: (upstream.0, Side::Upstream),
        to: (client.1, Side::Client),
        meter: Meter {
            bytes: (&transfer.received, totals.received),
            last_activity: &last_activity,
            start,
        },
    };
    // Each direction is polled when it has work, not when the other one has.
    let (out, back) = (woken(out.run()), woken(back.run()));
    tokio::pin!(out, back);
    let idle = timeouts.idle;
    let first = tokio::select! {
        result = &mut out => result.map(|()| Finished::Out)?,
        result = &mut back => result.map(|()| Finished::Back)?,
        () = woken(idle_expired(&last_activity, start, idle)) => return Err(CopyError::Idle(idle)),
    };
    // The half-closed timeout counts from the EOF that ended the first direction.
    last_activity.store(start.elapsed().as_millis() as u64, Relaxed);
    let limit = timeouts.half_closed.min(idle);
    let expired = woken(idle_expired(&last_activity, start, limit));
    match first {
        Finished::Out => tokio::select! {
            result = back => result,
            () = expired => Err(CopyError::HalfClosedIdle(limit)),
        },
        Finished::Back => tokio::select! {
            result = out => result,
            () = expired => Err(CopyError::HalfClosedIdle(limit)),
        },
    }
}

/// Which direction passed its EOF on first.
enum Finished {
    /// Application → destination.
    Out,
    /// Destination → application.
    Back,
}

/// A read half that may be a plain TCP socket (read without a buffer of its own).
pub trait ReadTcp: AsyncRead + Unpin + Send {
    /// The plain TCP socket read from, when there is one.
    fn tcp(&self) -> Option<&TcpStream>;

    /// The HBONE stream read from, when it is one (its chunks are written on as
    /// they are, without a buffer of the copy's own).
    fn h2(&mut self) -> Option<&mut H2Reader> {
        None
    }
}

/// A write half that may be a plain TCP socket (splice destination).
pub trait WriteTcp: AsyncWrite + Unpin + Send {
    /// The plain TCP socket written to, when there is one.
    fn tcp(&self) -> Option<&TcpStream>;

    /// The HBONE stream written to, when it is one (a plain socket's reads go into
    /// buffers the stream then owns, without a copy).
    fn h2(&mut self) -> Option<&mut H2Writer> {
        None
    }
}

impl ReadTcp for ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncRead + Send> ReadTcp for tokio::io::ReadHalf<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl WriteTcp for WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncWrite + Send> WriteTcp for tokio::io::WriteHalf<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

struct OneWay<'a, R, W> {
    from: (R, Side),
    to: (W, Side),
    meter: Meter<'a>,
}

/// Where a direction counts its bytes and notes activity.
struct Meter<'a> {
    bytes: (&'a AtomicU64, Counter),
    last_activity: &'a AtomicU64,
    start: Instant,
}

impl Meter<'_> {
    /// Counts `n` bytes moved and notes the activity.
    fn moved(&self, n: usize) {
        self.bytes.0.fetch_add(n as u64, Relaxed);
        self.bytes.1.inc_by(n as u64);
        let now = self.start.elapsed().as_millis() as u64;
        self.last_activity.store(now, Relaxed);
    }

    /// Splices `src` into `dst` until EOF.
    async fn splice(
        &self,
        pipe: &Pipe,
        src: &TcpStream,
        dst: &TcpStream,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        loop {
            let n = pipe.fill(src).await.map_err(|e| from.error(e))?;
            if n == 0 {
                return Ok(());
            }
            pipe.drain(dst, n).await.map_err(|e| to.error(e))?;
            self.moved(n);
        }
    }
}

impl<R: ReadTcp, W: WriteTcp> OneWay<'_, R, W> {
    async fn run(self) -> Result<(), CopyError> {
        let OneWay {
            from: (mut reader, from),
            to: (mut writer, to),
            meter,
        } = self;
        match (reader.tcp(), writer.tcp()) {
            (Some(src), Some(dst)) => meter.plain(src, dst, (from, to)).await?,
            (Some(src), None) => match writer.h2() {
                Some(h2) => meter.plain_to_h2(&mut reader, h2, (from, to)).await?,
                None => meter.plain_to_tls(src, &mut writer, (from, to)).await?,
            },
            (None, _) => match reader.h2() {
                Some(h2) => meter.h2_to_any(h2, &mut writer, (from, to)).await?,
                None => {
                    meter
                        .tls_to_any(&mut reader, &mut writer, (from, to))
                        .await?
                }
            },
        }
        // EOF: pass the half-close on; the other direction keeps running.
        writer.shutdown().await.map_err(|e| to.error(e))
    }
}

thread_local! {
    /// Each worker thread's read buffer for copies from a plain socket: a read and
    /// the write that follows it happen without yielding, so one buffer per thread
    /// serves every connection; only bytes the destination cannot take at once are
    /// copied into memory the connection owns.
    pub(super) static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH_SIZE]);
}

/// One read from a plain socket and the write that follows it.
enum Step {
    /// The socket had nothing after all (spurious readiness).
    Again,
    /// The socket sent EOF.
    Eof,
    /// `n` bytes read (`full`: as many as the buffer holds); `rest` of them still to
    /// be written.
    Moved {
        n: usize,
        full: bool,
        rest: Option<Vec<u8>>,
    },
}

impl Meter<'_> {
    /// Copies between two plain sockets until `src`'s EOF: through the thread's
    /// scratch buffer while messages are small, with `splice(2)` once a read fills
    /// the whole buffer (a bulk transfer).
    async fn plain(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        loop {
            src.readable().await.map_err(|e| from.error(e))?;
            let step = step(src, from, |bytes| match dst.try_write(bytes) {
                Ok(m) => Ok(m),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) => Err(to.error(e)),
            })?;
            let (n, full) = match step {
                Step::Again => continue,
                Step::Eof => return Ok(()),
                Step::Moved { n, full, rest } => {
                    if let Some(rest) = rest {
                        write_all(dst, &rest).await.map_err(|e| to.error(e))?;
                    }
                    (n, full)
                }
            };
            self.moved(n);
            if full {
                // Out of descriptors for a pipe, keep copying.
                if let Ok(pipe) = Pipe::new() {
                    return self.splice(&pipe, src, dst, (from, to)).await;
                }
            }
        }
    }

    /// Copies from a plain socket into a TLS stream until the socket's EOF, through
    /// the thread's scratch buffer: rustls takes the plaintext into its own buffer
    /// at once (up to 4 records per read, sent with one `writev`).
    async fn plain_to_tls<W: AsyncWrite + Unpin>(
        &self,
        src: &TcpStream,
        writer: &mut W,
        (from, to): (Side, Side),
    ) -> Result<(), CopyError> {
        loop {
            src.readable().await.map_err(|e| from.error(e))?;
            let step = std::future::poll_fn(|cx| {
                Poll::Ready(step(src, from, |bytes| {
                    match Pin::new(&mut *writer).poll_write(cx, bytes) {
                        Poll::Ready(Ok(m)) => Ok(m),
                        Poll::Ready(Err(e)) => Err(to.error(e)),
                        Poll::Pending => Ok(0),
                    }
                }))
            })
            .await?;
            let n = match step {
                Step::Again => continue,
                Step::Eof => return Ok(()),
                Step::Moved { n, rest, .. } => {
                    if let Some(rest) = rest {
                        writer.write_all(&rest).await.map_err(|e| to.error(e))?;
                    }
                    n
                }
            };
            // rustls sends what the socket takes and keeps the rest until polled
            // again: flush, or the tail would wait for the next read.
            writer.flush().await.map_err(|e| to.error(e))?;
            self.moved(n);
        }
    }
}

/// Reads what `src` has into the thread's scratch buffer and hands it to `write`,
/// which returns how many bytes the destination took at once.
fn step(
    src: &TcpStream,
    from: Side,
    write: impl FnOnce(&[u8]) -> Result<usize, CopyError>,
) -> Result<Step, CopyError> {
    SCRATCH.with_borrow_mut(|scratch| {
        let n = match src.try_read(scratch) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
            Err(e) => return Err(from.error(e)),
        };
        let written = write(&scratch[..n])?;
        let rest = (written < n).then(|| scratch[written..n].to_vec());
        Ok(Step::Moved {
            n,
            full: n == scratch.len(),
            rest,
        })
    })
}

/// Writes all of `bytes` to `dst`, waiting whenever its send buffer is full.
async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => bytes = &bytes[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
