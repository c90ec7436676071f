//! The training run as plain data: configs/*.toml, then `--set key=value` overrides.

use basin_kernels::adamw::AdamWParams;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    pub dtype: String,
    pub device: String,
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
    /// Validation loss every N steps (0: only at the end), over at most `val_batches`.
    pub eval_every: usize,
    pub val_batches: usize,
    /// Checkpoint every N steps (0: never).
    pub checkpoint_every: usize,
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
            model: basin_lm::model::DEFAULT_MODEL.into(),
            data: vec!["data/prepared/dolly.parquet".into()],
            data_rows: Vec::new(),
            max_seq_len: 0,
            dtype: "f32".into(),
            device: "cpu".into(),
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
            eval_every: 0,
            val_batches: 8,
            checkpoint_every: 0,
        }
    }
}

impl TrainConfig {
    pub fn adamw(&self) -> AdamWParams {
        AdamWParams {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
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
        Ok(())
    }

    /// The learning rate at optimizer step `t` (1-based) of `total`.
    pub fn lr_at(&self, t: usize, total: usize) -> f64 {
        if t <= self.warmup_steps {
            return self.lr * t as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((t - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.schedule.as_str() {
            "linear" => floor + (self.lr - floor) * (1.0 - progress),
            "cosine" => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            _ => self.lr,
        }
    }
}
