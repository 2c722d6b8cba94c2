//! Running the real `sidecar` binary for a pod.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{certs::Certs, pod::Pod, tools};

/// Where the sidecar process itself runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside the pod's (captured) cgroup, as in a real pod.
    InPodCgroup,
    /// In the test's own cgroup, beside the pod.
    Outside,
}

/// A running sidecar attached to a pod; killed on drop.
pub struct Sidecar {
    child: Option<Child>,
    pod: Pod,
    /// The sidecar's log file.
    pub log: PathBuf,
    dir: PathBuf,
}

impl Sidecar {
    /// The sidecar of `pod` as workload `workload` of `certs`, originating HBONE to
    /// every test pod.
    pub fn meshed_client(pod: &Pod, certs: &Certs, workload: &str) -> Self {
        let config = format!(
            "{}mesh:\n  cidrs: [198.18.0.0/24]\n",
            certs.identity(workload)
        );
        Self::start(pod, &config, Placement::InPodCgroup)
    }

    /// Starts the sidecar for `pod` with `config` (YAML) and waits for `/readyz`.
    /// Logs at `SIDECAR_TEST_LOG` (default `info`).
    pub fn start(pod: &Pod, config: &str, placement: Placement) -> Self {
        let log = std::env::var("SIDECAR_TEST_LOG").unwrap_or_else(|_| "info".into());
        Self::start_logged(pod, config, placement, &log)
    }

    /// As [`Sidecar::start`], with `RUST_LOG` set to `log`.
    pub fn start_logged(pod: &Pod, config: &str, placement: Placement, log_filter: &str) -> Self {
        let cmd = match placement {
            Placement::InPodCgroup => {
                // Join the cgroup only: the sidecar enters the netns itself (--netns).
                // (`app` also entered the netns; --netns re-enters the same one.)
                pod.app(&tools::sidecar_bin().to_string_lossy())
            }
            Placement::Outside => Command::new(tools::sidecar_bin()),
        };
        let cgroup = pod.cgroup.to_string_lossy().into_owned();
        let netns = pod.netns_path().to_string_lossy().into_owned();
        Self::spawn(
            pod,
            config,
            log_filter,
            cmd,
            &["--cgroup", &cgroup, "--netns", &netns],
        )
    }

    /// As [`Sidecar::start`] (in the pod's cgroup), with extra environment variables.
    pub fn start_env(pod: &Pod, config: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = pod.app(&tools::sidecar_bin().to_string_lossy());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let cgroup = pod.cgroup.to_string_lossy().into_owned();
        let netns = pod.netns_path().to_string_lossy().into_owned();
        let log = std::env::var("SIDECAR_TEST_LOG").unwrap_or_else(|_| "info".into());
        Self::spawn(
            pod,
            config,
            &log,
            cmd,
            &["--cgroup", &cgroup, "--netns", &netns],
        )
    }

    /// Starts the sidecar as an app of `pod` (in its cgroup and netns, so no
    /// `--netns`) through `wrapper` (for example `setpriv` with a reduced capability
    /// set), and waits for `/readyz`.
    pub fn start_wrapped(pod: &Pod, config: &str, wrapper: &[&str]) -> Self {
        Self::start_finding_cgroup(
            pod,
            config,
            wrapper,
            &["--cgroup", &pod.cgroup.to_string_lossy()],
        )
    }

    /// As [`Sidecar::start_wrapped`], but with `find_args` instead of `--cgroup`: the
    /// sidecar finds the pod's cgroup itself (`--pod-uid`, `--cgroup-root`, or its own).
    pub fn start_finding_cgroup(
        pod: &Pod,
        config: &str,
        wrapper: &[&str],
        find_args: &[&str],
    ) -> Self {
        let (program, args) = wrapper.split_first().expect("wrapper program");
        let mut cmd = pod.app(program);
        cmd.args(args).arg(tools::sidecar_bin());
        let log = std::env::var("SIDECAR_TEST_LOG").unwrap_or_else(|_| "info".into());
        Self::spawn(pod, config, &log, cmd, find_args)
    }

