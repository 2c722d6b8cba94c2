//! `sidecar run` and `sidecar check` with bad configuration: a clear error naming the
//! field, a non-zero exit, and nothing attached.

use std::process::Command;

use sidecar_tests::{
    Net,
    tools::{attached_programs, sidecar_bin},
};

fn run_with(config: Option<&str>, pod: &sidecar_tests::Pod) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("{}-badcfg", pod.netns));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = match config {
        Some(text) => {
            let path = dir.join("sidecar.yaml");
            std::fs::write(&path, text).expect("write");
            path
        }
        None => dir.join("missing.yaml"),
    };
    Command::new(sidecar_bin())
        .args(["run", "--config"])
        .arg(&path)
        .arg("--cgroup")
        .arg(&pod.cgroup)
        .arg("--netns")
        .arg(pod.netns_path())
        .output()
        .expect("run sidecar")
}

#[test]
fn bad_config_is_refused_before_anything_attaches() {
    let mut net = Net::new("badcfg");
    let pod = net.pod("app");
    let cases: [(Option<&str>, &[&str]); 5] = [
        (
            Some("proxy:\n  conect_timeout: 1s\n"),
            &["conect_timeout", "proxy"],
        ),
        (
            Some("capture:\n  exclude_cidrs: [10.0.0.0/33]\n"),
            &["capture.exclude_cidrs[0]"],
        ),
        (
            Some("capture:\n  exclude_ports: [22, 65536]\n"),
            &["capture.exclude_ports[1]"],
        ),
        (
            Some("admin:\n  address: 0.0.0.0:15000\n"),
            &["admin.address", "loopback"],
        ),
        (None, &["cannot read config file", "missing.yaml"]),
    ];
    for (config, needles) in cases {
        let out = run_with(config, &pod);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{config:?}: {stderr}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{config:?}: expected {needle:?} in: {stderr}"
            );
        }
        assert!(
            attached_programs(&pod.cgroup).is_empty(),
            "{config:?} attached something"
        );
    }
}

#[test]
fn check_names_the_field_and_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sidecar.yaml");
    let out = Command::new(sidecar_bin())
        .args(["check", "--config", example])
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "every other port: disabled: no mesh peers (no identity); plaintext admitted"
        ),
        "{stdout}"
    );
    // What each port admits, with an allow-list that does not name
    // `unauthenticated`: plaintext is refused on every port, strict or not.
    let listed =
        std::env::temp_dir().join(format!("sidecar-check-allow-{}.yaml", std::process::id()));
    let certs = sidecar_tests::Certs::new("check", &["b=shop/db"]);
    std::fs::write(
        &listed,
        format!(
            "{}inbound:\n  mode: disabled\n  port_modes: {{8080: strict}}\n  allow: ['spiffe://td/ns/a/*']\n",
            certs.identity("b")
        ),
    )
    .expect("write");
    let out = Command::new(sidecar_bin())
        .args(["check", "--config"])
        .arg(&listed)
        .output()
        .expect("check");
    let _ = std::fs::remove_file(&listed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("port 8080: strict:") && stdout.contains("plaintext refused (strict)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("every other port: disabled:")
            && stdout.contains("plaintext refused (inbound.allow does not list `unauthenticated`)"),
        "{stdout}"
    );
    let bad = std::env::temp_dir().join(format!("sidecar-check-{}.yaml", std::process::id()));
    std::fs::write(&bad, "proxy:\n  idle_timeout: forever\n").expect("write");
    let out = Command::new(sidecar_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("check");
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("proxy.idle_timeout") && stderr.contains("forever"),
        "{stderr}"
    );
}

#[test]
fn port_in_use_is_a_clear_startup_error() {
    let mut net = Net::new("portuse");
    let pod = net.pod("app");
    // Occupy the admin port inside the pod.
    let mut holder = pod
        .outsider("nc")
        .args(["-l", "127.0.0.1", "15000"])
        .spawn()
        .expect("nc");
    sidecar_tests::tools::wait_until(
        std::time::Duration::from_secs(5),
        "nc listens on the admin port",
        || {
            pod.outsider("ss")
                .args(["-Hltn", "sport = :15000"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        },
    );
    let out = run_with(Some(""), &pod);
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("127.0.0.1:15000") && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(attached_programs(&pod.cgroup).is_empty());
}
