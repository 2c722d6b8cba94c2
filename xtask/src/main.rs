//! Project tasks: `cargo xtask build-ebpf | build | test | run | demo | lint`.

mod build_ebpf;
mod cmd;
mod toolchain;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for the sidecar")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installs nightly rust-src and bpf-linker when missing).
    BuildEbpf,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => {
            let obj = build_ebpf::build_ebpf()?;
            eprintln!("xtask: eBPF object at {}", obj.display());
        }
    }
    Ok(())
}

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}
