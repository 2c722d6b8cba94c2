//! Process-level setup done before the async runtime starts threads: entering the
//! pod's network namespace and dropping root for the proxy UID (both change only the
//! calling thread's state in the kernel, so they must happen while it is the only one),
//! and giving back the memory start-up used (`memory`, also after each full list from
//! the Kubernetes API, when the runtime's threads are running).

mod memory;

use std::{fs::File, path::Path};

pub use memory::release_startup_memory;

use nix::{
    sched::{CloneFlags, setns},
    unistd::{Gid, Uid, getegid, geteuid, setgroups, setresgid, setresuid},
};

/// Why process setup failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The namespace file could not be opened or entered.
    #[error("entering network namespace {path}: {reason}")]
    Netns {
        /// The namespace file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Capabilities could not be dropped.
    #[error("dropping capabilities: {0}")]
    Capabilities(String),
    /// Switching to the proxy UID failed.
    #[error("switching to proxy.uid {uid}: {reason}")]
    Identity {
        /// The target UID.
        uid: u32,
        /// What failed.
        reason: String,
    },
}

/// Moves this (single-threaded) process into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<(), ProcessError> {
    let err = |reason: String| ProcessError::Netns {
        path: path.display().to_string(),
        reason,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| err(e.desc().to_string()))
}

/// Becomes `uid` (and the group of the same number) so that the kernel programs
/// recognise the proxy's own connects, and gives up every capability: the bounding
/// and ambient sets are emptied first (while `CAP_SETPCAP` is still held), switching
/// away from root empties the permitted and effective sets, and the inheritable set is
/// cleared last. Already running as `uid` is fine; running as another non-root user is
/// an error, since the proxy's connects would be captured again. Call it while the
/// process has one thread: capability sets are per thread.
pub fn become_proxy_user(uid: u32) -> Result<(), ProcessError> {
    let caps = |e: crate::caps::CapError| ProcessError::Capabilities(e.to_string());
    crate::caps::clear_bounding_and_ambient().map_err(caps)?;
    let current = geteuid();
    if current.as_raw() == uid {
        crate::caps::clear_thread_sets().map_err(caps)?;
        return Ok(());
    }
    let err = |reason: String| ProcessError::Identity { uid, reason };
    if !current.is_root() {
        return Err(err(format!(
            "running as uid {current} without the right to switch; run as root or as uid {uid}"
        )));
    }
    let gid = Gid::from_raw(uid);
    setgroups(&[gid]).map_err(|e| err(format!("setgroups: {}", e.desc())))?;
    setresgid(gid, gid, gid).map_err(|e| err(format!("setresgid: {}", e.desc())))?;
    let user = Uid::from_raw(uid);
    setresuid(user, user, user).map_err(|e| err(format!("setresuid: {}", e.desc())))?;
    crate::caps::clear_thread_sets().map_err(caps)?;
    let sets = crate::caps::CapSets::current().map_err(caps)?;
    if !sets.is_empty() {
        return Err(ProcessError::Capabilities(format!(
            "capabilities remain after dropping them: {sets:?}"
        )));
    }
    tracing::info!(
        uid,
        gid = getegid().as_raw(),
        "dropped root and every capability; proxy runs as proxy.uid"
    );
    Ok(())
}

/// Raises the soft open-file limit to the hard limit: every proxied connection holds
/// two descriptors, and the default soft limit (often 1024) caps a busy pod early.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return 0;
        }
    }
    lim.rlim_cur
}
