//! The bench report: a Markdown table (medians over rounds with their spread), ratios
//! against direct and against HAProxy in the same position, the issue's targets with
//! what was measured, and a JSON file holding every figure of every round.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;

use super::{Plan, Results, rig::Setup};

/// Where and when the figures were taken.
#[derive(serde::Serialize)]
pub struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    commit: String,
    /// How the sidecar was built (PGO or not, or which binary).
    build: String,
    date: String,
    duration_s: f64,
    quick: bool,
}

impl Machine {
    /// Reads the kernel, CPUs and git commit.
    pub fn detect(took: Duration, quick: bool, build: String) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cmd = |prog: &str, args: &[&str]| {
            std::process::Command::new(prog)
                .args(args)
                .current_dir(crate::workspace_root())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")?
                        .split_once(':')
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default(),
            commit: cmd("git", &["rev-parse", "--short=12", "HEAD"]),
            build,
            date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            duration_s: took.as_secs_f64(),
            quick,
        }
    }
}

/// A metric as the report shows it.
struct Row {
    key: &'static str,
    label: &'static str,
    /// Also show the difference to direct (latencies).
    added: bool,
}

const ROWS: &[Row] = &[
    Row {
        key: "lat_p50_us",
        label: "1000 rps, 1 KB, 4 conns: p50 (µs)",
        added: true,
    },
    Row {
        key: "lat_p90_us",
        label: "1000 rps: p90 (µs)",
        added: true,
    },
    Row {
        key: "lat_p99_us",
        label: "1000 rps: p99 (µs)",
        added: true,
    },
    Row {
        key: "lat_p999_us",
        label: "1000 rps: p99.9 (µs)",
        added: true,
    },
    Row {
        key: "newconn_p50_us",
        label: "200 rps, new connection each: p50 (µs)",
        added: true,
    },
    Row {
        key: "newconn_p99_us",
        label: "new connection each: p99 (µs)",
        added: true,
    },
    Row {
        key: "bulk1_gbit_s",
        label: "bulk, 1 stream (Gbit/s)",
        added: false,
    },
    Row {
        key: "bulk8_gbit_s",
        label: "bulk, 8 streams (Gbit/s)",
        added: false,
    },
    Row {
        key: "connections_per_s",
        label: "new connections/s (8 at a time)",
        added: false,
    },
    Row {
        key: "vcpu_per_1000_rps",
        label: "proxy vCPU per 1000 rps",
        added: false,
    },
    Row {
        key: "cpu_ms_per_10k_requests",
        label: "proxy CPU per 10k requests (ms)",
        added: false,
    },
    Row {
        key: "cpu_s_per_gb",
        label: "proxy CPU per GB, 8 streams (s)",
        added: false,
    },
    Row {
        key: "cpu_us_per_connection",
        label: "proxy CPU per new connection (µs)",
        added: false,
    },
    Row {
        key: "rss_mib_under_load",
        label: "proxy RSS at 1000 rps (MiB)",
        added: false,
    },
    Row {
        key: "rss_mib_idle",
        label: "proxy RSS idle (MiB)",
        added: false,
    },
    Row {
        key: "rss_mib_with_idle_connections",
        label: "proxy RSS with idle conns (MiB)",
        added: false,
    },
    Row {
        key: "kib_per_idle_connection",
        label: "per idle connection (KiB)",
        added: false,
    },
    Row {
        key: "kube_rss_mib_empty",
        label: "discovery: RSS watching nothing (MiB)",
        added: false,
    },
    Row {
        key: "kube_rss_mib_synced",
        label: "discovery: RSS with the cluster listed (MiB)",
        added: false,
    },
    Row {
        key: "kube_bytes_per_endpoint",
        label: "discovery: bytes held per endpoint",
        added: false,
    },
];

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let min = finite.clone().fold(f64::INFINITY, f64::min);
    let max = finite.fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (lo, hi) = spread(v);
    if v.len() == 1 || lo == hi {
        fmt(median(v))
    } else {
        format!("{} ({}–{})", fmt(median(v)), fmt(lo), fmt(hi))
    }
}

