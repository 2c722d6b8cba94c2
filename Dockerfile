# syntax=docker/dockerfile:1
# Builder: `cargo xtask dist`, the same command CI runs outside Docker (it builds the
# eBPF object, installing nightly's rust-src and a bpf-linker built against nightly's
# LLVM, then a release `sidecar`), so the image and the tested build cannot drift.
FROM rust:1.95-bookworm AS builder
# The nightly the eBPF crate is tested with (rustc 1.97.0-nightly, 2026-05-19).
ENV SIDECAR_NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "$SIDECAR_NIGHTLY" --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask dist --out /out

# Runtime: glibc and libgcc only, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
# Starts as root with only CAP_BPF, CAP_NET_ADMIN, CAP_SETUID, CAP_SETGID, CAP_SETPCAP
# and CAP_CHOWN (see deploy/kubernetes), attaches, then drops every capability and runs
# as UID 1337. Capabilities are only effective for root in a container, hence USER 0.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 15020
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["run", "--config", "/etc/sidecar/sidecar.yaml"]
