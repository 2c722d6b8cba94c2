//! Project tasks: `cargo xtask build-ebpf | test | lint | layout | run | demo | bench | pgo |
//! deps | dist | certs`.

mod bench;
mod build_ebpf;
mod cmd;
mod demo;
mod layout;
mod pgo;
mod tasks;
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
    /// Run every test: unit tests and pod integration tests (root).
    Test,
    /// cargo fmt --check and clippy -D warnings, host crates and kernel crate, and
    /// the layout check.
    Lint,
    /// The module graph of sidecar-user: no import circle, no overlong file.
    Layout,
    /// Build (release) and run the sidecar: `cargo xtask run -- run --config FILE`.
    Run {
        /// Arguments for the sidecar binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark against no proxy and HAProxy; report in target/bench (root).
    Bench {
        /// A short smoke run (one round, one second per scenario).
        #[arg(long)]
        quick: bool,
    },
    /// Refresh the PGO profile (pgo/sidecar.profdata.gz): an instrumented sidecar carries
    /// the bench's workloads (root); release builds then compile with it.
    Pgo,
    /// Pods, sidecars, an unmodified curl: capture, HBONE and services end to end
    /// (root). `--kubernetes`: the services come from a test API server instead of
    /// the config file.
    Demo {
        /// Feed the client's sidecar two Services from a test Kubernetes API server.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Install the Debian packages the tests and demo use, and the Python linters.
    Deps,
    /// The release build the image ships: eBPF object + release `sidecar` into OUT
    /// (the Dockerfile runs exactly this).
    Dist {
        /// Output folder.
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
    },
    /// Dev certificates via `sidecar certs` (e.g. `cargo xtask certs -- --out certs --workload a=default/a`).
    Certs {
        /// Arguments for `sidecar certs`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => {
            let obj = build_ebpf::build_ebpf()?;
            eprintln!("xtask: eBPF object at {}", obj.display());
        }
        Task::Test => tasks::test()?,
        Task::Lint => tasks::lint()?,
        Task::Layout => layout::layout()?,
        Task::Run { args } => tasks::run(&args)?,
        Task::Demo { kubernetes } => demo::demo(kubernetes)?,
        Task::Bench { quick } => bench::bench(quick)?,
        Task::Pgo => bench::train::train()?,
        Task::Deps => tasks::deps()?,
        Task::Dist { out } => tasks::dist(&out)?,
        Task::Certs { args } => {
            let mut all = vec!["certs".to_string()];
            all.extend(args);
            tasks::run(&all)?
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
