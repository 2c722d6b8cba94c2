//! SIGTERM drains: listeners close, open connections get the grace period, the rest
//! are closed, then the programs are detached.

use std::time::{Duration, Instant};

use sidecar_tests::{
    Net, Placement, Sidecar,
    tools::{Background, InFlight, attached_programs, pod_tool_bin},
};

fn slow_transfers(seconds: f64, drain_timeout: &str) -> (serde_json::Value, String, Duration) {
    let mut net = Net::new("drain");
    let client = net.pod("client");
    let server = net.pod("server");
    let dst = format!("{}:9200", server.ip4);
    let mut echo = server.app(&pod_tool_bin());
    echo.args(["echo", "--listen", &dst]);
    let _echo = Background::start_ready(echo);
    let config = format!("proxy:\n  drain_timeout: {drain_timeout}\n");
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);

    let mut cmd = client.app(&pod_tool_bin());
    cmd.args([
        "slow",
        "--to",
        &dst,
        "--streams",
        "20",
        "--bytes",
        "200000",
        "--seconds",
        &seconds.to_string(),
    ]);
    let slow = InFlight::start(cmd);

    let started = Instant::now();
    let (status, log) = sidecar.terminate_with_log();
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        attached_programs(&client.cgroup).is_empty(),
        "programs left attached"
    );
    let summary = slow.finish();
    (summary, log, took)
}

#[test]
fn open_connections_finish_within_the_grace_period() {
    let (summary, log, took) = slow_transfers(2.0, "20s");
    assert_eq!(summary["ok"], 20, "all 20 byte-exact: {summary}\n{log}");
    assert!(log.contains("drained: every connection finished"), "{log}");
    // The sidecar waited for the transfers (about 2 s), not for the whole grace period.
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(15),
        "took {took:?}"
    );
}

#[test]
fn connections_past_the_grace_period_are_closed() {
    let (summary, log, took) = slow_transfers(30.0, "1s");
    assert_eq!(summary["failed"], 20, "{summary}\n{log}");
    assert!(
        log.contains("drain timeout: closed remaining connections"),
        "{log}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
