//! `cargo xtask demo [--kubernetes]`: real pods (network namespaces and cgroups on a
//! private bridge), each with its sidecar, and unmodified clients in them. The
//! default demo routes a service from the config file; `--kubernetes` learns two
//! Services from a test Kubernetes API server instead.

mod config_file;
mod kubernetes;

use std::path::Path;

use anyhow::{Context, Result, bail};
use sidecar_tests::{Pod, tools::Background};

use crate::tasks;

/// Runs the demo: the config file's services, or Kubernetes discovery's.
pub fn demo(kubernetes: bool) -> Result<()> {
    tasks::require_root("cargo xtask demo")?;
    tasks::deps()?;
    let bin = tasks::build_release(&["sidecar-user", "sidecar-tests"])?;

    // SAFETY: single-threaded at this point; the pod harness reads these.
    unsafe {
        std::env::set_var("SIDECAR_BIN", bin.join("sidecar"));
        std::env::set_var("POD_TOOL_BIN", bin.join("pod-tool"));
        std::env::set_var("SIDECAR_TEST_LOG", "info,sidecar=debug");
    }
    match kubernetes {
        true => kubernetes::run(&bin),
        false => config_file::run(&bin),
    }
}

/// An HTTP server on `pod`'s addresses, port 8080, naming the address that served.
fn http_server(pod: &Pod, bin: &Path) -> Background {
    let mut http = pod.app(&bin.join("pod-tool").to_string_lossy());
    http.args([
        "http",
        "--listen",
        &format!("{}:8080", pod.ip4),
        "--listen",
        &format!("[{}]:8080", pod.ip6),
    ]);
    Background::start_ready(http)
}

/// The app in `pod` runs `curl url`; what it printed.
fn curl(pod: &Pod, url: &str) -> Result<String> {
    let out = pod
        .app("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()
        .context("curl")?;
    if !out.status.success() {
        bail!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
