//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/sidecar-ebpf.o");
    let obj = std::env::var_os("SIDECAR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-env-changed=SIDECAR_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        panic!(
            "eBPF object not found at {}: run `cargo xtask build-ebpf` first (cargo xtask build/test/run do it for you)",
            obj.display()
        );
    }
    println!("cargo:rustc-env=SIDECAR_EBPF_OBJECT={}", obj.display());
    // Relative relocations packed (DT_RELR, glibc >= 2.36, the runtime image's): the
    // position-independent binary's 0.8 MB of `.rela.dyn`, all read at every start,
    // shrinks to a few KB.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
