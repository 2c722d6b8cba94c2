//! Loads the embedded eBPF object, writes the capture rules into its maps and attaches
//! the programs to a pod's cgroup. [`Capture`] owns every link: dropping it (or
//! [`Capture::detach`]) detaches the programs.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, LpmTrie, MapData, MapError, SockMap, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps, links::FdLink},
};
use sidecar_common::{FlowKey, KernelSettings, SockAddr, map_names, program_names};

use crate::{
    config::Config,
    ebpf::{
        held_links::HeldLinks,
        logs::{KernelLogger, kernel_log_level},
        maps::KernelMaps,
        orig_dst::OrigDstTable,
        pins::{self, LinkTarget, PinDir},
    },
};

/// The compiled kernel programs, embedded so one file deploys.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SIDECAR_EBPF_OBJECT"));

/// Why loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The object itself could not be loaded (maps created, relocations applied).
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    /// The kernel log buffer could not be opened.
    #[error("opening the eBPF log buffer: {0}")]
    Logger(#[from] aya_log::Error),
    /// The object lacks a program or map the loader expects.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The verifier refused a program, or attaching failed.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// The error, with the verifier log when it is a load error.
        source: ProgramError,
    },
    /// A map could not be opened or written.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// The error.
        source: MapError,
    },
    /// The cgroup directory could not be opened.
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The network namespace (for `sk_lookup`) could not be opened.
    #[error("opening network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A descriptor could not be duplicated.
    #[error("duplicating a map descriptor: {0}")]
    Dup(std::io::Error),
    /// The kernel is older than the programs need.
    #[error("Linux {found} is too old: the sidecar needs Linux 5.14 or later")]
    Kernel {
        /// The running kernel's version.
        found: String,
    },
    /// Pinning a link, or taking a pinned one over, failed.
    #[error("pin of program {name}: {reason}")]
    Pin {
        /// The program.
        name: &'static str,
        /// What failed.
        reason: String,
    },
}

/// Loaded and attached capture programs. Dropping it detaches them.
pub struct Capture {
    /// Owns the programs and their links (closing a link fd detaches it).
    ebpf: Ebpf,
    cgroup: PathBuf,
    /// Reader of the programs' log buffer. It owns the log map, so it must outlive
    /// program load (dropping it early closes the map under the loader).
    logger: Option<KernelLogger>,
    /// Where links are pinned, when they are.
    pins: Option<PinDir>,
    /// Links this process attached and pinned (their pins keep them after exit).
    pinned: Vec<aya::programs::links::PinnedLink>,
    /// A descriptor of every pinned link in use, fresh or taken over: how the proxy,
    /// which may not touch the pins, checks and detaches its capture.
    held: Arc<HeldLinks>,
}

// === impl Capture ===

