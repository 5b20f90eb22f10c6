#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain from PyPI wheels (no system CUDA needed) and prints the
# environment `cargo build --features cuda` needs. Usage:
#   eval "$(scripts/cuda-toolchain.sh [DIR])"     # DIR defaults to .cuda in the repository
#   cargo build --release --features cuda
# The wheels are pinned to 13.0.x: PTX from a newer nvcc is rejected by driver 580.
# With a system CUDA toolkit instead, set CUDA_ROOT to it and CUDA_COMPUTE_CAP to your GPU's
# compute capability (89 for an RTX 4090, 90 for H100/H200) and skip this script.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${1:-$repo/.cuda}")
root="$dir/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 wheels into $dir ..." >&2
  python3 -m pip install -q --no-deps --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 >&2
fi
# NCCL for multi-GPU fine-tuning (`--features cuda,nccl`), only when asked: PHILO_NCCL=1.
nccl="$dir/nvidia/nccl"
if [ "${PHILO_NCCL:-0}" = 1 ] && [ ! -e "$nccl/lib/libnccl.so.2" ]; then
  echo "installing the NCCL wheel into $dir ..." >&2
  tmp=$(mktemp -d)
  python3 -m pip install -q --no-deps --target "$tmp" nvidia-nccl-cu13==2.32.6 >&2
  mkdir -p "$dir/nvidia" && rm -rf "$nccl" && mv "$tmp/nvidia/nccl" "$nccl" && rm -rf "$tmp"
fi
[ -e "$nccl/lib/libnccl.so.2" ] && ln -sf libnccl.so.2 "$nccl/lib/libnccl.so"
# Unversioned names for the linker (libcublas.so -> libcublas.so.13, ...).
for lib in "$root"/lib/lib*.so.*; do
  base=${lib##*/}
  plain="$root/lib/${base%%.so.*}.so"
  [ -e "$plain" ] || ln -s "$base" "$plain"
done
# The wheels carry no driver: a link stub of libcuda (soname libcuda.so.1) exporting the cu*
# symbols cudarc declares; the real one is loaded at run time on the GPU machine.
stub="$root/lib/stubs/libcuda.so"
if [ ! -e "$stub" ]; then
  mkdir -p "$root/lib/stubs"
  (cd "$repo" && cargo fetch -q) >&2
  cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys 2>/dev/null | sort -V | tail -1 || true)
  symbols=$( (grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*' "$cudarc_src" 2>/dev/null || true) | sort -u)
  [ -n "$symbols" ] || symbols="cuInit cuDriverGetVersion"
  {
    for s in $symbols; do echo "void $s(void) {}"; done
  } > "$root/lib/stubs/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib/stubs/stub.c"
  ln -sf libcuda.so "$root/lib/stubs/libcuda.so.1"
fi
cat <<ENV
export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib:$root/lib/stubs:$nccl/lib:\${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$root/lib:$nccl/lib:\${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-2}
ENV
