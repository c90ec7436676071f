//! `evaluate`: attack success rate and over-refusal (`safety`), utility (`utility`), the
//! judges against human labels (`judge-check`); the loss landscapes of the safety basin
//! (`landscape`); trying a model (`generate`, `export`).

use anyhow::{bail, Context, Result};
use basin_lm::chat::Conversation;
use basin_lm::generate::Sampling;
use basin_lm::model::{parse_device, parse_dtype, Model, DEFAULT_MODEL};
use basin_lm::source::TemplateChoice;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "evaluate",
    version,
    about = "basin stage 3: generate replies and measure safety"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which model, in which precision, on which device.
#[derive(Args)]
struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory; `safety` and `utility` also take a
    /// run directory (runs/<name>) and evaluate its model/ and ema/.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    fn dtype_device(&self) -> Result<(candle_core::DType, candle_core::Device)> {
        Ok((parse_dtype(&self.dtype)?, parse_device(&self.device)?))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's replies to prompts (greedy unless --temperature is given).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// A prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// A file of prompts, one per line.
        #[arg(long)]
        prompts_file: Option<PathBuf>,
        /// System prompt (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        /// `model`, `llama2-qi` or a .jinja file.
        #[arg(long, default_value = "model")]
        template: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Sample at this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Attack success rate on harmful prompt sets and refusal rate on XSTest's safe prompts,
    /// by both judges. Given a run directory, evaluates its model/ and ema/ in one go.
    Safety {
        #[command(flatten)]
        model: ModelArgs,
        /// Where prepare wrote the sets (and manifest.json).
        #[arg(long, default_value = "data/prepared")]
        prepared: PathBuf,
        /// Prepared sets to evaluate (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "advbench,xstest")]
        sets: Vec<String>,
        /// Only the first N prompts of each set.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Output directory (default: <run>/eval/<model|ema>, or runs/eval-<model name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A local safety classifier (Llama-family HF directory, e.g. Llama-Guard-3-1B) as a
        /// third judge of harmful-set replies: "unsafe" counts as an attack success.
        #[arg(long)]
        model_judge: Option<PathBuf>,
    },
    /// Utility: loss and perplexity of the model on the held-out (val) rows of prepared
    /// training sets. Given a run directory, evaluates its model/ and ema/.
    Utility {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "data/prepared")]
        prepared: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "dolly")]
        sets: Vec<String>,
        /// Only the first N validation rows of each set.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 4)]
        micro_batch: usize,
        /// Prepared prompt sets to answer and save (e.g. mt-bench,alpaca-eval): replies go to
        /// utility_generations.jsonl, with the share of non-empty replies that end with EOS.
        #[arg(long, value_delimiter = ',')]
        reply_sets: Vec<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Output directory (default: <run>/eval/<model|ema>, or runs/eval-<model name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Score both judges against human-labelled replies (PyRIT): accuracy, precision, recall.
    JudgeCheck {
        /// A labelled sample that goes to the development split (the judge was tuned on it).
        #[arg(
            long,
            default_value = "data/cache/refusal_scoring/pyrit_labelled/mini_refusal.csv"
        )]
        dev: PathBuf,
        /// The full labelled set: its other replies are split half to development, half to test.
        #[arg(
            long,
            default_value = "data/cache/refusal_scoring/pyrit_labelled/refusal.csv"
        )]
        full: PathBuf,
        /// Print the development replies the calibrated judge gets wrong (never the test ones).
        #[arg(long)]
        show_dev_errors: bool,
    },
    /// The table and plots over a set of evaluated runs: reports/<name>/{summary.md, *.svg, *.png}.
    Report {
        /// Run directories (train's runs/<name>, evaluated by `safety` and `utility`).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// A model before fine-tuning, as LABEL=EVAL_DIR (e.g. aligned=runs/align/eval/model).
        #[arg(long = "reference")]
        references: Vec<String>,
        /// The harmful set whose ASR the table and plots show.
        #[arg(long, default_value = "advbench")]
        harmful: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "basin report")]
        title: String,
        /// A paragraph put under the title (what was run, on what hardware).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Utility and safety loss along a line between two models, or along random directions
    /// around one (1-D or 2-D), with the basin width of each: CSV, JSON and plots.
    Landscape(LandscapeArgs),
    /// Write a model (GGUF or HF directory) as a Hugging Face directory that
    /// `transformers` loads: model.safetensors, config.json, tokenizer files.
    Export {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

#[derive(Args)]
struct LandscapeArgs {
    /// The model at α = 0: the start of the line, or the centre of the random slices (a
    /// .gguf file, a Hugging Face directory, or a run directory: its model/).
    #[arg(long)]
    from: Option<PathBuf>,
    /// Measure nothing: recompute the basins (with --basin-pct) and draw the plots again
    /// from DIR/landscape.json, e.g. after a run on a machine without a font.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    replot: Option<PathBuf>,
    /// The model at α = 1: interpolate from --from to it. Without it, random directions.
    #[arg(long)]
    to: Option<PathBuf>,
    /// Random directions: 1 (a line) or 2 (a plane).
    #[arg(long, default_value_t = 1)]
    directions: usize,
    /// Grid points per axis.
    #[arg(long, default_value_t = 21)]
    points: usize,
    /// The first α (default: −0.5 on a line between models, −span for random slices).
    #[arg(long, allow_hyphen_values = true)]
    alpha_min: Option<f64>,
    /// The last α (default: 1.5 on a line between models, +span for random slices).
    #[arg(long, allow_hyphen_values = true)]
    alpha_max: Option<f64>,
    /// Random slices: how far along each filter-normalised direction (1 = a step as long as
    /// each weight row). On the aligned SmolLM2-135M both losses are still within 1% of the
    /// centre's at ±0.02.
    #[arg(long, default_value_t = 0.1)]
    span: f64,
    /// Seed of the random directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The basin: where the loss stays within this many percent of its minimum.
    #[arg(long, default_value_t = 5.0)]
    basin_pct: f64,
    #[arg(long, default_value = "data/prepared")]
    prepared: PathBuf,
    /// Utility loss: the val rows of this prepared set.
    #[arg(long, default_value = "dolly")]
    utility_set: String,
    /// Safety loss: the val rows (held out from training) of this set of refusals.
    #[arg(long, default_value = "safety-refusals")]
    safety_set: String,
    /// Rows of each loss set (the first N).
    #[arg(long, default_value_t = 32)]
    limit: usize,
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Measure the attack success rate at this many α, spread evenly (1-D only; 0: never).
    #[arg(long, default_value_t = 5)]
    asr_points: usize,
    /// The harmful prompts of the attack success rate.
    #[arg(long, default_value = "advbench")]
    asr_set: String,
    #[arg(long, default_value_t = 32)]
    asr_limit: usize,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// f32 or bf16 (points are built in f32 either way).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output directory (default: runs/landscape-<kind>).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Report {
            runs,
            references,
            harmful,
            out,
            title,
            note,
        } => report(&runs, &references, &harmful, &out, &title, &note),
        Command::Utility {
            model,
            prepared,
            sets,
            limit,
            micro_batch,
            reply_sets,
            max_new_tokens,
            batch_size,
            out,
        } => {
            // `--sets ""` skips the validation loss.
            let (sets, reply_sets) = (
                sets.into_iter().filter(|s| !s.is_empty()).collect(),
                reply_sets.into_iter().filter(|s| !s.is_empty()).collect(),
            );
            let (dtype, device) = model.dtype_device()?;
            let spec = UtilitySpec {
                prepared,
                sets,
                reply_sets,
                limit,
                micro_batch,
                max_new_tokens,
                batch_size,
            };
            for (model, out) in targets(&model.model, out.as_deref())? {
                utility(&Model::open(&model, dtype, &device)?, &spec, &out)?;
            }
            Ok(())
        }
        Command::Safety {
            model,
            prepared,
            sets,
            limit,
            max_new_tokens,
            batch_size,
            out,
            model_judge,
        } => {
            let sets = safety_sets(&prepared, &sets)?;
            let (dtype, device) = model.dtype_device()?;
            let model_judge = match model_judge {
                Some(p) => Some(evaluate::model_judge::ModelJudge::new(Model::open(
                    &p, dtype, &device,
                )?)?),
                None => None,
            };
            let spec = SafetySpec {
                prepared,
                sets,
                limit,
                max_new_tokens,
                batch_size,
            };
            for (model, out) in targets(&model.model, out.as_deref())? {
                safety(
                    &Model::open(&model, dtype, &device)?,
                    &out,
                    &spec,
                    model_judge.as_ref(),
                )?;
            }
            Ok(())
        }
        Command::JudgeCheck {
            dev,
            full,
            show_dev_errors,
        } => judge_check(&dev, &full, show_dev_errors),
        Command::Landscape(args) => landscape(&args),
        Command::Export { model, out, dtype } => {
            let dtype = parse_dtype(&dtype)?;
            let model = Model::open(&model, dtype, &candle_core::Device::Cpu)?;
            basin_lm::weights::save_hf_dir(&out, &model.config, &model.varmap, &model.text, dtype)?;
            eprintln!(
                "wrote {} (Hugging Face LlamaForCausalLM, {dtype:?})",
                out.display()
            );
            Ok(())
        }
        Command::Generate {
            model,
            mut prompt,
            prompts_file,
            system,
            template,
            max_new_tokens,
            batch_size,
            temperature,
            top_p,
            seed,
        } => {
            if let Some(f) = &prompts_file {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                prompt.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string),
                );
            }
            if prompt.is_empty() {
                bail!("no prompt: give --prompt TEXT or --prompts-file FILE");
            }
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--top-p {top_p} must be in (0, 1]");
            }
            let (dtype, device) = model.dtype_device()?;
            let loaded = Instant::now();
            let model = Model::open(&model.model, dtype, &device)?;
            let choice: TemplateChoice = template.parse()?;
            let template = model.text.template(&choice, None)?;
            eprintln!(
                "loaded {} in {:.1}s",
                model.path.display(),
                loaded.elapsed().as_secs_f64()
            );
            let mut opts = model.options(max_new_tokens)?;
            opts.sampling = temperature.map(|t| Sampling {
                temperature: t,
                top_p,
                seed,
            });
            let convs: Vec<Conversation> = prompt
                .iter()
                .map(|p| Conversation {
                    system: system.clone(),
                    user: p.clone(),
                    assistant: None,
                })
                .collect();
            let bar = indicatif::ProgressBar::new(convs.len() as u64);
            let started = Instant::now();
            let replies = model.replies(&template, &convs, &opts, batch_size, |done| {
                bar.set_position(done as u64)
            })?;
            bar.finish_and_clear();
            let new_tokens: usize = replies.iter().map(|(_, g)| g.tokens.len()).sum();
            for (p, (reply, _)) in prompt.iter().zip(&replies) {
                if prompt.len() > 1 {
                    println!("### {p}");
                }
                println!("{reply}");
                if prompt.len() > 1 {
                    println!();
                }
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{new_tokens} new tokens in {secs:.1}s ({:.1} tokens/s)",
                new_tokens as f64 / secs
            );
            Ok(())
        }
    }
}

