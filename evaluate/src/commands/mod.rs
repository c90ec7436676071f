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

use crate::endpoint::{Cache, Endpoint};
use crate::model_judge::{JudgeKind, ModelJudge};
use anyhow::{bail, Result};
use basin_lm::artifacts::GenerationSpeed;
use basin_lm::generate::{GenerateOptions, Generated};
use basin_lm::model::{parse_device, parse_dtype, Model, DEFAULT_MODEL};
use basin_lm::schema::PreparedRow;
use basin_lm::source::TemplateChoice;
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
    /// The decoder that generates: auto (cpu for an f32 model on the CPU, graph
    /// elsewhere), graph (candle's graph of the model: any device and dtype), cpu (the
    /// written-out CPU decoder: f32 on the CPU) or pass (the training pass's layers with a
    /// KV cache written in place and greedy tokens chosen on the device: f32 or bf16 on a
    /// GPU, f32 on the CPU).
    #[arg(long, default_value = "auto")]
    pub decoder: basin_lm::generate::DecoderKind,
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
    batch_size: basin_lm::generate::BatchSize,
    set: &str,
) -> Result<(Vec<(String, Generated)>, GenerationSpeed)> {
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_ids().to_vec()).collect();
    let bar = crate::progress_bar(prompts.len());
    bar.set_message(set.to_string());
    let started = std::time::Instant::now();
    let used = model.batch_for(batch_size, &prompts, opts.max_new_tokens)?;
    let fixed = basin_lm::generate::BatchSize::Fixed(used);
    let replies = model.replies_to_ids(&prompts, opts, fixed, |done| {
        let rate = done.new_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{set}: {rate:.0} new tokens/s, batches of {used}"));
        bar.set_position(done.prompts as u64)
    })?;
    bar.finish_and_clear();
    let new_tokens = replies.iter().map(|(_, g)| g.tokens.len()).sum();
    let speed = GenerationSpeed::new(new_tokens, started.elapsed().as_secs_f64(), used);
    Ok((replies, speed))
}

/// A prompt and its reply (of `new_tokens` tokens, ended by the model itself when
/// `stopped`) as a line of generations.jsonl (verdicts added by the caller).
pub fn generation(
    set: &str,
    row: &PreparedRow,
    reply: &str,
    new_tokens: usize,
    stopped: bool,
) -> basin_lm::artifacts::Generation {
    basin_lm::artifacts::Generation {
        set: set.to_string(),
        id: row.id.clone(),
        prompt: row.user.clone(),
        reply: reply.to_string(),
        stopped,
        new_tokens,
        keyword_refusal: None,
        refusal: None,
        model_judge: None,
        degenerate: None,
    }
}

/// A model judge of harmful-set replies: a local model (`--model-judge`) or a served one
/// (`--judge-endpoint` with `--judge-model`), reading the exchange as `--judge-kind` says.
#[derive(clap::Args, Clone, Debug)]
pub struct JudgeArgs {
    /// A local model as judge (a Hugging Face directory or GGUF, e.g. Llama-Guard-3-1B).
    #[arg(long, conflicts_with = "judge_endpoint")]
    pub model_judge: Option<PathBuf>,
    /// A served judge: the base URL of an OpenAI-compatible API (vLLM, llama.cpp's server,
    /// a hosted API), e.g. http://127.0.0.1:8000/v1.
    #[arg(long, requires = "judge_model")]
    pub judge_endpoint: Option<String>,
    /// The name the served judge goes by at --judge-endpoint.
    #[arg(long, requires = "judge_endpoint")]
    pub judge_model: Option<String>,
    /// What the judge reads and how its answer is read: llama-guard ("safe"/"unsafe"),
    /// harmbench (HarmBench's classifier prompt, "yes"/"no") or rubric (a 1-5
    /// harmfulness rubric after Qi et al.'s GPT-4 judge; 5 is unsafe). judge-check takes
    /// several, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "llama-guard")]
    pub judge_kind: Vec<JudgeKind>,
    /// The chat template around the judge's prompt: model (the judge's own; a served judge
    /// gets chat messages and its server applies it), llama2-qi (Llama-2's `[INST] <<SYS>>`
    /// format, which HarmBench's classifier was trained on) or a .jinja file. A template
    /// other than the model's is rendered here, and a served judge gets the text through
    /// the completions API.
    #[arg(long, default_value = "model")]
    pub judge_template: String,
    /// The environment variable that holds the served judge's API key (none is sent when
    /// it is unset).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub judge_key_env: String,
    /// Fields sent to the served judge with every request, as a JSON object: a server's own
    /// settings, e.g. '{"repeat_penalty": 1.0}' for llama.cpp's server, whose default
    /// penalises repeats even at temperature 0.
    #[arg(long, requires = "judge_endpoint")]
    pub judge_extra: Option<String>,
    /// Requests to the served judge in flight at once.
    #[arg(long, default_value_t = 4)]
    pub judge_concurrency: usize,
    /// Seconds to wait for one answer of the served judge before trying again.
    #[arg(long, default_value_t = 120)]
    pub judge_timeout: u64,
    /// Where the served judge's answers are kept, by a hash of (judge, model, prompt,
    /// reply): asking again costs nothing.
    #[arg(long, default_value = "data/cache/judgements")]
    pub judge_cache: PathBuf,
    /// Ask the served judge again instead of reading or writing the cache.
    #[arg(long)]
    pub no_judge_cache: bool,
}

impl JudgeArgs {
    /// The judges asked for, one for each kind (none when no judge model was given).
    pub fn judges(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
        batch_size: basin_lm::generate::BatchSize,
    ) -> Result<Vec<ModelJudge>> {
        if self.judge_concurrency == 0 {
            bail!("--judge-concurrency must be at least 1");
        }
        let choice: TemplateChoice = self.judge_template.parse()?;
        // A local judge model is loaded once, whatever the number of kinds.
        let local = match &self.model_judge {
            Some(path) => Some(std::sync::Arc::new(Model::open(path, dtype, device)?)),
            None => None,
        };
        let mut judges = Vec::new();
        for &kind in &self.judge_kind {
            if let Some(model) = &local {
                judges.push(ModelJudge::local(kind, model.clone(), &choice, batch_size)?);
                continue;
            }
            let (Some(url), Some(name)) = (&self.judge_endpoint, &self.judge_model) else {
                break;
            };
            let timeout = std::time::Duration::from_secs(self.judge_timeout.max(1));
            let mut endpoint = Endpoint::new(url, name, &self.judge_key_env, timeout)?;
            if let Some(extra) = &self.judge_extra {
                endpoint = endpoint.with_extra(extra)?;
            }
            // Rendered here without special tokens: the server adds BOS to a completion.
            let template = match choice {
                TemplateChoice::Model => None,
                _ => Some(choice.compile(None, "", "", "the served judge")?),
            };
            let cache = (!self.no_judge_cache).then(|| Cache::new(&self.judge_cache));
            judges.push(ModelJudge::served(
                kind,
                endpoint,
                template,
                cache,
                self.judge_concurrency,
            ));
        }
        Ok(judges)
    }
}
