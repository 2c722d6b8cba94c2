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
    /// This process is in a private cgroup namespace and no pod UID was given.
    #[error(
        "/proc/self/cgroup reads 0::/ (a private cgroup namespace, as in a container, or the host's root cgroup): pass --pod-uid (downward API metadata.uid) with the host's cgroup2 mounted at --cgroup-root, or --cgroup"
    )]
    PrivateNamespace,
    /// No cgroup of the given pod was found.
    #[error(
        "no cgroup of pod {uid} under {root} (looked for pod<uid> and *pod<uid_with_underscores>.slice); is the host's cgroup2 mounted there?"
    )]
    PodNotFound {
        /// The pod UID.
        uid: String,
        /// Where it was searched.
        root: PathBuf,
    },
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

/// How to find the pod's cgroup.
#[derive(Clone, Debug, Default)]
pub struct CgroupSelector {
    /// An explicit directory (absolute, or relative to the cgroup root).
    pub dir: Option<PathBuf>,
    /// The pod's UID (Kubernetes downward API `metadata.uid`).
    pub pod_uid: Option<String>,
    /// Where the host's cgroup2 hierarchy is mounted (default: this host's cgroup2
    /// mount from /proc/mounts).
    pub root: Option<PathBuf>,
}

/// Resolves the cgroup to attach to: `dir` if given; else the directory of pod
/// `pod_uid` under the cgroup root; else this process's own cgroup, widened to its
/// pod's when it is a container inside a Kubernetes pod cgroup (so the app's
/// containers are captured too).
pub fn resolve(selector: &CgroupSelector) -> Result<PathBuf, CgroupError> {
    let root = match &selector.root {
        Some(root) => root.clone(),
        None => cgroup2_mount()?,
    };
    let path = match (&selector.dir, &selector.pod_uid) {
        (Some(dir), _) if dir.is_absolute() => dir.to_path_buf(),
        (Some(dir), _) => root.join(dir),
        (None, Some(uid)) => {
            find_pod_cgroup(&root, uid).ok_or_else(|| CgroupError::PodNotFound {
                uid: uid.clone(),
                root: root.clone(),
            })?
        }
        (None, None) => {
            let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| {
                CgroupError::Read {
                    path: "/proc/self/cgroup",
                    source,
                }
            })?;
            let own = own_cgroup_in(&text).ok_or(CgroupError::NoOwnCgroup)?;
            // Either a private cgroup namespace (a container) or the host's root
            // cgroup: capturing the whole host is never what a sidecar should do.
            if own == "/" {
                return Err(CgroupError::PrivateNamespace);
            }
            let own = Path::new(own.trim_start_matches('/'));
            root.join(pod_ancestor(own).unwrap_or(own))
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

/// Whether a cgroup directory name is pod `uid`'s: `pod<uid>` (cgroupfs driver) or
/// `...-pod<uid with _ for ->.slice` (systemd driver).
fn is_pod_dir(name: &str, uid: &str) -> bool {
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    name == format!("pod{uid}") || name.ends_with(&systemd)
}

/// The pod-level ancestor of a container's cgroup path, if it is in a Kubernetes pod.
pub fn pod_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            (n.starts_with("pod") && n.len() > 3 && !n.contains('.'))
                || (n.contains("-pod") && n.ends_with(".slice"))
        })
    })
}

/// Searches `root` (breadth-first, up to 8 levels: kubepods/<qos>/pod<uid> is 3) for pod
/// `uid`'s cgroup.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..8 {
        let mut next = Vec::new();
        for dir in &level {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                if is_pod_dir(&name.to_string_lossy(), uid) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
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
    fn finds_pod_cgroups_of_both_drivers() {
        let root = std::env::temp_dir().join(format!("sidecar-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "3f1a9c2e-77b0-4d4e-9a39-0c1b2d3e4f50";
        let cgroupfs = root.join("a/kubepods/burstable").join(format!("pod{uid}"));
        let systemd = root
            .join("b/kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        for d in [&cgroupfs, &systemd] {
            std::fs::create_dir_all(d.join("cri-containerd-abc.scope")).expect("mkdir");
        }
        std::fs::create_dir_all(root.join("a/kubepods/burstable/podother")).expect("mkdir");
        assert_eq!(
            find_pod_cgroup(&root.join("a"), uid),
            Some(cgroupfs.clone())
        );
        assert_eq!(find_pod_cgroup(&root.join("b"), uid), Some(systemd.clone()));
        assert_eq!(find_pod_cgroup(&root.join("a"), "nope"), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn widens_a_container_cgroup_to_its_pod() {
        let c = Path::new("kubepods/burstable/pod1234-ab/0123456789abcdef");
        assert_eq!(
            pod_ancestor(c),
            Some(Path::new("kubepods/burstable/pod1234-ab"))
        );
        let s = Path::new(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-9.scope",
        );
        assert_eq!(
            pod_ancestor(s),
            Some(Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice"
            ))
        );
        assert_eq!(pod_ancestor(Path::new("sidecar-tests/client")), None);
        assert_eq!(pod_ancestor(Path::new("user.slice/session-1.scope")), None);
    }

    #[test]
    fn reads_own_cgroup() {
        let text = "12:cpu:/x\n0::/kubepods/pod1234/abc\n";
        assert_eq!(own_cgroup_in(text), Some("/kubepods/pod1234/abc"));
        assert_eq!(own_cgroup_in("0::/\n"), Some("/"));
        assert_eq!(own_cgroup_in("3:cpu:/\n"), None);
    }
}
