//! `cgroup/connect4` and `cgroup/connect6`: redirect an application's TCP connect to
//! the proxy's outbound listener, storing the original destination under the socket
//! cookie. Every path returns "allow" but one: a native IPv6 connect while the proxy
//! does not serve IPv6 is refused, since letting it through would leave the pod
//! uncaptured.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use sidecar_common::{Counter, KernelSettings, Program, SockAddr, capture_flags, port_rule};

use crate::{
    counters::bump,
    maps::{CONFIG, EXCLUDED_V4, EXCLUDED_V6, ORIG_DST_BY_COOKIE, PORT_RULES},
};

/// Return code that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return code that fails the syscall with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `::ffff:0:0/96`, the third word of an IPv4-mapped IPv6 address (network order).
const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

/// Redirects IPv4 TCP connects.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = capture_config(Program::Connect4, sa) else {
        return ALLOW;
    };
    let dst = SockAddr::v4(sa.user_ip4, u16::from_be(sa.user_port as u16));
    if should_capture_v4(Program::Connect4, cfg, dst.addr[0], dst.port)
        && proxy_listening(Program::Connect4, &ctx, cfg, false)
    {
        record(Program::Connect4, &ctx, &dst);
        debug!(
            &ctx,
            "connect4: captured connect to {:i}:{}",
            u32::from_be(dst.addr[0]),
            dst.port
        );
        sa.user_ip4 = cfg.outbound_ip4;
        sa.user_port = u32::from(cfg.outbound_port.to_be());
    }
    ALLOW
}

/// Redirects IPv6 TCP connects, including IPv4-mapped destinations (`::ffff:a.b.c.d`),
/// which run only this hook and get the IPv4 rules and an IPv4-mapped listener address.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `connect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = capture_config(Program::Connect6, sa) else {
        return ALLOW;
    };
    let ip6 = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        if should_capture_v4(Program::Connect6, cfg, ip6[3], port)
            && proxy_listening(Program::Connect6, &ctx, cfg, false)
        {
            record(Program::Connect6, &ctx, &SockAddr::v4(ip6[3], port));
            debug!(
                &ctx,
                "connect6: captured connect to ::ffff:{:i}:{}",
                u32::from_be(ip6[3]),
                port
            );
            sa.user_ip6[3] = cfg.outbound_ip4;
            sa.user_port = u32::from(cfg.outbound_port.to_be());
        }
    } else if is_local_v6(ip6) {
        bump(Program::Connect6, Counter::SkippedLoopback);
    } else if cfg.flags & capture_flags::IPV6_OFF != 0 {
        if port_allowed(Program::Connect6, cfg, port) && !excluded_v6(Program::Connect6, ip6) {
            bump(Program::Connect6, Counter::RefusedIpv6Off);
            return REFUSE;
        }
    } else if should_capture_v6(Program::Connect6, cfg, ip6, port)
        && proxy_listening(Program::Connect6, &ctx, cfg, true)
    {
        record(Program::Connect6, &ctx, &SockAddr::v6(ip6, port));
        debug!(&ctx, "connect6: captured connect to port {}", port);
        set_user_ip6(sa, cfg.outbound_ip6);
        sa.user_port = u32::from(cfg.outbound_port.to_be());
    }
    ALLOW
}

/// In fail-open mode, whether the proxy's outbound listener exists in this network
/// namespace (a socket lookup, as `bpf_sk_lookup_tcp` finds listeners): when it does
/// not, the connect is left alone and goes direct. In fail-closed mode (the default)
/// always true: the connect is redirected, and refused if nothing listens.
#[inline(always)]
fn proxy_listening(prog: Program, ctx: &SockAddrContext, cfg: &KernelSettings, v6: bool) -> bool {
    if cfg.flags & capture_flags::OUTBOUND_FAIL_OPEN == 0 {
        return true;
    }
    let found = if v6 {
        listener_v6(ctx, cfg)
    } else {
        listener_v4(ctx, cfg)
    };
    if !found {
        bump(prog, Counter::ListenerMissingPassed);
    }
    found
}

/// Looks up the IPv4 outbound listener. Separate functions per family keep each
/// stack tuple at a fixed offset: the verifier refuses pointer arithmetic that mixes
/// paths unless the loader has CAP_PERFMON, which the sidecar does not ask for.
#[inline(never)]
fn listener_v4(ctx: &SockAddrContext, cfg: &KernelSettings) -> bool {
    // Built field by field: `mem::zeroed` becomes a byte loop the verifier refuses.
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: cfg.outbound_ip4,
                daddr: cfg.outbound_ip4,
                sport: 0,
                dport: cfg.outbound_port.to_be(),
            },
        },
    };
    lookup(ctx, &mut tuple, 12)
}

