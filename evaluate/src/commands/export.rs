//! `evaluate export`: a model (GGUF or HF directory) written as a Hugging Face directory
//! that `transformers` loads as the model's own class, in its own layout:
//! model.safetensors, config.json, generation_config.json, tokenizer files.

use anyhow::Result;
use basin_lm::model::{parse_dtype, Model, DEFAULT_MODEL};
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub struct Summary {
    pub out: PathBuf,
}

pub fn run(args: &Args) -> Result<Summary> {
    let dtype = parse_dtype(&args.dtype)?;
    let model = Model::open(&args.model, dtype, &candle_core::Device::Cpu)?;
    basin_lm::weights::save_hf_dir(&args.out, &model.config, &model.varmap, &model.text, dtype)?;
    eprintln!(
        "wrote {} (Hugging Face {}, {dtype:?})",
        args.out.display(),
        model.config.family.class()
    );
    Ok(Summary {
        out: args.out.clone(),
    })
}
