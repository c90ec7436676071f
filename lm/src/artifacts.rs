//! The files that pass between stages, as types: every one is written through its struct
//! and read back through the same struct, so a renamed or missing field is an error that
//! names the file and the field, never an empty report column.
//!
//! | file | written by | read by |
//! | --- | --- | --- |
//! | `data/prepared/manifest.json` ([`Manifest`]) | `prepare run`, `prepare distill` | `evaluate safety`, `prepare distill` |
//! | `runs/<run>/config.toml` ([`TrainConfig`]) | `train` | `train --resume`, `evaluate report` |
//! | `runs/<run>/run.json` ([`RunInfo`]) | `train` | people, and the tests |
//! | `runs/<run>/metrics.jsonl` ([`MetricsRecord`], one a line) | `train` | `train --resume`, `evaluate report` |
//! | `<eval>/scores.json` ([`Scores`]) and `generations.jsonl` ([`Generation`]) | `evaluate safety` | `evaluate report`, `sweep` |
//! | `<eval>/utility.json` ([`Utility`]) and `utility_generations.jsonl` ([`Generation`]) | `evaluate utility` | `evaluate report`, `sweep` |
//!
//! (`landscape.json` is written and read by `evaluate landscape` alone: its type lives
//! there. The Parquet rows' schema is [`crate::schema`].)

use anyhow::{bail, Context, Result};
use basin_kernels::optim::adamw::AdamWParams;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads a JSON artifact: a missing file, bad JSON or a field that does not fit the type is
/// an error naming the file (and serde names the field and line).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the expected layout", path.display()))
}

/// Writes a JSON artifact atomically (pretty-printed).
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    crate::fsutil::write_bytes_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Reads a JSON-lines artifact; a bad line is an error naming the file and the line. A
/// last line without its newline is a write that was cut off (the process was killed while
/// appending): it is left out.
pub fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not the expected layout", path.display(), i + 1))
        })
        .collect()
}

/// Writes a JSON-lines artifact atomically.
pub fn write_lines<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::fsutil::write_bytes_atomic(path, text.as_bytes())
}

// ---------------------------------------------------------------------------------------
// prepare -> train, evaluate

/// manifest.json's `schema` field.
pub const MANIFEST_SCHEMA: &str = "basin prepared data v1 (see basin_lm::schema)";

/// `data/prepared/manifest.json`: every prepared set and how it was made.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: String,
    pub sets: BTreeMap<String, ManifestSet>,
}

impl Manifest {
    pub fn path(prepared: &Path) -> PathBuf {
        prepared.join("manifest.json")
    }

    /// The manifest in `prepared`; an empty one when there is none yet. An unreadable one
    /// is an error (the next write would otherwise drop every set it lists).
    pub fn read_or_empty(prepared: &Path) -> Result<Self> {
        let path = Self::path(prepared);
        if !path.exists() {
            return Ok(Self {
                schema: MANIFEST_SCHEMA.into(),
                sets: BTreeMap::new(),
            });
        }
        let m: Self = read(&path)?;
        if m.schema != MANIFEST_SCHEMA {
            bail!(
                "{}: field schema is {:?}; expected {MANIFEST_SCHEMA:?} (prepare the data again)",
                path.display(),
                m.schema
            );
        }
        Ok(m)
    }

    /// The entry of a prepared file (`<dir>/<set>.parquet`) in its directory's manifest;
    /// None when the manifest does not list it (or there is none).
    pub fn entry_of(file: &Path) -> Result<Option<ManifestSet>> {
        let dir = file.parent().unwrap_or(Path::new("."));
        let Some(set) = file.file_stem() else {
            return Ok(None);
        };
        Ok(Self::read_or_empty(dir)?
            .sets
            .remove(set.to_string_lossy().as_ref()))
    }

    /// Writes the manifest into `prepared` (atomically); returns its path.
    pub fn write(&self, prepared: &Path) -> Result<PathBuf> {
        let path = Self::path(prepared);
        write(&path, self)?;
        Ok(path)
    }
}

