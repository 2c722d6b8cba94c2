//! The sidecar's place in a pod's life: the window between attaching and serving
//! (app connects wait for the proxy, none goes around it), enrolling an app that is
//! already running, and forwarding the kubelet's rewritten probes to the app.

use std::{
    io::Write,
    process::Stdio,
    time::{Duration, Instant},
};

use sidecar_tests::{
    Net, Placement, Sidecar,
    tools::{
        Background, Lines, attached_programs, echo_server, pod_tool_bin, run_json, wait_within,
    },
};

#[test]
fn connects_between_attach_and_serving_wait_for_the_proxy() {
    for fail_open in [false, true] {
        let mut net = Net::new(if fail_open {
            "race-open"
        } else {
            "race-closed"
        });
        let client = net.pod("client");
        let server = net.pod("server");
        let (_echo, _) = echo_server(&server, 8080);
        let config = format!("capture:\n  fail_open: {fail_open}\n");
        let starting = {
            let client = client.clone();
            std::thread::spawn(move || {
                Sidecar::start_env(
                    &client,
                    &config,
                    &[("SIDECAR_TEST_HOLD_AFTER_ATTACH", "1500ms")],
                )
            })
        };
        // The programs are attached; the proxy is held before serving.
        let deadline = Instant::now() + Duration::from_secs(20);
        while attached_programs(&client.cgroup).len() < 3 {
            assert!(Instant::now() < deadline, "programs never attached");
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        let mut cmd = client.app(&pod_tool_bin());
        cmd.args(["tally", "--to", &format!("{}:8080", server.ip4)])
            .args(["--count", "10", "--concurrency", "10"]);
        let summary = run_json(cmd);
        let waited = started.elapsed();
        let sidecar = starting.join().expect("sidecar");
        assert_eq!(summary["ok"], 10, "fail_open={fail_open}: {summary}");
        assert_eq!(
            sidecar.opened(),
            10,
            "fail_open={fail_open}: every connect went through the proxy"
        );
        assert!(
            waited >= Duration::from_millis(500),
            "fail_open={fail_open}: they waited for the proxy ({waited:?})"
        );
    }
}

#[test]
fn a_running_app_is_enrolled_without_restart_and_keeps_its_connection() {
    let mut net = Net::new("enrol");
    let client = net.pod("client");
    let server = net.pod("server");
    let (_echo, _) = echo_server(&server, 8080);
    let mut app = client
        .app(&pod_tool_bin())
        .args(["enrol", "--to", &format!("{}:8080", server.ip4)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("app");
    let lines = Lines::new(app.stdout.take().expect("stdout"));
    assert_eq!(
        lines.next_within(Duration::from_secs(30), "the app's first connection"),
        "connected"
    );

    // Connection A is open, uncaptured. Now the sidecar attaches to the app's cgroup.
    let sidecar = Sidecar::start(&client, "", Placement::InPodCgroup);
    writeln!(app.stdin.take().expect("stdin"), "go").expect("signal the app");
    let summary: serde_json::Value =
        serde_json::from_str(&lines.next_within(Duration::from_secs(60), "the app's summary"))
            .expect("json");
    wait_within(&mut app, Duration::from_secs(10), "the app");
    assert_eq!(
        summary["a_ok"], true,
        "the earlier connection survived: {summary}"
    );
    assert_eq!(summary["b_ok"], true, "{summary}");
    assert_eq!(
        sidecar.opened(),
        1,
        "only the new connection went through the proxy"
    );
}

#[test]
fn rewritten_kubelet_probes_reach_the_app_behind_strict_mtls() {
    let mut net = Net::new("probes");
    let app = net.pod("app");
    let kubelet = net.pod("kubelet");
    let certs = std::env::temp_dir().join(format!("sidecar-probes-{}", std::process::id()));
    let out = std::process::Command::new(sidecar_tests::tools::sidecar_bin())
        .args(["certs", "--out"])
        .arg(&certs)
        .args(["--workload", "app=shop/web"])
        .output()
        .expect("certs");
    assert!(out.status.success());
    let mut http = app.app(&pod_tool_bin());
    http.args(["http", "--listen", &format!("{}:8080", app.ip4)]);
    let http = Background::start_ready(http);
    let dir = certs.join("app");
    let config = format!(
        "identity:\n  cert: {}\n  key: {}\n  bundle: {}\ninbound:\n  mode: strict\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        dir.join("bundle.pem").display()
    );
    // What `sidecar inject` puts in the environment for an httpGet and a tcpSocket probe.
    let probes = r#"{"/app-health/web/readiness":{"httpGet":{"port":8080,"path":"/ready"}},"/app-health/web/liveness":{"tcpSocket":{"port":8080}}}"#;
    let _sidecar = Sidecar::start_env(&app, &config, &[("SIDECAR_APP_PROBES", probes)]);
    let probe = |url: String| -> String {
        let out = kubelet
            .outsider("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The kubelet's original plaintext probe is refused by strict mTLS...
    assert_ne!(probe(format!("http://{}:8080/ready", app.ip4)), "200");
    // ...the rewritten ones reach the app.
    let health = |p: &str| probe(format!("http://{}:15020/app-health/web/{p}", app.ip4));
    assert_eq!(health("readiness"), "200");
    assert_eq!(health("liveness"), "200");
    drop(http);
    assert_eq!(health("readiness"), "503");
    assert_eq!(health("liveness"), "503");
    let _ = std::fs::remove_dir_all(&certs);
}

#[test]
fn a_job_pods_sidecar_exits_at_once_on_sigterm_when_idle() {
    // Kubernetes stops a Job's native sidecar with SIGTERM once the app has exited:
    // with nothing open, the sidecar must not sit out its drain timeout (10 s).
    let mut net = Net::new("job");
    let pod = net.pod("job");
    let sidecar = Sidecar::start(&pod, "", Placement::InPodCgroup);
    let started = Instant::now();
    let (status, log) = sidecar.terminate_with_log();
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{log}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(log.contains("drained: every connection finished"), "{log}");
    assert!(attached_programs(&pod.cgroup).is_empty());
}
