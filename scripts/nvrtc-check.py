#!/usr/bin/env python3
"""Compiles every CUDA source of kernels/cuda/ as the launchers do at run time (NVRTC, for
sm_$CUDA_COMPUTE_CAP, bf16.cuh prepended; pass.cu and fused.cu once per element type, f32
and bf16; optim.cu with the exact options), so that a kernel that does not compile fails
the build here and not on the GPU machine. Needs libnvrtc (the CUDA toolkit, or the wheels
of scripts/build-cuda.sh) under $CUDA_HOME/lib or lib64."""
import ctypes
import glob
import os
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "cuda")
home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
found = sorted(
    p
    for d in ("lib", "lib64")
    for p in glob.glob(os.path.join(home, d, "libnvrtc.so*"))
    if "builtins" not in p and "alt" not in p
)
if not found:
    sys.exit(f"nvrtc-check: no libnvrtc under {home}/lib or lib64 (set CUDA_HOME)")
nvrtc = ctypes.CDLL(found[0])
arch = f"--gpu-architecture=sm_{os.environ.get('CUDA_COMPUTE_CAP', '90')}"
# kernels/src/cuda.rs: compile(); `exact` for the optimizer.
exact = ["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false"]


def compile_source(name, source, options):
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        sys.exit(f"nvrtc-check: could not create the program for {name}")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    failed = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    print(f"nvrtc-check: {name}: {'FAILED' if failed else 'ok'}")
    if failed:
        print(log.value.decode(), file=sys.stderr)
    return not failed


def read(name):
    with open(os.path.join(root, name)) as f:
        return f.read()


header = read("bf16.cuh")
ok = True
for name in ("pass.cu", "fused.cu"):
    ok &= compile_source(f"{name} (f32)", header + read(name), [arch])
    ok &= compile_source(f"{name} (bf16)", "#define ACT_BF16\n" + header + read(name), [arch])
ok &= compile_source("optim.cu", header + read("optim.cu"), [arch] + exact)
sys.exit(0 if ok else 1)
