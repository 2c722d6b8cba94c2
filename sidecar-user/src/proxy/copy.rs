//! Copying bytes both ways between the application and its destination.
//!
//! Each direction runs until its reader sends EOF, then half-closes the other side
//! (FIN) while the opposite direction keeps flowing. An error in either direction ends
//! both, and so does a period with no bytes either way.
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
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

use crate::proxy::splice::Pipe;

/// Size of the buffer an idle TLS reader waits on: a message this size or smaller is
/// copied on from it, so an idle or chatty connection holds no larger buffer.
const WAIT_SIZE: usize = 1024;
/// Size of a TLS reader's buffer while data streams: one TLS record's plaintext.
const BUF_SIZE: usize = 16 * 1024;
/// How long a TLS reader keeps its record-sized buffer without new data.
const RELEASE_AFTER: Duration = Duration::from_millis(100);
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

opaque_halves!(
    tokio_rustls::client::TlsStream<IO>,
    tokio_rustls::server::TlsStream<IO>
);
#[cfg(test)]
opaque_halves!(tokio::io::BufWriter<IO>);

/// Copies until both directions are closed, one fails, or `idle` passes with no bytes.
pub async fn copy_bidirectional<C: Halves, U: Halves>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError> {
    copy_halves(client.halves(), upstream.halves(), idle, transfer, totals).await
}

async fn copy_halves<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
    idle: Duration,
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
    let out = Direction {
        from: (client.0, Side::Client),
        to: (upstream.1, Side::Upstream),
        meter: Meter {
            bytes: (&transfer.sent, totals.sent),
            last_activity: &last_activity,
            start,
        },
    };
    let back = Direction {
        from: (upstream.0, Side::Upstream),
        to: (client.1, Side::Client),
        meter: Meter {
            bytes: (&transfer.received, totals.received),
            last_activity: &last_activity,
            start,
        },
    };
    tokio::select! {
        result = async { tokio::try_join!(out.run(), back.run()) } => result.map(|_| ()),
        () = idle_expired(&last_activity, start, idle) => Err(CopyError::Idle(idle)),
    }
}

/// A read half that may be a plain TCP socket (read without a buffer of its own).
pub trait ReadTcp: AsyncRead + Unpin + Send {
    /// The plain TCP socket read from, when there is one.
    fn tcp(&self) -> Option<&TcpStream>;
}

/// A write half that may be a plain TCP socket (splice destination).
pub trait WriteTcp: AsyncWrite + Unpin + Send {
    /// The plain TCP socket written to, when there is one.
    fn tcp(&self) -> Option<&TcpStream>;
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

struct Direction<'a, R, W> {
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

impl<R: ReadTcp, W: WriteTcp> Direction<'_, R, W> {
    async fn run(self) -> Result<(), CopyError> {
        let Direction {
            from: (mut reader, from),
            to: (mut writer, to),
            meter,
        } = self;
        match (reader.tcp(), writer.tcp()) {
            (Some(src), Some(dst)) => meter.plain(src, dst, (from, to)).await?,
            (Some(src), None) => meter.plain_to_tls(src, &mut writer, (from, to)).await?,
            (None, _) => {
                meter
                    .tls_to_any(&mut reader, &mut writer, (from, to))
                    .await?
            }
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
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH_SIZE]);
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

