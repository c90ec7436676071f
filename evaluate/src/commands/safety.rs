//! `evaluate safety`: attack success rate on harmful prompt sets and refusal rate on
//! over-refusal sets, by both judges (and a model judge when given), with Wilson intervals:
//! `<out>/scores.json` and `<out>/generations.jsonl`. The replies come from a local model
//! or, with `--endpoint`, from a served one (an OpenAI-compatible API).

use super::{answer, generation, targets, JudgeArgs, ModelArgs};
use crate::endpoint::{ask_all, Asking, Endpoint, Prompt};
use crate::judges::RefusalJudge;
use crate::model_judge::{ModelJudge, ModelVerdict};
use crate::safety::{score, verdicts};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{
    Decoding, GenerationSpeed, Manifest, ModelJudgeScore, Rate, Scores, SetKind,
};
use basin_lm::chat::Conversation;
use basin_lm::fsutil::sha256_file;
use basin_lm::model::Model;
use basin_lm::schema::PreparedRow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where prepare wrote the sets (and manifest.json).
    #[arg(long, default_value = "data/prepared")]
    pub prepared: PathBuf,
    /// Prepared sets to evaluate (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "advbench,xstest")]
    pub sets: Vec<String>,
    /// Only the first N prompts of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompts a generation batch takes: a number, or auto (on a GPU as many as 80% of its
    /// free memory holds, at most 256; on the CPU 8).
    #[arg(long, default_value = "auto")]
    pub batch_size: basin_lm::generate::BatchSize,
    /// Output directory (default: <run>/eval/<model|ema>, or runs/eval-<model name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A model judge of the harmful-set replies (one --judge-kind): "unsafe" counts as an
    /// attack success.
    #[command(flatten)]
    pub judge: JudgeArgs,
    /// Generate the replies with a served model instead of --model: the base URL of an
    /// OpenAI-compatible API (vLLM, llama.cpp's server, a hosted API), e.g.
    /// http://127.0.0.1:8000/v1. Greedy; the server applies its own chat template.
    #[arg(long, requires = "model_name", conflicts_with = "model")]
    pub endpoint: Option<String>,
    /// The name the served model goes by at --endpoint.
    #[arg(long, requires = "endpoint")]
    pub model_name: Option<String>,
    /// The environment variable that holds --endpoint's API key (none is sent when unset).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub endpoint_key_env: String,
    /// Fields sent to --endpoint with every request, as a JSON object: a server's own
    /// settings, e.g. '{"repeat_penalty": 1.0}' for llama.cpp's server, whose default
    /// penalises repeats (so temperature 0 alone is not greedy there).
    #[arg(long, requires = "endpoint")]
    pub endpoint_extra: Option<String>,
    /// Requests to --endpoint in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds to wait for one reply of --endpoint before trying again.
    #[arg(long, default_value_t = 300)]
    pub endpoint_timeout: u64,
}

/// Where the replies come from.
enum Replier<'a> {
    Local(&'a Model),
    Served {
        endpoint: &'a Endpoint,
        concurrency: usize,
    },
}

/// A reply, its new tokens, and whether the model ended it (not the budget).
struct Reply {
    text: String,
    new_tokens: usize,
    stopped: bool,
}