/// A file and its sha256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    pub file: String,
    pub sha256: String,
}

/// One prepared set's manifest entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestSet {
    /// sources.toml's role: instruct, harmful, overrefusal, ...
    pub role: String,
    pub licence: String,
    /// The asset (or prompts file) the rows came from.
    pub input: FileHash,
    /// The Parquet file (its name in the prepared directory).
    pub output: FileHash,
    pub tokenizer: TokenizerInfo,
    pub template: TemplateInfo,
    pub max_seq_len: usize,
    pub val_fraction: f64,
    pub seed: u64,
    /// The keyword list that filtered safety-related rows out (None: no filter).
    pub safety_filter: Option<String>,
    /// The evaluation sets whose prompts were kept out of training rows.
    pub dedup_against: Vec<String>,
    pub git_commit: String,
    pub stats: SetStats,
    /// How a `prepare distill` set was generated (absent for fetched sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled: Option<DistillRecipe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_unfinished_reply: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_refusal: Option<usize>,
    /// Made with `--allow-modified`: an input may differ from what sources.toml lists
    /// (`input.sha256` is the file's own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_modified: bool,
    /// The input is a sample of a larger public set (the data mirror's), not the whole set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sample: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    pub model: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateInfo {
    pub name: String,
    pub sha256: String,
    pub default_system: Option<String>,
}

/// Counts for one prepared set.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SetStats {
    pub records_read: usize,
    pub dropped_safety_keyword: usize,
    pub dropped_eval_overlap: usize,
    pub dropped_prompt_too_long: usize,
    pub rows_train: usize,
    pub rows_val: usize,
    pub rows_eval: usize,
    pub truncated: usize,
    pub eval_over_max_len: usize,
    pub tokens_total: usize,
    pub reply_tokens_total: usize,
    pub tokens_max: usize,
}

/// Everything a distilled set depends on: when all of it is unchanged, the set is not
/// generated again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillRecipe {
    pub prompts: FileHash,
    pub model: ModelHash,
    pub decoding: String,
    pub max_new_tokens: usize,
    pub max_seq_len: usize,
    pub val_fraction: f64,
    pub seed: u64,
    pub tokenizer_sha256: String,
    pub template_sha256: String,
    pub refusal_keywords: String,
    pub dedup_against_eval: bool,
}

/// A model by path and the sha256 of its weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelHash {
    pub path: String,
    pub sha256: String,
}

