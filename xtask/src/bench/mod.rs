//! `cargo xtask bench [--quick]`: the data path's cost against no proxy at all and
//! against HAProxy, measured in the same run on the same pods.
//!
//! Rounds alternate the setups (direct, sidecar, sidecar mTLS, HAProxy, HAProxy mTLS,
//! direct, ...); every figure is the median over rounds with its spread, and also a
//! ratio against direct and against HAProxy in the same position. The report goes to
//! `target/bench/` (report.md, report.json, latency.png). Load is bounded in count and
//! time, and all traffic stays between the two pods of a private bridge.

mod discovery;
mod plot;
mod report;
mod rig;
pub mod train;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rig::{Rig, Running, Setup};

/// How long and how hard.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Plan {
    rounds: usize,
    latency_seconds: f64,
    new_connection_seconds: f64,
    bulk_seconds: u32,
    connrate_seconds: f64,
    idle_connections: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                latency_seconds: 1.0,
                new_connection_seconds: 1.0,
                bulk_seconds: 1,
                connrate_seconds: 1.0,
                idle_connections: 1000,
            }
        } else {
            Self {
                rounds: 3,
                latency_seconds: 8.0,
                new_connection_seconds: 4.0,
                bulk_seconds: 4,
                connrate_seconds: 4.0,
                // Not 10,000: a proxy holds two descriptors per connection and these
                // machines' hard limit on open files is 20,000 (root lacks
                // CAP_SYS_RESOURCE).
                idle_connections: 9_000,
            }
        }
    }
}

/// The anchor workload: 1,000 requests/s, 1 KB, a few persistent connections.
const RATE: u64 = 1000;
const POOL: usize = 4;
/// New connection per request, at a rate every setup sustains.
const NEW_CONNECTION_RATE: u64 = 200;

/// Figures of one setup in one round, by metric name.
pub type Figures = BTreeMap<&'static str, f64>;

/// Everything measured.
#[derive(Default, serde::Serialize)]
pub struct Results {
    /// Per setup, per metric, one value per round.
    pub rounds: BTreeMap<Setup, BTreeMap<&'static str, Vec<f64>>>,
    /// Latency quantiles of the anchor workload, last round: setup -> (q, µs).
    pub quantiles: BTreeMap<Setup, Vec<(f64, f64)>>,
    /// Problems found by the checks (byte counts, errors).
    pub problems: Vec<String>,
}

/// Runs the bench and writes the report.
pub fn bench(quick: bool) -> Result<()> {
    crate::tasks::require_root("cargo xtask bench")?;
    crate::tasks::deps()?;
    let bin = crate::tasks::build_release(&["sidecar-user", "sidecar-tests"])?;
    use_binaries(&bin);
    // BENCH_SIDECAR=PATH measures another build of the sidecar (A/B runs of a change).
    let build = match std::env::var("BENCH_SIDECAR") {
        Ok(other) => {
            // SAFETY: single-threaded, as in `use_binaries`.
            unsafe { std::env::set_var("SIDECAR_BIN", &other) };
            format!("{other} (BENCH_SIDECAR)")
        }
        Err(_) => format!("release, fat LTO, {}", crate::pgo::summary()),
    };
    let mut plan = Plan::new(quick);
    if let Some(n) = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        plan.rounds = n;
    }
    if let Some(n) = std::env::var("BENCH_IDLE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        plan.idle_connections = n;
    }
    // BENCH_SETUPS=Direct,SidecarMtls,HaproxyMtls narrows a run while investigating
    // (keep Direct for the added-latency figures).
    let only = std::env::var("BENCH_SETUPS").ok();
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|s| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|n| n == format!("{s:?}")))
        })
        .collect();
    let started = Instant::now();
    let loadgen = bin.join("loadgen");
    let mut results = Results::default();
    for round in 0..plan.rounds {
        for setup in setups.iter().copied() {
            eprintln!(
                "bench: round {}/{}: {}",
                round + 1,
                plan.rounds,
                setup.title()
            );
            // Fresh pods for every run: the TIME_WAIT sockets the previous setup's
            // connection-rate scenario left in the pods would slow the ephemeral port
            // search of whichever setup comes next.
            let rig = Rig::new(&bin)?;
            let running = rig.start(setup)?;
            let figures = measure(&rig, &running, &loadgen, &plan, &mut results)
                .with_context(|| format!("{setup:?}"))?;
            running.stop()?;
            drop(rig);
            let entry = results.rounds.entry(setup).or_default();
            for (k, v) in figures {
                entry.entry(k).or_default().push(v);
            }
        }
    }
    // Memory with idle connections: once per proxy setup, after the timed rounds.
    for setup in setups.iter().copied().filter(|s| s.proxied()) {
        eprintln!(
            "bench: {} idle connections through {}",
            plan.idle_connections,
            setup.title()
        );
        let rig = Rig::new(&bin)?;
        let running = rig.start(setup)?;
        let figures = idle_memory(&rig, &running, &plan, &mut results)?;
        running.stop()?;
        drop(rig);
        let entry = results.rounds.entry(setup).or_default();
        for (k, v) in figures {
            entry.entry(k).or_default().push(v);
        }
    }
    // Kubernetes discovery's memory at scale: once, with the sidecar's figures.
    if setups.contains(&Setup::SidecarPlain) {
        let (services, endpoints) = discovery::scale(quick);
        eprintln!("bench: discovery of {services} services / {endpoints} endpoints");
        let entry = results.rounds.entry(Setup::SidecarPlain).or_default();
        for round in discovery::measure(quick)? {
            for (k, v) in round {
                entry.entry(k).or_default().push(v);
            }
        }
    }
    let haproxy = Rig::new(&bin)?.haproxy_configs()?;
    let out = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let machine = report::Machine::detect(started.elapsed(), quick, build);
    let table = report::write(&out, &results, &plan, &machine, &haproxy)?;
    plot::latency(&out.join("latency.png"), &results)?;
    println!("{table}");
    eprintln!(
        "bench: report in {} (report.md, report.json, latency.png), {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    if !results.problems.is_empty() {
        bail!("the bench found problems:\n{}", results.problems.join("\n"));
    }
    Ok(())
}

