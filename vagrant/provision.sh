#!/usr/bin/env bash
# Provisions the dev VM: Rust (stable + nightly with rust-src), then `cargo xtask setup`, which
# installs LLVM 22, bpf-linker, iproute2 and iptables.
set -euxo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config git
if ! command -v rustup >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --default-toolchain stable
fi
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain install nightly --profile minimal --component rust-src
# LLVM 22 comes from apt.llvm.org on Debian 12; `cargo xtask setup` installs llvm-22-dev from
# whatever apt sources the machine has.
if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then
  curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg
  echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
    > /etc/apt/sources.list.d/llvm-22.list
  apt-get update
fi
cd /mesh
cargo xtask setup
# cgroup v2 is the default on Debian 12; the mesh also finds a hybrid layout's unified mount.
mount | grep -q ' type bpf ' || mount -t bpf bpf /sys/fs/bpf
echo "ready: vagrant ssh, then cd /mesh && sudo -E \$HOME/.cargo/bin/cargo xtask run"