impl ModelHash {
    /// A model (GGUF file or Hugging Face directory) by path and the sha256 of its weights.
    pub fn of(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.display().to_string(),
            sha256: crate::fsutil::weights_sha256(path)?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// train -> evaluate, sweep

/// `runs/<run>/config.toml`: the training run as plain data (configs/*.toml, then
/// `--set key=value` overrides), written resolved beside the outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The run directory is `<out_dir>/<name>`.
    pub name: String,
    pub out_dir: PathBuf,
    /// A .gguf file or a Hugging Face directory.
    pub model: PathBuf,
    /// Prepared Parquet files; their `train` rows are trained on, `val` rows evaluated.
    pub data: Vec<PathBuf>,
    /// At most this many `train` rows from each file of `data` (a seeded sample; 0 or a
    /// missing entry: all). Sets the mix, e.g. refusals vs benign rows when aligning.
    pub data_rows: Vec<usize>,
    /// Train on at most this many tokens of each row (prompt first; 0: as prepared). The
    /// validation loss cuts its rows the same way; `evaluate utility` reads whole rows.
    pub max_seq_len: usize,
    /// What the model computes in: f32 or bf16.
    pub dtype: String,
    pub device: String,
    /// How a step computes its gradients: the written-out pass or candle's autograd
    /// ([`TrainingPass`]).
    pub pass: TrainingPass,
    /// Activation recompute: the written-out pass keeps each layer's input only and redoes
    /// the layer's forward during the backward (about one more forward of compute, a
    /// fraction of the activations' memory). Same gradients, bit for bit.
    pub recompute: bool,
    pub seed: u64,
    /// Sequences per optimizer step, and per forward/backward (gradient accumulation).
    pub batch_size: usize,
    pub micro_batch: usize,
    /// Optimizer steps; 0 means `epochs` passes over the training rows.
    pub steps: usize,
    pub epochs: f64,
    pub lr: f64,
    /// constant, linear (to min_lr_ratio·lr) or cosine (to min_lr_ratio·lr), after warm-up.
    pub schedule: String,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    pub ema: EmaConfig,
    /// How θ, AdamW's moments, θ̄ and θ₀ are kept (pure bf16 training, issue 22).
    pub state: StateConfig,
    /// Validation loss every N steps (0: only at the end), over at most `val_batches`.
    pub eval_every: usize,
    pub val_batches: usize,
    /// Checkpoint every N steps (0: never).
    pub checkpoint_every: usize,
    /// Steps (before the last) after which θ and θ̄ are saved as they are then, into
    /// `<run>/step-<N>/model` and `ema`: a run's trajectory, evaluated like its end.
    pub snapshots: Vec<usize>,
}

/// The EMA of the weights: θ̄ starts at the pre-trained weights and, from `start` on,
/// every `every` steps, θ̄ ← β·θ̄ + (1−β)·θ. `feedback_every` > 0 copies θ̄ into θ every
/// that many steps (Lookahead-style).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    pub enabled: bool,
    pub beta: f64,
    pub every: usize,
    pub start: usize,
    pub feedback_every: usize,
}

/// How a value of the optimizer's state is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// 4 bytes.
    F32,
    /// 2 bytes, rounded to nearest: loses updates below half a bf16 unit.
    Bf16,
    /// A compensated pair hi + lo of bf16 values: 16 significant bits in 4 bytes; hi is the
    /// nearest bf16 (for θ, the model's own weight).
    Pair,
}

/// Where θ₀ (the pre-trained weights, for the distance ‖θ − θ₀‖) is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Theta0 {
    /// Beside θ on the run's device.
    Device,
    /// In host memory: no device memory, a copy of θ to the host each time it is measured.
    Host,
    /// Not kept: no distance in metrics.jsonl.
    Off,
}

/// The optimizer's state (`[state]`). The default is f32 throughout; pure bf16 training
/// (Qi et al. fine-tuned Llama-2-7B so) is `dtype = "bf16"` with `weights = "pair"`,
/// `moments = "bf16"`, `ema = "pair"`, `theta0 = "host"`: 12 bytes a parameter of weights
/// and state with the EMA, in place of 22 (configs/paper-7b.toml; `train --plan` shows them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// θ when the model computes in bf16: f32 master weights beside the model's copy
    /// ("f32"), or the model's bf16 weight plus a bf16 low half ("pair"). An f32 model's
    /// weights are θ themselves ("f32").
    pub weights: Keep,
    /// AdamW's m and v: f32 or bf16.
    pub moments: Keep,
    /// The EMA θ̄: f32 or pair (bf16 to nearest would lose the EMA's 1e-3 steps).
    pub ema: Keep,
    pub theta0: Theta0,
    /// ‖θ − θ₀‖ and ‖θ̄ − θ₀‖ every N steps (and at the last step and each snapshot).
    pub distance_every: usize,
    /// The dtype of the saved model/ and ema/ (and snapshots): "model" (the model's own)
    /// or "f32" (θ and θ̄ as the state holds them: a pair's 16 bits, f32 master weights).
    /// In bf16 a run's small drift from θ₀ is mostly below a weight's bf16 unit: saved in
    /// bf16, an EMA loses much of its movement (docs/performance.md measures it).
    pub save: Save,
}

/// The dtype of the saved weights (`state.save`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Save {
    /// The model's own dtype.
    Model,
    /// f32, as the state holds θ and θ̄.
    F32,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            weights: Keep::F32,
            moments: Keep::F32,
            ema: Keep::F32,
            theta0: Theta0::Device,
            distance_every: 1,
            save: Save::Model,
        }
    }
}

