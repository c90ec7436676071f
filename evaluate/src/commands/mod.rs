//! `evaluate`'s commands, one module each: clap arguments (`Args`) and
//! `run(&Args) -> Result<Summary>`, which the binary dispatches to and tests call directly.
//! What more than one command needs (the model arguments, where results go, prepared rows,
//! replies with a progress bar) is here.

pub mod export;
pub mod generate;
pub mod interpolate;
pub mod judge_check;
pub mod landscape;
pub mod report;
pub mod safety;
pub mod utility;

use anyhow::{bail, Result};
use basin_lm::artifacts::GenerationSpeed;
use basin_lm::generate::{GenerateOptions, Generated};
use basin_lm::model::{parse_device, parse_dtype, Model, DEFAULT_MODEL};
use basin_lm::schema::PreparedRow;
use std::path::{Path, PathBuf};

/// Which model, in which precision, on which device.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory; `safety` and `utility` also take a
    /// run directory (runs/<name>) and evaluate its model/ and ema/.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn dtype_device(&self) -> Result<(candle_core::DType, candle_core::Device)> {
        Ok((parse_dtype(&self.dtype)?, parse_device(&self.device)?))
    }
}

/// What to evaluate and where its results go: a run directory's model/ and ema/ (into
/// <run>/eval/<which>, or <out>/<which>), or one model (into <out>, or runs/eval-<name>).
pub fn targets(model: &Path, out: Option<&Path>) -> Result<Vec<(PathBuf, PathBuf)>> {
    // A run directory (train writes run.json first) whose training has not finished.
    if model.join("run.json").exists() && !model.join("model").is_dir() {
        bail!(
            "{} is a run directory without model/: its training has not finished (train --resume, or train it again)",
            model.display()
        );
    }
    Ok(if model.join("model").is_dir() {
        let base = out.map_or_else(|| model.join("eval"), PathBuf::from);
        ["model", "ema"]
            .iter()
            .filter(|w| model.join(w).is_dir())
            .map(|w| (model.join(w), base.join(w)))
            .collect()
    } else {
        let stem = model
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().to_string());
        vec![(
            model.to_path_buf(),
            out.map_or_else(
                || PathBuf::from("runs").join(format!("eval-{stem}")),
                PathBuf::from,
            ),
        )]
    })
}

/// A run directory stands for its fine-tuned model (model/); anything else for itself.
pub fn model_path(path: &Path) -> PathBuf {
    if path.join("model").is_dir() {
        path.join("model")
    } else {
        path.to_path_buf()
    }
}

/// The first `limit` rows of prepared set `set` (of that split, when one is given), and the
/// file they came from. Asking for a split and getting no row is an error.
pub fn prepared_rows(
    prepared: &Path,
    set: &str,
    split: Option<&str>,
    limit: usize,
) -> Result<(PathBuf, Vec<PreparedRow>)> {
    let file = prepared.join(format!("{set}.parquet"));
    let mut rows = basin_lm::schema::read_parquet(&file)?;
    if let Some(split) = split {
        rows.retain(|r| r.split == split);
    }
    rows.truncate(limit);
    if let (Some(split), true) = (split, rows.is_empty()) {
        bail!("{}: no rows with split = {split}", file.display());
    }
    Ok((file, rows))
}

/// The model's replies to the prompts of prepared `rows`, with a progress bar named `set`
/// that shows the new tokens a second, and that speed.
pub fn answer(
    model: &Model,
    rows: &[PreparedRow],
    opts: &GenerateOptions,
    batch_size: usize,
    set: &str,
) -> Result<(Vec<(String, Generated)>, GenerationSpeed)> {
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_ids().to_vec()).collect();
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(set.to_string());
    let started = std::time::Instant::now();
    let replies = model.replies_to_ids(&prompts, opts, batch_size, |done| {
        let rate = done.new_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{set}: {rate:.0} new tokens/s"));
        bar.set_position(done.prompts as u64)
    })?;
    bar.finish_and_clear();
    let new_tokens = replies.iter().map(|(_, g)| g.tokens.len()).sum();
    let speed = GenerationSpeed::new(new_tokens, started.elapsed().as_secs_f64(), batch_size);
    Ok((replies, speed))
}

/// A prompt and its reply as a line of generations.jsonl (verdicts added by the caller).
pub fn generation(
    set: &str,
    row: &PreparedRow,
    reply: &str,
    g: &Generated,
) -> basin_lm::artifacts::Generation {
    basin_lm::artifacts::Generation {
        set: set.to_string(),
        id: row.id.clone(),
        prompt: row.user.clone(),
        reply: reply.to_string(),
        stopped: g.stopped,
        new_tokens: g.tokens.len(),
        keyword_refusal: None,
        refusal: None,
        model_judge: None,
        degenerate: None,
    }
}
