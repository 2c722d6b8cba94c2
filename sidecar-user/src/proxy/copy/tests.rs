//! Copying both ways: half-close, flushes, bulk, idle, reset.

use tokio::io::AsyncReadExt;

use super::{
    tls_read::{BUF_SIZE, RELEASE_AFTER, WAIT_SIZE},
    *,
};
use crate::proxy::test_support::tcp_pair as pair;

/// Timeouts no test reaches.
const LONG: Timeouts = Timeouts {
    idle: Duration::from_secs(30),
    half_closed: Duration::from_secs(30),
};

struct Rig {
    app: TcpStream,
    server: TcpStream,
    task: tokio::task::JoinHandle<(Result<(), CopyError>, Transfer)>,
}

async fn rig(idle: Timeouts) -> Rig {
    rig_with(idle, |upstream| upstream).await
}

/// A copy from a socket pair's proxy end to `wrap` of another pair's proxy end.
async fn rig_with<U: Halves + 'static>(idle: Timeouts, wrap: fn(TcpStream) -> U) -> Rig {
    let (app, mut proxy_client) = pair().await;
    let (proxy_upstream, server) = pair().await;
    let task = tokio::spawn(async move {
        let mut upstream = wrap(proxy_upstream);
        copy_counted(&mut proxy_client, &mut upstream, idle).await
    });
    Rig { app, server, task }
}