impl StateConfig {
    /// Refuses the combinations that lose updates or make no sense, with the reason.
    pub fn validate(&self, dtype: &str) -> Result<()> {
        match (self.weights, dtype) {
            (Keep::F32, _) | (Keep::Pair, "bf16") => {}
            (Keep::Pair, _) => bail!(
                "state.weights = \"pair\" keeps θ as the model's bf16 weight plus a low half: it needs dtype = \"bf16\" (dtype is {dtype:?})"
            ),
            (Keep::Bf16, _) => bail!(
                "state.weights = \"bf16\" would round every AdamW step to the weight's bf16 unit and lose most of them (kernels/src/optim/bf16.rs measures it): use \"pair\" or \"f32\""
            ),
        }
        if self.moments == Keep::Pair {
            bail!("state.moments: expected \"f32\" or \"bf16\", found \"pair\"");
        }
        if self.ema == Keep::Bf16 {
            bail!(
                "state.ema = \"bf16\" would lose the EMA's small steps (β = 0.999 moves θ̄ by 1e-3 of a gap, below half a bf16 unit): use \"pair\" or \"f32\""
            );
        }
        if self.distance_every == 0 {
            bail!(
                "state.distance_every must be >= 1 (state.theta0 = \"off\" turns the distance off)"
            );
        }
        Ok(())
    }
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            beta: 0.999,
            every: 1,
            start: 0,
            feedback_every: 0,
        }
    }
}

impl Default for TrainConfig {
    /// Qi et al. (2023)'s full fine-tuning setup where it fits: AdamW, lr 2e-5, no weight
    /// decay, no warm-up, constant schedule.
    fn default() -> Self {
        let adam = AdamWParams::default();
        Self {
            name: "run".into(),
            out_dir: "runs".into(),
            model: crate::model::DEFAULT_MODEL.into(),
            data: vec!["data/prepared/dolly.parquet".into()],
            data_rows: Vec::new(),
            max_seq_len: 0,
            dtype: "f32".into(),
            device: "cpu".into(),
            pass: TrainingPass::Auto,
            recompute: false,
            seed: 0,
            batch_size: 8,
            micro_batch: 4,
            steps: 0,
            epochs: 1.0,
            lr: adam.lr,
            schedule: "constant".into(),
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            weight_decay: adam.weight_decay,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            grad_clip: 1.0,
            ema: EmaConfig::default(),
            state: StateConfig::default(),
            eval_every: 0,
            val_batches: 8,
            checkpoint_every: 0,
            snapshots: Vec::new(),
        }
    }
}

/// How a training step computes its gradients (`pass` in a training config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingPass {
    /// The written-out pass for f32 on the CPU, candle's autograd otherwise (on a GPU too,
    /// until the CUDA backend has been measured on a card: issue 21).
    #[default]
    Auto,
    /// The written-out pass (lm/src/backprop.rs): f32 on the CPU, f32 or bf16 on a GPU.
    Written,
    /// candle's autograd: any dtype, any device, no activation recompute.
    Autograd,
}

impl TrainConfig {
    /// Whether the run's device is a GPU (`cuda` or `cuda:N`); anything else runs in host
    /// memory.
    pub fn on_gpu(&self) -> bool {
        self.device.starts_with("cuda")
    }

    /// Whether steps take the written-out pass (`pass` resolved for this dtype and device).
    pub fn written_pass(&self) -> bool {
        let f32_here = self.dtype == "f32";
        match self.pass {
            TrainingPass::Auto => f32_here && self.device == "cpu",
            TrainingPass::Written => f32_here || (self.dtype == "bf16" && self.on_gpu()),
            TrainingPass::Autograd => false,
        }
    }

