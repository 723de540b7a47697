#!/usr/bin/env bash
# Runs every fuzz target briefly (or the ones named), one after another.
#
#   fuzz/run.sh [seconds-per-target] [target...]
#
# Default 4 seconds per target (13 targets: about a minute, plus the build). Set FUZZ_RUNS=N to
# run each target for N executions instead of a time (the long runs: FUZZ_RUNS=10000000).
# Exits non-zero when a target finds a crash; the input is kept in fuzz/artifacts/<target>/
# and the libFuzzer log in fuzz/logs/<target>.log.
#
# FUZZ_SANITIZER=none builds without AddressSanitizer (several times faster, for the long runs;
# Rust's own bounds and overflow checks stay on). Default: address.
#
# Needs: the nightly toolchain and cargo-fuzz (see fuzz/README.md). The kernel object is not
# needed: MESH_SKIP_EBPF=1.
set -euo pipefail

cd "$(dirname "$0")"
secs="${1:-4}"
shift || true
export MESH_SKIP_EBPF=1

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# -a: debug assertions on (integer overflow panics). The same flags for build and run, so the
# run does not rebuild.
san=(-s "${FUZZ_SANITIZER:-address}")
cargo +nightly fuzz build -a "${san[@]}"

mkdir -p logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    if [ -n "${FUZZ_RUNS:-}" ]; then
        limit=(-runs="$FUZZ_RUNS")
    else
        limit=(-max_total_time="$secs")
    fi
    printf '%-22s ' "$t"
    if cargo +nightly fuzz run -a "${san[@]}" "$t" "corpus/$t" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
        >"logs/$t.log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || true)
        echo "ok (${runs:-?} executions)"
    else
        echo "FAILED: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]}" >&2
    exit 1
fi