/// Looks up the IPv6 outbound listener (see [`listener_v4`]).
#[inline(never)]
fn listener_v6(ctx: &SockAddrContext, cfg: &KernelSettings) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: cfg.outbound_ip6,
                daddr: cfg.outbound_ip6,
                sport: 0,
                dport: cfg.outbound_port.to_be(),
            },
        },
    };
    lookup(ctx, &mut tuple, 36)
}

/// Whether a TCP socket matches `tuple` in the current netns; releases it at once.
#[inline(always)]
fn lookup(ctx: &SockAddrContext, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    // SAFETY: a sock_addr context and a tuple of `size` bytes, as the helper expects;
    // a found socket is released right away.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.sock_addr.cast(),
            tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        // Decide from the helper's result, not the pointer: after the release the
        // verifier forbids reading the pointer's register again.
        bpf_sk_release(sk.cast()) == 0
    }
}

/// Writes the IPv6 address word by word: the verifier only accepts aligned 4-byte
/// stores into `user_ip6`, and a plain array assignment may become a `memmove`.
#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, ip6: [u32; 4]) {
    for (i, word) in ip6.into_iter().enumerate() {
        // SAFETY: `i < 4`, inside the context's `user_ip6` field.
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], word) };
    }
}

/// The capture settings, or `None` when this connect is not ours to capture
/// (not TCP, made by the proxy itself, or no config loaded yet).
#[inline(always)]
fn capture_config(prog: Program, sa: &bpf_sock_addr) -> Option<&'static KernelSettings> {
    if sa.type_ != SOCK_STREAM || (sa.protocol != IPPROTO_TCP && sa.protocol != 0) {
        bump(prog, Counter::SkippedNotTcp);
        return None;
    }
    let cfg = CONFIG.get(0)?;
    if cfg.outbound_port == 0 {
        return None;
    }
    // The low 32 bits are the UID. The proxy's upstream connects carry its UID, so they
    // are never redirected back into itself, even from inside this cgroup.
    if bpf_get_current_uid_gid() as u32 == cfg.proxy_uid {
        bump(prog, Counter::SkippedProxy);
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn should_capture_v4(prog: Program, cfg: &KernelSettings, ip: u32, port: u16) -> bool {
    // Loopback, and 0.0.0.0, which the kernel dials as the local host.
    if u32::from_be(ip) >> 24 == 127 || ip == 0 {
        bump(prog, Counter::SkippedLoopback);
        return false;
    }
    if !port_allowed(prog, cfg, port) {
        return false;
    }
    if EXCLUDED_V4.get(Key::new(32, ip.to_ne_bytes())).is_some() {
        bump(prog, Counter::ExcludedCidr);
        return false;
    }
    true
}

/// `::1`, or `::`, which the kernel dials as the local host.
#[inline(always)]
fn is_local_v6(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 1u32.to_be() || ip[3] == 0)
}

#[inline(always)]
fn should_capture_v6(prog: Program, cfg: &KernelSettings, ip: [u32; 4], port: u16) -> bool {
    port_allowed(prog, cfg, port) && !excluded_v6(prog, ip)
}

/// Whether `ip` is in an excluded network (counted when it is).
#[inline(always)]
fn excluded_v6(prog: Program, ip: [u32; 4]) -> bool {
    // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size and any bit pattern is valid.
    let bytes: [u8; 16] = unsafe { core::mem::transmute(ip) };
    if EXCLUDED_V6.get(Key::new(128, bytes)).is_some() {
        bump(prog, Counter::ExcludedCidr);
        return true;
    }
    false
}

#[inline(always)]
fn port_allowed(prog: Program, cfg: &KernelSettings, port: u16) -> bool {
    // SAFETY: the value is a plain u32 that nothing writes concurrently but the loader.
    let rule = unsafe { PORT_RULES.get(port) }.copied().unwrap_or(0);
    let include_only = cfg.flags & capture_flags::INCLUDE_PORTS_ONLY != 0;
    if port == 0
        || rule & port_rule::EXCLUDE != 0
        || (include_only && rule & port_rule::INCLUDE == 0)
    {
        bump(prog, Counter::ExcludedPort);
        return false;
    }
    true
}

/// Stores the original destination under the socket cookie. Capture proceeds even if
/// this fails: the proxy then finds no destination and refuses the connection, which
/// fails closed instead of letting traffic go around the proxy.
#[inline(always)]
fn record(prog: Program, ctx: &SockAddrContext, dst: &SockAddr) {
    bump(prog, Counter::Captured);
    // SAFETY: a sock_addr context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Err(errno) = ORIG_DST_BY_COOKIE.insert(cookie, dst, 0) {
        bump(prog, Counter::OrigDstStoreFailed);
        warn!(
            ctx,
            "cannot store the original destination (error {}): the proxy will refuse this connection",
            errno
        );
    }
}
