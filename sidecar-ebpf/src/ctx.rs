//! Reading program context fields the way the verifier accepts.

/// Reads an IPv6 address field of the context one word at a time: the verifier
/// rejects loads through a ctx pointer moved to the field's start, which is what an
/// array copy compiles to.
///
/// # Safety
/// `field` must point at a `[u32; 4]` inside a live program context.
#[inline(always)]
pub unsafe fn ip6_words(field: *const [u32; 4]) -> [u32; 4] {
    let base = field.cast::<u32>();
    // SAFETY: the caller guarantees four readable words at `field`.
    unsafe {
        [
            core::ptr::read_volatile(base),
            core::ptr::read_volatile(base.add(1)),
            core::ptr::read_volatile(base.add(2)),
            core::ptr::read_volatile(base.add(3)),
        ]
    }
}
