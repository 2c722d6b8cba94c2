//! Kernel programs of the sidecar. `connect4`/`connect6` redirect an application's TCP
//! connects to the proxy's outbound listener and remember where they were going;
//! `sock_ops` re-keys that memory by the connection's 4-tuple so the proxy can find it
//! from the socket it accepts.
#![no_std]
#![no_main]
// `atomic_xadd` for counters: the BPF target has no 64-bit atomic types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod counters;
mod ctx;
mod maps;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there are no panics; this only satisfies `no_std`.
    loop {}
}

/// Required by the kernel to use GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