/// Points the pod harness at the sidecar and pod-tool in `bin`, with quiet sidecar logs.
fn use_binaries(bin: &Path) {
    // SAFETY: xtask is single-threaded when this runs; the pod harness reads these.
    unsafe {
        std::env::set_var("SIDECAR_BIN", bin.join("sidecar"));
        std::env::set_var("POD_TOOL_BIN", bin.join("pod-tool"));
        std::env::set_var("SIDECAR_TEST_LOG", "warn");
    }
}

/// CPU time (µs) used so far by every process in `cgroups`.
fn cpu_usec(cgroups: &[std::path::PathBuf]) -> u64 {
    cgroups
        .iter()
        .filter_map(|c| std::fs::read_to_string(c.join("cpu.stat")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Resident memory (KiB) of `pids`, summed.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .sum()
}

/// Runs `cmd` (an app of the client pod) and parses its last stdout line as JSON.
fn json(mut cmd: Command) -> Result<serde_json::Value> {
    let out = cmd.output().context("spawn")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    // iperf3 -J prints one multi-line document.
    let text = if stdout.trim_start().starts_with('{') {
        stdout.as_ref()
    } else {
        last
    };
    serde_json::from_str(text).with_context(|| format!("parsing {text:?}"))
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// One round of every scenario for a running setup.
fn measure(
    rig: &Rig,
    running: &Running,
    loadgen: &Path,
    plan: &Plan,
    results: &mut Results,
) -> Result<Figures> {
    let setup = running.setup;
    let mut f = Figures::new();
    let mut problem = |what: String| results.problems.push(format!("{}: {what}", setup.title()));
    let cgroups = &running.proxy_cgroups;
    let lg = |args: &[&str]| {
        let mut cmd = rig.client_app.app(&loadgen.to_string_lossy());
        cmd.args(args);
        cmd
    };

    // Warm-up: a few requests so handshakes and caches are not in the figures.
    json(lg(&[
        "connrate",
        "--to",
        &running.http,
        "--seconds",
        "0.2",
        "--concurrency",
        "2",
    ]))?;

    // 1. The anchor: 1,000 rps, 1 KB, 4 persistent connections.
    let cpu0 = cpu_usec(cgroups);
    let pids = running.pids();
    let sampler = std::thread::spawn({
        let wait = Duration::from_secs_f64(plan.latency_seconds / 2.0);
        move || {
            std::thread::sleep(wait);
            rss_kib(&pids)
        }
    });
    let secs = plan.latency_seconds.to_string();
    let rate = RATE.to_string();
    let pool = POOL.to_string();
    let r = json(lg(&[
        "latency",
        "--to",
        &running.http,
        "--rate",
        &rate,
        "--seconds",
        &secs,
        "--connections",
        &pool,
    ]))?;
    let cpu = (cpu_usec(cgroups) - cpu0) as f64;
    let rss_load = sampler.join().unwrap_or(0) as f64;
    check_http(&r, &mut problem, "1000 rps");
    for (k, key) in [
        ("lat_p50_us", "p50_us"),
        ("lat_p90_us", "p90_us"),
        ("lat_p99_us", "p99_us"),
        ("lat_p999_us", "p999_us"),
    ] {
        f.insert(k, num(&r, key));
    }
    let ok = num(&r, "ok");
    let elapsed = num(&r, "elapsed_s");
    if setup.proxied() {
        f.insert("cpu_ms_per_10k_requests", cpu / 1000.0 / ok * 10_000.0);
        f.insert(
            "vcpu_per_1000_rps",
            cpu / 1e6 / elapsed / (ok / elapsed / 1000.0),
        );
        f.insert("rss_mib_under_load", rss_load / 1024.0);
    }
    if let Some(q) = r["quantiles"].as_array() {
        let points = q
            .iter()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect();
        results.quantiles.insert(setup, points);
    }

    // 2. A new connection per request.
    let secs = plan.new_connection_seconds.to_string();
    let rate = NEW_CONNECTION_RATE.to_string();
    let r = json(lg(&[
        "latency",
        "--to",
        &running.http,
        "--rate",
        &rate,
        "--seconds",
        &secs,
        "--new-connection",
    ]))?;
    check_http(&r, &mut problem, "new connections");
    f.insert("newconn_p50_us", num(&r, "p50_us"));
    f.insert("newconn_p99_us", num(&r, "p99_us"));

    // 3. Bulk throughput, 1 and 8 streams (iperf3); none when the plan says 0 s.
    let bulk = if plan.bulk_seconds > 0 {
        &[1, 8][..]
    } else {
        &[]
    };
    for (streams, key) in bulk.iter().zip(["bulk1_gbit_s", "bulk8_gbit_s"]) {
        let streams = *streams;
        let cpu0 = cpu_usec(cgroups);
        let mut cmd = rig.client_app.app("iperf3");
        cmd.args(["-c", &running.iperf.0, "-p", &running.iperf.1.to_string()])
            .args([
                "-t",
                &plan.bulk_seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ]);
        let r = json(cmd)?;
        let cpu = (cpu_usec(cgroups) - cpu0) as f64;
        let sent = r["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
        let received = r["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
        // The sender counts what it wrote; bytes still in socket or proxy buffers when
        // the test stops are not received. Byte-exactness is checked on the HTTP and
        // echo workloads; here nothing may appear that was not sent.
        if received <= 0.0 || received > sent {
            problem(format!(
                "iperf3 -P {streams}: sent {sent} B, received {received} B"
            ));
        }
        let bps = r["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(f64::NAN);
        f.insert(key, bps / 1e9);
        if streams == 8 && setup.proxied() {
            f.insert("cpu_s_per_gb", cpu / 1e6 / (received / 1e9));
        }
    }

    // 4. New connections per second (full handshakes through mTLS setups).
    let cpu0 = cpu_usec(cgroups);
    let secs = plan.connrate_seconds.to_string();
    let r = json(lg(&[
        "connrate",
        "--to",
        &running.http,
        "--seconds",
        &secs,
        "--concurrency",
        "8",
    ]))?;
    let cpu = (cpu_usec(cgroups) - cpu0) as f64;
    check_http(&r, &mut problem, "connection rate");
    f.insert("connections_per_s", num(&r, "per_second"));
    if setup.proxied() {
        f.insert("cpu_us_per_connection", cpu / num(&r, "ok"));
        f.insert(
            "rss_mib_idle_after",
            rss_kib(&running.pids()) as f64 / 1024.0,
        );
    }
    Ok(f)
}

/// Every request answered 200 with exactly 1 KB, and none failed.
fn check_http(r: &serde_json::Value, problem: &mut impl FnMut(String), what: &str) {
    let ok = r["ok"].as_u64().unwrap_or(0);
    let errors = r["errors"].as_u64().unwrap_or(u64::MAX);
    let bytes = r["body_bytes"].as_u64().unwrap_or(0);
    if ok == 0 || errors != 0 || bytes != ok * 1024 {
        problem(format!(
            "{what}: {ok} ok, {errors} errors ({}), {bytes} body bytes",
            r["first_error"]
        ));
    }
}

/// RSS before and while `plan.idle_connections` idle connections are open.
fn idle_memory(
    rig: &Rig,
    running: &Running,
    plan: &Plan,
    results: &mut Results,
) -> Result<Figures> {
    let pids = running.pids();
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(&pids) as f64;
    let mut hold = rig.client_app.app(&sidecar_tests::tools::pod_tool_bin());
    hold.args([
        "hold",
        "--to",
        &running.echo,
        "--count",
        &plan.idle_connections.to_string(),
    ])
    .args(["--linger-ms", "3000", "--concurrency", "32"])
    .stdout(std::process::Stdio::piped());
    hold.stderr(std::process::Stdio::piped());
    let mut child = hold.spawn()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().context("stdout")?,
    ));
    let summary: serde_json::Value =
        serde_json::from_str(&lines.next().and_then(Result::ok).unwrap_or_default())
            .unwrap_or_default();
    std::thread::sleep(Duration::from_millis(500));
    let held = rss_kib(&pids) as f64;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let _ = child.wait();
    let n = plan.idle_connections as f64;
    if summary["ok"].as_f64() != Some(n) {
        results.problems.push(format!(
            "{}: idle connections: {summary} {}",
            running.setup.title(),
            stderr
                .lines()
                .find(|l| l.starts_with("Error"))
                .unwrap_or("")
        ));
        eprintln!("bench: proxy logs:\n{}", running.log_tail(5));
    }
    let mut f = Figures::new();
    f.insert("rss_mib_idle", idle / 1024.0);
    f.insert("rss_mib_with_idle_connections", held / 1024.0);
    f.insert("kib_per_idle_connection", (held - idle).max(0.0) / n);
    Ok(f)
}
