//! Test workloads run inside pods: servers that say who they are, and clients that
//! check every byte. Output is one JSON line, so tests can assert on it.
//!
//! Echo protocol: the client sends one mode byte — `S` (stream: echo as it arrives),
//! `H` (half-close: echo everything only after the client's FIN) or `F` (server
//! first: echo one line, then close before the client does) — then its payload.
//! The server first sends its own address padded to 64 bytes, then the echo.
//!
//! Every client command ends within `--deadline-s` (exit status 3, naming what it was
//! waiting for), and each connection of `tally` within `--conn-deadline-ms`: a hung
//! connection fails its test in seconds instead of stalling the run.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    sync::Semaphore,
};

const HEADER: usize = 64;

#[derive(Parser)]
struct Cli {
    /// A client command still running after this long exits with status 3 (servers
    /// run until killed).
    #[arg(long, global = true, default_value_t = 120)]
    deadline_s: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Who closes first in a `tally` exchange.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Order {
    /// The client half-closes after its payload; the server answers, then closes.
    Client,
    /// The server answers one line and closes; the client closes after its EOF.
    Server,
    /// Alternately, connection by connection.
    Mixed,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echo servers on each address (prints `ready` once all are bound).
    Echo {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Wait this long after accepting before answering (a slow backend).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// `count` short echo connections to `to`, `concurrency` at a time, one every
    /// `interval_ms` per worker; tallies which server answered each (its header).
    Tally {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Who closes first.
        #[arg(long, value_enum, default_value_t = Order::Client)]
        order: Order,
        /// A connection not finished (both ends closed) after this long is counted
        /// as an error `timeout`, naming the step it was in.
        #[arg(long, default_value_t = 10_000)]
        conn_deadline_ms: u64,
        /// Stop starting connections after this many errors (the summary says so);
        /// by default every connection is tried.
        #[arg(long, default_value_t = usize::MAX)]
        max_errors: usize,
    },
    /// Minimal HTTP servers answering `served-by <addr>`, plus UDP echo on the same addresses.
    Http {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Echo clients: `connections` concurrent connections spread over `to`,
    /// random payloads (every 20th is `big` bytes), half of them half-closed.
    Clients {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 64 * 1024)]
        max_small: usize,
        #[arg(long, default_value_t = 4 * 1024 * 1024 + 12345)]
        big: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Opens `count` connections to `to` and holds them all open at once, then checks
    /// each still echoes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Keep them open this long after printing the summary (memory measurements).
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// `count` non-blocking connects to `to`, each closed with a reset right away.
    Abort {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// `streams` echo connections that each send `bytes` in small chunks spread over
    /// `seconds`, half-close, and check the full echo: long transfers for drain tests.
    Slow {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// `count` HBONE connections to `to`'s port 15008, each with its own SPIFFE
    /// identity (spiffe://cluster.local/ns/flood/sa/id-N) issued from the CA in `ca`;
    /// each opens one stream to `to`, sends one echo byte and waits for it.
    Identities {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        count: usize,
    },
    /// A long-running app: opens connection A to `to`, prints `connected`, waits for a
    /// line on stdin, opens connection B, then checks both still echo.
    Enrol {
        #[arg(long)]
        to: SocketAddr,
    },
    /// `count` authenticated HBONE connections to `to` (a peer's port 15008) with the
    /// certificate in `cert`, opened one after another, each carrying one echo stream
    /// to `authority`. Prints `connected` once all were tried, holds the ones that
    /// worked `hold_ms`, and prints how many worked and how many were refused.
    HboneHold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        authority: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        hold_ms: u64,
        /// Source addresses (the pod's own): `count` connections from each.
        #[arg(long = "from")]
        from: Vec<std::net::IpAddr>,
    },
    /// Keep-alive HTTP/1.1 clients: `per_source` connections from each `--from`
    /// address to `to`, each sending `GET path` every `every_ms` (idle between), for
    /// `hold_ms`. Prints `connected` once all are open, then how many were opened and
    /// how many the server closed.
    HttpHold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long = "from", required = true)]
        from: Vec<std::net::IpAddr>,
        #[arg(long)]
        per_source: usize,
        #[arg(long, default_value = "/healthz")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        #[arg(long)]
        hold_ms: u64,
    },
    /// A slow-loris flood: `count` connections to `to`, each sending nothing (even
    /// ones) or the first half of a TLS ClientHello offering HBONE's ALPN (odd
    /// ones), then stalling. Prints `connected` once all connects are done, holds them
    /// `hold_ms`, and prints how many the server closed meanwhile.
    Stall {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        hold_ms: u64,
    },
    /// A raw HBONE client: mTLS to `to` (a peer's port 15008) with the certificate
    /// in `cert` (or none), then one stream per `--authority`, in order, on the same
    /// connection: `method authority`, and on 200 `payload` then END_STREAM. Prints
    /// the server's identity and each answer (status, what came back, how it ended).
    Hbone {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
        #[arg(long = "authority", required = true)]
        authorities: Vec<String>,
        #[arg(long, default_value = "CONNECT")]
        method: String,
        #[arg(long, default_value = "Hmarker-7f3a")]
        payload: String,
        #[arg(long, default_value_t = 3000)]
        read_ms: u64,
    },
    /// Rapid reset: one HBONE connection to `to` with the certificate in `cert`,
    /// `count` CONNECT streams to `authority` in batches of `batch`, each batch
    /// reset `reset_after_ms` after its HEADERS; then waits up to `wait_ms` for the
    /// server to end the connection. Prints how many streams went out and how the
    /// connection ended.
    ResetFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        authority: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        reset_after_ms: u64,
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
    },
    /// A reader that never reads: one echo connection (stream mode) to `to` that
    /// writes until its writes stall for two seconds (every window and buffer on the
    /// way is full), prints `connected`, holds `hold_ms` without reading, and prints
    /// how much it wrote.
    Stuck {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        hold_ms: u64,
    },
    /// UDP: `connect()` a datagram socket to `to`, send, wait for the echo.
    Udp {
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() -> Result<()> {
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cli = Cli::parse();
    let deadline = Duration::from_secs(cli.deadline_s);
    let name = format!("{:?}", cli.cmd);
    rt.block_on(async {
        let client = match cli.cmd {
            Cmd::Echo { listen, delay_ms } => return serve(listen, false, delay_ms).await,
            Cmd::Http { listen } => return serve(listen, true, 0).await,
            client => client,
        };
        match tokio::time::timeout(deadline, run_client(client)).await {
            Ok(result) => result,
            Err(_) => {
                eprintln!("pod-tool: {name} did not finish within {deadline:?}");
                std::process::exit(3);
            }
        }
    })
}

async fn run_client(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Echo { .. } | Cmd::Http { .. } => bail!("a server, not a client command"),
        Cmd::Tally {
            to,
            count,
            concurrency,
            interval_ms,
            order,
            conn_deadline_ms,
            max_errors,
        } => {
            let plan = Plan {
                to,
                order,
                deadline: Duration::from_millis(conn_deadline_ms),
                max_errors,
            };
            tally(plan, count, concurrency, interval_ms).await
        }
        Cmd::Clients {
            to,
            connections,
            max_small,
            big,
            seed,
        } => clients(to, connections, max_small, big, seed).await,
        Cmd::Hold {
            to,
            count,
            linger_ms,
            concurrency,
        } => hold(to, count, linger_ms, concurrency).await,
        Cmd::Abort { to, count } => abort(to, count).await,
        Cmd::Slow {
            to,
            streams,
            bytes,
            seconds,
        } => slow(to, streams, bytes, seconds).await,
        Cmd::Identities { to, ca, count } => identities(to, &ca, count).await,
        Cmd::Udp { to } => udp(to).await,
        Cmd::Stuck { to, hold_ms } => stuck(to, hold_ms).await,
        Cmd::Hbone {
            to,
            cert,
            authorities,
            method,
            payload,
            read_ms,
        } => hbone(to, cert, authorities, method, payload, read_ms).await,
        Cmd::Enrol { to } => enrol(to).await,
        Cmd::HboneHold {
            to,
            cert,
            authority,
            count,
            hold_ms,
            from,
        } => hbone_hold(to, &cert, &authority, (count, &from), hold_ms).await,
        Cmd::HttpHold {
            to,
            from,
            per_source,
            path,
            every_ms,
            hold_ms,
        } => http_hold(to, &from, per_source, &path, (every_ms, hold_ms)).await,
        Cmd::Stall { to, count, hold_ms } => stall(to, count, hold_ms).await,
        Cmd::ResetFlood {
            to,
            cert,
            authority,
            count,
            batch,
            reset_after_ms,
            wait_ms,
        } => {
            use sidecar_tests::hbone::{Client, tls_config};
            let config = Arc::new(tls_config(Some(&cert))?);
            let client = Client::connect(to, config).await?;
            let reset_after = Duration::from_millis(reset_after_ms);
            let sent = client
                .reset_flood(&authority, count, batch, reset_after)
                .await;
            let waited = Instant::now();
            while client.ended().is_none() && waited.elapsed() < Duration::from_millis(wait_ms) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!(
                "{}",
                serde_json::json!({"sent": sent, "ended": client.ended()})
            );
            Ok(())
        }
    }
}

fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn serve(addrs: Vec<SocketAddr>, http: bool, delay_ms: u64) -> Result<()> {
    let mut tasks = Vec::new();
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr).with_context(|| format!("bind {addr}"))?;
        let listener = socket.listen(4096)?;
        tasks.push(tokio::spawn(accept(listener, addr, http, delay_ms)));
        if http {
            let udp = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("udp bind {addr}"))?;
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(&buf[..n], peer).await;
                }
            }));
        }
    }
    println!("ready");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn accept(listener: TcpListener, addr: SocketAddr, http: bool, delay_ms: u64) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let _ = if http {
                http_reply(stream, addr).await
            } else {
                echo(stream, addr).await
            };
        });
    }
}

async fn http_reply(mut stream: TcpStream, addr: SocketAddr) -> Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        got.extend_from_slice(&buf[..n]);
    }
    let peer = stream.peer_addr()?;
    let body = format!("served-by {addr} peer {peer}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn echo(mut stream: TcpStream, addr: SocketAddr) -> Result<()> {
    let mut header = format!("{addr}").into_bytes();
    header.resize(HEADER, b' ');
    stream.write_all(&header).await?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode).await?;
    let (mut r, mut w) = stream.split();
    if mode[0] == b'H' {
        let mut all = Vec::new();
        r.read_to_end(&mut all).await?;
        w.write_all(&all).await?;
    } else if mode[0] == b'F' {
        // One line back, then this side closes first; the client's FIN follows.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 * 1024 && r.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        line.push(b'\n');
        w.write_all(&line).await?;
        w.shutdown().await?;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await?;
        return Ok(());
    } else {
        tokio::io::copy(&mut r, &mut w).await?;
    }
    w.shutdown().await?;
    Ok(())
}

