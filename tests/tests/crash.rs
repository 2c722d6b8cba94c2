//! A sidecar killed with SIGKILL in the middle of a steady stream of connections:
//! with `capture.fail_open` the kernel notices the proxy's listener is gone and lets
//! new connects go direct; by default (fail closed) they are refused, so nothing
//! reaches the destination around the proxy. A restarted sidecar takes the pinned
//! links over, and a clean stop leaves no program attached. Pins are root's alone: no
//! sidecar (they all run as the same UID) can touch another pod's.

use std::time::{Duration, Instant};

use sidecar_tests::{
    Net, Placement, Pod, Sidecar,
    tools::{attached_programs, echo_server, pod_tool_bin, run_json},
};

fn tally(pod: &Pod, to: &str, count: usize, interval_ms: u64) -> serde_json::Value {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()]);
    run_json(cmd)
}

fn pins_left(pod: &Pod) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(pod.pins_dir())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|p| p.path())
        .collect()
}

fn crash_during_a_stream(fail_open: bool) {
    let tag = if fail_open {
        "crash-open"
    } else {
        "crash-closed"
    };
    let mut net = Net::new(tag);
    let client = net.pod("client");
    let server = net.pod("server");
    let (_echo, dst) = echo_server(&server, 8080);
    let config = format!("capture:\n  fail_open: {fail_open}\n");
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);

    // About 2 s of connections, one every 10 ms; the sidecar dies 0.5 s in.
    let stream = {
        let (client, dst) = (client.clone(), dst.clone());
        std::thread::spawn(move || tally(&client, &dst, 150, 10))
    };
    // Kill the sidecar once the stream is under way through it.
    sidecar_tests::tools::wait_until(Duration::from_secs(10), "the stream is under way", || {
        sidecar.opened() >= 30
    });
    sidecar.crash();
    let during = stream.join().expect("stream");
    let ok = during["ok"].as_u64().unwrap_or(0);
    let failed = during["failed"].as_u64().unwrap_or(0);
    assert_eq!(ok + failed, 150, "{during}");
    assert_eq!(
        attached_programs(&client.cgroup).len(),
        3,
        "pinned programs outlive the crash"
    );

    if fail_open {
        // At most the connection in flight at the kill fails; the rest went direct.
        assert!(failed <= 1, "{during}");
        let after = tally(&client, &dst, 10, 0);
        assert_eq!(after["ok"], 10, "{after}");
    } else {
        // Everything after the kill was refused: nothing reached the server direct.
        assert!(ok < 150 && failed >= 100, "{during}");
        let after = tally(&client, &dst, 10, 0);
        assert_eq!(
            after["failed"], 10,
            "nothing goes around the proxy: {after}"
        );
    }

    // A restarted sidecar takes over; every later connection goes through it.
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    assert!(sidecar.logs().contains("took over the pinned link"));
    assert_eq!(attached_programs(&client.cgroup).len(), 3);
    let after = tally(&client, &dst, 20, 0);
    assert_eq!(after["ok"], 20, "{after}");
    assert_eq!(sidecar.opened(), 20, "all through the new proxy");
    assert!(sidecar.terminate().success());
    assert!(attached_programs(&client.cgroup).is_empty());
    // The pins (root's, which the stopped proxy could not remove) point at detached
    // links; the next start removes them and attaches afresh.
    assert!(!pins_left(&client).is_empty());
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);
    assert!(
        sidecar.logs().contains("removed stale pins") && !sidecar.logs().contains("took over"),
        "{}",
        sidecar.logs()
    );
    assert_eq!(attached_programs(&client.cgroup).len(), 3);
    assert_eq!(tally(&client, &dst, 5, 0)["ok"], 5);
    assert_eq!(sidecar.opened(), 5);
}

#[test]
fn fail_open_lets_new_connections_go_direct_while_the_proxy_is_gone() {
    crash_during_a_stream(true);
}

#[test]
fn fail_closed_refuses_every_connection_while_the_proxy_is_gone() {
    crash_during_a_stream(false);
}

#[test]
fn fail_open_first_direct_connection_comes_within_a_second() {
    let mut net = Net::new("crash-fast");
    let client = net.pod("client");
    let server = net.pod("server");
    let (_echo, dst) = echo_server(&server, 8080);
    let sidecar = Sidecar::start(
        &client,
        "capture:\n  fail_open: true\n",
        Placement::InPodCgroup,
    );
    assert_eq!(tally(&client, &dst, 1, 0)["ok"], 1);
    sidecar.crash();
    let killed = Instant::now();
    loop {
        if tally(&client, &dst, 1, 0)["ok"] == 1 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "no direct connection within 1 s"
        );
    }
    eprintln!(
        "first direct connection {:?} after SIGKILL",
        killed.elapsed()
    );
}

