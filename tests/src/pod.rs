//! Network namespaces and cgroups as pods.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Panics unless running as root: pod tests need namespaces, cgroups and BPF.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "pod integration tests need root (network namespaces, cgroups, BPF): run `sudo cargo xtask test` (euid is {euid})"
    );
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The host's cgroup2 mount, read from /proc/mounts.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 filesystem mounted")
}

/// A test's private network: a node namespace with a bridge that pods plug into.
/// Pods get 198.18.0.N/24 (RFC 2544 benchmarking range) and fd00:5c::N/64.
pub struct Net {
    /// Prefix of every namespace and cgroup name of this net.
    pub id: String,
    node: String,
    cgroup_root: PathBuf,
    next_host: u8,
    pods: Vec<String>,
}

/// One pod: a namespace with `eth0` on the net's bridge, and a cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Namespace name (under /run/netns).
    pub netns: String,
    /// The pod's IPv4 address.
    pub ip4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ip6: Ipv6Addr,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
}

impl Net {
    /// Creates the node namespace and its bridge.
    pub fn new(test: &str) -> Self {
        require_root();
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "sct{}-{n}-{}",
            std::process::id(),
            &test[..test.len().min(12)]
        );
        let node = format!("{id}-node");
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &node, "link", "set", "br0", "up"]);
        let cgroup_root = cgroup2_mount().join("sidecar-tests").join(&id);
        fs::create_dir_all(&cgroup_root).expect("create test cgroup");
        Self {
            id,
            node,
            cgroup_root,
            next_host: 1,
            pods: Vec::new(),
        }
    }

    /// The node namespace (where the bridge is: capture there to see pod traffic).
    pub fn node_netns(&self) -> &str {
        &self.node
    }

    /// Sets the node side of `pod`'s link down (or up again): the pod drops off the
    /// network at once, with no FIN or RST sent for its connections (a node or link
    /// lost).
    pub fn set_link(&self, pod: &Pod, up: bool) {
        let veth = format!("veth{}", pod.ip4.octets()[3]);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.node, "link", "set", &veth, state]);
    }

    /// Adds a pod named `name`.
    pub fn pod(&mut self, name: &str) -> Pod {
        let host = self.next_host;
        self.next_host += 1;
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns]);
        self.pods.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let peer = format!("veth{host}");
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &peer, "netns",
            &self.node,
        ]);
        ip(&[
            "-n", &self.node, "link", "set", &peer, "master", "br0", "up",
        ]);
        let ip4 = Ipv4Addr::new(198, 18, 0, host);
        let ip6 = Ipv6Addr::new(0xfd00, 0x5c, 0, 0, 0, 0, 0, u16::from(host));
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        let cgroup = self.cgroup_root.join(name);
        fs::create_dir_all(&cgroup).expect("create pod cgroup");
        Pod {
            netns,
            ip4,
            ip6,
            cgroup,
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds. Pins first: a
        // crashed sidecar's pinned links would keep programs attached.
        for pod in &self.pods {
            let _ = fs::remove_dir_all(PathBuf::from("/sys/fs/bpf/sidecar-tests").join(pod));
        }
        let children = fs::read_dir(&self.cgroup_root)
            .into_iter()
            .flatten()
            .flatten();
        for child in children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            kill_cgroup(&child.path());
        }
        kill_cgroup(&self.cgroup_root);
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Kills every process in `cgroup` and removes it, retrying while exiting processes
/// are still being released (best effort, never panics).
fn kill_cgroup(cgroup: &Path) {
    // Nested cgroups (a pod's container cgroups) go first.
    let children = fs::read_dir(cgroup).into_iter().flatten().flatten();
    for child in children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
        kill_cgroup(&child.path());
    }
    for _ in 0..250 {
        if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            return;
        }
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", cgroup.display());
}

impl Pod {
    /// A command that runs in this pod's namespace and cgroup: an "app" of the pod.
    pub fn app(&self, program: &str) -> Command {
        self.command(program, true)
    }

    /// A command in this pod's namespace but outside its cgroup (not captured).
    pub fn outsider(&self, program: &str) -> Command {
        self.command(program, false)
    }

    fn command(&self, program: &str, in_cgroup: bool) -> Command {
        let ns = fs::File::open(self.netns_path()).expect("open pod netns");
        let procs = in_cgroup.then(|| {
            fs::OpenOptions::new()
                .write(true)
                .open(self.cgroup.join("cgroup.procs"))
                .expect("open cgroup.procs")
        });
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe syscalls on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // Join the cgroup first: sockets made after this belong to it.
                    let pid = b"0";
                    if libc::write(procs.as_raw_fd(), pid.as_ptr().cast(), pid.len()) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// The bpffs folder the pod's sidecar pins its links in (removed with the net).
    pub fn pins_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/sidecar-tests").join(&self.netns)
    }

    /// `/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// Adds another address to `eth0` (IPv4 /24 or IPv6 /64 inside the net's ranges).
    pub fn add_address(&self, addr: IpAddr) {
        let cidr = match addr {
            IpAddr::V4(a) => format!("{a}/24"),
            IpAddr::V6(a) => format!("{a}/64"),
        };
        let mut args = vec!["-n", &self.netns, "addr", "add", &cidr, "dev", "eth0"];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args);
    }

    /// Runs `ip -n POD ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs curl as an app of this pod; returns its output.
    pub fn curl(&self, args: &[&str]) -> Output {
        self.app("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .expect("run curl")
    }
}