async fn echo_once(s: &mut TcpStream, byte: u8) -> Result<()> {
    s.write_all(&[byte]).await?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back).await?;
    anyhow::ensure!(back[0] == byte, "echo mismatch");
    Ok(())
}

/// The first half of a real ClientHello offering `h2`, as an HBONE client's.
fn half_client_hello() -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("stall.invalid")?.to_owned();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    hello.truncate(hello.len() / 2);
    Ok(hello)
}

async fn stall(to: SocketAddr, count: usize, hold_ms: u64) -> Result<()> {
    let hello = half_client_hello()?;
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for i in 0..count {
        let mut s = match TcpStream::connect(to).await {
            Ok(s) => s,
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        if i % 2 == 1 && s.write_all(&hello).await.is_err() {
            failed += 1;
            continue;
        }
        let closed = closed.clone();
        held.push(tokio::spawn(async move {
            // Any byte, EOF or reset from the server counts as "closed by the server".
            let mut byte = [0u8; 1];
            let _ = s.read(&mut byte).await;
            closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Keep the socket until the end.
            std::future::pending::<()>().await;
        }));
    }
    println!("connected");
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    let closed = closed.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({"opened": count - failed, "failed": failed, "closed_by_server": closed})
    );
    for task in held {
        task.abort();
    }
    Ok(())
}

