//! The benchmark's load generator, run as an app inside the client pod.
//!
//! * `latency`: open-loop HTTP/1.1 GETs at a fixed rate, either over a pool of
//!   persistent connections or with a new connection per request. A pacing thread
//!   issues each request's *intended* start time; latency is measured from it, so a
//!   stalled proxy shows up as queueing delay instead of silently lowering the rate
//!   (coordinated omission corrected, as wrk2 does). HdrHistogram, microseconds.
//! * `connrate`: closed-loop new connections, one GET each, as fast as they complete.
//!
//! Every response body is counted, so the bench can check that bytes matched.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed-rate requests; prints latency percentiles as JSON.
    Latency {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: f64,
        /// Persistent connections in the pool (ignored with --new-connection).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// A new connection for every request.
        #[arg(long)]
        new_connection: bool,
        #[arg(long, default_value = "/1k")]
        path: String,
    },
    /// New connections per second, `concurrency` at a time.
    Connrate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "/1k")]
        path: String,
    },
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match Cli::parse().cmd {
            Cmd::Latency {
                to,
                rate,
                seconds,
                connections,
                new_connection,
                path,
            } => latency(to, rate, seconds, connections, new_connection, path).await,
            Cmd::Connrate {
                to,
                seconds,
                concurrency,
                path,
            } => connrate(to, seconds, concurrency, path).await,
        }
    })?;
    println!("{out}");
    Ok(())
}

/// One HTTP/1.1 connection that reads whole responses.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(to: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(to).await.context("connect")?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends a GET and reads the response; returns the body length.
    async fn get(&mut self, request: &[u8]) -> Result<usize> {
        self.stream.write_all(request).await?;
        let mut chunk = [0u8; 8192];
        let header_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before a response");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..header_end]).context("header")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("status: {}", head.lines().next().unwrap_or(""));
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no Content-Length")?;
        while self.buf.len() < header_end + length {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed inside a body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..header_end + length);
        Ok(length)
    }
}

fn request(to: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: sidecar-bench\r\n\r\n").into_bytes()
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

#[derive(Default)]
struct Totals {
    ok: u64,
    errors: u64,
    body_bytes: u64,
    first_error: Option<String>,
}

impl Totals {
    fn record(&mut self, result: Result<usize>) {
        match result {
            Ok(n) => {
                self.ok += 1;
                self.body_bytes += n as u64;
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

/// Issues intended start times at `rate` per second for `seconds`, from a thread that
/// sleeps coarsely and spins the last stretch, so send times are exact to microseconds.
fn pacer(rate: u64, seconds: f64) -> (mpsc::UnboundedReceiver<Instant>, u64) {
    let (tx, rx) = mpsc::unbounded_channel();
    let count = (rate as f64 * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(20);
        for i in 0..count {
            let at = start + interval * i as u32;
            loop {
                let now = Instant::now();
                if now >= at {
                    break;
                }
                let left = at - now;
                if left > Duration::from_micros(200) {
                    std::thread::sleep(left - Duration::from_micros(150));
                } else {
                    std::hint::spin_loop();
                }
            }
            if tx.send(at).is_err() {
                return;
            }
        }
    });
    (rx, count)
}

async fn latency(
    to: SocketAddr,
    rate: u64,
    seconds: f64,
    connections: usize,
    new_connection: bool,
    path: String,
) -> Result<String> {
    let (rx, count) = pacer(rate, seconds);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let hist = Arc::new(Mutex::new(histogram()));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let req = Arc::new(request(to, &path));
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Enough workers that new-connection requests never wait on each other.
    let workers = if new_connection { 256 } else { connections };
    for _ in 0..workers {
        let (rx, hist, totals, req) = (rx.clone(), hist.clone(), totals.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let Some(intended) = rx.lock().await.recv().await else {
                    return;
                };
                let result = async {
                    if new_connection || conn.is_none() {
                        conn = Some(Conn::open(to).await?);
                    }
                    let c = conn.as_mut().context("connection")?;
                    c.get(&req).await
                }
                .await;
                if result.is_err() {
                    conn = None;
                }
                if new_connection {
                    conn = None;
                }
                let us = intended.elapsed().as_micros() as u64;
                if let Ok(mut h) = hist.lock() {
                    let _ = h.record(us.max(1));
                }
                if let Ok(mut t) = totals.lock() {
                    t.record(result);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let t = std::mem::take(&mut *totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let quantiles: Vec<(f64, u64)> = [
        0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
    ]
    .iter()
    .map(|&q| (q, h.value_at_quantile(q)))
    .collect();
    Ok(serde_json::json!({
        "mode": if new_connection { "new_connection" } else { "persistent" },
        "rate": rate,
        "intended": count,
        "ok": t.ok,
        "errors": t.errors,
        "first_error": t.first_error,
        "body_bytes": t.body_bytes,
        "elapsed_s": elapsed,
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
        "quantiles": quantiles,
    })
    .to_string())
}

async fn connrate(
    to: SocketAddr,
    seconds: f64,
    concurrency: usize,
    path: String,
) -> Result<String> {
    let req = Arc::new(request(to, &path));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let totals = Arc::new(Mutex::new(Totals::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (req, totals) = (req.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let result = async { Conn::open(to).await?.get(&req).await }.await;
                if let Ok(mut t) = totals.lock() {
                    t.record(result);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = std::mem::take(&mut *totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(serde_json::json!({
        "ok": t.ok,
        "errors": t.errors,
        "first_error": t.first_error,
        "body_bytes": t.body_bytes,
        "elapsed_s": elapsed,
        "per_second": t.ok as f64 / elapsed,
    })
    .to_string())
}