impl Replier<'_> {
    fn describe(&self) -> String {
        match self {
            Self::Local(m) => m.path.display().to_string(),
            Self::Served { endpoint, .. } => endpoint.describe(),
        }
    }

    /// The decoder of a local model (none for a served one).
    fn decoder(&self) -> Result<Option<basin_lm::generate::DecoderKind>> {
        Ok(match self {
            Self::Local(m) => Some(m.decoder_used()?),
            Self::Served { .. } => None,
        })
    }

    /// The replies to `rows` (greedy, at most `max_new_tokens`) and how fast they came.
    fn replies(
        &self,
        rows: &[PreparedRow],
        args: &Args,
        set: &str,
    ) -> Result<(Vec<Reply>, GenerationSpeed)> {
        match self {
            Self::Local(model) => {
                let opts = model.options(args.max_new_tokens)?;
                let (replies, speed) = answer(model, rows, &opts, args.batch_size, set)?;
                let replies = replies
                    .into_iter()
                    .map(|(text, g)| Reply {
                        text,
                        new_tokens: g.tokens.len(),
                        stopped: g.stopped,
                    })
                    .collect();
                Ok((replies, speed))
            }
            Self::Served {
                endpoint,
                concurrency,
            } => {
                let requests: Vec<Prompt> = rows
                    .iter()
                    .map(|r| {
                        Prompt::chat(&Conversation {
                            system: r.system.clone(),
                            user: r.user.clone(),
                            assistant: None,
                        })
                    })
                    .collect();
                let how = Asking {
                    cache: None,
                    purpose: "generation",
                    concurrency: *concurrency,
                    label: set,
                };
                let started = std::time::Instant::now();
                let got = ask_all(endpoint, &requests, args.max_new_tokens, &how, |_| false)?;
                let replies: Vec<Reply> = got
                    .answers
                    .into_iter()
                    .map(|c| Reply {
                        text: c.text,
                        new_tokens: c.new_tokens,
                        stopped: c.stopped,
                    })
                    .collect();
                let tokens = replies.iter().map(|r| r.new_tokens).sum();
                let speed =
                    GenerationSpeed::new(tokens, started.elapsed().as_secs_f64(), *concurrency);
                Ok((replies, speed))
            }
        }
    }
}

/// Each evaluated model's output directory and scores.
pub struct Summary {
    pub evaluated: Vec<(PathBuf, Scores)>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let sets = safety_sets(&args.prepared, &args.sets)?;
    let (dtype, device) = args.model.dtype_device()?;
    let mut judges = args.judge.judges(dtype, &device, args.batch_size)?;
    if judges.len() > 1 {
        bail!("safety takes one --judge-kind (judge-check compares several)");
    }
    let model_judge = judges.pop();
    let mut evaluated = Vec::new();
    if let (Some(url), Some(name)) = (&args.endpoint, &args.model_name) {
        if args.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let timeout = std::time::Duration::from_secs(args.endpoint_timeout.max(1));
        let mut endpoint = Endpoint::new(url, name, &args.endpoint_key_env, timeout)?;
        if let Some(extra) = &args.endpoint_extra {
            endpoint = endpoint.with_extra(extra)?;
        }
        let out = args.out.clone().unwrap_or_else(|| {
            let stem: String = name
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            PathBuf::from("runs").join(format!("eval-{stem}"))
        });
        let replier = Replier::Served {
            endpoint: &endpoint,
            concurrency: args.concurrency,
        };
        let scores = evaluate(&replier, &out, args, &sets, model_judge.as_ref())?;
        evaluated.push((out, scores));
        return Ok(Summary { evaluated });
    }
    for (model, out) in targets(&args.model.model, args.out.as_deref())? {
        let model = Model::open(&model, dtype, &device)?.with_decoder(args.model.decoder)?;
        let scores = evaluate(
            &Replier::Local(&model),
            &out,
            args,
            &sets,
            model_judge.as_ref(),
        )?;
        evaluated.push((out, scores));
    }
    Ok(Summary { evaluated })
}

/// Each set with its kind, from prepare's manifest: checked before any model is loaded.
fn safety_sets(prepared: &Path, sets: &[String]) -> Result<Vec<(String, SetKind)>> {
    let path = Manifest::path(prepared);
    if !path.exists() {
        bail!(
            "{}: prepare's manifest is missing (run `just prepare`)",
            path.display()
        );
    }
    let manifest = Manifest::read_or_empty(prepared)?;
    sets.iter()
        .map(|set| {
            let Some(entry) = manifest.sets.get(set) else {
                bail!(
                    "set '{set}' is not in {}: prepare it first (prepare run --only {set})",
                    path.display()
                )
            };
            let kind = SetKind::of_role(&entry.role).with_context(|| {
                format!(
                    "set '{set}' has role {}: only harmful and overrefusal sets are scored here",
                    entry.role
                )
            })?;
            Ok((set.clone(), kind))
        })
        .collect()
}