async fn enrol(to: SocketAddr) -> Result<()> {
    let mut a = TcpStream::connect(to).await?;
    let mut header = [0u8; HEADER];
    a.read_exact(&mut header).await?;
    a.write_all(b"S").await?;
    echo_once(&mut a, 1).await?;
    println!("connected");
    // Wait for the go-ahead on stdin (a blocking read off the runtime's threads).
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await??;
    let mut b = TcpStream::connect(to).await?;
    b.read_exact(&mut header).await?;
    b.write_all(b"S").await?;
    let b_ok = echo_once(&mut b, 2).await.is_ok();
    let a_ok = echo_once(&mut a, 3).await.is_ok();
    println!("{}", serde_json::json!({"a_ok": a_ok, "b_ok": b_ok}));
    Ok(())
}

/// Where `tally` connects, who closes first, each connection's deadline, and the
/// errors after which it stops.
struct Plan {
    to: SocketAddr,
    order: Order,
    deadline: Duration,
    max_errors: usize,
}

/// One short echo exchange, the `nth` of the tally: returns the server's address
/// (from its header). Each step is named, so a connection that hangs says where.
async fn tally_one(plan: &Plan, nth: usize) -> Result<String> {
    let step = std::sync::Mutex::new("connect");
    let at = |name| {
        if let Ok(mut s) = step.lock() {
            *s = name;
        }
    };
    let server_first = match plan.order {
        Order::Client => false,
        Order::Server => true,
        Order::Mixed => nth % 2 == 1,
    };
    let exchange = async {
        let mut s = TcpStream::connect(plan.to).await?;
        at("read the header");
        let mut header = [0u8; HEADER];
        s.read_exact(&mut header).await?;
        let mut back = Vec::new();
        if server_first {
            at("write the line");
            s.write_all(b"Ftally-ping\n").await?;
            at("read until the server's EOF");
            s.read_to_end(&mut back).await?;
            at("close after the server");
            s.shutdown().await?;
            back.pop_if(|b| *b == b'\n');
        } else {
            at("write and half-close");
            s.write_all(b"Stally-ping").await?;
            s.shutdown().await?;
            at("read until the server's EOF, after half-closing");
            s.read_to_end(&mut back).await?;
        }
        if back != b"tally-ping" {
            bail!("echo mismatch: {:?}", String::from_utf8_lossy(&back));
        }
        anyhow::Ok(String::from_utf8_lossy(&header).trim().to_string())
    };
    match tokio::time::timeout(plan.deadline, exchange).await {
        Ok(result) => result,
        Err(_) => {
            let step = step.lock().map(|s| *s).unwrap_or("?");
            bail!(
                "timeout: not finished within {:?} at: {step}",
                plan.deadline
            )
        }
    }
}