#[test]
fn pins_of_a_cgroup_that_no_longer_exists_are_removed_at_start() {
    let mut net = Net::new("pin-gc");
    let pod = net.pod("app");
    // An earlier pod (a child cgroup here) whose sidecar crashed, leaving its pins.
    let old_cgroup = pod.cgroup.join("deleted-pod");
    std::fs::create_dir_all(&old_cgroup).expect("cgroup");
    let old = Pod {
        cgroup: old_cgroup.clone(),
        ..pod.clone()
    };
    let sidecar = Sidecar::start(&old, "", Placement::Outside);
    sidecar.crash();
    let old_pins: Vec<_> = std::fs::read_dir(pod.pins_dir())
        .expect("pins dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(old_pins.len(), 1, "{old_pins:?}");
    assert!(!pins_left(&pod).is_empty());
    // The pod goes away while no sidecar runs.
    std::fs::remove_dir(&old_cgroup).expect("remove the old cgroup");

    // The next sidecar on the node (same pin root) cleans up.
    let sidecar = Sidecar::start(&pod, "", Placement::InPodCgroup);
    assert!(!old_pins[0].exists(), "stale pins removed");
    assert!(
        sidecar.logs().contains("removed stale pins"),
        "{}",
        sidecar.logs()
    );
    let now: Vec<_> = std::fs::read_dir(pod.pins_dir())
        .expect("pins dir")
        .flatten()
        .collect();
    assert_eq!(now.len(), 1, "only the live pod's folder remains");
}

/// Runs `args` as the proxy's UID with no capability at all, as a compromised sidecar
/// would run once it has dropped root.
fn as_proxy_uid(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
fn a_sidecar_cannot_touch_pins_and_readiness_follows_capture() {
    let mut net = Net::new("pin-owner");
    let a = net.pod("a");
    let b = net.pod("b");
    let (_echo, dst) = echo_server(&b, 8080);
    let sidecar_a = Sidecar::start(&a, "", Placement::InPodCgroup);
    let _sidecar_b = Sidecar::start(&b, "", Placement::InPodCgroup);
    // Every pin of b, and of a itself, is out of reach of the UID all sidecars share.
    for pod in [&b, &a] {
        let pins = pins_left(pod);
        assert_eq!(pins.len(), 4, "{pins:?}");
        for pin in &pins {
            let out = as_proxy_uid(&["rm", "-f", &pin.to_string_lossy()]);
            assert!(!out.status.success(), "uid 1337 removed {}", pin.display());
            assert!(pin.exists(), "{}", pin.display());
        }
        assert_eq!(attached_programs(&pod.cgroup).len(), 3);
    }
    assert_eq!(tally(&a, &dst, 3, 0)["ok"], 3);
    assert_eq!(sidecar_a.opened(), 3);

    // Someone detaches a's connect4 link: a turns unready and says why.
    let connect4 = pins_left(&a)
        .into_iter()
        .find(|p| p.ends_with("connect4"))
        .expect("connect4 pin");
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&connect4)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readyz = a
        .outsider("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-w",
            " %{http_code}",
            "http://127.0.0.1:15020/readyz",
        ])
        .output()
        .expect("curl");
    let readyz = String::from_utf8_lossy(&readyz.stdout).into_owned();
    assert_eq!(readyz, "not ready: capture detached (connect4)\n 503");
    assert_eq!(
        sidecar_a.metric("sidecar_capture_attached", &[("program", "connect4")]),
        0.0
    );
    assert_eq!(
        sidecar_a.metric("sidecar_capture_attached", &[("program", "connect6")]),
        1.0
    );
}

#[test]
fn a_restart_without_inbound_capture_leaves_no_stale_inbound_program() {
    let mut net = Net::new("pin-prune");
    let app = net.pod("app");
    let peer = net.pod("peer");
    let (_echo, dst) = echo_server(&app, 8080);
    let sidecar = Sidecar::start(&app, "", Placement::InPodCgroup);
    assert_eq!(tally(&peer, &dst, 2, 0)["ok"], 2);
    // Crash: the pinned inbound program stays and, fail closed, drops inbound traffic.
    sidecar.crash();
    assert_eq!(tally(&peer, &dst, 1, 0)["failed"], 1);
    // Restarted without inbound capture: the old inbound program must not stay behind.
    let sidecar = Sidecar::start(&app, "inbound:\n  enabled: false\n", Placement::InPodCgroup);
    let direct = tally(&peer, &dst, 3, 0);
    assert_eq!(direct["ok"], 3, "{direct}");
    assert!(
        sidecar
            .logs()
            .contains("removed the pin of a program this configuration does not attach"),
        "{}",
        sidecar.logs()
    );
    assert!(
        !pins_left(&app)
            .iter()
            .any(|p| p.ends_with("inbound_lookup"))
    );
}

/// A pod's sandbox is replaced (new network namespace, same pod cgroup) while the old
/// namespace is still alive, after its sidecar crashed. The restarted sidecar must
/// capture inbound traffic in the new namespace: taking over the pinned `sk_lookup`
/// link would leave it in the old one, and the new pod's app would be reached around
/// the proxy.
#[test]
fn a_restart_in_a_new_network_namespace_captures_inbound_there() {
    let mut net = Net::new("new-netns");
    let old = net.pod("app");
    let peer = net.pod("peer");
    let (_echo, _) = echo_server(&old, 8080);
    let sidecar = Sidecar::start(&old, "", Placement::InPodCgroup);
    sidecar.crash();
    // The replacement sandbox: a new namespace, the pod's cgroup and pins.
    let fresh = net.pod("app-new");
    let replaced = Pod {
        cgroup: old.cgroup.clone(),
        ..fresh.clone()
    };
    let (_echo, dst) = echo_server(&replaced, 8080);
    let pins = old.pins_dir();
    let pins = pins.to_string_lossy();
    let sidecar = Sidecar::start_env(&replaced, "", &[("SIDECAR__PINS__DIR", &pins)]);
    let before = sidecar.metric(
        "sidecar_connections_opened_total",
        &[("direction", "inbound")],
    );
    let sent = tally(&peer, &dst, 3, 0);
    assert_eq!(sent["ok"], 3, "{sent}");
    let opened = sidecar.metric(
        "sidecar_connections_opened_total",
        &[("direction", "inbound")],
    );
    assert_eq!(
        opened - before,
        3.0,
        "inbound connections to the new namespace went around the proxy:\n{}",
        sidecar.logs()
    );
    assert!(
        sidecar
            .logs()
            .contains("a pinned link is attached elsewhere"),
        "{}",
        sidecar.logs()
    );
}
