//! Links pinned in bpffs, so capture outlives the sidecar process: a crashed sidecar
//! leaves its programs attached (outbound connects are then refused by the empty proxy
//! port; inbound connections are dropped by `sk_lookup`), never letting traffic go
//! around the proxy. A restarted sidecar takes the pinned links over by swapping its
//! freshly loaded programs into them (`BPF_LINK_UPDATE`), so at no moment do two
//! generations run side by side.
//!
//! Pins belong to root alone (folder 0700): every sidecar on a node runs as the same
//! `proxy.uid`, so anything that UID may write, every pod's sidecar may write, and one
//! could unpin another's capture. The running proxy therefore never touches a pin: it
//! keeps the links' descriptors, and a clean stop detaches them through those
//! (`BPF_LINK_DETACH`, which needs no privilege beyond the descriptor). The pin files
//! then point at detached links and are removed by root at the next start of a sidecar
//! on the node (the pod's own, or any sidecar's garbage collection).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_LINK_UPDATE`.
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_DETACH`.
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_TYPE_CGROUP` and `BPF_LINK_TYPE_NETNS`.
const LINK_TYPE_CGROUP: u32 = 3;
const LINK_TYPE_NETNS: u32 = 5;
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin folder of one pod: `<root>/<cgroup id>`.
#[derive(Clone, Debug)]
pub struct PinDir {
    dir: PathBuf,
}

