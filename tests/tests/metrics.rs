//! Metrics as operators see them: a real Prometheus server scrapes the sidecar, promtool
//! lints the output, and the live connection view lists what is open.

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    sidecar::metric_sum,
    tools::{InFlight, echo_server, pod_tool_bin, run_json, sidecar_bin},
};

/// A Prometheus server in `pod`'s network namespace (on its loopback), scraping the
/// sidecar's health listener every second. Killed on drop.
struct Prometheus {
    child: Child,
    pod: Pod,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(pod: &Pod) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", pod.netns));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['127.0.0.1:15020']\n",
        )
        .expect("config");
        let child = pod
            .outsider("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`) is required");
        Self {
            child,
            pod: pod.clone(),
            dir,
        }
    }

    /// Runs an instant query; the value of its single result, if any.
    fn query(&self, promql: &str) -> Option<f64> {
        let out = self
            .pod
            .outsider("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-G",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
            ])
            .arg(format!("query={promql}"))
            .output()
            .ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        doc["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` until it equals `want` (up to 30 s); returns the last value.
    fn wait_for(&self, promql: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(promql);
            if last == Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_exact_counts_for_a_known_workload() {
    let mut net = Net::new("prom");
    let client = net.pod("client");
    let server = net.pod("server");
    let (_echo, dst) = echo_server(&server, 9300);
    let sidecar = Sidecar::start(&client, "", Placement::InPodCgroup);
    let prometheus = Prometheus::start(&client);

    let mut cmd = client.app(&pod_tool_bin());
    cmd.args([
        "clients",
        "--to",
        &dst,
        "--connections",
        "40",
        "--max-small",
        "20000",
        "--big",
        "300000",
    ]);
    let summary = run_json(cmd);
    assert_eq!(summary["ok"], 40, "{summary}");
    let sent = summary["bytes_sent"].as_f64().expect("sent");
    let received = summary["bytes_received"].as_f64().expect("received");

    let opened = prometheus.wait_for("sum(sidecar_connections_opened_total)", 40.0);
    assert_eq!(opened, Some(40.0), "Prometheus never saw 40 connections");
    assert_eq!(
        prometheus.wait_for(
            "sum(sidecar_connections_closed_total{reason=\"normal\"})",
            40.0
        ),
        Some(40.0)
    );
    assert_eq!(
        prometheus.wait_for("sum(sidecar_connection_sent_bytes_total)", sent),
        Some(sent)
    );
    assert_eq!(
        prometheus.wait_for("sum(sidecar_connection_received_bytes_total)", received),
        Some(received)
    );
    assert_eq!(
        prometheus.wait_for("sum(sidecar_kernel_events_total{event=\"captured\"})", 40.0),
        Some(40.0)
    );
    assert_eq!(
        prometheus.wait_for("sum(sidecar_connection_size_bytes_count)", 40.0),
        Some(40.0)
    );
    assert_eq!(
        prometheus.wait_for("sum(sidecar_connections_open)", 0.0),
        Some(0.0)
    );

    // promtool lints the exposition the scraper got.
    let text = sidecar.metrics_text();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) is required");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every query of the Grafana dashboard is valid PromQL over metrics we export.
    dashboard_queries_are_valid(&prometheus, &text);

    // OpenMetrics when asked for.
    let out = client
        .outsider("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-i",
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            "http://127.0.0.1:15020/metrics",
        ])
        .output()
        .expect("curl");
    let om = String::from_utf8_lossy(&out.stdout);
    assert!(
        om.contains("content-type: application/openmetrics-text"),
        "{om}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
}

/// Runs each panel query of `deploy/grafana-dashboard.json` through Prometheus (with
/// Grafana's variables filled in) and checks every `sidecar_*` name it uses is exported.
fn dashboard_queries_are_valid(prometheus: &Prometheus, exposition: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard"))
            .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().expect("expr");
        let promql = expr.replace("$__rate_interval", "1m").replace("$pod", ".*");
        let out = prometheus
            .pod
            .outsider("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-G",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
            ])
            .arg(format!("query={promql}"))
            .output()
            .expect("curl");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("query JSON");
        assert_eq!(doc["status"], "success", "{expr}: {doc}");
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("sidecar_"))
        {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            // Families without series are not exposed; TLS handshakes are recorded only
            // once mTLS between sidecars exists, so that one is expected to be absent.
            if family == "sidecar_tls_handshake_duration_seconds" {
                continue;
            }
            let declared = exposition
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {family} ")));
            assert!(
                declared,
                "dashboard uses {name}, which /metrics does not export"
            );
        }
    }
}

#[test]
fn open_connections_are_listed_with_live_bytes() {
    let mut net = Net::new("conns");
    let client = net.pod("client");
    let server = net.pod("server");
    let (_echo, dst) = echo_server(&server, 9301);
    let sidecar = Sidecar::start(&client, "", Placement::InPodCgroup);

    let mut cmd = client.app(&pod_tool_bin());
    cmd.args([
        "slow",
        "--to",
        &dst,
        "--streams",
        "3",
        "--bytes",
        "300000",
        "--seconds",
        "4",
    ]);
    let slow = InFlight::start(cmd);
    // Long-lived connections: their bytes show before they close (the three streams
    // run 4 s; wait until bytes are counted while all three are still open).
    let mut text = String::new();
    sidecar_tests::tools::wait_until(Duration::from_secs(3), "bytes of open connections", || {
        text = sidecar.metrics_text();
        metric_sum(&text, "sidecar_connection_sent_bytes_total", &[]) > 1.0
    });
    let live = metric_sum(&text, "sidecar_connection_sent_bytes_total", &[]);
    assert!(live > 1.0 && live < 900_000.0, "sent so far: {live}");
    assert_eq!(metric_sum(&text, "sidecar_connections_open", &[]), 3.0);

    let out = client
        .outsider(&sidecar_bin().to_string_lossy())
        .args(["connections", "--json"])
        .output()
        .expect("sidecar connections --json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conns: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(conns.len(), 3, "{conns:?}");
    for c in &conns {
        assert_eq!(c["direction"], "outbound");
        assert_eq!(c["orig_dst"], dst.as_str());
        assert_eq!(c["endpoint"], dst.as_str());
        assert!(
            c["client"]
                .as_str()
                .expect("client")
                .starts_with("127.0.0.1:"),
            "{c}"
        );
        assert_eq!(c["tls"], false);
        assert!(c["bytes_sent"].as_u64().expect("sent") > 0, "{c}");
        assert_eq!(c["tcp"]["state"], "established", "{c}");
    }

    let out = client
        .outsider(&sidecar_bin().to_string_lossy())
        .arg("connections")
        .output()
        .expect("table");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(&dst)).count(),
        3,
        "{table}"
    );

    let summary = slow.finish();
    assert_eq!(summary["ok"], 3, "{summary}");
    let out = client
        .outsider(&sidecar_bin().to_string_lossy())
        .args(["connections", "--json"])
        .output()
        .expect("connections");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert_eq!(
        sidecar.metric("sidecar_connection_sent_bytes_total", &[]),
        3.0 * 300_001.0
    );
}
