//! Installs what the eBPF build needs on a fresh machine: nightly's `rust-src` and a
//! `bpf-linker` linked against nightly's own libLLVM. Every step checks first, so a
//! second run does nothing.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cmd, workspace_root};

/// The toolchain that builds kernel programs: `nightly`, or `$SIDECAR_NIGHTLY` (the
/// Dockerfile pins a dated nightly this way).
pub fn nightly() -> String {
    std::env::var("SIDECAR_NIGHTLY").unwrap_or_else(|_| "nightly".into())
}
/// bpf-linker release known to work with nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Makes sure nightly, its `rust-src` and `bpf-linker` are present; returns the folder
/// holding `bpf-linker` so callers can put it on `PATH`.
pub fn ensure() -> Result<PathBuf> {
    let nightly = nightly();
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: installing rust-src for {nightly}");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &nightly,
        ]))?;
    }
    let bin_dir = tools_dir().join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file() && linker_runs(&linker) {
        return Ok(bin_dir);
    }
    install_bpf_linker(&sysroot)?;
    if !linker_runs(&linker) {
        bail!(
            "bpf-linker was installed at {} but does not run",
            linker.display()
        );
    }
    Ok(bin_dir)
}

/// Where project-local tools live (kept out of `~/.cargo` so nothing global changes).
fn tools_dir() -> PathBuf {
    workspace_root().join("target/tools")
}

fn nightly_sysroot() -> Result<PathBuf> {
    let nightly = nightly();
    let out = Command::new("rustc")
        .args([&format!("+{nightly}"), "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "the {nightly} toolchain is missing ({}); install it with `rustup toolchain install {nightly}`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn linker_runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds bpf-linker against the nightly toolchain's libLLVM. `llvm-sys` wants an
/// `LLVM_PREFIX` whose `lib/` holds `libLLVM.so`; nightly ships only the versioned name,
/// so a folder of symlinks provides both. The folder stays: bpf-linker's RUNPATH points there.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let lib = sysroot.join("lib");
    let versioned = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = versioned
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("cannot read the LLVM major version from {versioned}"))?;

    let prefix = tools_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(lib.join(&versioned), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} ({versioned})");
    let mut install = Command::new("cargo");
    install
        .env_clear_cargo()
        .env("LLVM_PREFIX", &prefix)
        .args([
            &format!("+{}", nightly()),
            "install",
            "--locked",
            // A copy that does not run (its libLLVM moved) is replaced, not kept.
            "--force",
            "bpf-linker",
        ])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(tools_dir());
    cmd::run(&mut install)
}

/// Removes the variables cargo sets for the running xtask, so a nested cargo starts clean.
pub trait CleanCargoEnv {
    /// Drops inherited `CARGO*` and `RUST*` variables (but keeps `CARGO_HOME`/`RUSTUP_HOME`).
    fn env_clear_cargo(&mut self) -> &mut Self;
}

impl CleanCargoEnv for Command {
    fn env_clear_cargo(&mut self) -> &mut Self {
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let keep = matches!(key.as_ref(), "CARGO_HOME" | "RUSTUP_HOME");
            if !keep && (key.starts_with("CARGO") || key.starts_with("RUST")) {
                self.env_remove(key.as_ref());
            }
        }
        self
    }
}