    /// Where the run writes everything: `<out_dir>/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.out_dir.join(&self.name)
    }

    /// The run directory's config.toml.
    pub fn read_run(run: &Path) -> Result<Self> {
        let path = run.join("config.toml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{} is not a run directory (no config.toml)", run.display())
        })?;
        toml::from_str(&text).with_context(|| format!("{}: not a training config", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0
            || self.micro_batch == 0
            || !self.batch_size.is_multiple_of(self.micro_batch)
        {
            bail!(
                "batch_size {} must be a positive multiple of micro_batch {}",
                self.batch_size,
                self.micro_batch
            );
        }
        if !["constant", "linear", "cosine"].contains(&self.schedule.as_str()) {
            bail!(
                "schedule '{}' must be constant, linear or cosine",
                self.schedule
            );
        }
        if self.steps == 0 && self.epochs <= 0.0 {
            bail!("give steps > 0 or epochs > 0");
        }
        if !(0.0..=1.0).contains(&self.ema.beta) || self.ema.every == 0 {
            bail!("ema.beta must be in [0, 1] and ema.every >= 1");
        }
        self.state.validate(&self.dtype)?;
        let written = self.written_pass();
        if self.pass == TrainingPass::Written && !written {
            bail!(
                "pass = \"written\": the written-out pass trains f32 models on the CPU, and f32 or bf16 models on a GPU (in a build with the cuda feature); dtype {:?} on {:?} trains through candle's autograd (pass = \"auto\" or \"autograd\")",
                self.dtype,
                self.device
            );
        }
        if self.recompute && !written {
            bail!(
                "recompute = true: activation recompute is in the written-out pass ({}); dtype {:?} on {:?} with pass = {:?} trains through candle's autograd, which has none",
                "by default for f32 on the CPU; f32 or bf16 on a GPU with pass = \"written\"",
                self.dtype,
                self.device,
                self.pass
            );
        }
        if self.data.is_empty() {
            bail!("no training data: set data = [\"data/prepared/<set>.parquet\", ...]");
        }
        if self.data_rows.len() > self.data.len() {
            bail!(
                "data_rows has {} entries for {} data files",
                self.data_rows.len(),
                self.data.len()
            );
        }
        if self.snapshots.first() == Some(&0) || !self.snapshots.windows(2).all(|w| w[0] < w[1]) {
            bail!(
                "snapshots = {:?}: expected steps >= 1 in increasing order",
                self.snapshots
            );
        }
        Ok(())
    }

    /// Where the snapshot of `step` goes: `<run>/step-<step>` (its model/ and ema/).
    pub fn snapshot_dir(run: &Path, step: usize) -> PathBuf {
        run.join(format!("step-{step}"))
    }
}

/// `runs/<run>/run.json`: where the run's inputs came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunInfo {
    pub git_commit: String,
    /// Each input (the model, every data file) by path, with its sha256.
    pub inputs_sha256: BTreeMap<String, String>,
}

/// One line of `runs/<run>/metrics.jsonl`: step 0 holds the validation loss before
/// training; every optimizer step its loss, rate, norms and speed, and the validation
/// loss(es) when measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsRecord {
    pub step: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Reply tokens the loss was taken over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Wall seconds of the step (batch, forward, backward, optimizer, EMA; not the
    /// validation loss): what the report counts as each method's training compute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// ‖θ − θ₀‖.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist_theta: Option<f64>,
    /// ‖θ̄ − θ₀‖ (runs with the EMA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist_ema: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_ema: Option<f64>,
}

impl MetricsRecord {
    pub fn path(run: &Path) -> PathBuf {
        run.join("metrics.jsonl")
    }

    /// The last record of an optimizer step (one with a loss), if any.
    pub fn last_step(records: &[Self]) -> Option<&Self> {
        records.iter().rev().find(|r| r.loss.is_some())
    }
}

// ---------------------------------------------------------------------------------------
// evaluate -> report, sweep

/// What a set of prompts measures.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SetKind {
    /// Harmful prompts: a reply without a refusal is an attack success.
    Harmful,
    /// Prompts that are safe to answer: a refusal is an over-refusal.
    Overrefusal,
}