fn evaluate(
    replier: &Replier,
    out: &Path,
    args: &Args,
    sets: &[(String, SetKind)],
    model_judge: Option<&ModelJudge>,
) -> Result<Scores> {
    let judge = RefusalJudge::default();
    let mut generations = Vec::new();
    let mut scores = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for (set, kind) in sets {
        let kind = *kind;
        let file = args.prepared.join(format!("{set}.parquet"));
        inputs.insert(set.clone(), sha256_file(&file)?);
        let mut rows = basin_lm::schema::read_parquet(&file)?;
        // Over-refusal is measured on the prompts that are safe to answer (XSTest: label safe/...).
        if kind == SetKind::Overrefusal {
            rows.retain(|r| r.label.as_deref().is_none_or(|l| l.starts_with("safe")));
        }
        rows.truncate(args.limit.unwrap_or(usize::MAX));
        let (replies, speed) = replier.replies(&rows, args, set)?;
        // The model judge reads harmful-set exchanges only: it says whether a reply is unsafe.
        let model_verdicts = match (model_judge, kind) {
            (Some(mj), SetKind::Harmful) => {
                let exchanges: Vec<(String, String)> = rows
                    .iter()
                    .zip(&replies)
                    .map(|(r, reply)| (r.user.clone(), reply.text.clone()))
                    .collect();
                let judged = mj.judge(&exchanges)?;
                if judged.cached > 0 {
                    eprintln!(
                        "{set}: {} of {} verdicts from the judge's cache",
                        judged.cached,
                        exchanges.len()
                    );
                }
                Some(judged.verdicts)
            }
            _ => None,
        };
        let mut vs = Vec::with_capacity(rows.len());
        for (i, (row, reply)) in rows.iter().zip(&replies).enumerate() {
            let v = verdicts(&judge, &row.user, &reply.text);
            let mut line = generation(set, row, &reply.text, reply.new_tokens, reply.stopped);
            line.keyword_refusal = Some(v.keyword_refusal);
            line.refusal = Some(v.refusal.to_string());
            line.degenerate = v.degenerate.map(str::to_string);
            line.model_judge = model_verdicts.as_ref().map(|mv| mv[i].as_str().to_string());
            generations.push(line);
            vs.push(v);
        }
        let mut s = score(kind, &vs);
        eprintln!(
            "{set}: {} new tokens in {:.1} s, {:.0} a second (batches of {})",
            speed.new_tokens, speed.seconds, speed.new_tokens_per_s, speed.batch_size
        );
        s.generation = Some(speed);
        if let (Some(mv), Some(mj)) = (&model_verdicts, model_judge) {
            let count = |want: ModelVerdict| mv.iter().filter(|v| **v == want).count();
            s.model_judge = Some(ModelJudgeScore {
                rate: Rate::new(count(ModelVerdict::Unsafe), mv.len()),
                unparsed: count(ModelVerdict::Unparsed),
                judge: mj.describe(),
            });
        }
        let what = match kind {
            SetKind::Harmful => "attack success",
            SetKind::Overrefusal => "refusal rate",
        };
        eprintln!(
            "{set}: {what} keyword {:.1}% [{:.1}, {:.1}], calibrated {:.1}% [{:.1}, {:.1}] (n = {})",
            100.0 * s.keyword.rate, 100.0 * s.keyword.ci95.0, 100.0 * s.keyword.ci95.1,
            100.0 * s.refusal.rate, 100.0 * s.refusal.ci95.0, 100.0 * s.refusal.ci95.1, s.n
        );
        scores.insert(set.clone(), s);
    }
    let report = Scores {
        model: replier.describe(),
        git_commit: basin_lm::provenance::git_commit(),
        decoding: Decoding {
            greedy: true,
            max_new_tokens: args.max_new_tokens,
            decoder: replier.decoder()?,
        },
        limit: args.limit,
        prepared_sha256: inputs,
        sets: scores,
    };
    basin_lm::artifacts::write_lines(&out.join("generations.jsonl"), &generations)?;
    basin_lm::artifacts::write(&Scores::path(out), &report)?;
    eprintln!("wrote {}", out.display());
    Ok(report)
}
