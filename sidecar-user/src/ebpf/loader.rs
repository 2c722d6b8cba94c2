//! Loads the embedded eBPF object, writes the capture rules into its maps and attaches
//! the programs to a pod's cgroup. [`Capture`] owns every link: dropping it (or
//! [`Capture::detach`]) detaches the programs.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, SockMap,
        lpm_trie::Key,
    },
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps, links::FdLink},
};
use sidecar_common::{
    CaptureConfig, Counter, FlowKey, Program, SockAddr, capture_flags, counter_index, map_names,
    port_rule, program_names,
};

use crate::{
    config::Config,
    ebpf::{
        held_links::HeldLinks,
        logs::{KernelLogger, kernel_log_level},
        orig_dst::OrigDstTable,
        pins::{self, PinDir},
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

/// Views of the maps the running proxy reads; independent of [`Capture`]'s lifetime.
pub struct KernelMaps {
    /// Original destinations by 4-tuple.
    pub orig_dst: OrigDstTable,
    counters: PerCpuArray<MapData, u64>,
    by_cookie: HashMap<MapData, u64, SockAddr>,
    by_flow: HashMap<MapData, FlowKey, SockAddr>,
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
        let dir = std::fs::File::open(cgroup).map_err(|source| CaptureError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let name = program_names::SOCK_OPS;
        if !self.take_over(name)? {
            let prog: &mut SockOps = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(dir.as_fd(), LINK_MODE)
                .map_err(|source| CaptureError::Program { name, source })?;
            if self.pins.is_some() {
                let link = prog
                    .take_link(id)
                    .map_err(|source| CaptureError::Program { name, source })?;
                let link = FdLink::try_from(link).map_err(|e| CaptureError::Pin {
                    name,
                    reason: e.to_string(),
                })?;
                self.pin(name, link)?;
            }
        }
        for name in [program_names::CONNECT4, program_names::CONNECT6] {
            if self.take_over(name)? {
                continue;
            }
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(dir.as_fd(), LINK_MODE)
                .map_err(|source| CaptureError::Program { name, source })?;
            if self.pins.is_some() {
                let link = prog
                    .take_link(id)
                    .map_err(|source| CaptureError::Program { name, source })?;
                let link = FdLink::try_from(link).map_err(|e| CaptureError::Pin {
                    name,
                    reason: e.to_string(),
                })?;
                self.pin(name, link)?;
            }
        }
        self.cgroup = cgroup.to_owned();
        Ok(())
    }

    /// Pins links under `pins` from now on, and takes over links already pinned there.
    pub fn use_pins(&mut self, pins: PinDir) {
        self.pins = Some(pins);
    }

    /// Swaps program `name` into its pinned link, if there is one (a previous run).
    fn take_over(&mut self, name: &'static str) -> Result<bool, CaptureError> {
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
        let taken = pins::take_over(&path, fd.as_fd()).map_err(|e| CaptureError::Pin {
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
        let netns = std::fs::File::open(path).map_err(|source| CaptureError::Cgroup {
            path: PathBuf::from(path),
            source,
        })?;
        let name = program_names::SK_LOOKUP;
        if self.take_over(name)? {
            return Ok(());
        }
        let prog: &mut SkLookup = program(&mut self.ebpf, name)?;
        let id = prog
            .attach(netns)
            .map_err(|source| CaptureError::Program { name, source })?;
        if self.pins.is_some() {
            let link = prog
                .take_link(id)
                .map_err(|source| CaptureError::Program { name, source })?;
            self.pin(name, FdLink::from(link))?;
        }
        Ok(())
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

// === impl KernelMaps ===

impl KernelMaps {
    /// Each kernel counter of each program, summed over CPUs.
    pub fn counters(&self) -> Vec<(Program, Counter, u64)> {
        let mut all = Vec::with_capacity(Program::ALL.len() * Counter::ALL.len());
        for program in Program::ALL {
            for counter in Counter::ALL {
                let sum = self
                    .counters
                    .get(&counter_index(program, counter), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                all.push((program, counter, sum));
            }
        }
        all
    }

    /// `counter` summed over programs and CPUs.
    pub fn counter_total(&self, counter: Counter) -> u64 {
        self.counters()
            .into_iter()
            .filter(|(_, c, _)| *c == counter)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Entries in the (cookie, flow) original-destination maps: connects recorded but
    /// not yet re-keyed, and re-keyed but not yet accepted.
    pub fn orig_dst_entries(&self) -> (usize, usize) {
        (self.by_cookie.keys().count(), self.by_flow.keys().count())
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
    let settings = capture_settings(config);
    let name = map_names::CONFIG;
    let mut array: Array<&mut MapData, CaptureConfig> = map_mut(ebpf, name)?;
    array
        .set(0, settings, 0)
        .map_err(|source| CaptureError::Map { name, source })?;

    let name = map_names::PORT_RULES;
    let mut ports: HashMap<&mut MapData, u16, u32> = map_mut(ebpf, name)?;
    for (port, rule) in port_rules(config) {
        ports
            .insert(port, rule, 0)
            .map_err(|source| CaptureError::Map { name, source })?;
    }

    let name = map_names::INBOUND_PORTS;
    let mut inbound: HashMap<&mut MapData, u16, u32> = map_mut(ebpf, name)?;
    for (port, rule) in inbound_rules(config) {
        inbound
            .insert(port, rule, 0)
            .map_err(|source| CaptureError::Map { name, source })?;
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

/// The kernel's view of the proxy settings.
pub fn capture_settings(config: &Config) -> CaptureConfig {
    let mut flags = 0;
    if !config.capture.include_ports.is_empty() {
        flags |= capture_flags::INCLUDE_PORTS_ONLY;
    }
    if config.inbound.ports.is_empty() {
        flags |= capture_flags::INBOUND_ALL_PORTS;
    }
    if config.inbound.fail_closed {
        flags |= capture_flags::INBOUND_FAIL_CLOSED;
    }
    if config.capture.fail_open {
        flags |= capture_flags::OUTBOUND_FAIL_OPEN;
    }
    if !config.proxy.ipv6 {
        flags |= capture_flags::IPV6_OFF;
    }
    CaptureConfig {
        proxy_uid: config.proxy.uid,
        flags,
        outbound_ip4: u32::from_ne_bytes([127, 0, 0, 1]),
        outbound_ip6: crate::ebpf::orig_dst::words(std::net::Ipv6Addr::LOCALHOST.octets()),
        outbound_port: config.proxy.outbound_port,
        _pad: 0,
        inbound_enabled: u32::from(config.inbound.enabled),
    }
}

/// Local port → inbound rule bits: captured ports (when listed), exclusions, and the
/// sidecar's own ports (health, admin, listeners), which are never steered.
pub fn inbound_rules(config: &Config) -> BTreeMap<u16, u32> {
    use sidecar_common::inbound_rule::{CAPTURE, EXCLUDE};
    rule_map(
        (&config.inbound.ports, CAPTURE),
        (&config.inbound.exclude_ports, EXCLUDE),
        &config.own_ports(),
    )
}

/// Destination port → rule bits: configured exclusions and inclusions. The sidecar's
/// own ports are not excluded: its listeners are on loopback, which is never captured,
/// and excluding them for every destination would let `registry_only` be bypassed by
/// dialling any host on 15000, 15001, 15006 or 15020.
pub fn port_rules(config: &Config) -> BTreeMap<u16, u32> {
    let include = (config.capture.include_ports.as_slice(), port_rule::INCLUDE);
    rule_map(
        include,
        (&config.capture.exclude_ports, port_rule::EXCLUDE),
        &[],
    )
}

/// Port → bits: `listed` ports get their bit, `excluded` ports and `own` ports get the
/// exclusion bit (exclusion wins in the programs).
fn rule_map(listed: (&[u16], u32), excluded: (&[u16], u32), own: &[u16]) -> BTreeMap<u16, u32> {
    let mut rules = BTreeMap::new();
    for &port in listed.0 {
        *rules.entry(port).or_default() |= listed.1;
    }
    for &port in excluded.0.iter().chain(own) {
        *rules.entry(port).or_default() |= excluded.1;
    }
    rules
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
    fn own_ports_are_captured_outbound_and_never_steered_inbound() {
        let mut config = Config::default();
        config.capture.include_ports = vec![80];
        config.capture.exclude_ports = vec![22];
        let rules = port_rules(&config);
        assert_eq!(rules[&80], port_rule::INCLUDE);
        assert_eq!(rules[&22], port_rule::EXCLUDE);
        let inbound = inbound_rules(&config);
        for port in [15000, 15001, 15006, 15020] {
            assert!(!rules.contains_key(&port), "outbound port {port}");
            assert_eq!(
                inbound[&port],
                sidecar_common::inbound_rule::EXCLUDE,
                "inbound port {port}"
            );
        }
    }

    #[test]
    fn ipv6_off_is_a_kernel_flag() {
        let mut config = Config::default();
        assert_eq!(capture_settings(&config).flags & capture_flags::IPV6_OFF, 0);
        config.proxy.ipv6 = false;
        assert_ne!(capture_settings(&config).flags & capture_flags::IPV6_OFF, 0);
    }

    #[test]
    fn this_kernel_is_recent_enough() {
        check_kernel().expect("the build machines run Linux >= 5.14");
    }

    #[test]
    fn include_list_sets_the_flag() {
        let mut config = Config::default();
        let defaults = capture_settings(&config).flags;
        assert_eq!(defaults & capture_flags::INCLUDE_PORTS_ONLY, 0);
        // Inbound: every port, fail closed, unless configured otherwise.
        assert_eq!(
            defaults,
            capture_flags::INBOUND_ALL_PORTS | capture_flags::INBOUND_FAIL_CLOSED
        );
        config.capture.include_ports = vec![443];
        config.inbound.ports = vec![8080];
        config.inbound.fail_closed = false;
        assert_eq!(
            capture_settings(&config).flags,
            capture_flags::INCLUDE_PORTS_ONLY
        );
        let rules = inbound_rules(&config);
        assert_eq!(rules[&8080], sidecar_common::inbound_rule::CAPTURE);
        assert_eq!(rules[&15020], sidecar_common::inbound_rule::EXCLUDE);
        assert_eq!(
            capture_settings(&config).outbound_ip4.to_ne_bytes(),
            [127, 0, 0, 1]
        );
    }
}
