//! The bench's pods and the proxies under test. Two pods on the harness's private
//! bridge; each pod's cgroup has an `app` child (load generators, servers) and a `proxy`
//! child (the sidecar or HAProxy), so a proxy's own CPU is read from its cgroup. The
//! sidecar attaches to the pod cgroup, which covers the app.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sidecar_tests::{Net, Pod, Sidecar, tools::Background};

/// What carries the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// No proxy: the physical limit.
    Direct,
    /// Our sidecar in the client pod, plaintext passthrough.
    SidecarPlain,
    /// Our sidecars in both pods, mTLS between them.
    SidecarMtls,
    /// HAProxy in the client pod, TCP mode.
    HaproxyPlain,
    /// HAProxy in both pods, TLS 1.3 with mutual authentication between them.
    HaproxyMtls,
}

impl Setup {
    /// Every setup, in report order.
    pub const ALL: [Setup; 5] = [
        Setup::Direct,
        Setup::SidecarPlain,
        Setup::SidecarMtls,
        Setup::HaproxyPlain,
        Setup::HaproxyMtls,
    ];

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::SidecarPlain => "sidecar",
            Setup::SidecarMtls => "sidecar mTLS ×2",
            Setup::HaproxyPlain => "HAProxy",
            Setup::HaproxyMtls => "HAProxy mTLS ×2",
        }
    }

    /// Whether a proxy is involved.
    pub fn proxied(self) -> bool {
        self != Setup::Direct
    }
}

/// Ports in the server pod.
pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 9000;
/// HAProxy's TLS ports in the server pod (HTTP, iperf, echo).
const HAPROXY_TLS_PORTS: [u16; 3] = [8443, 8444, 8445];
/// HAProxy's local frontends in the client pod (HTTP, iperf, echo).
const HAPROXY_LOCAL_PORTS: [u16; 3] = [10080, 15201, 19000];

/// The pods, the servers, and the certificates.
pub struct Rig {
    /// Client pod (the attach point), its app and proxy cgroups.
    pub client: Pod,
    pub client_app: Pod,
    client_proxy: Pod,
    /// Server pod.
    pub server: Pod,
    server_app: Pod,
    server_proxy: Pod,
    dir: PathBuf,
    _echo: Background,
    _servers: Vec<Child>,
    _net: Net,
}

/// A setup running: its proxies and where the app should dial.
pub struct Running {
    /// The setup.
    pub setup: Setup,
    sidecars: Vec<Sidecar>,
    haproxies: Vec<Child>,
    /// Cgroups whose CPU is the proxies' cost.
    pub proxy_cgroups: Vec<PathBuf>,
    /// HTTP target for the load generator.
    pub http: String,
    /// iperf3 host and port.
    pub iperf: (String, u16),
    /// Echo target (idle connections).
    pub echo: String,
}