impl Capture {
    /// Loads the programs and writes `config`'s capture rules into the maps. Nothing
    /// is attached yet, so a failure here leaves the pod untouched.
    pub fn load(config: &Config) -> Result<Self, CaptureError> {
        check_kernel()?;
        raise_memlock_limit();
        let level = kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)?;
        let logger = Some(KernelLogger::init(&mut ebpf)?);
        write_rules(&mut ebpf, config)?;
        for name in [program_names::CONNECT4, program_names::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        let name = program_names::SOCK_OPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| CaptureError::Program { name, source })?;
        let name = program_names::SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| CaptureError::Program { name, source })?;
        Ok(Self {
            ebpf,
            cgroup: PathBuf::new(),
            logger,
            pins: None,
            pinned: Vec::new(),
            held: Arc::default(),
        })
    }

    /// Attaches to `cgroup` with `bpf_link`s in multi mode, so other programs in the
    /// subtree (a CNI's, say) keep running beside ours. `sock_ops` goes first, so no
    /// redirected connect can miss its re-key. `connect6` is attached even when the
    /// proxy does not serve IPv6: IPv4-mapped destinations (`::ffff:a.b.c.d`, Java's
    /// default) run only that hook, and native IPv6 connects are then refused rather
    /// than left uncaptured.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), CaptureError> {
        let cgroup_error = |source| CaptureError::Cgroup {
            path: cgroup.to_owned(),
            source,
        };
        let dir = std::fs::File::open(cgroup).map_err(cgroup_error)?;
        let target = LinkTarget::cgroup(&dir).map_err(cgroup_error)?;
        // The same attach for each cgroup program type (aya gives them no common trait).
        macro_rules! attach_to_cgroup {
            ($program:ty, $name:expr) => {{
                let name = $name;
                self.attach_pinned(name, target, |prog: &mut $program, pin| {
                    let id = prog
                        .attach(dir.as_fd(), LINK_MODE)
                        .map_err(program_error(name))?;
                    pin.then(|| cgroup_link(name, prog.take_link(id)))
                        .transpose()
                })
            }};
        }
        attach_to_cgroup!(SockOps, program_names::SOCK_OPS)?;
        for name in [program_names::CONNECT4, program_names::CONNECT6] {
            attach_to_cgroup!(CgroupSockAddr, name)?;
        }
        self.cgroup = cgroup.to_owned();
        Ok(())
    }

    /// Attaches program `name` with `attach` (told whether to hand back the link for
    /// pinning), unless a pinned link of a previous run is taken over, and pins the
    /// link it returns.
    fn attach_pinned<P>(
        &mut self,
        name: &'static str,
        target: LinkTarget,
        attach: impl FnOnce(&mut P, bool) -> Result<Option<FdLink>, CaptureError>,
    ) -> Result<(), CaptureError>
    where
        for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        if self.take_over(name, target)? {
            return Ok(());
        }
        let pin = self.pins.is_some();
        let prog: &mut P = program(&mut self.ebpf, name)?;
        if let Some(link) = attach(prog, pin)? {
            self.pin(name, link)?;
        }
        Ok(())
    }

    /// Pins links under `pins` from now on, and takes over links already pinned there.
    pub fn use_pins(&mut self, pins: PinDir) {
        self.pins = Some(pins);
    }

    /// Swaps program `name` into its pinned link, if there is one (a previous run).
    fn take_over(&mut self, name: &'static str, target: LinkTarget) -> Result<bool, CaptureError> {
        let Some(pins) = &self.pins else {
            return Ok(false);
        };
        let path = pins.link(name);
        let prog = self.ebpf.program(name).ok_or(CaptureError::Missing {
            kind: "program",
            name,
        })?;
        let fd = prog
            .fd()
            .map_err(|source| CaptureError::Program { name, source })?;
        let taken = pins::take_over(&path, fd.as_fd(), target).map_err(|e| CaptureError::Pin {
            name,
            reason: e.to_string(),
        })?;
        let Some(link) = taken else {
            return Ok(false);
        };
        tracing::info!(program = name, pin = %path.display(), "took over the pinned link of a previous run");
        self.held.push(name, link);
        Ok(true)
    }

    fn pin(&mut self, name: &'static str, link: FdLink) -> Result<(), CaptureError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let pinned = link.pin(pins.link(name)).map_err(|e| CaptureError::Pin {
            name,
            reason: e.to_string(),
        })?;
        self.pinned.push(pinned);
        let fd = pins.open(name).map_err(|e| CaptureError::Pin {
            name,
            reason: format!("reopening the pin: {e}"),
        })?;
        self.held.push(name, fd);
        Ok(())
    }

    /// Registers the inbound `listeners` (one per family) and attaches `sk_lookup` to
    /// the network namespace this process is in. Connections for captured ports are
    /// steered to them from then on.
    pub fn attach_inbound(
        &mut self,
        listeners: &[std::net::TcpListener],
    ) -> Result<(), CaptureError> {
        let name = map_names::INBOUND_LISTENER;
        let mut sockmap: SockMap<&mut MapData> = map_mut(&mut self.ebpf, name)?;
        for listener in listeners {
            let slot = match listener.local_addr() {
                Ok(std::net::SocketAddr::V6(_)) => sidecar_common::INBOUND_LISTENER_V6,
                _ => sidecar_common::INBOUND_LISTENER_V4,
            };
            sockmap
                .set(slot, listener, 0)
                .map_err(|source| CaptureError::Map { name, source })?;
        }
        // The thread's own namespace: the main thread entered the pod's before any other
        // thread existed.
        let path = "/proc/thread-self/ns/net";
        let netns = std::fs::File::open(path).map_err(|source| CaptureError::Netns {
            path: PathBuf::from(path),
            source,
        })?;
        let target = LinkTarget::netns(&netns).map_err(|source| CaptureError::Netns {
            path: PathBuf::from(path),
            source,
        })?;
        let name = program_names::SK_LOOKUP;
        self.attach_pinned(name, target, |prog: &mut SkLookup, pin| {
            let id = prog.attach(netns).map_err(program_error(name))?;
            let link = pin.then(|| prog.take_link(id).map(FdLink::from));
            link.transpose().map_err(program_error(name))
        })
    }

    /// The kernel log reader, for [`crate::ebpf::logs::forward`] (once).
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// The cgroup the programs are attached to (empty before [`Capture::attach`]).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Opens the maps the proxy needs at run time.
    pub fn kernel_maps(&mut self) -> Result<KernelMaps, CaptureError> {
        let flow = map_names::ORIG_DST_BY_FLOW;
        let by_flow: HashMap<MapData, FlowKey, SockAddr> = owned_map(&mut self.ebpf, flow)?;
        let fd = by_flow
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(CaptureError::Dup)?;
        Ok(KernelMaps {
            orig_dst: OrigDstTable::new(fd),
            counters: owned_map(&mut self.ebpf, map_names::COUNTERS)?,
            by_cookie: owned_map(&mut self.ebpf, map_names::ORIG_DST_BY_COOKIE)?,
            by_flow,
        })
    }

    /// Removes pins of a previous run for programs this run did not attach (say
    /// `inbound_lookup` after a restart with inbound capture off): a stale program
    /// must not stay attached to maps nobody serves. Call after attaching, as root.
    pub fn prune_pins(&self) -> Result<(), CaptureError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let keep = self.held.names();
        let removed = pins.prune(&keep).map_err(|e| CaptureError::Pin {
            name: "(previous run)",
            reason: e.to_string(),
        })?;
        for name in removed {
            tracing::info!(program = %name, "removed the pin of a program this configuration does not attach");
        }
        Ok(())
    }

    /// The pinned links in use, for checking that capture is still attached.
    pub fn held_links(&self) -> Arc<HeldLinks> {
        self.held.clone()
    }

    /// Detaches every program now, through the links' descriptors (the pins, root's
    /// alone, are left pointing at detached links for root to remove later).
    pub fn detach(mut self) {
        if let Err(error) = self.held.detach_all() {
            tracing::warn!(%error, "could not detach a link; programs may stay attached");
        }
        self.pinned.clear();
        self.pins = None;
        drop(self);
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

/// Maps a program error to [`CaptureError::Program`] naming `name`.
fn program_error(name: &'static str) -> impl Fn(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

/// A cgroup program's link as a pinnable [`FdLink`].
fn cgroup_link<L>(name: &'static str, link: Result<L, ProgramError>) -> Result<FdLink, CaptureError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let link = link.map_err(program_error(name))?;
    FdLink::try_from(link).map_err(|e| CaptureError::Pin {
        name,
        reason: e.to_string(),
    })
}

fn owned_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or(CaptureError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Writes the config map, port rules and excluded networks.
fn write_rules(ebpf: &mut Ebpf, config: &Config) -> Result<(), CaptureError> {
    use super::rules::{capture_settings, inbound_rules, port_rules};
    let settings = capture_settings(config);
    let name = map_names::CONFIG;
    let mut array: Array<&mut MapData, KernelSettings> = map_mut(ebpf, name)?;
    array
        .set(0, settings, 0)
        .map_err(|source| CaptureError::Map { name, source })?;

    for (name, rules) in [
        (map_names::PORT_RULES, port_rules(config)),
        (map_names::INBOUND_PORTS, inbound_rules(config)),
    ] {
        let mut map: HashMap<&mut MapData, u16, u32> = map_mut(ebpf, name)?;
        for (port, rule) in rules {
            map.insert(port, rule, 0)
                .map_err(|source| CaptureError::Map { name, source })?;
        }
    }

    for net in config.excluded_cidrs() {
        match net.network() {
            IpAddr::V4(ip) => {
                let name = map_names::EXCLUDED_V4;
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> = map_mut(ebpf, name)?;
                let key = Key::new(u32::from(net.prefix_len()), ip.octets());
                trie.insert(&key, 1, 0)
                    .map_err(|source| CaptureError::Map { name, source })?;
            }
            IpAddr::V6(ip) => {
                let name = map_names::EXCLUDED_V6;
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> = map_mut(ebpf, name)?;
                let key = Key::new(u32::from(net.prefix_len()), ip.octets());
                trie.insert(&key, 1, 0)
                    .map_err(|source| CaptureError::Map { name, source })?;
            }
        }
    }
    Ok(())
}

/// Attach flags for cgroup programs. Every supported kernel attaches with `bpf_link`,
/// whose cgroup attachments are always multi-mode (other programs in the subtree, a
/// CNI's say, keep running); the kernel rejects any flag there, so aya's "Single"
/// (flags 0) is what must be passed.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The oldest kernel the programs work on: 5.14 (`BPF_MAP_LOOKUP_AND_DELETE_ELEM` on
/// hash maps, which the proxy uses at accept; also `bpf_link` for cgroups from 5.7,
/// `sk_lookup` from 5.9, `bpf_sk_lookup_tcp` from cgroup programs from 5.10).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// Refuses a kernel older than [`MIN_KERNEL`], naming both versions.
pub fn check_kernel() -> Result<(), CaptureError> {
    let current = aya::util::KernelVersion::current().map_err(|e| CaptureError::Kernel {
        found: format!("unknown ({e})"),
    })?;
    let (major, minor) = MIN_KERNEL;
    if current < aya::util::KernelVersion::new(major as u8, minor as u8, 0) {
        return Err(CaptureError::Kernel {
            found: format!("{current:?}"),
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge maps to `RLIMIT_MEMLOCK`; raise it so they load there too.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer; failure only matters on old kernels.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if ret != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_is_recent_enough() {
        check_kernel().expect("the build machines run Linux >= 5.14");
    }
}
