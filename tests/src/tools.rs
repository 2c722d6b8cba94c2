//! Locating the binaries under test and running background workloads.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
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

/// How long a test waits for a workload's line or exit before it fails, naming what
/// it waited for (pod-tool's own deadline, 120 s, normally ends it first).
pub const WORKLOAD_DEADLINE: Duration = Duration::from_secs(150);

/// The stdout lines of a child, read on a thread of their own, so that each wait for
/// one has a deadline.
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    /// Reads `stdout` line by line.
    pub fn new(stdout: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// The next line; panics naming `what` when none comes within `limit`, and
    /// returns an empty line at EOF.
    pub fn next_within(&self, limit: Duration, what: &str) -> String {
        match self.rx.recv_timeout(limit) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => String::new(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what}: no line within {limit:?}")
            }
        }
    }
}

/// Waits for `child` to exit; kills it and panics naming `what` after `limit`.
pub fn wait_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: did not exit within {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with its output captured, like `Command::output`, but
/// kills it and panics after `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut all);
            }
            all
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let status = wait_within(&mut child, limit, &format!("{cmd:?}"));
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A background process killed on drop.
pub struct Background {
    child: Child,
}

impl Background {
    /// Spawns `cmd` and waits (with a deadline) for its first stdout line to be
    /// `ready`.
    pub fn start_ready(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn background process");
        let lines = Lines::new(child.stdout.take().expect("piped stdout"));
        let guard = Self { child };
        let line = lines.next_within(Duration::from_secs(20), &format!("readiness of {cmd:?}"));
        assert_eq!(
            line.trim(),
            "ready",
            "background process did not become ready: {cmd:?}"
        );
        guard
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
    lines: Lines,
    what: String,
}

impl InFlight {
    /// Spawns `cmd` and waits (with a deadline) until it reports `connected`.
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn workload");
        let lines = Lines::new(child.stdout.take().expect("piped stdout"));
        let what = format!("{cmd:?}");
        let flight = Self { child, lines, what };
        let first = flight.lines.next_within(WORKLOAD_DEADLINE, &flight.what);
        assert_eq!(first, "connected", "workload did not connect: {cmd:?}");
        flight
    }

    /// Waits (with a deadline) for the summary line and the exit.
    pub fn finish(mut self) -> serde_json::Value {
        let line = self.lines.next_within(WORKLOAD_DEADLINE, &self.what);
        wait_within(&mut self.child, Duration::from_secs(10), &self.what);
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
    let out = output_within(&mut cmd, WORKLOAD_DEADLINE);
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
