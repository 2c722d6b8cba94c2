//! Profile-guided optimisation of the release build.
//!
//! `pgo/sidecar.profdata.gz` is an LLVM instrumentation profile of the sidecar under
//! the bench's request workloads through the HBONE pair and the passthrough sidecar
//! (`cargo xtask pgo` makes it; training needs pods, so the image build cannot do it
//! and the profile is committed). Every release build through xtask (`dist`, which
//! the Dockerfile runs, `bench`, `demo`, `run`) compiles with `-Cprofile-use` when the
//! profile was made by the same LLVM major as the compiler at hand. A stale profile
//! costs only speed: LLVM ignores the functions whose control flow changed since
//! training. `SIDECAR_PGO=off` builds without it (before/after measurements).

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// The committed profile (gzip: 1.4 MB instead of 5.9), relative to the workspace root.
pub const PROFILE: &str = "pgo/sidecar.profdata.gz";
/// Where and with what the profile was made (`key: value` lines).
pub const INFO: &str = "pgo/sidecar.txt";

/// The `RUSTFLAGS` a release build should use: the caller's own, plus
/// `-Cprofile-use` when the committed profile applies to this compiler.
pub fn release_rustflags() -> Result<Option<String>> {
    let (profile, summary) = usable_profile()?;
    eprintln!("xtask: release build {summary}");
    let Some(profile) = profile else {
        return Ok(None);
    };
    let flag = format!("-Cprofile-use={}", profile.display());
    Ok(Some(match std::env::var("RUSTFLAGS") {
        Ok(own) if !own.trim().is_empty() => format!("{own} {flag}"),
        _ => flag,
    }))
}

/// Whether release builds use the profile, and why, in a few words (bench reports).
pub fn summary() -> String {
    usable_profile().map_or_else(|e| format!("PGO unknown ({e:#})"), |(_, s)| s)
}

/// The profile to compile with, copied to a path named after its contents (cargo does
/// not watch files named in flags, so a refreshed profile must change the flag), and
/// what was decided, in words.
fn usable_profile() -> Result<(Option<PathBuf>, String)> {
    let root = workspace_root();
    if std::env::var("SIDECAR_PGO").is_ok_and(|v| v == "off") {
        return Ok((None, "without PGO (SIDECAR_PGO=off)".into()));
    }
    let profile = root.join(PROFILE);
    let Ok(bytes) = std::fs::read(&profile) else {
        return Ok((
            None,
            format!("without PGO: no {PROFILE} (`cargo xtask pgo` makes it)"),
        ));
    };
    let info = std::fs::read_to_string(root.join(INFO)).unwrap_or_default();
    let trained = field(&info, "llvm").and_then(llvm_major);
    let ours = llvm_major(&compiler_llvm()?);
    if trained.is_none() || trained != ours {
        return Ok((
            None,
            format!(
                "without PGO: {PROFILE} was made by LLVM {} and rustc uses LLVM {} \
                 (refresh it with `cargo xtask pgo`)",
                field(&info, "llvm").unwrap_or("?"),
                ours.map_or("?".into(), |m| m.to_string()),
            ),
        ));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let dir = root.join("target/pgo");
    std::fs::create_dir_all(&dir)?;
    let named = dir.join(format!("use-{:016x}.profdata", hasher.finish()));
    if !named.is_file() {
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&profile)
            .output()
            .context("running gzip")?;
        if !out.status.success() {
            bail!(
                "gzip -dc {}: {}",
                profile.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::write(&named, &out.stdout).with_context(|| format!("{}", named.display()))?;
    }
    let summary = format!(
        "with PGO ({PROFILE}, trained at {})",
        field(&info, "commit").unwrap_or("?")
    );
    Ok((Some(named), summary))
}

/// The value of `key: value` in `info`.
pub fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// `20` from `20.1.8`.
fn llvm_major(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// The LLVM version of the host `rustc` (`rustc -vV`).
pub fn compiler_llvm() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    field(&text, "LLVM version")
        .map(str::to_string)
        .context("rustc -vV printed no LLVM version")
}

/// `llvm-profdata` of the host toolchain (rustup's `llvm-tools` component, installed
/// when missing: Debian's LLVM is older than rustc's and cannot read its profiles).
pub fn llvm_profdata() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let out = Command::new("rustc").arg("-vV").output()?;
    let host = field(&String::from_utf8_lossy(&out.stdout), "host")
        .context("rustc -vV printed no host")?
        .to_string();
    let tool = sysroot.join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !tool.is_file() {
        eprintln!("xtask: installing rustup's llvm-tools (llvm-profdata)");
        crate::cmd::run(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    }
    if !tool.is_file() {
        bail!("rustup's llvm-tools has no {}", tool.display());
    }
    Ok(tool)
}

/// Merges the raw profiles in `raw` into the committed profile and writes its info.
pub fn merge(raw: &Path, workload: &str) -> Result<()> {
    let root = workspace_root();
    let files: Vec<PathBuf> = std::fs::read_dir(raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if files.is_empty() {
        bail!(
            "no .profraw in {}: the instrumented sidecars wrote no profile (did they exit \
             cleanly?)",
            raw.display()
        );
    }
    let merged = raw.with_extension("profdata");
    // Not --sparse: functions the training never ran stay in the profile with zero
    // counts, so LLVM lays them out as cold code, away from the hot paths.
    crate::cmd::run(
        Command::new(llvm_profdata()?)
            .args(["merge", "-o"])
            .arg(&merged)
            .args(&files),
    )?;
    let out = root.join(PROFILE);
    std::fs::create_dir_all(out.parent().context("profile folder")?)?;
    // -n: no name or time in the header, so the same profile gives the same bytes.
    let gz = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .arg(&merged)
        .output()
        .context("running gzip")?;
    if !gz.status.success() {
        bail!(
            "gzip {}: {}",
            merged.display(),
            String::from_utf8_lossy(&gz.stderr)
        );
    }
    std::fs::write(&out, gz.stdout)?;
    let commit = Command::new("git")
        .current_dir(&root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .current_dir(&root)
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "sidecar-user",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let info = format!(
        "# Made by `cargo xtask pgo`; read by xtask/src/pgo.rs.\n\
         commit: {commit}{}\n\
         llvm: {}\n\
         raw profiles: {}\n\
         workload: {workload}\n",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
        compiler_llvm()?,
        files.len(),
    );
    std::fs::write(root.join(INFO), info)?;
    eprintln!(
        "xtask: {} ({} KiB) from {} raw profiles",
        out.display(),
        std::fs::metadata(&out)?.len() / 1024,
        files.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_llvm_majors() {
        let info = "# comment\ncommit: abc123\nllvm: 20.1.8\n";
        assert_eq!(field(info, "commit"), Some("abc123"));
        assert_eq!(field(info, "llvm").and_then(llvm_major), Some(20));
        assert_eq!(field(info, "host"), None);
        assert_eq!(llvm_major("x.1"), None);
    }
}
