//! basin-lm: everything about the model that more than one pipeline stage needs.
//!
//! - [`architecture`]: the families basin runs (Llama, Mistral, Qwen2, Phi-3), read strictly
//!   from `config.json` or GGUF metadata, and the tensors each holds.
//! - [`llama`]: the decoder all of them share (trains and generates); [`weights`] loads it
//!   from GGUF or a Hugging Face directory, refusing any tensor mismatch, and saves it as the
//!   latter in the model's own layout; [`batch`] builds
//!   training batches and the masked loss; [`backprop`] is the loss and its gradients
//!   written out by hand for an f32 model, one pass over a CPU or a CUDA backend; [`generate`] decodes batches with a
//!   KV cache.
//! - [`model`]: a model opened for use (text side + weights + network), and replies to
//!   conversations in batches.
//! - [`tokenizer`]: Hugging Face tokenizers, loaded from `tokenizer.json` or built from a
//!   GGUF file's `tokenizer.ggml.*` metadata.
//! - [`chat`]: the conversation record and its rendering through the model's own Jinja
//!   chat template (or the Llama-2 `[INST]` template of Qi et al. 2023).
//! - [`source`]: opens a model given by path (GGUF file or Hugging Face directory) and
//!   returns its tokenizer and chat template.
//! - [`schema`]: the Parquet schema of prepared data, its writer and reader.
//! - [`artifacts`]: the files one stage writes and another reads, as serde types (the
//!   manifest, a run's config, run.json and metrics, scores, utility).
//! - [`config`]: TOML config files with `key=value` overrides from the command line.
//! - [`fsutil`]: sha256 and atomic (temp file + rename) writes.
//! - [`tiny`]: a tiny tokenizer and chat template for fast tests; [`testkit`]: the real
//!   assets tests need (a missing one fails in CI) and the count of tests that ran.
//! - [`provenance`]: the git commit recorded with every output; [`rng`]: seeded numbers;
//!   [`runlock`]: one process at a time in a run directory.

pub mod architecture;
pub mod artifacts;
pub mod backprop;
pub mod batch;
pub mod chat;
pub mod config;
pub mod decode;
pub mod fsutil;
pub mod generate;
pub mod gguf_meta;
pub mod llama;
pub mod memory;
pub mod model;
pub mod provenance;
pub mod rng;
pub mod runlock;
pub mod schema;
pub mod source;
pub mod testkit;
pub mod tiny;
pub mod tokenizer;
pub mod weights;
