//! `evaluate safety`: attack success rate on harmful prompt sets and refusal rate on
//! over-refusal sets, by both judges (and a model judge when given), with Wilson intervals:
//! `<out>/scores.json` and `<out>/generations.jsonl`.

use super::{answer, generation, targets, ModelArgs};
use crate::judges::RefusalJudge;
use crate::model_judge::{ModelJudge, ModelVerdict};
use crate::safety::{score, verdicts};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{Decoding, Manifest, ModelJudgeScore, Rate, Scores, SetKind};
use basin_lm::fsutil::sha256_file;
use basin_lm::model::Model;
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
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Output directory (default: <run>/eval/<model|ema>, or runs/eval-<model name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A local safety classifier (Llama-family HF directory, e.g. Llama-Guard-3-1B) as a
    /// third judge of harmful-set replies: "unsafe" counts as an attack success.
    #[arg(long)]
    pub model_judge: Option<PathBuf>,
}

/// Each evaluated model's output directory and scores.
pub struct Summary {
    pub evaluated: Vec<(PathBuf, Scores)>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let sets = safety_sets(&args.prepared, &args.sets)?;
    let (dtype, device) = args.model.dtype_device()?;
    let model_judge = match &args.model_judge {
        Some(p) => Some(ModelJudge::new(Model::open(p, dtype, &device)?)?),
        None => None,
    };
    let mut evaluated = Vec::new();
    for (model, out) in targets(&args.model.model, args.out.as_deref())? {
        let model = Model::open(&model, dtype, &device)?;
        let scores = evaluate(&model, &out, args, &sets, model_judge.as_ref())?;
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
    model: &Model,
    out: &Path,
    args: &Args,
    sets: &[(String, SetKind)],
    model_judge: Option<&ModelJudge>,
) -> Result<Scores> {
    let judge = RefusalJudge::default();
    let opts = model.options(args.max_new_tokens)?;
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
        let (replies, speed) = answer(model, &rows, &opts, args.batch_size, set)?;
        // The model judge reads harmful-set exchanges only: it says whether a reply is unsafe.
        let model_verdicts = match (model_judge, kind) {
            (Some(mj), SetKind::Harmful) => {
                let exchanges: Vec<(String, String)> = rows
                    .iter()
                    .zip(&replies)
                    .map(|(r, (reply, _))| (r.user.clone(), reply.clone()))
                    .collect();
                Some(mj.judge(&exchanges, args.batch_size)?)
            }
            _ => None,
        };
        let mut vs = Vec::with_capacity(rows.len());
        for (i, (row, (reply, g))) in rows.iter().zip(&replies).enumerate() {
            let v = verdicts(&judge, &row.user, reply);
            let mut line = generation(set, row, reply, g);
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
                judge: mj.model.path.display().to_string(),
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
        model: model.path.display().to_string(),
        git_commit: basin_lm::provenance::git_commit(),
        decoding: Decoding {
            greedy: true,
            max_new_tokens: args.max_new_tokens,
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
