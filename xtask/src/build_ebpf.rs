//! `cargo xtask build-ebpf`: compiles the kernel programs with nightly and copies the
//! object where `sidecar-user`'s build script embeds it.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{
    cmd,
    toolchain::{self, CleanCargoEnv, nightly},
    workspace_root,
};

/// Builds `sidecar-ebpf` and returns the path of the object the sidecar embeds.
pub fn build_ebpf() -> Result<PathBuf> {
    let path = path_with_linker()?;
    let root = workspace_root();
    let crate_dir = root.join("sidecar-ebpf");
    let mut build = Command::new("cargo");
    build
        .env_clear_cargo()
        .env("PATH", path)
        .current_dir(&crate_dir)
        .args([&format!("+{}", nightly()), "build", "--release", "--locked"]);
    cmd::run(&mut build)?;
    let built = crate_dir.join("target/bpfel-unknown-none/release/sidecar-ebpf");
    let out = object_path();
    fs::create_dir_all(out.parent().context("object path has a parent")?)?;
    // Copy only when changed, so the user crate's build script does not rerun for nothing.
    let new = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if fs::read(&out).ok().as_deref() != Some(new.as_slice()) {
        fs::write(&out, &new).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(out)
}

/// `PATH` with the project's `bpf-linker` first (installing it when missing).
pub fn path_with_linker() -> Result<std::ffi::OsString> {
    let linker_dir = toolchain::ensure()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_dir];
    paths.extend(std::env::split_paths(&path));
    Ok(std::env::join_paths(paths)?)
}

/// Where the embedded eBPF object lives (read by `sidecar-user/build.rs`).
pub fn object_path() -> PathBuf {
    workspace_root().join("target/ebpf/sidecar-ebpf.o")
}
