//! Copying bytes both ways between the application and its destination.
//!
//! Each direction runs until its reader sends EOF, then half-closes the other side
//! (FIN) while the opposite direction keeps flowing. An error in either direction ends
//! both, and so does a period with no bytes either way.
//!
//! Between two plain sockets a connection owns no buffer: each read goes into the
//! worker thread's scratch buffer and is written on at once, and a direction that fills
//! the whole buffer in one read (a bulk transfer) switches to `splice(2)` through a
//! pipe, so its bytes no longer pass through userspace. With TLS on a side, buffers are
//! allocated when a direction first has data.

use std::{
    cell::RefCell,
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

use crate::proxy::splice::Pipe;

/// Size of each direction's buffer: one read fills most of a 64 KiB socket buffer
/// in a few calls while keeping per-connection memory small.
const BUF_SIZE: usize = 16 * 1024;

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

/// Copies until both directions are closed, one fails, or `idle` passes with no bytes.
pub async fn copy_bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError> {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    copy_halves(
        (client_read, client_write),
        (upstream_read, upstream_write),
        idle,
        transfer,
        totals,
    )
    .await
}

/// As [`copy_bidirectional`], for any streams (TLS on either side, say).
pub async fn copy_bidirectional_io<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    copy_halves(
        (client_read, client_write),
        (upstream_read, upstream_write),
        idle,
        transfer,
        totals,
    )
    .await
}

async fn copy_halves<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
    idle: Duration,
    transfer: &Transfer,
    totals: Totals,
) -> Result<(), CopyError>
where
    CR: ReadReady,
    UR: ReadReady,
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

/// A read half that can wait for data before the copy allocates its buffer.
trait ReadReady: AsyncRead + Unpin + Send {
    /// Whether [`ReadReady::ready`] really waits for data (so a buffer can be given
    /// back between reads without being reallocated at once).
    const WAITS: bool;
    /// Resolves when a read would not block (or at once, if the type cannot tell).
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// The plain TCP socket read from, when there is one (splice source).
    fn tcp(&self) -> Option<&TcpStream>;
}

/// A write half that may be a plain TCP socket (splice destination).
trait WriteTcp: AsyncWrite + Unpin + Send {
    /// The plain TCP socket written to, when there is one.
    fn tcp(&self) -> Option<&TcpStream>;
}

impl ReadReady for ReadHalf<'_> {
    const WAITS: bool = true;
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.readable()
    }
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncRead + Send> ReadReady for tokio::io::ReadHalf<T> {
    const WAITS: bool = false;
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        // A TLS stream may hold decrypted bytes already; just read.
        std::future::ready(Ok(()))
    }
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

impl<R: ReadReady, W: WriteTcp> Direction<'_, R, W> {
    async fn run(self) -> Result<(), CopyError> {
        let Direction {
            from: (mut reader, from),
            to: (mut writer, to),
            meter,
        } = self;
        if let (Some(src), Some(dst)) = (reader.tcp(), writer.tcp()) {
            meter.plain(src, dst, (from, to)).await?;
            // EOF: pass the half-close on; the other direction keeps running.
            return writer.shutdown().await.map_err(|e| to.error(e));
        }
        // A TLS side: the buffer exists only while data flows when the reader is a
        // plain socket (allocated when it is readable, given back after a short read),
        // so an idle connection holds none. A TLS reader cannot wait without a buffer,
        // so it keeps its one.
        let mut buf: Option<Vec<u8>> = None;
        loop {
            if buf.is_none() {
                reader.ready().await.map_err(|e| from.error(e))?;
            }
            let b = buf.get_or_insert_with(|| vec![0u8; BUF_SIZE]);
            let n = reader.read(b).await.map_err(|e| from.error(e))?;
            if n == 0 {
                return writer.shutdown().await.map_err(|e| to.error(e));
            }
            writer.write_all(&b[..n]).await.map_err(|e| to.error(e))?;
            // A TLS writer accepts bytes it could not send yet (the socket was full)
            // and sends them only when polled again: flush, or they would wait for
            // the next read, which may never come.
            writer.flush().await.map_err(|e| to.error(e))?;
            meter.moved(n);
            if R::WAITS && n < BUF_SIZE {
                buf = None;
            }
        }
    }
}

thread_local! {
    /// Each worker thread's read buffer for plain-to-plain copies: a read and the
    /// write that follows it happen without yielding, so one buffer per thread serves
    /// every connection; only bytes the destination cannot take at once are copied
    /// into memory the connection owns.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_SIZE]);
}

/// One read-and-write step between plain sockets.
enum Step {
    /// `src` had nothing after all (spurious readiness).
    Again,
    /// `src` sent EOF.
    Eof,
    /// `n` bytes read; `rest` of them still to be written.
    Moved { n: usize, rest: Option<Vec<u8>> },
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
            let step = SCRATCH.with_borrow_mut(|scratch| step(src, dst, scratch, (from, to)))?;
            let n = match step {
                Step::Again => continue,
                Step::Eof => return Ok(()),
                Step::Moved { n, rest: None } => n,
                Step::Moved {
                    n,
                    rest: Some(rest),
                } => {
                    write_all(dst, &rest).await.map_err(|e| to.error(e))?;
                    n
                }
            };
            self.moved(n);
            if n == BUF_SIZE {
                // Out of descriptors for a pipe, keep copying.
                if let Ok(pipe) = Pipe::new() {
                    return self.splice(&pipe, src, dst, (from, to)).await;
                }
            }
        }
    }
}

/// Reads what `src` has into `scratch` and writes as much as `dst` takes now.
fn step(
    src: &TcpStream,
    dst: &TcpStream,
    scratch: &mut [u8],
    (from, to): (Side, Side),
) -> Result<Step, CopyError> {
    let n = match src.try_read(scratch) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
        Err(e) => return Err(from.error(e)),
    };
    let written = match dst.try_write(&scratch[..n]) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(to.error(e)),
    };
    let rest = (written < n).then(|| scratch[written..n].to_vec());
    Ok(Step::Moved { n, rest })
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
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of TCP streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

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
            copy_bidirectional_io(
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