async fn tally(plan: Plan, count: usize, concurrency: usize, interval_ms: u64) -> Result<()> {
    let plan = Arc::new(plan);
    use std::collections::BTreeMap;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(std::sync::Mutex::new((
        BTreeMap::<String, usize>::new(),
        Vec::<String>::new(),
    )));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, results, plan) = (next.clone(), results.clone(), plan.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let nth = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let too_many = results
                    .lock()
                    .map_or(true, |r| r.1.len() >= plan.max_errors);
                if nth >= count || too_many {
                    break;
                }
                let outcome = tally_one(&plan, nth).await;
                if let Ok(mut r) = results.lock() {
                    match outcome {
                        Ok(server) => *r.0.entry(server).or_default() += 1,
                        Err(e) => r.1.push(format!("{e:#}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let (by_server, errors) =
        std::mem::take(&mut *results.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let ok: usize = by_server.values().sum();
    println!(
        "{}",
        serde_json::json!({
            "ok": ok,
            "failed": errors.len(),
            "stopped_early": errors.len() >= plan.max_errors,
            "by_server": by_server,
            "errors": errors.iter().take(5).collect::<Vec<_>>(),
            "elapsed_ms": start.elapsed().as_millis(),
        })
    );
    Ok(())
}

/// xorshift64*: deterministic payloads without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Serialize, Default)]
struct Summary {
    ok: usize,
    failed: usize,
    bytes_sent: u64,
    bytes_received: u64,
    half_closed: usize,
    big: usize,
    elapsed_ms: u128,
    errors: Vec<String>,
}

async fn clients(
    to: Vec<SocketAddr>,
    n: usize,
    max_small: usize,
    big: usize,
    seed: u64,
) -> Result<()> {
    let start = Instant::now();
    // Every connection is opened before any finishes: they are all concurrent.
    let gate = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let dst = to[i % to.len()];
        let mut rng = Rng(seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + 1));
        let size = if i % 20 == 7 {
            big
        } else {
            1 + (rng.next() as usize % max_small)
        };
        let half_close = i % 2 == 0;
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; size];
            rng.fill(&mut payload);
            let r = one_client(dst, payload, half_close, gate).await;
            (r, size, half_close)
        }));
    }
    let mut s = Summary::default();
    for t in tasks {
        let (r, size, half) = t.await?;
        match r {
            Ok(()) => {
                s.ok += 1;
                s.bytes_sent += size as u64 + 1;
                s.bytes_received += (size + HEADER) as u64;
                s.half_closed += usize::from(half);
                s.big += usize::from(size > max_small);
            }
            Err(e) => {
                s.failed += 1;
                if s.errors.len() < 10 {
                    s.errors.push(format!("{e:#}"));
                }
            }
        }
    }
    s.elapsed_ms = start.elapsed().as_millis();
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

async fn one_client(
    dst: SocketAddr,
    payload: Vec<u8>,
    half_close: bool,
    gate: Arc<tokio::sync::Barrier>,
) -> Result<()> {
    let stream = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(dst))
        .await
        .context("connect timeout")?
        .with_context(|| format!("connect {dst}"))?;
    gate.wait().await;
    let (mut r, mut w) = stream.into_split();
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header).await.context("read header")?;
    let who = String::from_utf8_lossy(&header).trim().to_string();
    if who != dst.to_string() {
        bail!("dialed {dst} but reached {who}");
    }
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(if half_close { b"H" } else { b"S" }).await?;
        w.write_all(&payload).await?;
        // FIN: with mode H the server answers only after this.
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::with_capacity(expected.len());
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .context("echo timeout")?
        .context("read echo")?;
    let _w = writer.await?.context("write")?;
    if got != expected {
        let at = got.iter().zip(&expected).position(|(a, b)| a != b);
        bail!(
            "echo from {dst} differs: got {} bytes, want {}, first difference at {at:?}",
            got.len(),
            expected.len()
        );
    }
    Ok(())
}

async fn hold(to: SocketAddr, count: usize, linger_ms: u64, concurrency: usize) -> Result<()> {
    let start = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut conns = Vec::with_capacity(count);
    let mut pending = Vec::new();
    for _ in 0..count {
        let permit = limit.clone().acquire_owned().await?;
        // The permit is held until the server's greeting arrives: through a proxy,
        // connect() returns once the local proxy accepts, and the proxy's own
        // upstream connect (and handshake) is still to come.
        pending.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(to).await?;
            let mut header = [0u8; HEADER];
            s.read_exact(&mut header).await?;
            drop(permit);
            anyhow::Ok(s)
        }));
    }
    for p in pending {
        conns.push(p.await??);
    }
    // All `count` connections are open now; check each one still carries bytes.
    let mut ok = 0usize;
    for (i, s) in conns.iter_mut().enumerate() {
        let byte = [b'S', (i % 251) as u8];
        s.write_all(&byte).await?;
        let mut back = [0u8; 1];
        s.read_exact(&mut back).await?;
        if back[0] == byte[1] {
            ok += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({"open": conns.len(), "ok": ok, "elapsed_ms": start.elapsed().as_millis()})
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_millis(linger_ms)).await;
    drop(conns);
    Ok(())
}

