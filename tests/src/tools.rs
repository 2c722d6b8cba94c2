//! Locating the binaries under test and running background workloads.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// A binary of this workspace, next to the running test executable (`target/<profile>/`).
/// `SIDECAR_BIN` / `POD_TOOL_BIN` override.
pub fn binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (`cargo xtask test` does), or set {env}",
        path.display()
    );
    path
}

/// The `sidecar` binary.
pub fn sidecar_bin() -> PathBuf {
    binary("sidecar", "SIDECAR_BIN")
}

/// The `pod-tool` workload binary.
pub fn pod_tool_bin() -> String {
    binary("pod-tool", "POD_TOOL_BIN")
        .to_string_lossy()
        .into_owned()
}

/// `pod-tool echo` as an app of `server` on its IPv4 address and `port`; returns the
/// running server and its `ip:port`.
pub fn echo_server(server: &crate::Pod, port: u16) -> (Background, String) {
    let dst = format!("{}:{port}", server.ip4);
    let mut cmd = server.app(&pod_tool_bin());
    cmd.args(["echo", "--listen", &dst]);
    (Background::start_ready(cmd), dst)
}

/// A background process killed on drop.
pub struct Background {
    child: Child,
}

impl Background {
    /// Spawns `cmd` and waits for its first stdout line to be `ready`.
    pub fn start_ready(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn background process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read readiness line");
        assert_eq!(
            line.trim(),
            "ready",
            "background process did not become ready: {cmd:?}"
        );
        Self { child }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workload still running: `pod-tool slow` once it has printed `connected` (all its
/// connections are open), until its JSON summary.
pub struct InFlight {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl InFlight {
    /// Spawns `cmd` and waits until it reports `connected`.
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn workload");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first, "connected", "workload did not connect: {cmd:?}");
        Self { child, lines }
    }

    /// Waits for the summary line and the exit.
    pub fn finish(mut self) -> serde_json::Value {
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = self.child.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad summary ({e}): {line:?}"))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections each echo server answered in a `pod-tool tally` summary, by the
/// server's address (`ip:port`).
pub fn tally_by_server(summary: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    summary["by_server"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `cmd` to completion and parses its last stdout line as JSON, panicking with
/// stderr if it failed.
pub fn run_json(mut cmd: Command) -> serde_json::Value {
    let out = cmd.output().expect("run workload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON from {cmd:?}: {e}: {last}"))
}

/// Rules in the host's iptables and nftables, as text (for before/after comparisons).
pub fn firewall_rules() -> String {
    let mut all = String::new();
    for (prog, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let out = Command::new(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{prog} is required to check for firewall rules: {e}"));
        assert!(
            out.status.success(),
            "{prog} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Drop comment lines (they carry timestamps).
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
        {
            all.push_str(line);
            all.push('\n');
        }
    }
    all
}

/// Programs attached to `cgroup`, as listed by the kernel (`bpftool cgroup show`).
pub fn attached_programs(cgroup: &std::path::Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool is required to list attached programs");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1) // header
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Waits until `f` holds, polling every 50 ms; panics naming `what` after `limit`.
/// Returns how long it took. Tests wait on conditions with this, never on a sleep.
pub fn wait_until(
    limit: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    started.elapsed()
}
