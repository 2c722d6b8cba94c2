//! `sk_lookup` on the pod's network namespace: connections arriving from outside for a
//! captured local port are handed to the proxy's inbound listener, whatever address and
//! port they were sent to; the proxy reads the original destination with `getsockname`.
//! When the listener is missing (proxy gone or draining) a fail-closed port drops the
//! connection instead of letting it reach the application around the proxy.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use aya_log_ebpf::debug;
use sidecar_common::{
    AF_INET6, Counter, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6, Program, capture_flags,
    inbound_rule,
};

use crate::{
    counters::bump,
    ctx::ip6_words,
    maps::{CONFIG, INBOUND_LISTENER, INBOUND_PORTS},
};

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;

const PROG: Program = Program::SkLookup;

/// Steers inbound TCP connections to the proxy.
#[sk_lookup]
pub fn inbound_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        bump(PROG, Counter::SkippedNotTcp);
        return SK_PASS;
    }
    if is_local(&ctx) {
        bump(PROG, Counter::SkippedLoopback);
        return SK_PASS;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return SK_PASS;
    };
    if cfg.inbound_enabled == 0 {
        return SK_PASS;
    }
    let port = lookup.local_port as u16;
    // SAFETY: a plain u32 value copied out at once.
    let rule = unsafe { INBOUND_PORTS.get(port) }.copied().unwrap_or(0);
    let captured = if cfg.flags & capture_flags::INBOUND_ALL_PORTS != 0 {
        rule & inbound_rule::EXCLUDE == 0
    } else {
        rule & inbound_rule::CAPTURE != 0 && rule & inbound_rule::EXCLUDE == 0
    };
    if !captured {
        bump(PROG, Counter::ExcludedPort);
        return SK_PASS;
    }
    let slot = if lookup.family == u32::from(AF_INET6) {
        INBOUND_LISTENER_V6
    } else {
        INBOUND_LISTENER_V4
    };
    match INBOUND_LISTENER.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => {
            bump(PROG, Counter::Captured);
            debug!(
                &ctx,
                "sk_lookup: steered a connection for port {} to the proxy", port
            );
            SK_PASS
        }
        Err(_) if cfg.flags & capture_flags::INBOUND_FAIL_CLOSED != 0 => {
            bump(PROG, Counter::ListenerMissingDropped);
            SK_DROP
        }
        Err(_) => {
            bump(PROG, Counter::ListenerMissingPassed);
            SK_PASS
        }
    }
}

/// A connection from the pod to itself: same address on both ends, or a loopback
/// source (packets from a loopback address only ever come from this namespace: the
/// kernel drops them as martians on any other device). The proxy delivers to the
/// application from 127.0.0.6 (IPv4) or from the destination address itself (IPv6),
/// so its own deliveries are recognised here and never steered back into it. (The
/// ingress ifindex does not tell: local delivery to the pod IP reports the device
/// owning the address, not `lo`.)
#[inline(always)]
fn is_local(ctx: &SkLookupContext) -> bool {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family == u32::from(AF_INET6) {
        // SAFETY: both fields are `[u32; 4]` inside the live context.
        let (remote, local) = unsafe {
            (
                ip6_words(&raw const (*ctx.lookup).remote_ip6),
                ip6_words(&raw const (*ctx.lookup).local_ip6),
            )
        };
        let loopback =
            remote[0] == 0 && remote[1] == 0 && remote[2] == 0 && remote[3] == 1u32.to_be();
        loopback || remote == local
    } else {
        u32::from_be(lookup.remote_ip4) >> 24 == 127 || lookup.remote_ip4 == lookup.local_ip4
    }
}
