//! `evaluate interpolate`: weight interpolation, the baseline of WiSE-FT (Wortsman et al.
//! 2022, "Robust fine-tuning of zero-shot models"): θ(α) = θ_pre + α·(θ_T − θ_pre) between
//! a run's start and its fine-tuned θ, by the EMA kernel's lerp ([`Params::set_interpolated`]).
//! It shrinks toward the start as the anchored EMA does, with no training: the report
//! compares the two at equal utility. Each α gives `<run>/wise-<α>/` (a Hugging Face
//! directory, written whole or not at all) with its `interpolation.json`.

use crate::landscape::Params;
use anyhow::{bail, Context, Result};
use basin_kernels::optim::multi::MultiTensor;
use basin_lm::artifacts::{Interpolation, ModelHash, TrainConfig};
use basin_lm::model::{parse_dtype, Model};
use candle_core::Device;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// A run directory of train (runs/<name>): θ_T is its model/, θ_pre the model its
    /// config.toml started from.
    #[arg(long)]
    pub run: PathBuf,
    /// The fine-tune's weight, in [0, 1]: 0 is the start, 1 the fine-tuned θ (repeatable, or
    /// comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub alpha: Vec<f64>,
}

pub struct Summary {
    /// The model directories written, one per α.
    pub models: Vec<PathBuf>,
}

pub fn run(args: &Args) -> Result<Summary> {
    if let Some(a) = args.alpha.iter().find(|a| !(0.0..=1.0).contains(*a)) {
        bail!("--alpha {a}: expected a weight in [0, 1] (0: the start, 1: the fine-tuned θ)");
    }
    let config = TrainConfig::read_run(&args.run)?;
    let end_path = args.run.join("model");
    if !end_path.join("model.safetensors").exists() {
        bail!(
            "{}: no model/model.safetensors: the run's training has not finished",
            args.run.display()
        );
    }
    let (start, end) = (ModelHash::of(&config.model)?, ModelHash::of(&end_path)?);
    // Both ends in the run's dtype (θ_pre as training loaded it), on the CPU; the lerp runs
    // on f32 copies, and θ(α) is saved in that dtype, as the run's model/ is.
    let dtype = parse_dtype(&config.dtype)?;
    let cpu = Device::Cpu;
    let theta_pre = Model::open(&config.model, dtype, &cpu)
        .with_context(|| format!("the start of {}", args.run.display()))?;
    let model = Model::open(&end_path, dtype, &cpu)?;
    let params = Params::of(&model)?;
    let a = params.other(&theta_pre)?;
    drop(theta_pre);
    let b = params.snapshot()?;
    let mut kernels = MultiTensor::new();
    let mut models = Vec::new();
    for &alpha in &args.alpha {
        params.set_interpolated(&mut kernels, &a, &b, alpha)?;
        let doc = Interpolation {
            alpha,
            start: start.clone(),
            end: end.clone(),
            distance: params.distance_to(&mut kernels, &a)?,
            git_commit: basin_lm::provenance::git_commit(),
        };
        let dir = Interpolation::dir(&args.run, alpha);
        basin_lm::fsutil::replace_dir(&dir, |tmp| {
            basin_lm::weights::save_hf_dir(tmp, &model.config, &model.varmap, &model.text, dtype)?;
            basin_lm::artifacts::write(&Interpolation::path(tmp), &doc)
        })?;
        eprintln!(
            "wrote {} (α = {alpha}: ‖θ(α) − θ_pre‖ = {:.4})",
            dir.display(),
            doc.distance
        );
        models.push(dir);
    }
    Ok(Summary { models })
}