/// Copies both ways between `client` and `upstream` with fresh counters; the result
/// and what was counted.
async fn copy_counted<C: Halves, U: Halves>(
    client: &mut C,
    upstream: &mut U,
    idle: Timeouts,
) -> (Result<(), CopyError>, Transfer) {
    let transfer = Transfer::default();
    let totals = Totals {
        sent: Counter::default(),
        received: Counter::default(),
    };
    let result = copy_bidirectional(client, upstream, idle, &transfer, totals).await;
    (result, transfer)
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_flowing() {
    let Rig {
        mut app,
        mut server,
        task,
    } = rig(LONG).await;
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
        copy_counted(&mut proxy_client, &mut held, LONG).await
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

/// A copy whose destination side is not a plain socket (a buffered writer stands in
/// for a TLS stream), so bytes coming back take the TLS-reader path.
async fn opaque_rig() -> Rig {
    rig_with(LONG, tokio::io::BufWriter::new).await
}

/// Bulk bytes out of a stream that is not a plain socket (the TLS-reader path,
/// which batches whatever is readable) arrive byte-exact, then EOF.
#[tokio::test]
async fn bulk_out_of_a_non_plain_stream_is_byte_exact() {
    let Rig {
        mut app,
        mut server,
        task,
    } = opaque_rig().await;
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
    let Rig {
        mut app,
        mut server,
        task,
    } = opaque_rig().await;
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
    } = rig(Timeouts {
        idle: Duration::from_millis(200),
        half_closed: Duration::from_secs(30),
    })
    .await;
    let started = std::time::Instant::now();
    let (result, _) = task.await.expect("join");
    assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The application half-closes and the destination goes silent without closing:
/// the connection ends at the half-closed timeout, not at the (long) idle timeout.
#[tokio::test]
async fn a_half_closed_connection_gone_silent_ends_at_the_half_closed_timeout() {
    let Rig {
        mut app,
        server: _server,
        task,
    } = rig(Timeouts {
        idle: Duration::from_secs(30),
        half_closed: Duration::from_millis(300),
    })
    .await;
    app.write_all(b"done").await.expect("write");
    let started = std::time::Instant::now();
    app.shutdown().await.expect("half-close");
    let (result, transfer) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the half-closed connection was held past its timeout")
        .expect("join");
    assert!(
        matches!(result, Err(CopyError::HalfClosedIdle(_))),
        "{result:?}"
    );
    // Not before the timeout: the other direction had its full 300 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(transfer.sent.load(Relaxed), 4);
}

/// Bytes still flowing in the open direction keep a half-closed connection alive
/// past the half-closed timeout.
#[tokio::test]
async fn a_half_closed_connection_still_answering_is_kept() {
    let Rig {
        mut app,
        mut server,
        task,
    } = rig(Timeouts {
        idle: Duration::from_secs(30),
        half_closed: Duration::from_millis(300),
    })
    .await;
    app.shutdown().await.expect("half-close");
    for _ in 0..8 {
        server.write_all(b"tick").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await.expect("close");
    let mut got = Vec::new();
    app.read_to_end(&mut got).await.expect("read");
    assert_eq!(got.len(), 32);
    let (result, _) = task.await.expect("join");
    result.expect("clean close after 800 ms of answers");
}

#[tokio::test]
async fn reset_ends_both_directions() {
    let Rig {
        app,
        mut server,
        task,
    } = rig(LONG).await;
    app.set_zero_linger().expect("linger");
    drop(app);
    let (result, _) = task.await.expect("join");
    assert!(matches!(result, Err(CopyError::Client(_))), "{result:?}");
    let mut rest = Vec::new();
    // The proxy dropped its upstream socket, so the server sees the end.
    let _ = server.read_to_end(&mut rest).await;
}

/// An application socket copied into one stream of a real HTTP/2 connection (over a
/// loopback socket pair, h2's default 64 KiB windows): the application's end, the
/// serving end of the stream, and the copy.
async fn h2_rig() -> (
    TcpStream,
    crate::mesh::hbone::H2Stream,
    tokio::task::JoinHandle<(Result<(), CopyError>, Transfer)>,
) {
    use crate::mesh::hbone::H2Stream;
    let (app, mut proxy_client) = pair().await;
    let (client_io, server_io) = pair().await;
    let server = tokio::spawn(async move {
        let mut conn = ::h2::server::handshake(server_io)
            .await
            .expect("server handshake");
        let (request, mut respond) = conn.accept().await.expect("a stream").expect("stream ok");
        let send = respond
            .send_response(http::Response::new(()), false)
            .expect("200");
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        H2Stream::new(send, request.into_body(), None)
    });
    let (mut requests, conn) = ::h2::client::handshake(client_io)
        .await
        .expect("client handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("CONNECT")
        .uri("10.0.0.1:80")
        .body(())
        .expect("request");
    let (response, send) = requests.send_request(request, false).expect("stream");
    let served = server.await.expect("server task");
    let recv = response.await.expect("response").into_body();
    let task = tokio::spawn(async move {
        let mut stream = H2Stream::new(send, recv, None);
        copy_counted(&mut proxy_client, &mut stream, LONG).await
    });
    (app, served, task)
}

/// Messages of every size from a plain socket into an HBONE stream (small ones
/// through the scratch buffer, bulk ones read in place, and small ones again after
/// bulk) arrive byte-exact and in order, and the answer and both half-closes come
/// back.
#[tokio::test]
async fn messages_of_every_size_into_an_h2_stream_are_byte_exact() {
    let (mut app, mut served, task) = h2_rig().await;
    let sizes = [
        1,
        70,
        SCRATCH_SIZE - 1,
        SCRATCH_SIZE,
        3_000_000,
        5,
        4_095,
        4_096,
        70,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let message: Vec<u8> = (0..size).map(|j| ((i * 31 + j) % 251) as u8).collect();
        let sent = message.clone();
        let mut writer = app;
        let write = tokio::spawn(async move {
            writer.write_all(&sent).await.expect("write");
            writer
        });
        let mut got = vec![0u8; size];
        served.read.read_exact(&mut got).await.expect("read");
        assert!(got == message, "message {i} ({size} bytes) differs");
        app = write.await.expect("writer");
    }
    served.write.write_all(b"answer").await.expect("answer");
    served.write.shutdown().await.expect("end of stream");
    let mut answer = Vec::new();
    app.read_to_end(&mut answer).await.expect("answer and EOF");
    assert_eq!(answer, b"answer");
    app.shutdown().await.expect("fin");
    let mut rest = Vec::new();
    served
        .read
        .read_to_end(&mut rest)
        .await
        .expect("end of stream");
    assert!(rest.is_empty(), "{} stray bytes", rest.len());
    let (result, transfer) = task.await.expect("join");
    result.expect("clean close");
    let total: usize = sizes.iter().sum();
    assert_eq!(transfer.sent.load(Relaxed), total as u64, "bytes counted");
}