/// Why pins could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The pin root is not on a bpffs.
    #[error(
        "{0} is not on a bpf filesystem: mount one there (mount -t bpf bpf /sys/fs/bpf) or set pins.dir"
    )]
    NotBpffs(PathBuf),
    /// A filesystem or syscall operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl PinDir {
    /// The folder for the pod whose cgroup is `cgroup`, under `root` (created, must be
    /// on bpffs). The cgroup's id (its inode) keeps the name stable across restarts.
    /// The folder is root's alone (0700): no sidecar, once it has given up root, can
    /// remove or replace any pin, its own pod's included.
    pub fn for_cgroup(root: &Path, cgroup: &Path) -> Result<Self, PinError> {
        fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
            let path = path.to_owned();
            move |source| PinError::Io { what, path, source }
        }
        mount_bpffs_if_missing(root)?;
        std::fs::create_dir_all(root).map_err(io("creating", root))?;
        let stat = nix::sys::statfs::statfs(root).map_err(|e| PinError::Io {
            what: "statfs",
            path: root.to_owned(),
            source: e.into(),
        })?;
        if stat.filesystem_type().0 != BPF_FS_MAGIC {
            return Err(PinError::NotBpffs(root.to_owned()));
        }
        let id = std::fs::metadata(cgroup)
            .map_err(io("reading", cgroup))?
            .ino();
        let dir = root.join(format!("cgroup-{id}"));
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        // Root owns the folder and nobody else may enter it (earlier versions left it
        // writable by the proxy's group: taken back here).
        let root_id = (
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        );
        nix::unistd::chown(&dir, root_id.0, root_id.1).map_err(|e| PinError::Io {
            what: "chown",
            path: dir.clone(),
            source: e.into(),
        })?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io("chmod", &dir))?;
        Ok(Self { dir })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the link of program `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes the pins of programs not in `keep` (a previous run's, for a program
    /// this configuration does not attach): their links are released, so no stale
    /// program stays attached to maps nobody serves. Needs root.
    pub fn prune(&self, keep: &[&str]) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name.as_str()) {
                std::fs::remove_file(entry.path())?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Opens the link pinned for program `name`.
    pub fn open(&self, name: &str) -> io::Result<OwnedFd> {
        obj_get(&self.link(name))
    }
}

/// What a link is attached to, as the kernel reports it: a detached cgroup link shows
/// cgroup id 0, a detached netns link inode 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by id (the inode number of its cgroup2 directory).
    Cgroup(u64),
    /// A network namespace, by inode number.
    Netns(u32),
    /// Another kind of link.
    Other,
}

impl LinkTarget {
    /// The cgroup whose directory `dir` is open.
    pub fn cgroup(dir: &std::fs::File) -> io::Result<Self> {
        Ok(Self::Cgroup(dir.metadata()?.ino()))
    }

    /// The network namespace `ns` (an open `/proc/.../ns/net`).
    pub fn netns(ns: &std::fs::File) -> io::Result<Self> {
        // The kernel reports a namespace's inode number as 32 bits.
        Ok(Self::Netns(ns.metadata()?.ino() as u32))
    }
}

/// Whether the link behind `fd` is still attached (to a live cgroup or namespace).
pub fn link_attached(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(!matches!(
        link_target(fd)?,
        LinkTarget::Cgroup(0) | LinkTarget::Netns(0)
    ))
}

/// What the link behind `fd` is attached to.
pub fn link_target(fd: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the per-type union:
    // cgroup { u64 cgroup_id; u32 attach_type }, netns { u32 netns_ino; u32 attach_type }.
    let mut info = [0u64; 8];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // `info` (of `info_len` bytes) outlives the call.
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let link_type = info[0] as u32;
    Ok(match link_type {
        LINK_TYPE_CGROUP => LinkTarget::Cgroup(info[2]),
        LINK_TYPE_NETNS => LinkTarget::Netns(info[2] as u32),
        _ => LinkTarget::Other,
    })
}

/// Detaches the link behind `fd` now (`BPF_LINK_DETACH`): its program stops running,
/// whoever else holds or pins the link.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let attr: [u32; 2] = [fd.as_raw_fd() as u32, 0];
    bpf(BPF_LINK_DETACH, &attr).map(drop)
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Removes pin folders under `root` whose cgroup no longer exists (a pod deleted while
/// its sidecar was down): their links are defunct, and nothing else would remove them.
/// `cgroup` is any cgroup of the hierarchy; the whole hierarchy it belongs to is
/// searched for the cgroup ids the folders are named after. Returns what was removed.
pub fn collect_garbage(root: &Path, cgroup: &Path) -> Vec<PathBuf> {
    let stale: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_prefix("cgroup-")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    if stale.is_empty() {
        return Vec::new();
    }
    // The top of the cgroup2 hierarchy as this process sees it.
    let is_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_MAGIC)
    };
    let top = cgroup
        .ancestors()
        .take_while(|p| is_cgroup2(p))
        .last()
        .unwrap_or(cgroup)
        .to_path_buf();
    let mut live = std::collections::HashSet::new();
    let mut level = vec![top];
    for _ in 0..16 {
        let mut next = Vec::new();
        for dir in &level {
            if let Ok(meta) = std::fs::metadata(dir) {
                live.insert(meta.ino());
            }
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    next.push(entry.path());
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    let mut removed = Vec::new();
    for (id, dir) in stale {
        if live.contains(&id) {
            // A live pod whose sidecar stopped cleanly: its pins point at detached
            // links. Remove those (an attached one belongs to a running sidecar).
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let detached = obj_get(&entry.path())
                    .and_then(|fd| link_attached(fd.as_fd()))
                    .is_ok_and(|attached| !attached);
                if detached && std::fs::remove_file(entry.path()).is_ok() {
                    removed.push(entry.path());
                }
            }
            continue;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        if std::fs::remove_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

/// The conventional bpffs mount point.
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts a bpffs at /sys/fs/bpf when `root` is below it and none is mounted (as
/// Cilium does on nodes that lack it).
fn mount_bpffs_if_missing(root: &Path) -> Result<(), PinError> {
    let bpffs = Path::new(BPFFS);
    if !root.starts_with(bpffs) {
        return Ok(());
    }
    let mounted =
        nix::sys::statfs::statfs(bpffs).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| PinError::Io {
        what: "mounting a bpffs on",
        path: bpffs.to_owned(),
        source: e.into(),
    })?;
    tracing::info!(path = BPFFS, "mounted a bpf filesystem for pins");
    Ok(())
}

/// If a link attached to `target` is pinned at `path`, swaps `prog` into it and
/// returns the link. A pin whose link can no longer be updated (detached by a clean
/// stop, or its cgroup or namespace gone) is removed and `None` returned, as when there
/// is no pin: the caller then attaches afresh. So is a pin whose link is attached
/// elsewhere (the pod's previous network namespace, still alive after its sandbox was
/// replaced): taking it over would leave `target` uncaptured, so that link is detached
/// first.
pub fn take_over(
    path: &Path,
    prog: BorrowedFd<'_>,
    target: LinkTarget,
) -> io::Result<Option<OwnedFd>> {
    let link = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let stale = || match std::fs::remove_file(path) {
        // Another sidecar's garbage collection got there first.
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(None),
    };
    let found = link_target(link.as_fd())?;
    if found != target {
        if link_attached(link.as_fd())? {
            tracing::warn!(pin = %path.display(), ?found, expected = ?target, "a pinned link is attached elsewhere (a previous network namespace of this pod?): detaching it");
            link_detach(link.as_fd())?;
        }
        return stale();
    }
    match link_update(link.as_raw_fd(), prog.as_raw_fd()) {
        Ok(()) => Ok(Some(link)),
        Err(_) => stale(),
    }
}

/// The `bpf(2)` syscall with command `cmd` and attribute block `attr`; the result, or
/// the error it set.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised block of the size passed; every caller
    // lays it out as the kernel's `union bpf_attr` member for `cmd`, and any pointers
    // inside it stay valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel rejects non-zero bytes past the command's fields, and
        // implicit padding is not guaranteed to be zero.
        _pad: u32,
    }
    let attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // `name` (NUL-terminated) outlives the call.
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: i32, prog: i32) -> io::Result<()> {
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = UpdateAttr {
        link_fd: link as u32,
        new_prog_fd: prog as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}
