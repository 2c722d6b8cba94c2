//! Locating cgroup v2 directories. The cgroup2 mount point differs between hosts
//! (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones), so it
//! is read from `/proc/mounts`, never assumed.

use std::path::{Path, PathBuf};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Why a cgroup could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup v2 filesystem is mounted (see /proc/mounts); cgroup v1-only hosts are not supported"
    )]
    NoCgroup2,
    /// A file under `/proc` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `/proc/self/cgroup` has no cgroup v2 line.
    #[error("/proc/self/cgroup has no cgroup v2 (`0::`) entry")]
    NoOwnCgroup,
    /// The given directory is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory: {reason}")]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The first cgroup2 mount point listed in `mounts` (the text of `/proc/mounts`).
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes spaces and friends as octal (`\040`).
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This host's cgroup2 mount point.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| CgroupError::Read {
        path: "/proc/mounts",
        source,
    })?;
    cgroup2_mount_in(&mounts).ok_or(CgroupError::NoCgroup2)
}

/// The cgroup v2 path (relative to the mount) in `/proc/self/cgroup` text.
pub fn own_cgroup_in(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Resolves the cgroup to attach to: `dir` if given (absolute, or relative to the
/// cgroup2 mount), else the cgroup this process runs in.
pub fn resolve(dir: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = match dir {
        Some(dir) if dir.is_absolute() => dir.to_path_buf(),
        Some(dir) => mount.join(dir),
        None => {
            let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| {
                CgroupError::Read {
                    path: "/proc/self/cgroup",
                    source,
                }
            })?;
            let own = own_cgroup_in(&text).ok_or(CgroupError::NoOwnCgroup)?;
            mount.join(own.trim_start_matches('/'))
        }
    };
    let stat = nix::sys::statfs::statfs(&path).map_err(|e| CgroupError::NotCgroup2 {
        path: path.clone(),
        reason: e.desc().to_string(),
    })?;
    if stat.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 {
            path,
            reason: "it is on another filesystem (cgroup v1?)".into(),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_paths() {
        let mounts = "cgroup2 /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn reads_own_cgroup() {
        let text = "12:cpu:/x\n0::/kubepods/pod1234/abc\n";
        assert_eq!(own_cgroup_in(text), Some("/kubepods/pod1234/abc"));
        assert_eq!(own_cgroup_in("0::/\n"), Some("/"));
        assert_eq!(own_cgroup_in("3:cpu:/\n"), None);
    }
}