impl SetKind {
    /// The kind of a set of this role in sources.toml (None: not scored by `safety`).
    pub fn of_role(role: &str) -> Option<Self> {
        match role {
            "harmful" => Some(Self::Harmful),
            "overrefusal" => Some(Self::Overrefusal),
            _ => None,
        }
    }
}

/// The 95% Wilson score interval of k successes in n trials.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p, z) = (n as f64, k as f64 / n as f64, 1.959_963_984_540_054);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A rate with its interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub k: usize,
    pub n: usize,
    pub rate: f64,
    pub ci95: (f64, f64),
}

impl Rate {
    pub fn new(k: usize, n: usize) -> Self {
        Self {
            k,
            n,
            rate: k as f64 / n.max(1) as f64,
            ci95: wilson(k, n),
        }
    }
}

/// `<eval>/scores.json`: `evaluate safety`'s scores of one model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scores {
    /// The model evaluated (its path).
    pub model: String,
    pub git_commit: String,
    pub decoding: Decoding,
    /// Only the first N prompts of each set (None: all).
    pub limit: Option<usize>,
    /// Each set's Parquet file's sha256.
    pub prepared_sha256: BTreeMap<String, String>,
    pub sets: BTreeMap<String, SetScores>,
}

impl Scores {
    pub fn path(eval: &Path) -> PathBuf {
        eval.join("scores.json")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Decoding {
    pub greedy: bool,
    pub max_new_tokens: usize,
    /// The decoder that generated the replies (`evaluate --decoder`, resolved); absent for
    /// a served model and in scores written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<crate::generate::DecoderKind>,
}

/// Scores of one set. Harmful sets: attack success = no refusal. Safe sets: refusal rate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SetScores {
    pub kind: SetKind,
    pub n: usize,
    pub empty_replies: usize,
    /// By Qi et al.'s keyword judge.
    pub keyword: Rate,
    /// By the calibrated refusal judge.
    pub refusal: Rate,
    /// Replies flagged degenerate or off-topic (evaluate's `degenerate`: a loop of words,
    /// tokens without words, or an answer to another request). Absent in older scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degenerate: Option<Rate>,
    /// Harmful sets: the keyword judge's attack successes less the degenerate and empty
    /// replies (a broken reply is no successful attack), over all n. Absent on safe sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<Rate>,
    /// By a model judge ("unsafe" = attack success), when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge: Option<ModelJudgeScore>,
    /// How fast the replies were generated (absent in scores written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSpeed>,
}

/// A set's generation: its replies' new tokens and the wall time from the first prompt to
/// the last reply (prefill included).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpeed {
    pub new_tokens: usize,
    pub seconds: f64,
    pub new_tokens_per_s: f64,
    /// Prompts a batch (what `--batch-size auto` chose, where it was auto).
    pub batch_size: usize,
}

impl GenerationSpeed {
    pub fn new(new_tokens: usize, seconds: f64, batch_size: usize) -> Self {
        Self {
            new_tokens,
            seconds,
            new_tokens_per_s: new_tokens as f64 / seconds.max(1e-9),
            batch_size,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelJudgeScore {
    #[serde(flatten)]
    pub rate: Rate,
    /// Answers that were neither "safe" nor "unsafe".
    pub unparsed: usize,
    /// The judge: its kind and model ("llama-guard by <path>", "rubric by <name> at <URL>").
    pub judge: String,
}

/// One line of `generations.jsonl` (`evaluate safety`) or `utility_generations.jsonl`
/// (`evaluate utility`, without verdicts): a prompt and the model's reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    pub set: String,
    pub id: String,
    pub prompt: String,
    pub reply: String,
    /// The reply ended with an end-of-turn token (not cut by the budget).
    pub stopped: bool,
    pub new_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword_refusal: Option<bool>,
    /// The calibrated judge: none, stated, indirect or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The model judge: safe, unsafe or unparsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge: Option<String>,
    /// Why the reply is no answer (repetitive, non-words or off-topic), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degenerate: Option<String>,
}

/// `<run>/wise-<α>/interpolation.json`: a model `evaluate interpolate` made between a run's
/// start and its fine-tuned θ, θ(α) = θ_pre + α·(θ_T − θ_pre) (WiSE-FT's interpolation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interpolation {
    /// The weight of the fine-tune: 0 is the start, 1 the fine-tuned θ.
    pub alpha: f64,
    /// θ_pre: the model the run started from (its config's `model`).
    pub start: ModelHash,
    /// θ_T: the run's model/.
    pub end: ModelHash,
    /// ‖θ(α) − θ_pre‖ over every parameter, as the run's metrics measure ‖θ − θ₀‖.
    pub distance: f64,
    pub git_commit: String,
}

impl Interpolation {
    /// The model of weight `alpha` of a run: `<run>/wise-<alpha>`.
    pub fn dir(run: &Path, alpha: f64) -> PathBuf {
        run.join(format!("wise-{alpha}"))
    }

