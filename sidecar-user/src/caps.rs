//! Linux capabilities: what the sidecar needs to start (checked up front, so a missing
//! one is named instead of surfacing as a bare EPERM from the kernel), and dropping
//! every one of them once the programs are attached.
//!
//! Start-up needs [`REQUIRED`]; after attaching, the proxy needs none: map and link
//! operations go through descriptors it already holds, its listeners are bound, and
//! it runs as `proxy.uid`. Capability sets are per thread, so the drop happens while
//! the process is still single-threaded (before the async runtime starts).

use std::fmt;

/// A capability by number (`linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u32);

/// `CAP_CHOWN`: hand the pin folder to `proxy.uid` (so a clean stop can unpin).
pub const CAP_CHOWN: Cap = Cap(0);
/// `CAP_SETGID`: switch to `proxy.uid`'s group.
pub const CAP_SETGID: Cap = Cap(6);
/// `CAP_SETUID`: switch to `proxy.uid`, whose connects the programs never capture.
pub const CAP_SETUID: Cap = Cap(7);
/// `CAP_SETPCAP`: clear the bounding set.
pub const CAP_SETPCAP: Cap = Cap(8);
/// `CAP_NET_ADMIN`: attach to the cgroup and the network namespace.
pub const CAP_NET_ADMIN: Cap = Cap(12);
/// `CAP_SYS_ADMIN`: only to enter another network namespace (`--netns`) or mount a
/// bpffs; older kernels also accept it instead of `CAP_BPF`.
pub const CAP_SYS_ADMIN: Cap = Cap(21);
/// `CAP_BPF`: load programs and create maps (Linux 5.8+).
pub const CAP_BPF: Cap = Cap(39);

/// What `sidecar run` needs in a container (Kubernetes names, for `capabilities.add`).
pub const REQUIRED: [(Cap, &str); 6] = [
    (CAP_BPF, "BPF"),
    (CAP_NET_ADMIN, "NET_ADMIN"),
    (CAP_SETUID, "SETUID"),
    (CAP_SETGID, "SETGID"),
    (CAP_SETPCAP, "SETPCAP"),
    (CAP_CHOWN, "CHOWN"),
];

/// Why capabilities could not be checked or dropped.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// The process lacks capabilities it needs to start.
    #[error(
        "missing capabilities: {missing} (the sidecar needs {needed}; with Kubernetes: securityContext.capabilities.add)"
    )]
    Missing {
        /// The missing ones, comma-separated.
        missing: String,
        /// Everything needed.
        needed: String,
    },
    /// A syscall failed.
    #[error("{what}: {source}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The capability sets of a thread, as `/proc/.../status` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    /// CapInh.
    pub inheritable: u64,
    /// CapPrm.
    pub permitted: u64,
    /// CapEff.
    pub effective: u64,
    /// CapBnd.
    pub bounding: u64,
    /// CapAmb.
    pub ambient: u64,
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match REQUIRED.iter().find(|(c, _)| c == self) {
            Some((_, name)) => write!(f, "CAP_{name}"),
            None if *self == CAP_SYS_ADMIN => f.write_str("CAP_SYS_ADMIN"),
            None => write!(f, "capability {}", self.0),
        }
    }
}

// === impl CapSets ===

impl CapSets {
    /// Parses the `Cap*:` lines of a `/proc/<pid>/status` file.
    pub fn parse(status: &str) -> Self {
        let mut sets = Self::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(v) = u64::from_str_radix(value.trim(), 16) else {
                continue;
            };
            match key {
                "CapInh" => sets.inheritable = v,
                "CapPrm" => sets.permitted = v,
                "CapEff" => sets.effective = v,
                "CapBnd" => sets.bounding = v,
                "CapAmb" => sets.ambient = v,
                _ => {}
            }
        }
        sets
    }

    /// This thread's sets.
    pub fn current() -> Result<Self, CapError> {
        std::fs::read_to_string("/proc/thread-self/status")
            .map(|s| Self::parse(&s))
            .map_err(|source| CapError::Sys {
                what: "reading /proc/thread-self/status",
                source,
            })
    }

    /// Whether `cap` is effective.
    pub fn has(&self, cap: Cap) -> bool {
        self.effective & (1 << cap.0) != 0
    }

    /// Whether every set is empty.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Checks that the process can start: every capability in [`REQUIRED`] (with
/// `CAP_SYS_ADMIN` accepted instead of `CAP_BPF`), plus `CAP_SYS_ADMIN` when
/// `needs_sys_admin` (entering another network namespace).
pub fn check_required(needs_sys_admin: bool) -> Result<(), CapError> {
    let sets = CapSets::current()?;
    let mut missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(cap, _)| !(sets.has(*cap) || (*cap == CAP_BPF && sets.has(CAP_SYS_ADMIN))))
        .map(|(cap, _)| cap.to_string())
        .collect();
    if needs_sys_admin && !sets.has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (for --netns)".into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(CapError::Missing {
        missing: missing.join(", "),
        needed: REQUIRED
            .iter()
            .map(|(c, _)| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Empties the bounding and ambient sets. Needs `CAP_SETPCAP`; run before giving up
/// root (which empties the permitted and effective sets).
pub fn clear_bounding_and_ambient() -> Result<(), CapError> {
    let sys = |what| move |source| CapError::Sys { what, source };
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(sys("clearing the ambient set")(
            std::io::Error::last_os_error(),
        ));
    }
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(sys("reading /proc/sys/kernel/cap_last_cap"))?
        .trim()
        .parse()
        .unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: as above.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present == 1
            && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0
        {
            return Err(sys("dropping from the bounding set (needs CAP_SETPCAP)")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Empties the permitted, effective and inheritable sets of this thread.
pub fn clear_thread_sets() -> Result<(), CapError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset with a valid v3 header and two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(CapError::Sys {
            what: "capset",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let sets = CapSets::parse(
            "Name:\tsidecar\nCapInh:\t0000000000000000\nCapPrm:\t000000800000100c\n\
             CapEff:\t000000800000100c\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n",
        );
        assert!(sets.has(CAP_BPF) && sets.has(CAP_NET_ADMIN));
        assert!(!sets.has(CAP_SYS_ADMIN));
        assert_eq!(sets.bounding, 0x1ff_ffff_ffff);
        assert!(!sets.is_empty());
        assert!(CapSets::default().is_empty());
        assert_eq!(CAP_NET_ADMIN.to_string(), "CAP_NET_ADMIN");
    }
}
