//! Running child commands with errors that say which command failed.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd` with inherited stdio and fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