impl Rig {
    /// Creates the pods and starts nginx (2 workers, 1 KB responses, keep-alive),
    /// iperf3 and an echo server in the server pod.
    pub fn new(bin: &Path) -> Result<Self> {
        let mut net = Net::new("bench");
        let client = net.pod("client");
        let server = net.pod("server");
        let child = |pod: &Pod, name: &str| -> Result<Pod> {
            let cgroup = pod.cgroup.join(name);
            std::fs::create_dir_all(&cgroup).with_context(|| format!("{}", cgroup.display()))?;
            Ok(Pod {
                cgroup,
                ..pod.clone()
            })
        };
        // A proxied connection takes two ephemeral ports (app -> proxy on loopback, proxy
        // -> server), and the connection-rate scenarios leave TIME_WAIT behind: give the
        // pods the wide range a busy pod would set (a namespaced sysctl), above the
        // sidecar's own ports (15000-15020).
        for pod in [&client, &server] {
            let ok = pod
                .outsider("sysctl")
                .args(["-qw", "net.ipv4.ip_local_port_range=20000 65000"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("setting net.ipv4.ip_local_port_range in {}", pod.netns);
            }
        }
        let (client_app, client_proxy) = (child(&client, "app")?, child(&client, "proxy")?);
        let (server_app, server_proxy) = (child(&server, "app")?, child(&server, "proxy")?);
        let dir = std::env::temp_dir().join(format!("sidecar-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        certs(bin, &dir)?;

        let ip = server.ip4;
        let body = "x".repeat(1024);
        let nginx_conf = dir.join("nginx.conf");
        std::fs::write(
            &nginx_conf,
            format!(
                "daemon off;\nworker_processes 2;\npid {pid};\nerror_log stderr error;\n\
                 events {{ worker_connections 8000; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
                   client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f;\n\
                   uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;\n\
                   server {{\n    listen {ip}:{HTTP_PORT} backlog=4096;\n\
                     location = /1k {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                tmp = dir.display(),
            ),
        )?;
        let nginx = server_app
            .app("nginx")
            .arg("-c")
            .arg(&nginx_conf)
            .arg("-e")
            .arg("stderr")
            .stdout(Stdio::null())
            .spawn()
            .context("nginx (Debian package nginx-light) is required")?;
        let mut iperf = server_app.app("iperf3");
        iperf.args(["-s", "-B", &ip.to_string(), "-p", &IPERF_PORT.to_string()]);
        let iperf = spawn_quiet(iperf, "iperf3 (Debian package iperf3) is required")?;
        let mut echo = server_app.app(&sidecar_tests::tools::pod_tool_bin());
        echo.args(["echo", "--listen", &format!("{ip}:{ECHO_PORT}")]);
        let echo = Background::start_ready(echo);
        let rig = Self {
            client,
            client_app,
            client_proxy,
            server,
            server_app,
            server_proxy,
            dir,
            _echo: echo,
            _servers: vec![nginx, iperf],
            _net: net,
        };
        rig.wait_listening(&rig.server_app, &format!("{ip}:{HTTP_PORT}"))?;
        rig.wait_listening(&rig.server_app, &format!("{ip}:{IPERF_PORT}"))?;
        Ok(rig)
    }

    /// Waits until `addr` accepts, probing from `pod`'s namespace (not captured).
    fn wait_listening(&self, pod: &Pod, addr: &str) -> Result<()> {
        let (host, port) = addr.rsplit_once(':').context("addr")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ok = pod
                .outsider("nc")
                .args(["-z", "-w", "1", host, port])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{addr} is not listening")
    }

    fn identity(&self, who: &str) -> String {
        let d = self.dir.join(who);
        format!(
            "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n",
            d.join("cert.pem").display(),
            d.join("key.pem").display(),
            d.join("bundle.pem").display()
        )
    }

    /// Starts `setup`'s proxies (none for `Direct`).
    pub fn start(&self, setup: Setup) -> Result<Running> {
        let ip = self.server.ip4;
        let mut running = Running {
            setup,
            sidecars: Vec::new(),
            haproxies: Vec::new(),
            proxy_cgroups: Vec::new(),
            http: format!("{ip}:{HTTP_PORT}"),
            iperf: (ip.to_string(), IPERF_PORT),
            echo: format!("{ip}:{ECHO_PORT}"),
        };
        let sidecar = |proxy: &Pod, attach: &Pod, config: &str| {
            Sidecar::start_finding_cgroup(
                proxy,
                config,
                &["env"],
                &["--cgroup", &attach.cgroup.to_string_lossy()],
            )
        };
        match setup {
            Setup::Direct => {}
            Setup::SidecarPlain => {
                running
                    .sidecars
                    .push(sidecar(&self.client_proxy, &self.client, ""));
                running.proxy_cgroups.push(self.client_proxy.cgroup.clone());
            }
            Setup::SidecarMtls => {
                let server = format!(
                    "{}inbound:\n  mode: strict\n  allow: ['spiffe://cluster.local/ns/bench/*']\n",
                    self.identity("server")
                );
                running
                    .sidecars
                    .push(sidecar(&self.server_proxy, &self.server, &server));
                // BENCH_MESH='  hbone: {...}\n' adds to the client's mesh section while
                // investigating (one setting against another in the same code).
                let extra = std::env::var("BENCH_MESH").unwrap_or_default();
                let client = format!(
                    "{}mesh:\n  cidrs: ['{ip}/32']\n{extra}",
                    self.identity("client")
                );
                running
                    .sidecars
                    .push(sidecar(&self.client_proxy, &self.client, &client));
                running.proxy_cgroups.push(self.client_proxy.cgroup.clone());
                running.proxy_cgroups.push(self.server_proxy.cgroup.clone());
            }
            Setup::HaproxyPlain | Setup::HaproxyMtls => {
                let tls = setup == Setup::HaproxyMtls;
                if tls {
                    let conf = self.haproxy_server_config()?;
                    running
                        .haproxies
                        .push(self.haproxy(&self.server_proxy, &conf)?);
                    running.proxy_cgroups.push(self.server_proxy.cgroup.clone());
                    for port in HAPROXY_TLS_PORTS {
                        self.wait_listening(&self.server_app, &format!("{ip}:{port}"))?;
                    }
                }
                let conf = self.haproxy_client_config(tls)?;
                running
                    .haproxies
                    .push(self.haproxy(&self.client_proxy, &conf)?);
                running.proxy_cgroups.push(self.client_proxy.cgroup.clone());
                for port in HAPROXY_LOCAL_PORTS {
                    self.wait_listening(&self.client_app, &format!("127.0.0.1:{port}"))?;
                }
                running.http = format!("127.0.0.1:{}", HAPROXY_LOCAL_PORTS[0]);
                running.iperf = ("127.0.0.1".into(), HAPROXY_LOCAL_PORTS[1]);
                running.echo = format!("127.0.0.1:{}", HAPROXY_LOCAL_PORTS[2]);
            }
        }
        Ok(running)
    }

    fn haproxy(&self, pod: &Pod, conf: &Path) -> Result<Child> {
        let mut cmd = pod.app("haproxy");
        cmd.args(["-db", "-f"]).arg(conf);
        spawn_quiet(cmd, "haproxy (Debian package haproxy) is required")
    }

    /// The HAProxy configurations, as written into the report.
    pub fn haproxy_configs(&self) -> Result<String> {
        let client = std::fs::read_to_string(self.haproxy_client_config(true)?)?;
        let server = std::fs::read_to_string(self.haproxy_server_config()?)?;
        Ok(format!(
            "# client pod (mTLS setup; the plaintext one has no `ssl ...` on the servers)\n{client}\n# server pod\n{server}"
        ))
    }

    /// Same thread count as the sidecar (2), TCP mode, long timeouts; maxconn fits the
    /// machine's hard limit of open files.
    fn haproxy_common() -> &'static str {
        "global\n  nbthread 2\n  maxconn 9500\n  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
    }

    fn haproxy_client_config(&self, tls: bool) -> Result<PathBuf> {
        let ip = self.server.ip4;
        let mut conf = Self::haproxy_common().to_string();
        let names = ["http", "iperf", "echo"];
        let plain = [HTTP_PORT, IPERF_PORT, ECHO_PORT];
        for i in 0..3 {
            let (port, ssl) = if tls {
                (
                    HAPROXY_TLS_PORTS[i],
                    format!(
                        " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
                        self.dir.join("client/haproxy.pem").display(),
                        self.dir.join("ca.pem").display()
                    ),
                )
            } else {
                (plain[i], String::new())
            };
            conf.push_str(&format!(
                "listen {}\n  bind 127.0.0.1:{}\n  server s {ip}:{port}{ssl}\n",
                names[i], HAPROXY_LOCAL_PORTS[i]
            ));
        }
        let path = self.dir.join(if tls {
            "haproxy-client-tls.cfg"
        } else {
            "haproxy-client.cfg"
        });
        std::fs::write(&path, conf)?;
        Ok(path)
    }

    fn haproxy_server_config(&self) -> Result<PathBuf> {
        let ip = self.server.ip4;
        let mut conf = Self::haproxy_common().to_string();
        let names = ["http", "iperf", "echo"];
        let plain = [HTTP_PORT, IPERF_PORT, ECHO_PORT];
        for i in 0..3 {
            conf.push_str(&format!(
                "listen {}\n  bind {ip}:{} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n  server s {ip}:{}\n",
                names[i],
                HAPROXY_TLS_PORTS[i],
                self.dir.join("server/haproxy.pem").display(),
                self.dir.join("ca.pem").display(),
                plain[i]
            ));
        }
        let path = self.dir.join("haproxy-server.cfg");
        std::fs::write(&path, conf)?;
        Ok(path)
    }
}

impl Running {
    /// Process IDs of the proxies (for RSS).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.sidecars.iter().map(Sidecar::pid).collect();
        for h in &self.haproxies {
            pids.push(h.id());
        }
        pids
    }

    /// The last `n` log lines of each sidecar (for problem reports).
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for s in &self.sidecars {
            let logs = s.logs();
            let lines: Vec<&str> = logs.lines().collect();
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Stops the proxies (a clean stop for sidecars: pins removed, programs detached).
    pub fn stop(mut self) -> Result<()> {
        for sidecar in self.sidecars.drain(..) {
            let status = sidecar.terminate();
            if !status.success() {
                bail!("{:?}: sidecar exited with {status}", self.setup);
            }
        }
        for mut h in self.haproxies.drain(..) {
            let _ = h.kill();
            let _ = h.wait();
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for h in &mut self.haproxies {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in &mut self._servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_quiet(mut cmd: Command, what: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(what.to_string())
}

/// Dev certificates (`sidecar certs`, ECDSA P-256) for both pods, plus the
/// cert+key PEM files HAProxy wants.
fn certs(bin: &Path, dir: &Path) -> Result<()> {
    let out = Command::new(bin.join("sidecar"))
        .args(["certs", "--out"])
        .arg(dir)
        .args([
            "--workload",
            "client=bench/client",
            "--workload",
            "server=bench/server",
        ])
        .output()?;
    if !out.status.success() {
        bail!("sidecar certs: {}", String::from_utf8_lossy(&out.stderr));
    }
    for who in ["client", "server"] {
        let d = dir.join(who);
        // The proxy re-reads its identity as proxy.uid (rotation checks).
        for f in ["cert.pem", "key.pem", "bundle.pem"] {
            std::fs::set_permissions(
                d.join(f),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )?;
        }
        let pem = std::fs::read_to_string(d.join("cert.pem"))?
            + &std::fs::read_to_string(d.join("key.pem"))?;
        std::fs::write(d.join("haproxy.pem"), pem)?;
    }
    Ok(())
}
