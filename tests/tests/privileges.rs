//! Least privilege: the sidecar starts with exactly the documented capabilities
//! (`setpriv` limits the bounding set, so root gets nothing else), names a missing
//! one, and once attached every thread holds none at all.

use std::time::Duration;

use sidecar_tests::{
    Net, Sidecar,
    tools::{Background, pod_tool_bin},
};

/// The README's list, as `setpriv` spells it.
const MINIMUM: &str = "-all,+bpf,+net_admin,+setuid,+setgid,+setpcap,+chown";

/// Every thread's capability sets, as `/proc/PID/task/*/status` shows them.
fn thread_caps(pid: u32) -> Vec<(String, Vec<(String, String)>)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let caps = status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        threads.push((name, caps));
    }
    threads
}

#[test]
fn with_the_documented_minimum_it_captures_and_then_every_thread_holds_nothing() {
    let mut net = Net::new("caps");
    let client = net.pod("client");
    let server = net.pod("server");
    let mut echo = server.app(&pod_tool_bin());
    echo.args(["http", "--listen", &format!("{}:8080", server.ip4)]);
    let _echo = Background::start_ready(echo);
    let sidecar = Sidecar::start_wrapped(
        &client,
        "",
        &[
            "setpriv",
            "--bounding-set",
            MINIMUM,
            "--inh-caps=-all",
            "--",
        ],
    );
    let out = client.curl(&[&format!("http://{}:8080/", server.ip4)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sidecar.opened(), 1, "the connection went through the proxy");

    // The runtime's worker threads exist (two workers plus the main thread).
    sidecar_tests::tools::wait_until(Duration::from_secs(5), "runtime threads", || {
        thread_caps(sidecar.pid()).len() >= 3
    });
    let threads = thread_caps(sidecar.pid());
    assert!(threads.len() >= 3, "runtime threads expected: {threads:?}");
    for (name, caps) in &threads {
        assert_eq!(caps.len(), 5, "{name}: {caps:?}");
        for (set, value) in caps {
            assert_eq!(value, "0000000000000000", "thread {name}: {set} = {value}");
        }
    }
    assert!(sidecar.logs().contains("dropped root and every capability"));
}

#[test]
fn a_missing_capability_is_named_before_anything_attaches() {
    let mut net = Net::new("caps-missing");
    let pod = net.pod("app");
    let without = MINIMUM.replace(",+net_admin", "");
    let (status, log) = Sidecar::start_wrapped_failing(
        &pod,
        "",
        &[
            "setpriv",
            "--bounding-set",
            &without,
            "--inh-caps=-all",
            "--",
        ],
        &["--cgroup", &pod.cgroup.to_string_lossy()],
    );
    assert!(!status.success());
    assert!(log.contains("missing capabilities: CAP_NET_ADMIN"), "{log}");
    assert!(
        sidecar_tests::tools::attached_programs(&pod.cgroup).is_empty(),
        "nothing attached"
    );
}

#[test]
fn in_a_private_cgroup_namespace_the_pod_is_found_by_its_uid() {
    let mut net = Net::new("poduid");
    let app = net.pod("app");
    let server = net.pod("server");
    let mut echo = server.app(&pod_tool_bin());
    echo.args(["http", "--listen", &format!("{}:8080", server.ip4)]);
    let _echo = Background::start_ready(echo);
    // The kubelet's layout: .../kubepods/burstable/pod<uid>/<container>.
    let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let pod_dir = app
        .cgroup
        .join("kubepods/burstable")
        .join(format!("pod{uid}"));
    let container = pod_dir.join("sidecar-container");
    std::fs::create_dir_all(&container).expect("cgroups");
    let app_container = pod_dir.join("app-container");
    std::fs::create_dir_all(&app_container).expect("cgroups");
    let in_container = |dir: &std::path::Path| sidecar_tests::Pod {
        cgroup: dir.to_path_buf(),
        ..app.clone()
    };
    let root = sidecar_tests::pod::cgroup2_mount();
    let root = root.to_string_lossy();
    // `unshare --cgroup`: /proc/self/cgroup reads 0::/, as in a container.
    let private = ["unshare", "--cgroup", "--"];
    let (status, log) =
        Sidecar::start_wrapped_failing(&in_container(&container), "", &private, &[]);
    assert!(!status.success());
    assert!(
        log.contains("private cgroup namespace") && log.contains("--pod-uid"),
        "{log}"
    );

    let sidecar = Sidecar::start_finding_cgroup(
        &in_container(&container),
        "",
        &private,
        &["--pod-uid", uid, "--cgroup-root", &root],
    );
    assert!(
        sidecar.logs().contains(&format!("pod{uid}")),
        "{}",
        sidecar.logs()
    );
    // The app runs in another container of the same pod: captured all the same.
    let out = in_container(&app_container).curl(&[&format!("http://{}:8080/", server.ip4)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sidecar.opened(), 1);
}
