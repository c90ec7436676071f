//! The training stage: full fine-tuning with AdamW and the parameter-space EMA.
//!
//! - [`config`]: the run as plain data (TOML + overrides);
//! - [`data`]: training rows in a seeded order per epoch;
//! - [`optim`]: the optimizer's one home — learning-rate schedule, clipping, AdamW's
//!   constants, the EMA's schedule and feedback, as one step struct;
//! - [`state`]: master weights, AdamW moments, the EMA, checkpoints;
//! - [`plan`]: the memory a run needs, part by part (`train --plan`), and the refusal of a
//!   run that would not fit;
//! - [`sweep`]: grids of runs as data (configs/all.toml, configs/paper.toml), Slurm scripts;
//! - [`experiment`]: running a sweep (the `sweep` binary): stage 0, the points, the report,
//!   with one skip-if-done rule;
//! - [`run`]: the loop — batch, forward, backward, clip, step, EMA, log, checkpoint.

pub mod config;
pub mod data;
pub mod experiment;
pub mod optim;
pub mod plan;
pub mod state;
pub mod sweep;

use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{MetricsRecord, RunInfo, Save};
use basin_lm::backprop::{loss_and_grads, Route};
use basin_lm::batch::Batch;
use basin_lm::fsutil::{sha256_file, write_bytes_atomic};
use basin_lm::model::{parse_device, parse_dtype, Model};
use basin_lm::schema::PreparedRow;
use config::TrainConfig;
use data::{next_rows, DataPosition, Dataset};
use serde::{Deserialize, Serialize};
use state::{TrainState, Weights};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a checkpoint holds besides the tensors.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    step: usize,
    position: DataPosition,
    config: TrainConfig,
}

/// Why `train` stopped early on SIGTERM/SIGINT (the checkpoint is written): the binaries
/// exit with [`Interrupted::EXIT_CODE`] so a sweep or a Slurm script can tell it from a
/// failure.
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub total: usize,
    pub checkpoint: PathBuf,
}

impl Interrupted {
    /// EX_TEMPFAIL: run the same command again (`--resume` for train) to continue.
    pub const EXIT_CODE: i32 = 75;
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "interrupted at step {} of {}; the checkpoint is in {}: --resume continues",
            self.step,
            self.total,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// A flag that SIGTERM and SIGINT set (the process is not stopped by them).
pub fn stop_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag.clone())
            .context("cannot install the SIGTERM/SIGINT handler")?;
    }
    Ok(flag)
}

pub struct Options {
    pub resume: bool,
    pub progress: bool,
    /// Abort the process (as `kill -9` would) right after this step: for the resume test.
    pub crash_after: Option<usize>,
    /// Plan for this much device memory (GiB) in place of the GPU's free memory.
    pub memory_gib: Option<f64>,
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub final_val_loss: Option<f64>,
    pub first_val_loss: Option<f64>,
}

/// A row's length in training: cut to `max_len` tokens when that is > 0.
fn seq_len(row: &PreparedRow, max_len: usize) -> usize {
    if max_len > 0 {
        row.input_ids.len().min(max_len)
    } else {
        row.input_ids.len()
    }
}

/// Rows as training examples, each cut to [`seq_len`].
fn examples<'a>(rows: &[&'a PreparedRow], max_len: usize) -> Vec<(&'a [u32], usize)> {
    rows.iter()
        .map(|r| {
            let (ids, prompt) = r.example();
            (&ids[..seq_len(r, max_len)], prompt)
        })
        .collect()
}

/// A training batch of rows cut to [`seq_len`].
fn batch_of(rows: &[&PreparedRow], pad: u32, model: &Model, max_len: usize) -> Result<Batch> {
    let r = examples(rows, max_len);
    Batch::new(&r, pad, model.llama.dtype(), model.llama.device())
}

