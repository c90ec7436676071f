//! `evaluate generate`: a model's replies to prompts, printed (greedy unless a temperature
//! is given).

use super::ModelArgs;
use anyhow::{bail, Context, Result};
use basin_lm::chat::Conversation;
use basin_lm::generate::Sampling;
use basin_lm::model::Model;
use basin_lm::source::TemplateChoice;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file of prompts, one per line.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// System prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// `model`, `llama2-qi` or a .jinja file.
    #[arg(long, default_value = "model")]
    pub template: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts a generation batch takes: a number, or auto (on a GPU as many as 80% of its
    /// free memory holds, at most 256; on the CPU 8).
    #[arg(long, default_value = "auto")]
    pub batch_size: basin_lm::generate::BatchSize,
    /// Sample at this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The prompts and their replies, in order.
pub struct Summary {
    pub replies: Vec<(String, String)>,
    pub new_tokens: usize,
}

pub fn run(args: &Args) -> Result<Summary> {
    let mut prompts = args.prompt.clone();
    if let Some(f) = &args.prompts_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        bail!("no prompt: give --prompt TEXT or --prompts-file FILE");
    }
    let top_p = args.top_p;
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        bail!("--top-p {top_p} must be in (0, 1]");
    }
    let (dtype, device) = args.model.dtype_device()?;
    let loaded = Instant::now();
    let model = Model::open(&args.model.model, dtype, &device)?.with_decoder(args.model.decoder)?;
    let choice: TemplateChoice = args.template.parse()?;
    let template = model.text.template(&choice, None)?;
    eprintln!(
        "loaded {} in {:.1}s",
        model.path.display(),
        loaded.elapsed().as_secs_f64()
    );
    let mut opts = model.options(args.max_new_tokens)?;
    opts.sampling = args.temperature.map(|t| Sampling {
        temperature: t,
        top_p,
        seed: args.seed,
    });
    let convs: Vec<Conversation> = prompts
        .iter()
        .map(|p| Conversation {
            system: args.system.clone(),
            user: p.clone(),
            assistant: None,
        })
        .collect();
    let bar = indicatif::ProgressBar::new(convs.len() as u64);
    let started = Instant::now();
    let replies = model.replies(&template, &convs, &opts, args.batch_size, |done| {
        bar.set_position(done.prompts as u64)
    })?;
    bar.finish_and_clear();
    let new_tokens: usize = replies.iter().map(|(_, g)| g.tokens.len()).sum();
    for (p, (reply, _)) in prompts.iter().zip(&replies) {
        if prompts.len() > 1 {
            println!("### {p}");
        }
        println!("{reply}");
        if prompts.len() > 1 {
            println!();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{new_tokens} new tokens in {secs:.1}s ({:.1} tokens/s)",
        new_tokens as f64 / secs
    );
    Ok(Summary {
        replies: prompts
            .into_iter()
            .zip(replies.into_iter().map(|(r, _)| r))
            .collect(),
        new_tokens,
    })
}