    /// Tries to start like [`Sidecar::start_wrapped`]; returns the exit status and log
    /// when the sidecar exits within 20 s instead of becoming ready.
    pub fn start_wrapped_failing(
        pod: &Pod,
        config: &str,
        wrapper: &[&str],
        find_args: &[&str],
    ) -> (ExitStatus, String) {
        let dir = std::env::temp_dir().join(format!("{}-sidecar", pod.netns));
        fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join("sidecar.yaml");
        fs::write(&config_path, config).expect("write config");
        let (program, args) = wrapper.split_first().expect("wrapper program");
        let out = pod
            .app(program)
            .args(args)
            .arg(tools::sidecar_bin())
            .env("SIDECAR__PINS__DIR", pod.pins_dir())
            .args(["run", "--config"])
            .arg(&config_path)
            .args(find_args)
            .output()
            .expect("spawn sidecar");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn spawn(pod: &Pod, config: &str, log_filter: &str, mut cmd: Command, args: &[&str]) -> Self {
        ensure_bpffs();
        let dir = std::env::temp_dir().join(format!("{}-sidecar", pod.netns));
        fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join("sidecar.yaml");
        fs::write(&config_path, config).expect("write config");
        let log = dir.join("sidecar.log");
        let extra: Vec<(std::ffi::OsString, std::ffi::OsString)> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect();
        // The pod's pin folder, unless the caller chose one (a pod whose sandbox was
        // replaced keeps its pins).
        let pins_given = extra.iter().any(|(k, _)| k == "SIDECAR__PINS__DIR");
        cmd.env_clear();
        if !pins_given {
            cmd.env("SIDECAR__PINS__DIR", pod.pins_dir());
        }
        cmd.envs(extra)
            .env("RUST_LOG", log_filter)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["run", "--config"])
            .arg(&config_path)
            .args(args);
        cmd.stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("spawn sidecar");
        let mut sidecar = Self {
            child: Some(child),
            pod: pod.clone(),
            log,
            dir,
        };
        sidecar.wait_ready();
        sidecar
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sidecar exited before ready ({status}):\n{}", self.logs());
            }
            let out = self
                .pod
                .outsider("curl")
                .args([
                    "-s",
                    "--max-time",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15020/readyz",
                ])
                .output();
            if out.is_ok_and(|o| o.stdout == b"200") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sidecar not ready after 20s:\n{}", self.logs());
    }

    /// Replaces the config file the sidecar watches, atomically (write, then rename),
    /// as a ConfigMap update lands.
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.join("sidecar.yaml.new");
        fs::write(&tmp, config).expect("write config");
        fs::rename(&tmp, self.dir.join("sidecar.yaml")).expect("replace config");
    }

    /// The sidecar's log so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin `/stats` document.
    pub fn stats(&self) -> serde_json::Value {
        self.admin_json("/stats")
    }

    /// A JSON document from the loopback admin listener (`/stats`, `/services`, ...).
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        let out = self
            .pod
            .outsider("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:15000{path}"))
            .output()
            .expect("curl admin");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bad {path} ({e}): {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                self.logs()
            )
        })
    }

    /// `/metrics` from the health listener (Prometheus text format).
    pub fn metrics_text(&self) -> String {
        let out = self
            .pod
            .outsider("curl")
            .args(["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
            .output()
            .expect("curl /metrics");
        assert!(
            out.status.success(),
            "GET /metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of every sample of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels)
    }

    /// A kernel event count, summed over programs.
    pub fn kernel_stat(&self, event: &str) -> u64 {
        self.metric("sidecar_kernel_events_total", &[("event", event)]) as u64
    }

    /// Connections closed for `reason`.
    pub fn closed(&self, reason: &str) -> u64 {
        self.metric("sidecar_connections_closed_total", &[("reason", reason)]) as u64
    }

    /// Connections accepted by the proxy.
    pub fn opened(&self) -> u64 {
        self.metric("sidecar_connections_opened_total", &[]) as u64
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `signal` to the sidecar.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILL, as a crash: the pins stay (the net removes them when dropped).
    pub fn crash(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (up to 30 s) for exit.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_with_log().0
    }

    /// SIGTERM, waits for exit, and returns the status with the whole log.
    pub fn terminate_with_log(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, self.logs());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "sidecar did not exit within 30s of SIGTERM:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // A failed test shows what the sidecar still held open, read before it dies.
        // (Not once the pod's namespace is gone: a panic here would abort the run.)
        let reachable = self.pod.netns_path().exists();
        let open = (std::thread::panicking() && reachable).then(|| {
            self.pod
                .outsider("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "3",
                    "http://127.0.0.1:15000/connections",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("(curl: {e})"))
        });
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(open) = open {
            eprintln!("--- the sidecar's /connections ---\n{open}");
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- last 40 lines of the sidecar log ---\n{}",
                tail.join("\n")
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
///
/// Panics when the text declares no metric family `name` (a renamed or removed metric
/// must fail the test, not read as 0), or when samples of it exist but none carries a
/// label key asked for (a renamed label). A declared family with no matching sample
/// yet (a labelled counter never incremented) sums to 0.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let family = ["_total", "_bucket", "_sum", "_count", "_created"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    let declared = text.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some("#")
            && words.next() == Some("TYPE")
            && words.next().is_some_and(|n| n == name || n == family)
    });
    assert!(
        declared,
        "metric {name} is not exposed at all (renamed or removed?)"
    );
    let mut sum = 0.0;
    let mut keys_seen = std::collections::BTreeSet::new();
    let mut samples = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        samples += 1;
        for pair in label_text.split(',') {
            if let Some((k, _)) = pair.split_once('=') {
                keys_seen.insert(k.to_string());
            }
        }
        let has = |k: &str, v: &str| {
            label_text
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        };
        if labels.iter().all(|(k, v)| has(k, v)) {
            sum += value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("metric {name}: bad value {value:?}: {e}"));
        }
    }
    if samples > 0 {
        for (k, _) in labels {
            assert!(
                keys_seen.contains(*k),
                "metric {name} has no label {k} (its labels: {keys_seen:?})"
            );
        }
    }
    sum
}

/// Mounts a bpffs at /sys/fs/bpf once, before any sidecar starts: sidecars mount one
/// when it is missing, and two starting at once would stack two mounts (hiding the
/// first one's pins).
fn ensure_bpffs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
        {
            return;
        }
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