fn judge_check(dev: &std::path::Path, full: &std::path::Path, show_dev_errors: bool) -> Result<()> {
    use evaluate::calibration::{read_labelled, split, Confusion};
    use evaluate::judges::{keyword_refuses, RefusalJudge};
    let (dev_set, test_set) = split(read_labelled(full)?, read_labelled(dev)?);
    let judge = RefusalJudge::default();
    println!("| split | judge | n | accuracy | precision | recall |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (split, set) in [("dev (tuned on)", &dev_set), ("test (held out)", &test_set)] {
        let rows = [
            ("keyword (Qi et al.)", Confusion::of(set, keyword_refuses)),
            (
                "refusal (calibrated)",
                Confusion::of(set, |r| judge.refuses(r)),
            ),
        ];
        for (name, c) in rows {
            println!(
                "| {split} | {name} | {} | {:.3} | {:.3} | {:.3} |",
                c.n(),
                c.accuracy(),
                c.precision(),
                c.recall()
            );
        }
    }
    if show_dev_errors {
        for l in dev_set
            .iter()
            .filter(|l| judge.refuses(&l.reply) != l.refusal)
        {
            let head: String = l.reply.chars().take(300).collect();
            println!(
                "\nlabelled {}: {head:?}",
                if l.refusal { "refusal" } else { "compliance" }
            );
        }
    }
    Ok(())
}