/// Values of `key` for `setup`, one per round.
fn values<'a>(results: &'a Results, setup: Setup, key: &str) -> &'a [f64] {
    results
        .rounds
        .get(&setup)
        .and_then(|m| m.get(key))
        .map_or(&[], Vec::as_slice)
}

/// Per round: `setup`'s value minus direct's.
fn added(results: &Results, setup: Setup, key: &str) -> Vec<f64> {
    let base = values(results, Setup::Direct, key);
    values(results, setup, key)
        .iter()
        .zip(base)
        .map(|(v, b)| v - b)
        .collect()
}

/// The medians used by the ratios and the targets.
fn m(results: &Results, setup: Setup, key: &str) -> f64 {
    median(values(results, setup, key))
}

fn madded(results: &Results, setup: Setup, key: &str) -> f64 {
    median(&added(results, setup, key))
}

/// Writes report.md and report.json into `out`; returns the Markdown table.
pub fn write(
    out: &Path,
    results: &Results,
    plan: &Plan,
    machine: &Machine,
    haproxy: &str,
) -> Result<String> {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: Linux {}, {} CPUs ({}), commit {}, {}; {} round(s), setups alternated; \
         median over rounds (min–max). All traffic between two pods (network namespaces on \
         a veth bridge) on this machine. Sidecar: {}.\n",
        machine.kernel,
        machine.cpus,
        machine.cpu_model,
        machine.commit,
        machine.date,
        plan.rounds,
        machine.build
    );
    md.push_str("| figure |");
    for s in Setup::ALL {
        let _ = write!(md, " {} |", s.title());
    }
    md.push_str("\n|---|");
    for _ in Setup::ALL {
        md.push_str("---|");
    }
    md.push('\n');
    for row in ROWS {
        let _ = write!(md, "| {} |", row.label);
        for s in Setup::ALL {
            let _ = write!(md, " {} |", cell(values(results, s, row.key)));
        }
        md.push('\n');
        if row.added {
            let _ = write!(md, "| … added vs direct |");
            for s in Setup::ALL {
                let v = if s == Setup::Direct {
                    Vec::new()
                } else {
                    added(results, s, row.key)
                };
                let _ = write!(
                    md,
                    " {} |",
                    if v.is_empty() { "–".into() } else { cell(&v) }
                );
            }
            md.push('\n');
        }
    }

    let ratio = |a: f64, b: f64| {
        if b.abs() > f64::EPSILON {
            a / b
        } else {
            f64::NAN
        }
    };
    let mut ratios = String::from(
        "\n| ratio (medians) | sidecar ÷ HAProxy | sidecar mTLS ×2 ÷ HAProxy mTLS ×2 |\n|---|---|---|\n",
    );
    let lat_rows = [
        ("added p50, 1000 rps", "lat_p50_us"),
        ("added p90, 1000 rps", "lat_p90_us"),
        ("added p99, 1000 rps", "lat_p99_us"),
        ("added p50, new connection each", "newconn_p50_us"),
        ("added p99, new connection each", "newconn_p99_us"),
    ];
    for (label, key) in lat_rows {
        let _ = writeln!(
            ratios,
            "| {label} | {} | {} |",
            fmt(added_ratio(
                madded(results, Setup::SidecarPlain, key),
                madded(results, Setup::HaproxyPlain, key)
            )),
            fmt(added_ratio(
                madded(results, Setup::SidecarMtls, key),
                madded(results, Setup::HaproxyMtls, key)
            )),
        );
    }
    for row in ROWS.iter().filter(|r| !r.added) {
        let _ = writeln!(
            ratios,
            "| {} | {} | {} |",
            row.label,
            fmt(ratio(
                m(results, Setup::SidecarPlain, row.key),
                m(results, Setup::HaproxyPlain, row.key)
            )),
            fmt(ratio(
                m(results, Setup::SidecarMtls, row.key),
                m(results, Setup::HaproxyMtls, row.key)
            )),
        );
    }
    let mut vs_direct = String::from(
        "\n| throughput ÷ direct | sidecar | sidecar mTLS ×2 | HAProxy | HAProxy mTLS ×2 |\n|---|---|---|---|---|\n",
    );
    for key in ["bulk1_gbit_s", "bulk8_gbit_s", "connections_per_s"] {
        let label = ROWS.iter().find(|r| r.key == key).map_or(key, |r| r.label);
        let _ = write!(vs_direct, "| {label} |");
        for s in &Setup::ALL[1..] {
            let _ = write!(
                vs_direct,
                " {} |",
                fmt(ratio(m(results, *s, key), m(results, Setup::Direct, key)))
            );
        }
        vs_direct.push('\n');
    }

    let targets = targets(results);
    let table = format!("{md}{vs_direct}{ratios}\n{targets}");
    let mut full = format!(
        "# Benchmark report\n\nProduced by `cargo xtask bench{}`.\n\n",
        if machine.quick { " --quick" } else { "" }
    );
    full.push_str(&table);
    full.push_str(&format!(
        "\nPublished anchors for the same workload (1,000 rps, 1 KB, a few persistent connections, \
         mTLS through two proxies; their hardware differs from this machine): Istio 1.22 ambient \
         (two ztunnels) +0.17 ms p90 / +0.20 ms p99; Istio 1.20 sidecars (two Envoys) +0.228 ms p90 / \
         +0.298 ms p99; ztunnel 0.06 vCPU and 12 MB per 1,000 rps, Envoy 0.20 vCPU and 60 MB (1.24). \
         Ours here: {} µs p90 / {} µs p99 added, {} vCPU per 1,000 rps for the pair, {} MiB RSS for the pair.\n",
        fmt(madded(results, Setup::SidecarMtls, "lat_p90_us")),
        fmt(madded(results, Setup::SidecarMtls, "lat_p99_us")),
        fmt(m(results, Setup::SidecarMtls, "vcpu_per_1000_rps")),
        fmt(m(results, Setup::SidecarMtls, "rss_mib_under_load")),
    ));
    full.push_str(
        "\nCPU is the proxies' own cgroups (`cpu.stat`, user + system, which includes the \
         kernel's work done on their behalf in syscalls; softirq work done in other contexts is \
         not attributed to any cgroup). RSS is `/proc/PID/status` VmRSS of the proxy processes \
         (both of them in the ×2 setups). cgroup memory (`memory.current`) is not reported: \
         this host's cgroup v2 hierarchy has no memory controller (hybrid layout).\n",
    );
    if !results.problems.is_empty() {
        full.push_str("\n**Problems found:**\n");
        for p in &results.problems {
            let _ = writeln!(full, "- {p}");
        }
    }
    full.push_str(&format!(
        "\n## HAProxy configuration\n\n```\n{haproxy}```\n"
    ));
    std::fs::write(out.join("report.md"), &full)?;
    let json = serde_json::json!({
        "machine": machine,
        "plan": plan,
        "rounds": results.rounds,
        "latency_quantiles": results.quantiles,
        "problems": results.problems,
        "medians": Setup::ALL.iter().map(|s| (format!("{s:?}"), ROWS.iter().map(|r| (r.key, m(results, *s, r.key))).collect::<std::collections::BTreeMap<_, _>>())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(table)
}

/// Ratio of two added latencies; undefined (NaN) unless both are positive: a proxy
/// measured faster than no proxy at all is the machine's noise, not a result.
fn added_ratio(ours: f64, theirs: f64) -> f64 {
    if ours > 0.0 && theirs > 0.0 {
        ours / theirs
    } else {
        f64::NAN
    }
}

/// The issue's targets, with what this run measured.
fn targets(results: &Results) -> String {
    let r = |a: f64, b: f64| a / b;
    let mut t = String::from("| target | measured | met |\n|---|---|---|\n");
    let mut line = |name: &str, value: f64, goal: f64, lower_is_better: bool| {
        let met = if !value.is_finite() {
            "unclear (no figure, or an added latency ≤ 0: noise)"
        } else if (lower_is_better && value <= goal) || (!lower_is_better && value >= goal) {
            "yes"
        } else {
            "no"
        };
        let _ = writeln!(t, "| {name} | {} | {met} |", fmt(value));
    };
    use Setup::*;
    for (label, key, goal) in [
        ("p50", "lat_p50_us", 0.5),
        ("p90", "lat_p90_us", 0.5),
        ("p99", "lat_p99_us", 0.7),
    ] {
        line(
            &format!("mTLS pair, added {label} ≤ {goal}× HAProxy's"),
            added_ratio(
                madded(results, SidecarMtls, key),
                madded(results, HaproxyMtls, key),
            ),
            goal,
            true,
        );
    }
    line(
        "mTLS pair, CPU per 1000 rps ≤ 0.5× HAProxy's",
        r(
            m(results, SidecarMtls, "vcpu_per_1000_rps"),
            m(results, HaproxyMtls, "vcpu_per_1000_rps"),
        ),
        0.5,
        true,
    );
    for (setup, peer, name) in [
        (SidecarPlain, HaproxyPlain, "plaintext"),
        (SidecarMtls, HaproxyMtls, "mTLS"),
    ] {
        for (label, key) in [("p50", "lat_p50_us"), ("p99", "lat_p99_us")] {
            line(
                &format!("{name}: added {label} ≤ 0.7× HAProxy's"),
                added_ratio(madded(results, setup, key), madded(results, peer, key)),
                0.7,
                true,
            );
        }
    }
    line(
        "plaintext bulk (8 streams) ≥ 0.8× direct",
        r(
            m(results, SidecarPlain, "bulk8_gbit_s"),
            m(results, Direct, "bulk8_gbit_s"),
        ),
        0.8,
        false,
    );
    line(
        "mTLS bulk (8 streams) ≥ 1.3× HAProxy mTLS",
        r(
            m(results, SidecarMtls, "bulk8_gbit_s"),
            m(results, HaproxyMtls, "bulk8_gbit_s"),
        ),
        1.3,
        false,
    );
    line(
        "new mTLS connections: CPU each ≤ 0.7× HAProxy's",
        r(
            m(results, SidecarMtls, "cpu_us_per_connection"),
            m(results, HaproxyMtls, "cpu_us_per_connection"),
        ),
        0.7,
        true,
    );
    line(
        "RSS at 1000 rps < 10 MiB (one sidecar)",
        m(results, SidecarPlain, "rss_mib_under_load"),
        10.0,
        true,
    );
    line(
        "per idle connection < 16 KiB (one sidecar)",
        m(results, SidecarPlain, "kib_per_idle_connection"),
        16.0,
        true,
    );
    line(
        "discovery: ≤ 1 KiB held per endpoint (10,000 services, 50,000 endpoints; --quick: a tenth)",
        m(results, SidecarPlain, "kube_bytes_per_endpoint"),
        1024.0,
        true,
    );
    // The mTLS setup's figure is the pair's (both sidecars' RSS): halve it.
    line(
        "per idle mTLS connection < 16 KiB (per sidecar)",
        m(results, SidecarMtls, "kib_per_idle_connection") / 2.0,
        16.0,
        true,
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_ratio_is_undefined_when_a_proxy_beat_no_proxy() {
        assert_eq!(added_ratio(50.0, 100.0), 0.5);
        assert!(added_ratio(-10.0, 100.0).is_nan());
        assert!(added_ratio(50.0, -3.0).is_nan());
        assert!(added_ratio(0.0, 100.0).is_nan());
    }
}