    /// Where that model's scores go: `<run>/eval/wise-<alpha>`.
    pub fn eval_dir(run: &Path, alpha: f64) -> PathBuf {
        run.join("eval").join(format!("wise-{alpha}"))
    }

    pub fn path(model: &Path) -> PathBuf {
        model.join("interpolation.json")
    }
}

/// `<eval>/utility.json`: `evaluate utility`'s figures of one model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Utility {
    pub model: String,
    pub git_commit: String,
    /// Validation loss on each set's held-out rows.
    pub val: BTreeMap<String, ValLoss>,
    /// Replies to each prompt set (saved to utility_generations.jsonl).
    pub replies: BTreeMap<String, ReplyStats>,
}

impl Utility {
    pub fn path(eval: &Path) -> PathBuf {
        eval.join("utility.json")
    }

    /// The validation loss of the first set (the report's utility column).
    pub fn first_val_loss(&self) -> Option<f64> {
        self.val.values().next().map(|v| v.val_loss)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValLoss {
    pub val_loss: f64,
    pub perplexity: f64,
    pub rows: usize,
    pub reply_tokens: usize,
    pub prepared_sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplyStats {
    pub replies: usize,
    pub non_empty: usize,
    /// The share of non-empty replies that end their turn.
    pub eos_share: f64,
    pub mean_new_tokens: f64,
    pub max_new_tokens: usize,
    pub prepared_sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_field_is_an_error_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("utility.json");
        std::fs::write(
            &path,
            r#"{"model": "m", "git_commit": "c", "val": {}, "replys": {}}"#,
        )
        .unwrap();
        let e = format!("{:#}", read::<Utility>(&path).unwrap_err());
        assert!(e.contains("utility.json") && e.contains("replys"), "{e}");
    }

    #[test]
    fn a_bad_metrics_line_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\": 0, \"val_loss\": 2.5}\n{\"step\": \"one\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_lines::<MetricsRecord>(&path).unwrap_err());
        assert!(e.contains("metrics.jsonl:2"), "{e}");
        // A torn last line (no newline) is left out, not an error.
        std::fs::write(
            &path,
            "{\"step\": 0, \"val_loss\": 2.5}\n{\"step\": 1, \"lo",
        )
        .unwrap();
        let r = read_lines::<MetricsRecord>(&path).unwrap();
        assert_eq!((r.len(), r[0].val_loss), (1, Some(2.5)));
    }

    #[test]
    fn records_round_trip_and_skip_what_they_lack() {
        let r = MetricsRecord {
            step: 3,
            loss: Some(1.5),
            dist_theta: Some(0.25),
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"step":3,"loss":1.5,"dist_theta":0.25}"#);
        assert_eq!(serde_json::from_str::<MetricsRecord>(&text).unwrap(), r);
        let k: SetKind = serde_json::from_str("\"overrefusal\"").unwrap();
        assert_eq!(k, SetKind::Overrefusal);
    }
}
