# The mesh's image: meshd (agent, `meshd ca`), meshctl, and the mesh-cni plugin with its
# installer. Built by `cargo xtask image` (docker, podman or buildah).
#
# Stage 1 is the project's own build, as on a dev machine: stable Rust, LLVM 22 from
# apt.llvm.org, nightly with rust-src and bpf-linker (`cargo xtask setup --build-only`), then
# `cargo xtask build --release` (the kernel programs, then the workspace embedding them).
FROM docker.io/library/rust:1.95-bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
      > /etc/apt/sources.list.d/llvm-22.list \
 && apt-get update
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only
RUN cargo xtask build --release

# Stage 2: the Debian release the dev VM runs, with what the agent executes: nsenter
# (util-linux, in the base) and iptables-restore for the iptables fallback, ss (iproute2)
# for socket diagnostics, jq for the CNI installer.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 jq ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshd /src/target/release/meshctl /src/target/release/mesh-cni /usr/local/bin/
COPY deploy/image/install-cni.sh /usr/local/bin/install-cni
ENTRYPOINT ["/usr/local/bin/meshd"]