async fn abort(to: SocketAddr, count: usize) -> Result<()> {
    for _ in 0..count {
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Reset on close: no TIME_WAIT, so ports are reusable at once.
        socket.set_zero_linger()?;
        let connect = socket.connect(to);
        // Poll briefly: the SYN is sent, then the socket is dropped (reset), whether or
        // not the handshake completed.
        let _ = tokio::time::timeout(Duration::from_micros(1), connect).await;
    }
    println!("{}", serde_json::json!({"aborted": count}));
    Ok(())
}

async fn slow(to: SocketAddr, streams: usize, bytes: usize, seconds: f64) -> Result<()> {
    // Connect everything first, then report, so a test can act while all are in flight.
    let mut conns = Vec::new();
    for _ in 0..streams {
        let mut s = TcpStream::connect(to)
            .await
            .with_context(|| format!("connect {to}"))?;
        let mut header = [0u8; HEADER];
        s.read_exact(&mut header).await?;
        conns.push(s);
    }
    println!("connected");
    let chunks = 50usize;
    let pause = Duration::from_secs_f64(seconds / chunks as f64);
    let mut tasks = Vec::new();
    for (i, stream) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; bytes];
            Rng(i as u64 + 99).fill(&mut payload);
            let (mut r, mut w) = stream.into_split();
            let expected = payload.clone();
            let writer = tokio::spawn(async move {
                w.write_all(b"S").await?;
                for chunk in payload.chunks(bytes.div_ceil(chunks).max(1)) {
                    w.write_all(chunk).await?;
                    tokio::time::sleep(pause).await;
                }
                w.shutdown().await?;
                Ok::<_, std::io::Error>(())
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await?;
            writer.await??;
            anyhow::ensure!(
                got == expected,
                "echo differs: {} of {} bytes",
                got.len(),
                expected.len()
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    println!("{}", serde_json::json!({"ok": ok, "failed": failed}));
    Ok(())
}

async fn identities(to: SocketAddr, ca_dir: &std::path::Path, count: usize) -> Result<()> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem"))?)?;
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(
        ca_dir.join("ca.pem"),
    )?)?;
    let ca = ca_params.self_signed(&ca_key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let limit = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("spiffe://cluster.local/ns/flood/sa/id-{i}");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.clone().try_into()?)];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let chain = vec![cert.der().clone()];
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(sidecar_tests::hbone::AnyServer(
                provider.clone(),
            )))
            .with_client_auth_cert(chain, key_der)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        let config = Arc::new(config);
        let permit = limit.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let result = async {
                let hbone = SocketAddr::new(to.ip(), 15008);
                let client = sidecar_tests::hbone::Client::connect(hbone, config).await?;
                let answer = client
                    .request(
                        "CONNECT",
                        &to.to_string(),
                        b"Hx-echo",
                        Duration::from_secs(5),
                    )
                    .await?;
                sidecar_tests::hbone::expect_echo(&answer, "x-echo")
            }
            .await;
            drop(permit);
            result
        }));
    }
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    for t in tasks {
        match t.await? {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"ok": ok, "failed": failed, "first_error": first_error})
    );
    Ok(())
}

