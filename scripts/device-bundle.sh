#!/usr/bin/env bash
# Builds what a GPU machine without Rust runs: the release binary and the GPU test binaries
# (`--features cuda`), stripped and xz-compressed into one folder, small enough to travel with
# the repository (about 55 MB). Usage, from anywhere:
#
#   scripts/device-bundle.sh [DIR]       # DIR defaults to .bin/bundle (git-ignored)
#
# DIR then holds philo.xz and one <name>.xz per GPU test binary (kernels, decode_graph, paged,
# engine, hf_parity); scripts/decode-acceptance.sh DIR runs them on the GPU machine. The tests
# find their fixtures under this checkout's path, which the acceptance script links to the
# repository's copy there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/.bin/bundle}")
cd "$repo"
eval "$(scripts/cuda-toolchain.sh)"
mkdir -p "$out"

pack() { # pack BINARY NAME
  strip -o "$out/$2" "$1"
  xz -9e -T1 -f "$out/$2"
  echo "$out/$2.xz $(du -h "$out/$2.xz" | cut -f1)" >&2
}

cargo build --release --features cuda --bin philo
pack target/release/philo philo

# package, test target, bundle name: the tests that run on the GPU with PHILO_CUDA_TESTS=1.
while read -r package test name; do
  exe=$(cargo test --release --features cuda -p "$package" --test "$test" --no-run \
    --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
  [ -n "$exe" ] || { echo "no test binary for $package/$test" >&2; exit 1; }
  pack "$exe" "$name"
done <<'EOF'
philo-kernels cuda kernels
philo-model decode_graph decode_graph
philo-model paged paged
philo-serve engine engine
philo hf_parity hf_parity
EOF
# Where the test binaries look for tests/fixtures (their CARGO_MANIFEST_DIR, compiled in), and
# the commit they were built from.
echo "$repo" > "$out/built_at"
git describe --always --dirty > "$out/commit"