/// Validation loss: the token-weighted mean over micro-batches of `rows`, cut as training
/// cuts its rows (the same objective, and no forward pass over hundreds of tokens that
/// training never sees).
fn mean_loss(model: &Model, rows: &[&PreparedRow], config: &TrainConfig, pad: u32) -> Result<f64> {
    let r = examples(rows, config.max_seq_len);
    Ok(basin_lm::batch::mean_loss(&model.llama, &r, config.micro_batch, pad)?.0)
}

/// Runs (or resumes) training as `config` says; writes everything under the run directory.
pub fn run(config: &TrainConfig, opts: &Options) -> Result<Summary> {
    config.validate()?;
    plan::check_fits(config, opts.memory_gib)?;
    let run_dir = config.run_dir();
    // Before anything in the run directory is read, deleted or written.
    let _lock = basin_lm::runlock::RunLock::acquire(&run_dir, "train")?;
    // SIGTERM/SIGINT (preemption, Ctrl-C) end the current step, then checkpoint and stop.
    let stop = stop_flag()?;
    let ckpt_dir = run_dir.join("checkpoint");
    let device = parse_device(&config.device)?;
    let model = Model::open(&config.model, parse_dtype(&config.dtype)?, &device)?;
    let pad = model.text.tokenizer.eos_id().unwrap_or(0);
    let mut data = Dataset::load(&config.data, &config.data_rows, config.seed)?;
    if config.max_seq_len > 0 {
        // A row whose prompt fills max_seq_len has no reply token left to learn from.
        let before = data.train.len();
        data.train
            .retain(|r| (r.prompt_len as usize) < config.max_seq_len);
        if data.train.is_empty() {
            bail!(
                "max_seq_len = {}: every training row's prompt is at least that long, so no reply token is left to train on",
                config.max_seq_len
            );
        }
        if data.train.len() < before {
            eprintln!(
                "max_seq_len = {}: {} of {before} training rows dropped (prompt too long)",
                config.max_seq_len,
                before - data.train.len()
            );
        }
    }
    let val: Vec<&PreparedRow> = data
        .val
        .iter()
        .take(config.val_batches * config.micro_batch)
        .collect();
    let total = if config.steps > 0 {
        config.steps
    } else {
        ((config.epochs * data.train.len() as f64) / config.batch_size as f64).ceil() as usize
    };
    if let Some(&last) = config.snapshots.last().filter(|&&s| s >= total) {
        bail!(
            "snapshots: step {last} is not before the run's last step ({total}); the end is saved anyway"
        );
    }
    let mut state = TrainState::new(&model.varmap, config.ema.enabled, &config.state)?;

    let (mut step, mut pos) = (0, DataPosition::default());
    if opts.resume {
        let text = std::fs::read_to_string(ckpt_dir.join("progress.json"))
            .with_context(|| format!("no checkpoint to resume in {}", ckpt_dir.display()))?;
        let saved: Progress = serde_json::from_str(&text)?;
        if &saved.config != config {
            bail!(
                "{}: the checkpoint was made with a different config; resume with the same one",
                ckpt_dir.display()
            );
        }
        state.restore(&ckpt_dir.join("state.safetensors"))?;
        (step, pos) = (saved.step, saved.position);
    } else {
        std::fs::create_dir_all(&run_dir)?;
        write_provenance(config, &run_dir)?;
    }
    // A fresh run starts anew (outputs of an earlier run of the same name go); a resumed
    // one drops the metrics of the steps after the checkpoint, which it replays.
    let metrics_path = run_dir.join("metrics.jsonl");
    let kept: Vec<MetricsRecord> = if opts.resume {
        let mut kept: Vec<MetricsRecord> = basin_lm::artifacts::read_lines(&metrics_path)?;
        kept.retain(|r| r.step <= step);
        kept
    } else {
        // What an earlier run left derives from its weights: its scores, snapshots and
        // interpolations would pass for this run's.
        for stale in ["checkpoint", "model", "ema", "eval"] {
            let _ = std::fs::remove_dir_all(run_dir.join(stale));
        }
        for entry in std::fs::read_dir(&run_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("step-") || name.starts_with("wise-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Vec::new()
    };
    basin_lm::artifacts::write_lines(&metrics_path, &kept)?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)?;

    let first_val = if step == 0 {
        let v = (!val.is_empty())
            .then(|| mean_loss(&model, &val, config, pad))
            .transpose()?;
        if let Some(v) = v {
            let record = MetricsRecord {
                step: 0,
                val_loss: Some(v),
                ..Default::default()
            };
            writeln!(metrics, "{}", serde_json::to_string(&record)?)?;
        }
        v
    } else {
        kept.first().and_then(|r| r.val_loss)
    };
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(step as u64);
    let mut last_val = first_val;
    let route = if config.written_pass() {
        Route::Written {
            recompute: config.recompute,
        }
    } else {
        Route::Autograd
    };
    while step < total {
        let started = Instant::now();
        let rows = next_rows(&data.train, &mut pos, config.batch_size, config.seed);
        let batches: Vec<Batch> = rows
            .chunks(config.micro_batch)
            .map(|c| batch_of(c, pad, &model, config.max_seq_len))
            .collect::<Result<_>>()?;
        let tokens: usize = batches.iter().map(|b| b.n_loss_tokens).sum();
        let mut loss_sum = 0.0;
        for b in batches.iter().filter(|b| b.n_loss_tokens > 0) {
            // Each micro-batch weighs by its share of reply tokens: the sum is the batch mean.
            let share = b.n_loss_tokens as f64 / tokens.max(1) as f64;
            let (l, grads) = loss_and_grads(&model.llama, b, share, route)?;
            state.accumulate(&grads)?;
            loss_sum += l * b.n_loss_tokens as f64;
        }
        let train_loss = loss_sum / tokens.max(1) as f64;
        let grad_norm = state.grad_norm()?;
        if !train_loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {}: non-finite loss ({train_loss}) or gradient norm ({grad_norm}); stopping. The last good checkpoint stays in {}",
                step + 1,
                ckpt_dir.display()
            );
        }
        step += 1;
        let update = optim::step(config, step, total, grad_norm);
        state.step(&update, optim::feedback_due(config, step))?;
        let secs = started.elapsed().as_secs_f64();
        let seen: usize = rows.iter().map(|r| seq_len(r, config.max_seq_len)).sum();
        let mut record = MetricsRecord {
            step,
            loss: Some(train_loss),
            // The rate the step applied (f32, as the kernels take it).
            lr: Some(f64::from(update.lr)),
            grad_norm: Some(grad_norm),
            tokens: Some(tokens),
            tokens_per_s: Some(seen as f64 / secs),
            seconds: Some(secs),
            ..Default::default()
        };
        if step % config.state.distance_every == 0
            || step == total
            || config.snapshots.contains(&step)
        {
            record.dist_theta = state.distance_from_start(Weights::Theta)?;
            record.dist_ema = state.distance_from_start(Weights::Ema)?;
        }
        if !val.is_empty()
            && ((config.eval_every > 0 && step % config.eval_every == 0) || step == total)
        {
            let v = mean_loss(&model, &val, config, pad)?;
            record.val_loss = Some(v);
            if config.ema.enabled {
                state.load_into_model(Weights::Ema)?;
                record.val_loss_ema = Some(mean_loss(&model, &val, config, pad)?);
                state.load_into_model(Weights::Theta)?;
            }
            last_val = Some(v);
        }
        writeln!(metrics, "{}", serde_json::to_string(&record)?)?;
        metrics.flush()?;
        if config.snapshots.contains(&step) {
            save_snapshot(
                &TrainConfig::snapshot_dir(&run_dir, step),
                &mut state,
                &model,
                config.state.save,
            )?;
        }
        bar.set_message(format!("loss {train_loss:.4}"));
        bar.inc(1);
        // SIGTERM/SIGINT since the last step: checkpoint now and stop.
        let interrupted = step < total && stop.load(std::sync::atomic::Ordering::Relaxed);
        let due = config.checkpoint_every > 0 && step % config.checkpoint_every == 0;
        if (due && step < total) || interrupted {
            save_checkpoint(
                &ckpt_dir,
                &state,
                &Progress {
                    step,
                    position: pos,
                    config: config.clone(),
                },
            )?;
        }
        if opts.crash_after == Some(step) {
            std::process::abort();
        }
        if interrupted {
            bar.finish_and_clear();
            return Err(Interrupted {
                step,
                total,
                checkpoint: ckpt_dir,
            }
            .into());
        }
    }
    bar.finish_and_clear();
    save_snapshot(&run_dir, &mut state, &model, config.state.save)?;
    // Finished: the checkpoint (θ, m, v, θ̄: four model copies) has nothing left to resume.
    let _ = std::fs::remove_dir_all(&ckpt_dir);
    Ok(Summary {
        run_dir,
        steps: step,
        final_val_loss: last_val,
        first_val_loss: first_val,
    })
}