    /// Copies out of a TLS stream until its EOF. A TLS reader cannot wait for data
    /// without a buffer (rustls may hold decrypted bytes already), so an idle
    /// direction waits on a small one ([`WAIT_SIZE`]), which carries a short message
    /// on by itself. A read that fills it moves to a record-sized buffer, kept while
    /// records stream in and released after [`RELEASE_AFTER`] without data. rustls
    /// hands out one record per read: while records stream, the buffer grows to
    /// [`SCRATCH_SIZE`] and collects every record already readable, so one write
    /// carries up to four.
    async fn tls_to_any<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
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

/// Resolves once `idle` has passed since the last recorded activity.
async fn idle_expired(last_activity: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last = Duration::from_millis(last_activity.load(Relaxed));
        let deadline = start + last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::tcp_pair as pair;

    struct Rig {
        app: TcpStream,
        server: TcpStream,
        task: tokio::task::JoinHandle<(Result<(), CopyError>, Transfer)>,
    }

    async fn rig(idle: Duration) -> Rig {
        let (app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, server) = pair().await;
        let task = tokio::spawn(async move {
            let transfer = Transfer::default();
            let totals = Totals {
                sent: Counter::default(),
                received: Counter::default(),
            };
            let result = copy_bidirectional(
                &mut proxy_client,
                &mut proxy_upstream,
                idle,
                &transfer,
                totals,
            )
            .await;
            (result, transfer)
        });
        Rig { app, server, task }
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_flowing() {
        let Rig {
            mut app,
            mut server,
            task,
        } = rig(Duration::from_secs(30)).await;
        app.write_all(b"request").await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server sees EOF");
        assert_eq!(got, b"request");
        // The server answers after the client's FIN; the answer still arrives.
        let reply = vec![7u8; 300_000];
        server.write_all(&reply).await.expect("reply");
        server.shutdown().await.expect("close");
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.expect("read reply");
        assert_eq!(back, reply);
        let (result, transfer) = task.await.expect("join");
        result.expect("clean close");
        assert_eq!(transfer.sent.load(Relaxed), 7);
        assert_eq!(transfer.received.load(Relaxed), 300_000);
    }

    /// A writer that holds bytes until flushed (as a TLS stream does when its socket
    /// is full) still delivers them without the client writing again.
    #[tokio::test]
    async fn bytes_a_writer_holds_back_are_flushed() {
        let (mut app, mut proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let task = tokio::spawn(async move {
            let mut held = tokio::io::BufWriter::new(proxy_upstream);
            let totals = Totals {
                sent: Counter::default(),
                received: Counter::default(),
            };
            let transfer = Transfer::default();
            copy_bidirectional(
                &mut proxy_client,
                &mut held,
                Duration::from_secs(30),
                &transfer,
                totals,
            )
            .await
        });
        app.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
            .await
            .expect("the bytes were held back")
            .expect("read");
        assert_eq!(&got, b"ping");
        task.abort();
    }

    /// Bulk bytes out of a stream that is not a plain socket (the TLS-reader path,
    /// which batches whatever is readable) arrive byte-exact, then EOF.
    #[tokio::test]
    async fn bulk_out_of_a_non_plain_stream_is_byte_exact() {
        let (mut app, mut proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let task = tokio::spawn(async move {
            let mut opaque = tokio::io::BufWriter::new(proxy_upstream);
            let totals = Totals {
                sent: Counter::default(),
                received: Counter::default(),
            };
            let transfer = Transfer::default();
            let result = copy_bidirectional(
                &mut proxy_client,
                &mut opaque,
                Duration::from_secs(30),
                &transfer,
                totals,
            )
            .await;
            (result, transfer)
        });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.expect("write");
            server.shutdown().await.expect("fin");
            server
        });
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.expect("read");
        assert!(
            got == data,
            "bytes differ ({} of {})",
            got.len(),
            data.len()
        );
        app.shutdown().await.expect("fin");
        drop(writer.await.expect("writer"));
        let (result, transfer) = task.await.expect("join");
        result.expect("clean close");
        assert_eq!(transfer.received.load(Relaxed), 3_000_000);
    }

    /// Messages around the waiting buffer's and a record's size, some after a quiet
    /// spell that releases the larger buffer, arrive byte-exact and in order.
    #[tokio::test]
    async fn messages_of_every_size_out_of_a_non_plain_stream_are_byte_exact() {
        let (mut app, mut proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let task = tokio::spawn(async move {
            let mut opaque = tokio::io::BufWriter::new(proxy_upstream);
            let totals = Totals {
                sent: Counter::default(),
                received: Counter::default(),
            };
            let transfer = Transfer::default();
            let result = copy_bidirectional(
                &mut proxy_client,
                &mut opaque,
                Duration::from_secs(30),
                &transfer,
                totals,
            )
            .await;
            (result, transfer)
        });
        let sizes = [
            1,
            WAIT_SIZE - 1,
            WAIT_SIZE,
            WAIT_SIZE + 1,
            BUF_SIZE,
            70_000,
            5,
        ];
        let mut total = 0u64;
        for (i, &size) in sizes.iter().enumerate() {
            let message: Vec<u8> = (0..size).map(|j| ((i * 31 + j) % 253) as u8).collect();
            server.write_all(&message).await.expect("write");
            let mut got = vec![0u8; size];
            app.read_exact(&mut got).await.expect("read");
            assert!(got == message, "message {i} ({size} bytes) differs");
            total += size as u64;
            if i % 2 == 1 {
                // Quiet long enough for the reader to release its larger buffer.
                tokio::time::sleep(RELEASE_AFTER * 2).await;
            }
        }
        server.shutdown().await.expect("fin");
        app.shutdown().await.expect("fin");
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty(), "{} stray bytes", rest.len());
        let (result, transfer) = task.await.expect("join");
        result.expect("clean close");
        assert_eq!(transfer.received.load(Relaxed), total);
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let Rig {
            app: _app,
            server: _server,
            task,
        } = rig(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let (result, _) = task.await.expect("join");
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn reset_ends_both_directions() {
        let Rig {
            app,
            mut server,
            task,
        } = rig(Duration::from_secs(30)).await;
        app.set_zero_linger().expect("linger");
        drop(app);
        let (result, _) = task.await.expect("join");
        assert!(matches!(result, Err(CopyError::Client(_))), "{result:?}");
        let mut rest = Vec::new();
        // The proxy dropped its upstream socket, so the server sees the end.
        let _ = server.read_to_end(&mut rest).await;
    }
}
