//! `sockops`: when a redirected socket sends its SYN (`TCP_CONNECT_CB`), its local port
//! is known; move its original destination from the cookie key to the 4-tuple key the
//! proxy can compute from the socket it accepts. This runs before the SYN leaves, so
//! the entry exists before the proxy can possibly accept the connection. The socket
//! then asks for state callbacks: when it closes, its entry is removed if the proxy
//! never took it (a connect aborted before accept), so the flow map never fills up
//! with the abandoned and needs no LRU eviction.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use sidecar_common::{AF_INET6, Counter, FlowKey, Program, SockAddr};

use crate::{
    counters::bump,
    ctx::ip6_words,
    maps::{CONFIG, ORIG_DST_BY_COOKIE, ORIG_DST_BY_FLOW},
};

const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

/// Re-keys original destinations of redirected connects.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&ctx),
        _ => {}
    }
    // 1 = the program ran fine; the kernel then uses the (unset) reply as-is.
    1
}

#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    // SAFETY: a sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once; a concurrent delete at worst yields a
    // stale copy of a destination that was right for this cookie.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        if to_outbound_listener(ctx) {
            // Redirected, but its entry is gone (the cookie map is LRU: evicted).
            bump(Program::SockOps, Counter::OrigDstRekeyMissing);
        }
        return;
    };
    let key = flow_key(ctx);
    match ORIG_DST_BY_FLOW.insert(key, orig, 0) {
        Ok(()) => {
            bump(Program::SockOps, Counter::OrigDstRekeyed);
            // Be told when this socket closes, to drop the entry if never taken. Add
            // the flag: the call replaces them all, and a CNI's program may have set
            // its own.
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        }
        Err(errno) => {
            bump(Program::SockOps, Counter::OrigDstRekeyFailed);
            warn!(
                ctx,
                "cannot re-key an original destination (error {})", errno
            );
        }
    }
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
}

/// A redirected socket closed: remove its entry if the proxy never took it.
#[inline(always)]
fn forget(ctx: &SockOpsContext) {
    if ORIG_DST_BY_FLOW.remove(flow_key(ctx)).is_ok() {
        bump(Program::SockOps, Counter::OrigDstAbandoned);
    }
}

/// Whether the socket is connecting to the proxy's outbound listener (127.0.0.1 or
/// `[::1]`, IPv4-mapped or not, at the outbound port): a redirected connect.
#[inline(always)]
fn to_outbound_listener(ctx: &SockOpsContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if remote_port(ctx.remote_port()) != cfg.outbound_port {
        return false;
    }
    // SAFETY: `ctx.ops` is the valid context the kernel passed in.
    let remote6 = unsafe { ip6_words(&raw const (*ctx.ops).remote_ip6) };
    if ctx.family() == u32::from(AF_INET6) {
        remote6 == cfg.outbound_ip6
            || (remote6[0] == 0
                && remote6[1] == 0
                && remote6[2] == V4_MAPPED_WORD
                && remote6[3] == cfg.outbound_ip4)
    } else {
        ctx.remote_ip4() == cfg.outbound_ip4
    }
}

/// The connection's 4-tuple from the app socket's side. An IPv6 socket connected to an
/// IPv4-mapped address is really an IPv4 connection (the proxy accepts it on its IPv4
/// listener), so it is keyed as IPv4. Its IPv6 source field is not filled in yet at this
/// point, but the IPv4 fields are.
#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    let local_port = ctx.local_port() as u16;
    let remote_port = remote_port(ctx.remote_port());
    // SAFETY: `ctx.ops` is the valid context the kernel passed in.
    let remote6 = unsafe { ip6_words(&raw const (*ctx.ops).remote_ip6) };
    let v6 = ctx.family() == u32::from(AF_INET6)
        && !(remote6[0] == 0 && remote6[1] == 0 && remote6[2] == V4_MAPPED_WORD);
    if v6 {
        FlowKey {
            // SAFETY: as above.
            src: SockAddr::v6(
                unsafe { ip6_words(&raw const (*ctx.ops).local_ip6) },
                local_port,
            ),
            dst: SockAddr::v6(remote6, remote_port),
        }
    } else {
        FlowKey {
            src: SockAddr::v4(ctx.local_ip4(), local_port),
            dst: SockAddr::v4(ctx.remote_ip4(), remote_port),
        }
    }
}

/// `bpf_sock_ops.remote_port` is in network byte order, and on little-endian kernels
/// the 16-bit port sits in the upper half of the u32 (the context rewrite shifts it).
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff {
        (raw >> 16) as u16
    } else {
        raw as u16
    };
    u16::from_be(be)
}