/// The checkpoint directory is replaced whole: written beside, then renamed into place.
fn save_checkpoint(dir: &Path, state: &TrainState, progress: &Progress) -> Result<()> {
    basin_lm::fsutil::replace_dir(dir, |tmp| {
        state.save(&tmp.join("state.safetensors"))?;
        write_bytes_atomic(
            &tmp.join("progress.json"),
            serde_json::to_string_pretty(progress)?.as_bytes(),
        )
    })
}

/// θ into `dir`/model and, with the EMA, θ̄ into `dir`/ema; the model holds θ again after.
fn save_snapshot(dir: &Path, state: &mut TrainState, model: &Model, save: Save) -> Result<()> {
    save_weights(&dir.join("model"), state, model, Weights::Theta, save)?;
    if state.has_ema() {
        save_weights(&dir.join("ema"), state, model, Weights::Ema, save)?;
        state.load_into_model(Weights::Theta)?;
    }
    Ok(())
}

/// A Hugging Face directory of θ or θ̄: in the model's dtype, or with `state.save = "f32"`
/// in f32 as the state holds them.
fn save_weights(
    dir: &Path,
    state: &mut TrainState,
    model: &Model,
    w: Weights,
    save: Save,
) -> Result<()> {
    if save == Save::F32 {
        let values = state
            .values_f32(w)?
            .ok_or_else(|| anyhow::anyhow!("this run has no EMA"))?;
        return basin_lm::weights::save_hf_tensors(
            dir,
            &model.config,
            values,
            &model.text,
            candle_core::DType::F32,
        );
    }
    state.load_into_model(w)?;
    basin_lm::weights::save_hf_dir(
        dir,
        &model.config,
        &model.varmap,
        &model.text,
        model.llama.dtype(),
    )
}

/// config.toml (resolved) and run.json (git commit, input hashes) next to the outputs.
fn write_provenance(config: &TrainConfig, run_dir: &Path) -> Result<()> {
    write_bytes_atomic(
        &run_dir.join("config.toml"),
        basin_lm::config::to_toml(config)?.as_bytes(),
    )?;
    let hash = |p: &Path| -> Result<String> {
        if p.is_dir() {
            sha256_file(&p.join("model.safetensors"))
        } else {
            sha256_file(p)
        }
    };
    let inputs_sha256 = std::iter::once(&config.model)
        .chain(&config.data)
        .map(|p| Ok((p.display().to_string(), hash(p)?)))
        .collect::<Result<_>>()?;
    let run = RunInfo {
        git_commit: basin_lm::provenance::git_commit(),
        inputs_sha256,
    };
    basin_lm::artifacts::write(&run_dir.join("run.json"), &run)
}