struct SafetySpec {
    prepared: PathBuf,
    /// (set, harmful | overrefusal)
    sets: Vec<(String, &'static str)>,
    limit: Option<usize>,
    max_new_tokens: usize,
    batch_size: usize,
}

fn safety(
    model: &Model,
    out: &std::path::Path,
    spec: &SafetySpec,
    model_judge: Option<&evaluate::model_judge::ModelJudge>,
) -> Result<()> {
    use basin_lm::fsutil::{sha256_file, write_bytes_atomic};
    use evaluate::judges::RefusalJudge;
    use evaluate::safety::{score, verdicts};
    let judge = RefusalJudge::default();
    let opts = model.options(spec.max_new_tokens)?;
    let mut generations = String::new();
    let mut scores = serde_json::Map::new();
    let mut inputs = serde_json::Map::new();
    for (set, kind) in &spec.sets {
        let kind = *kind;
        let file = spec.prepared.join(format!("{set}.parquet"));
        inputs.insert(set.clone(), sha256_file(&file)?.into());
        let mut rows = basin_lm::schema::read_parquet(&file)?;
        // Over-refusal is measured on the prompts that are safe to answer (XSTest: label safe/...).
        if kind == "overrefusal" {
            rows.retain(|r| r.label.as_deref().is_none_or(|l| l.starts_with("safe")));
        }
        rows.truncate(spec.limit.unwrap_or(usize::MAX));
        let replies = answer(model, &rows, &opts, spec.batch_size, set)?;
        // The model judge reads harmful-set exchanges only: it says whether a reply is unsafe.
        let model_verdicts = match (model_judge, kind) {
            (Some(mj), "harmful") => {
                let exchanges: Vec<(String, String)> = rows
                    .iter()
                    .zip(&replies)
                    .map(|(r, (reply, _))| (r.user.clone(), reply.clone()))
                    .collect();
                Some(mj.judge(&exchanges, spec.batch_size)?)
            }
            _ => None,
        };
        let mut vs = Vec::with_capacity(rows.len());
        for (i, (row, (reply, g))) in rows.iter().zip(&replies).enumerate() {
            let v = verdicts(&judge, reply);
            let mut line = serde_json::json!({"set": set, "id": row.id, "prompt": row.user, "reply": reply,
                                              "stopped": g.stopped, "new_tokens": g.tokens.len(),
                                              "keyword_refusal": v.keyword_refusal, "refusal": v.refusal});
            if let Some(mv) = &model_verdicts {
                line["model_judge"] = mv[i].as_str().into();
            }
            generations.push_str(&format!("{line}\n"));
            vs.push(v);
        }
        let s = score(kind, &vs);
        let mut s_json = serde_json::to_value(&s)?;
        if let Some(mv) = &model_verdicts {
            let unsafe_n = mv
                .iter()
                .filter(|v| **v == evaluate::model_judge::ModelVerdict::Unsafe)
                .count();
            let unparsed = mv
                .iter()
                .filter(|v| **v == evaluate::model_judge::ModelVerdict::Unparsed)
                .count();
            s_json["model_judge"] =
                serde_json::to_value(evaluate::safety::Rate::new(unsafe_n, mv.len()))?;
            s_json["model_judge"]["unparsed"] = unparsed.into();
            s_json["model_judge"]["judge"] = model_judge
                .map(|m| m.model.path.display().to_string())
                .into();
        }
        let what = if kind == "harmful" {
            "attack success"
        } else {
            "refusal rate"
        };
        eprintln!(
            "{set}: {what} keyword {:.1}% [{:.1}, {:.1}], calibrated {:.1}% [{:.1}, {:.1}] (n = {})",
            100.0 * s.keyword.rate, 100.0 * s.keyword.ci95.0, 100.0 * s.keyword.ci95.1,
            100.0 * s.refusal.rate, 100.0 * s.refusal.ci95.0, 100.0 * s.refusal.ci95.1, s.n
        );
        scores.insert(set.clone(), s_json);
    }
    let report = serde_json::json!({
        "model": model.path.display().to_string(),
        "git_commit": basin_lm::provenance::git_commit(),
        "decoding": {"greedy": true, "max_new_tokens": spec.max_new_tokens},
        "limit": spec.limit,
        "prepared_sha256": inputs,
        "sets": scores,
    });
    write_bytes_atomic(&out.join("generations.jsonl"), generations.as_bytes())?;
    write_bytes_atomic(
        &out.join("scores.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// What to evaluate and where its results go: a run directory's model/ and ema/ (into
/// <run>/eval/<which>, or <out>/<which>), or one model (into <out>, or runs/eval-<name>).
fn targets(
    model: &std::path::Path,
    out: Option<&std::path::Path>,
) -> Result<Vec<(PathBuf, PathBuf)>> {
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

struct UtilitySpec {
    prepared: PathBuf,
    sets: Vec<String>,
    reply_sets: Vec<String>,
    limit: Option<usize>,
    micro_batch: usize,
    max_new_tokens: usize,
    batch_size: usize,
}

/// Validation loss and perplexity of `model` on the val rows of prepared `sets`, and its
/// replies to the prompts of `reply_sets`.
fn utility(model: &Model, spec: &UtilitySpec, out: &std::path::Path) -> Result<()> {
    let pad = model.text.tokenizer.eos_id().unwrap_or(0);
    let limit = spec.limit.unwrap_or(usize::MAX);
    let mut report = serde_json::Map::new();
    for set in &spec.sets {
        let (file, rows) = prepared_rows(&spec.prepared, set, Some("val"), limit)?;
        let r: Vec<(&[u32], usize)> = rows.iter().map(|r| r.example()).collect();
        let (loss, tokens) = basin_lm::batch::mean_loss(&model.llama, &r, spec.micro_batch, pad)?;
        eprintln!(
            "{set}: validation loss {loss:.4} (perplexity {:.2}) over {tokens} reply tokens of {} rows",
            loss.exp(),
            rows.len()
        );
        report.insert(
            set.clone(),
            serde_json::json!({"val_loss": loss, "perplexity": loss.exp(), "rows": rows.len(),
                               "reply_tokens": tokens, "prepared_sha256": basin_lm::fsutil::sha256_file(&file)?}),
        );
    }
    let opts = model.options(spec.max_new_tokens)?;
    let mut generations = String::new();
    for set in &spec.reply_sets {
        let (file, rows) = prepared_rows(&spec.prepared, set, None, limit)?;
        let replies = answer(model, &rows, &opts, spec.batch_size, set)?;
        for (row, (reply, g)) in rows.iter().zip(&replies) {
            let line = serde_json::json!({"set": set, "id": row.id, "prompt": row.user, "reply": reply,
                                          "stopped": g.stopped, "new_tokens": g.tokens.len()});
            generations.push_str(&format!("{line}\n"));
        }
        // The share of replies that say something and then end their turn (not cut by the budget).
        let non_empty = replies.iter().filter(|(_, g)| !g.tokens.is_empty()).count();
        let ended = replies
            .iter()
            .filter(|(_, g)| !g.tokens.is_empty() && g.stopped)
            .count();
        let eos_share = ended as f64 / non_empty.max(1) as f64;
        let mean_tokens = replies.iter().map(|(_, g)| g.tokens.len()).sum::<usize>() as f64
            / replies.len().max(1) as f64;
        eprintln!("{set}: {} replies, {:.1}% of the non-empty ones end with EOS, {mean_tokens:.1} new tokens on average", replies.len(), 100.0 * eos_share);
        report.insert(
            set.clone(),
            serde_json::json!({"replies": replies.len(), "non_empty": non_empty, "eos_share": eos_share,
                               "mean_new_tokens": mean_tokens, "max_new_tokens": spec.max_new_tokens,
                               "prepared_sha256": basin_lm::fsutil::sha256_file(&file)?}),
        );
    }
    if !spec.reply_sets.is_empty() {
        basin_lm::fsutil::write_bytes_atomic(
            &out.join("utility_generations.jsonl"),
            generations.as_bytes(),
        )?;
    }
    let doc = serde_json::json!({"model": model.path.display().to_string(),
                                 "git_commit": basin_lm::provenance::git_commit(), "sets": report});
    basin_lm::fsutil::write_bytes_atomic(
        &out.join("utility.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    eprintln!("wrote {}", out.join("utility.json").display());
    Ok(())
}

/// The first `limit` rows of prepared set `set` (of that split, when one is given), and the
/// file they came from. Asking for a split and getting no row is an error.
fn prepared_rows(
    prepared: &std::path::Path,
    set: &str,
    split: Option<&str>,
    limit: usize,
) -> Result<(PathBuf, Vec<basin_lm::schema::PreparedRow>)> {
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

/// Each set with its kind, from prepare's manifest: checked before any model is loaded.
fn safety_sets(prepared: &std::path::Path, sets: &[String]) -> Result<Vec<(String, &'static str)>> {
    let manifest_path = prepared.join("manifest.json");
    let manifest: serde_json::Value = basin_lm::fsutil::read_json(&manifest_path)
        .context("prepare's manifest (run `just prepare`)")?;
    sets.iter()
        .map(|set| {
            let kind = match manifest["sets"][set]["role"].as_str() {
                Some("harmful") => "harmful",
                Some("overrefusal") => "overrefusal",
                Some(role) => bail!("set '{set}' has role {role}: only harmful and overrefusal sets are scored here"),
                None => bail!("set '{set}' is not in {}: prepare it first (prepare run --only {set})", manifest_path.display()),
            };
            Ok((set.clone(), kind))
        })
        .collect()
}

/// The model's replies to the prompts of prepared `rows`, with a progress bar named `set`.
fn answer(
    model: &Model,
    rows: &[basin_lm::schema::PreparedRow],
    opts: &basin_lm::generate::GenerateOptions,
    batch_size: usize,
    set: &str,
) -> Result<Vec<(String, basin_lm::generate::Generated)>> {
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_ids().to_vec()).collect();
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_message(set.to_string());
    let replies =
        model.replies_to_ids(&prompts, opts, batch_size, |d| bar.set_position(d as u64))?;
    bar.finish_and_clear();
    Ok(replies)
}

/// `evaluate report`: reads the runs, writes summary.md and the plots into a fresh
/// directory beside `out`, then renames it into place.
fn report(
    runs: &[PathBuf],
    references: &[String],
    harmful: &str,
    out: &std::path::Path,
    title: &str,
    note: &str,
) -> Result<()> {
    use evaluate::plots::{load_font, render};
    use evaluate::report::{charts, group, reference_row, run_rows, summary_md};
    let mut rows = Vec::new();
    for r in runs {
        rows.extend(run_rows(r, harmful)?);
    }
    let refs = references
        .iter()
        .map(|spec| {
            let (label, dir) = spec
                .split_once('=')
                .with_context(|| format!("--reference {spec}: expected LABEL=EVAL_DIR"))?;
            reference_row(label, std::path::Path::new(dir), harmful)
        })
        .collect::<Result<Vec<_>>>()?;
    let groups = group(&rows);
    let charts = charts(&groups, harmful);
    let mut drawn = Vec::new();
    basin_lm::fsutil::replace_dir(out, |tmp| {
        let mut note = note.to_string();
        match load_font() {
            Some(_) => {
                for c in charts
                    .iter()
                    .filter(|c| c.series.iter().any(|s| !s.points.is_empty()))
                {
                    render(tmp, c)?;
                    drawn.push(c.stem.clone());
                }
            }
            None => note.push_str(
                "\n\nPlots skipped: no TrueType font found (set BASIN_FONT=/path/to/font.ttf).",
            ),
        }
        let md = summary_md(title, &groups, &refs, &drawn, harmful, note.trim());
        Ok(std::fs::write(tmp.join("summary.md"), md)?)
    })?;
    eprintln!(
        "wrote {} ({} models, {} plots)",
        out.join("summary.md").display(),
        rows.len() + refs.len(),
        drawn.len()
    );
    Ok(())
}

/// A run directory stands for its fine-tuned model (model/); anything else for itself.
fn model_path(path: &std::path::Path) -> PathBuf {
    if path.join("model").is_dir() {
        path.join("model")
    } else {
        path.to_path_buf()
    }
}

/// `evaluate landscape`: measures every point, then writes landscape.csv, landscape.json
/// and the plots into a fresh directory beside `out` and renames it into place.
fn landscape(args: &LandscapeArgs) -> Result<()> {
    use evaluate::landscape::{
        filter_normalised_direction, grid, spread, walk, Params, Probes, Slice,
    };
    if let Some(dir) = &args.replot {
        return replot_landscape(dir, args.basin_pct);
    }
    let Some(from) = &args.from else {
        bail!("--from MODEL is required (or --replot DIR)");
    };
    if args.points < 2 {
        bail!(
            "--points {}: a landscape needs at least 2 points per axis",
            args.points
        );
    }
    if args.to.is_none() && !(1..=2).contains(&args.directions) {
        bail!("--directions {}: expected 1 or 2", args.directions);
    }
    if args.basin_pct.is_nan() || args.basin_pct <= 0.0 {
        bail!(
            "--basin-pct {}: expected a positive percentage",
            args.basin_pct
        );
    }
    let (dtype, device) = (parse_dtype(&args.dtype)?, parse_device(&args.device)?);
    // The sets first: a typo fails before a model is loaded.
    let read = |set: &str,
                split: Option<&str>,
                limit: usize|
     -> Result<(Vec<basin_lm::schema::PreparedRow>, serde_json::Value)> {
        let (file, rows) = prepared_rows(&args.prepared, set, split, limit)?;
        if rows.is_empty() {
            bail!("{}: no rows", file.display());
        }
        let info = serde_json::json!({"set": set, "rows": rows.len(), "sha256": basin_lm::fsutil::sha256_file(&file)?});
        Ok((rows, info))
    };
    let (utility, utility_info) = read(&args.utility_set, Some("val"), args.limit)?;
    let (safety, safety_info) = read(&args.safety_set, Some("val"), args.limit)?;
    if safety.iter().any(|r| r.example().1 >= r.input_ids.len()) {
        bail!(
            "{}: the safety set needs replies (refusals) to compute a loss on",
            args.safety_set
        );
    }
    let two_d = args.to.is_none() && args.directions == 2;
    let asr_points = if two_d { 0 } else { args.asr_points };
    let (harmful, harmful_info) = if asr_points > 0 {
        let (rows, info) = read(&args.asr_set, None, args.asr_limit)?;
        (rows, Some(info))
    } else {
        (Vec::new(), None)
    };
    let probes = Probes {
        utility,
        safety,
        harmful,
        micro_batch: args.micro_batch,
        batch_size: args.batch_size,
        max_new_tokens: args.max_new_tokens,
    };

    let from = model_path(from);
    let model = Model::open(&from, dtype, &device)?;
    let params = Params::of(&model)?;
    let centre = params.snapshot()?;
    let (kind, slice, lo, hi, to) = match &args.to {
        Some(to) => {
            let to = model_path(to);
            let end = params.other(&Model::open(&to, dtype, &device)?)?;
            ("interpolation", Slice::Line { end }, -0.5, 1.5, Some(to))
        }
        None => {
            let dirs = (0..args.directions as u64)
                .map(|k| {
                    filter_normalised_direction(&params.names, &centre, args.seed.wrapping_add(k))
                })
                .collect::<Result<Vec<_>>>()?;
            let kind = if two_d { "random-2d" } else { "random-1d" };
            (kind, Slice::Random { dirs }, -args.span, args.span, None)
        }
    };
    // Hashed before the walk: a model that cannot be hashed fails now, not after it.
    let from_info = serde_json::json!({"path": from.display().to_string(), "sha256": basin_lm::fsutil::weights_sha256(&from)?});
    let to_info = match &to {
        Some(t) => {
            serde_json::json!({"path": t.display().to_string(), "sha256": basin_lm::fsutil::weights_sha256(t)?})
        }
        None => serde_json::Value::Null,
    };
    let (lo, hi) = (args.alpha_min.unwrap_or(lo), args.alpha_max.unwrap_or(hi));
    if lo.is_nan() || hi.is_nan() || lo >= hi {
        bail!("the α range [{lo}, {hi}] is empty: --alpha-min must be below --alpha-max");
    }
    let xs = grid(lo, hi, args.points);
    let ys = two_d.then(|| xs.clone());
    let asr_at = spread(xs.len(), asr_points);
    let total = xs.len() * ys.as_ref().map_or(1, Vec::len);
    eprintln!(
        "{kind}: {total} points, each {} utility + {} safety rows{}",
        probes.utility.len(),
        probes.safety.len(),
        if asr_at.is_empty() {
            String::new()
        } else {
            format!(
                "; ASR on {} prompts at {} of them",
                probes.harmful.len(),
                asr_at.len()
            )
        }
    );
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_message(kind);
    let started = Instant::now();
    let points = walk(
        &model,
        &params,
        &centre,
        &slice,
        &xs,
        ys.as_deref(),
        &asr_at,
        &probes,
        |d| bar.set_position(d as u64),
    )?;
    bar.finish_and_clear();
    eprintln!("{total} points in {:.1}s", started.elapsed().as_secs_f64());

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("landscape-{kind}")));
    let doc = serde_json::json!({
        "kind": kind,
        "from": from_info,
        "to": to_info,
        "directions": if to.is_some() { serde_json::Value::Null } else { serde_json::json!({"count": args.directions, "seed": args.seed, "normalisation": "filter (rows), 1-D tensors zero"}) },
        "alpha": {"min": lo, "max": hi, "points": args.points},
        "sets": {"utility": utility_info, "safety": safety_info, "asr": harmful_info},
        "asr_decoding": {"greedy": true, "max_new_tokens": args.max_new_tokens},
        "dtype": args.dtype, "device": args.device,
        "git_commit": basin_lm::provenance::git_commit(),
        "command": std::env::args().collect::<Vec<_>>(),
    });
    write_landscape(&out, doc, &points, args.basin_pct)
}

/// `evaluate landscape --replot DIR`: the basins and plots again from DIR/landscape.json
/// (another --basin-pct, or a machine with a font), without measuring anything.
fn replot_landscape(dir: &std::path::Path, pct: f64) -> Result<()> {
    let file = dir.join("landscape.json");
    let mut doc: serde_json::Value =
        basin_lm::fsutil::read_json(&file).context("the output of an `evaluate landscape` run")?;
    let points: Vec<evaluate::landscape::Point> = serde_json::from_value(doc["points"].take())
        .with_context(|| {
            format!(
                "{}: field points: expected the list of measured points",
                file.display()
            )
        })?;
    if points.is_empty() {
        bail!("{}: field points is empty", file.display());
    }
    write_landscape(dir, doc, &points, pct)
}

/// Basins, plots, landscape.csv and landscape.json (`doc` plus basins, plots and points),
/// written into a fresh directory beside `out` and renamed into place.
fn write_landscape(
    out: &std::path::Path,
    mut doc: serde_json::Value,
    points: &[evaluate::landscape::Point],
    pct: f64,
) -> Result<()> {
    use evaluate::landscape::{basins, charts_1d, csv, heatmaps, Grid};
    use evaluate::plots::{load_font, render, render_heatmap};
    let grid = Grid::of(points)?;
    let basins = basins(&grid, points, pct);
    for which in ["utility", "safety"] {
        let b = &basins[which];
        match b.get("width") {
            Some(w) => eprintln!(
                "{which} basin (+{pct}%): width {:.4}{} (α {:.3} to {:.3}; minimum {:.4} at α = {:.3})",
                w.as_f64().unwrap_or(f64::NAN),
                if b["open_lo"] == true || b["open_hi"] == true { ", reaches the grid's edge" } else { "" },
                b["lo"].as_f64().unwrap_or(f64::NAN), b["hi"].as_f64().unwrap_or(f64::NAN),
                b["min"].as_f64().unwrap_or(f64::NAN), b["argmin"].as_f64().unwrap_or(f64::NAN)
            ),
            None => eprintln!(
                "{which} basin (+{pct}%): area {:.4} ({} cells){}",
                b["area"].as_f64().unwrap_or(f64::NAN), b["cells"],
                if b["open"] == true { ", reaches the grid's edge" } else { "" }
            ),
        }
    }
    basin_lm::fsutil::replace_dir(out, |tmp| {
        let mut plots = Vec::new();
        if load_font().is_some() {
            match &grid.ys {
                None => {
                    let axis = if doc["to"].is_null() {
                        "α along the random direction"
                    } else {
                        "α (0: --from, 1: --to)"
                    };
                    for c in charts_1d(points, axis, pct) {
                        render(tmp, &c)?;
                        plots.push(c.stem);
                    }
                }
                Some(ys) => {
                    for h in heatmaps(&grid.xs, ys, points, pct) {
                        render_heatmap(tmp, &h)?;
                        plots.push(h.stem);
                    }
                }
            }
        } else {
            eprintln!("plots skipped: no TrueType font found (set BASIN_FONT=/path/to/font.ttf)");
        }
        doc["basin_pct"] = pct.into();
        doc["basins"] = basins;
        doc["plots"] = serde_json::to_value(&plots)?;
        doc["points"] = serde_json::to_value(points)?;
        std::fs::write(tmp.join("landscape.csv"), csv(points))?;
        std::fs::write(
            tmp.join("landscape.json"),
            serde_json::to_string_pretty(&doc)?,
        )?;
        Ok(())
    })?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
