//! `cargo xtask pgo`: trains the PGO profile on the bench's own pods and scenarios.
//!
//! An instrumented release sidecar (its own target folder) carries the bench's
//! request workloads through the HBONE pair and the passthrough sidecar: 1,000 rps on
//! persistent connections, a new connection per request, the connection rate, and
//! idle connections. Bulk is left out: its gigabytes would outweigh the requests in
//! the profile's counts, and the code it runs (frames, copies) is the requests' code.
//! The sidecars stop with SIGTERM and write their raw profiles; `llvm-profdata`
//! merges them into `pgo/sidecar.profdata.gz`. The load generators are ordinary
//! release builds, so only the sidecar is profiled.

use std::{os::unix::fs::PermissionsExt, process::Command};

use anyhow::{Context, Result};

use super::{Plan, Results, measure, rig::Rig, rig::Setup};
use crate::{cmd, workspace_root};

/// The setups trained on, and how often each.
const SETUPS: [Setup; 2] = [Setup::SidecarMtls, Setup::SidecarPlain];
const ROUNDS: usize = 2;

/// Builds the instrumented sidecar, runs the workloads, merges the profile.
pub fn train() -> Result<()> {
    crate::tasks::require_root("cargo xtask pgo")?;
    crate::tasks::deps()?;
    crate::pgo::llvm_profdata()?;
    // The same builds as the bench's, so the two share their artefacts.
    let tools = crate::tasks::build_release(&["sidecar-user", "sidecar-tests"])?;
    let root = workspace_root();
    let work = root.join("target/pgo");
    let raw = work.join("raw");
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    // The sidecar drops to its proxy UID before it exits and writes its profile.
    std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o1777))?;
    let instrumented = work.join("instrumented");
    cmd::run(
        Command::new("cargo")
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &instrumented)
            .env("RUSTFLAGS", format!("-Cprofile-generate={}", raw.display()))
            .args(["build", "--release", "--bins", "-p", "sidecar-user"]),
    )?;
    // The rig finds the sidecar (and `sidecar certs`) and the tools in one folder.
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin)?;
    for (from, name) in [
        (instrumented.join("release"), "sidecar"),
        (tools.clone(), "pod-tool"),
        (tools.clone(), "loadgen"),
    ] {
        std::fs::copy(from.join(name), bin.join(name))
            .with_context(|| format!("copying {name}"))?;
    }
    super::use_binaries(&bin);
    let plan = Plan {
        rounds: ROUNDS,
        latency_seconds: 4.0,
        new_connection_seconds: 2.0,
        bulk_seconds: 0,
        connrate_seconds: 2.0,
        idle_connections: 2_000,
    };
    let mut results = Results::default();
    for round in 0..plan.rounds {
        for setup in SETUPS {
            eprintln!(
                "pgo: round {}/{}: {}",
                round + 1,
                plan.rounds,
                setup.title()
            );
            let rig = Rig::new(&bin)?;
            let running = rig.start(setup)?;
            measure(&rig, &running, &bin.join("loadgen"), &plan, &mut results)
                .with_context(|| format!("{setup:?}"))?;
            if round == 0 {
                super::idle_memory(&rig, &running, &plan, &mut results)?;
            }
            running.stop()?;
        }
    }
    if !results.problems.is_empty() {
        anyhow::bail!(
            "the training workload failed, no profile written:\n{}",
            results.problems.join("\n")
        );
    }
    crate::pgo::merge(
        &raw,
        &format!(
            "{ROUNDS} rounds of the bench's request scenarios (no bulk) through {}",
            SETUPS.map(Setup::title).join(" and ")
        ),
    )
}
