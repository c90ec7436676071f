#!/usr/bin/env bash
# Builds basin's CUDA binaries (cargo feature `cuda`) into $CARGO_TARGET_DIR/release:
# train, evaluate and the benchmarks.
#
# With nvcc on PATH, that toolkit is used. Without one (developer and CI machines have no
# CUDA), CUDA 13.0 comes from NVIDIA's PyPI wheels in a venv; the linker gets unversioned
# names for the libraries and a stub libcuda.so whose only job is to satisfy the link (the
# GPU machine's driver provides the real one at run time). CUDA_COMPUTE_CAP defaults to 90
# (H100). Binaries built this way need the CUDA 13 runtime libraries where they run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if ! command -v nvcc >/dev/null 2>&1; then
  venv="${CUDA_VENV:-$HOME/.cache/basin/cuda13-venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  cuda="$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')"
  "$venv/bin/python" - "$cuda" <<'PY'
import glob, os, re, subprocess, sys
cuda = sys.argv[1]
lib = os.path.join(cuda, "lib")
# The link line names -lcublas, -lcudart, ...: point the plain names at the versioned files.
for name in ["cublas", "cublasLt", "cudart", "nvrtc", "curand"]:
    found = sorted(f for f in glob.glob(os.path.join(lib, f"lib{name}.so.*")) if "alt" not in f)
    link = os.path.join(lib, f"lib{name}.so")
    if found and not os.path.exists(link):
        os.symlink(os.path.basename(found[0]), link)
# A stub driver library exporting every cu* entry point of cuda.h (SONAME libcuda.so.1).
stub = os.path.join(lib, "libcuda.so")
if not os.path.exists(stub):
    header = subprocess.run(["gcc", "-E", "-I", os.path.join(cuda, "include"), "-x", "c", "-"],
                            input="#include <cuda.h>\n", capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"CUresult\s+(?:CUDAAPI\s+)?(cu\w+)\s*\(", header)))
    src = os.path.join(lib, "libcuda_stub.c")
    with open(src, "w") as f:
        f.writelines(f"int {n}(void) {{ return 999; }}\n" for n in names)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", stub, src], check=True)
PY
  export CUDA_HOME="$cuda" PATH="$cuda/bin:$PATH" LIBRARY_PATH="$cuda/lib:${LIBRARY_PATH:-}"
fi
nvcc --version | tail -1
# The kernels compiled as the launchers compile them at run time (NVRTC), every variant.
home="${CUDA_HOME:-/usr/local/cuda}"
CUDA_HOME="$home" LD_LIBRARY_PATH="$home/lib:$home/lib64:${LD_LIBRARY_PATH:-}" python3 scripts/nvrtc-check.py
# The stage binaries and the benchmarks (target/release/deps/{kernels,step}-*).
cargo build --release -p train -p evaluate -p basin-kernels \
  --features train/cuda,evaluate/cuda,basin-kernels/cuda --bins --bench kernels --bench step "$@"
# The device tests that scripts/stage-device.sh takes to the GPU with the step bench
# (target/release/deps/{pass_ops,fused,pass_device,decode_device,bf16_device}-*): the
# written-out pass's kernels and whole pass in f32 and bf16, decoding through its layers, the
# fused softmax / cross-entropy of the autograd path, and bf16 training against f32.
cargo build --release -p basin-kernels -p basin-lm -p train \
  --features basin-kernels/cuda,basin-lm/cuda,train/cuda \
  --test pass_ops --test fused --test pass_device --test decode_device --test bf16_device "$@"