async fn hbone(
    to: SocketAddr,
    cert: Option<std::path::PathBuf>,
    authorities: Vec<String>,
    method: String,
    payload: String,
    read_ms: u64,
) -> Result<()> {
    use sidecar_tests::hbone::{Client, tls_config};
    let config = Arc::new(tls_config(cert.as_deref())?);
    let client = match Client::connect(to, config).await {
        Ok(client) => client,
        Err(e) => {
            println!("{}", serde_json::json!({"error": format!("{e:#}")}));
            return Ok(());
        }
    };
    let mut answers = Vec::new();
    for authority in &authorities {
        let answer = client
            .request(
                &method,
                authority,
                payload.as_bytes(),
                Duration::from_millis(read_ms),
            )
            .await;
        answers.push(match answer {
            Ok(answer) => serde_json::to_value(answer)?,
            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
        });
    }
    println!(
        "{}",
        serde_json::json!({"server_identity": client.server_identity, "answers": answers})
    );
    Ok(())
}

async fn hbone_hold(
    to: SocketAddr,
    cert: &std::path::Path,
    authority: &str,
    (count, from): (usize, &[std::net::IpAddr]),
    hold_ms: u64,
) -> Result<()> {
    use sidecar_tests::hbone::{Client, expect_echo, tls_config};
    let config = Arc::new(tls_config(Some(cert))?);
    let (mut held, mut refused, mut first_error) = (Vec::new(), 0, None);
    let sources: Vec<Option<std::net::IpAddr>> = match from {
        [] => vec![None],
        list => list.iter().copied().map(Some).collect(),
    };
    for source in sources.iter().flat_map(|s| std::iter::repeat_n(*s, count)) {
        let attempt = async {
            let client = Client::connect_from(source, to, config.clone()).await?;
            let answer = client
                .request("CONNECT", authority, b"Hx-echo", Duration::from_secs(5))
                .await?;
            expect_echo(&answer, "x-echo")?;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(client) => held.push(client),
            Err(e) => {
                refused += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    println!("connected");
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    // Still open at the end: not closed (GOAWAY) by the server meanwhile.
    let open = held.iter().filter(|c| c.ended().is_none()).count();
    println!(
        "{}",
        serde_json::json!({"ok": held.len(), "refused": refused, "open_at_end": open, "first_error": first_error})
    );
    Ok(())
}

async fn http_hold(
    to: SocketAddr,
    from: &[std::net::IpAddr],
    per_source: usize,
    path: &str,
    (every_ms, hold_ms): (u64, u64),
) -> Result<()> {
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut failed = 0;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    for &source in from {
        for _ in 0..per_source {
            let socket = match to {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let Ok(mut s) = socket.connect(to).await else {
                failed += 1;
                continue;
            };
            let (closed, request) = (closed.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    // One request, its whole answer (a small body), then idle.
                    let answered = async {
                        s.write_all(request.as_bytes()).await?;
                        let n = s.read(&mut buf).await?;
                        anyhow::ensure!(n > 0, "closed");
                        anyhow::Ok(())
                    };
                    if answered.await.is_err() {
                        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                }
            }));
        }
    }
    println!("connected");
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    for t in &tasks {
        t.abort();
    }
    println!(
        "{}",
        serde_json::json!({
            "opened": tasks.len(),
            "failed": failed,
            "closed_by_server": closed.load(std::sync::atomic::Ordering::Relaxed),
        })
    );
    Ok(())
}

async fn stuck(to: SocketAddr, hold_ms: u64) -> Result<()> {
    let mut s = TcpStream::connect(to).await?;
    s.write_all(b"S").await?;
    let chunk = vec![b'z'; 64 * 1024];
    let mut written = 0usize;
    // Bounded: a proxy that buffered without limit would be caught here too.
    while written < 1024 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_secs(2), s.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    println!("connected");
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    println!("{}", serde_json::json!({"written": written}));
    Ok(())
}

async fn udp(to: SocketAddr) -> Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(to).await?;
    sock.send(b"ping").await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .context("no UDP echo")??;
    println!(
        "{}",
        serde_json::json!({"echo": String::from_utf8_lossy(&buf[..n])})
    );
    Ok(())
}
