# syntax=docker/dockerfile:1
# Builder: the same steps as `cargo xtask build-ebpf` + `cargo build --release`, so the
# image and a developer's build cannot drift (xtask installs rust-src and bpf-linker).
FROM rust:1.95-bookworm AS builder
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask build-ebpf \
 && cargo build --release --locked -p sidecar-user \
 && install -D -m 0755 target/release/sidecar /out/sidecar

# Runtime: glibc and libgcc only, no shell. Needs CAP_BPF, CAP_NET_ADMIN (and
# CAP_SYS_ADMIN for --netns) to attach; the proxy then runs as UID 1337.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
USER 0:0
EXPOSE 15020
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["run"]
