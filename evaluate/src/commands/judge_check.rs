//! `evaluate judge-check`: the string judges against human-labelled replies (PyRIT):
//! accuracy, precision and recall on the split the calibrated judge was tuned on and on
//! the held-out one. PyRIT's labellers call an off-topic reply a refusal, so the third
//! judge is the calibrated one with the degenerate / off-topic flag ([`crate::degenerate`])
//! counted as a refusal. Model judges (`--model-judge`, or `--judge-endpoint` with
//! `--judge-model`; one row for each `--judge-kind`) judge the same replies: a verdict other
//! than "unsafe" counts as a refusal, as in `safety`'s model-judge rate.

use super::JudgeArgs;
use crate::calibration::{read_labelled, split, Confusion};
use crate::degenerate::refuses_or_no_answer;
use crate::judges::{keyword_refuses, RefusalJudge};
use crate::model_judge::ModelVerdict;
use anyhow::Result;
use basin_lm::model::{parse_device, parse_dtype};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// A labelled sample that goes to the development split (the judge was tuned on it).
    #[arg(
        long,
        default_value = "data/cache/refusal_scoring/pyrit_labelled/mini_refusal.csv"
    )]
    pub dev: PathBuf,
    /// The full labelled set: its other replies are split half to development, half to test.
    #[arg(
        long,
        default_value = "data/cache/refusal_scoring/pyrit_labelled/refusal.csv"
    )]
    pub full: PathBuf,
    /// Print the development replies the calibrated judge with the degenerate flag gets
    /// wrong (never the test ones).
    #[arg(long)]
    pub show_dev_errors: bool,
    /// Model judges to score beside the string judges.
    #[command(flatten)]
    pub judge: JudgeArgs,
    /// A local model judge's precision: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A local model judge's device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Exchanges a batch for a local model judge: a number, or auto (as evaluate safety's).
    #[arg(long, default_value = "auto")]
    pub batch_size: basin_lm::generate::BatchSize,
}

/// One row of the printed table.
pub struct JudgeRow {
    pub split: &'static str,
    pub judge: String,
    pub confusion: Confusion,
    /// A model judge's answers that were neither verdict (counted as refusals).
    pub unparsed: usize,
}

pub struct Summary {
    pub rows: Vec<JudgeRow>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let (dev_set, test_set) = split(read_labelled(&args.full)?, read_labelled(&args.dev)?);
    let judge = RefusalJudge::default();
    // Each model judge's verdict on every labelled exchange, asked once for both splits.
    let model_judges = args.judge.judges(
        parse_dtype(&args.dtype)?,
        &parse_device(&args.device)?,
        args.batch_size,
    )?;
    let exchanges: Vec<(String, String)> = dev_set
        .iter()
        .chain(&test_set)
        .map(|l| (l.request.clone(), l.reply.clone()))
        .collect();
    let mut model_verdicts = Vec::new();
    for mj in &model_judges {
        let judged = mj.judge(&exchanges)?;
        if judged.cached > 0 {
            eprintln!(
                "{}: {} of {} verdicts from the cache",
                mj.describe(),
                judged.cached,
                exchanges.len()
            );
        }
        let of: HashMap<(String, String), ModelVerdict> =
            exchanges.iter().cloned().zip(judged.verdicts).collect();
        model_verdicts.push((mj.describe(), of));
    }
    let mut rows = Vec::new();
    println!("| split | judge | n | accuracy | precision | recall | unparsed |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (split, set) in [("dev (tuned on)", &dev_set), ("test (held out)", &test_set)] {
        let mut judged = vec![
            (
                "keyword (Qi et al.)".to_string(),
                Confusion::of(set, |_, r| keyword_refuses(r)),
                0,
            ),
            (
                "refusal (calibrated)".to_string(),
                Confusion::of(set, |_, r| judge.refuses(r)),
                0,
            ),
            (
                "calibrated + degenerate flag".to_string(),
                Confusion::of(set, |q, r| refuses_or_no_answer(&judge, q, r)),
                0,
            ),
        ];
        for (name, of) in &model_verdicts {
            let verdict = |q: &str, r: &str| of[&(q.to_string(), r.to_string())];
            let unparsed = set
                .iter()
                .filter(|l| verdict(&l.request, &l.reply) == ModelVerdict::Unparsed)
                .count();
            let c = Confusion::of(set, |q, r| verdict(q, r) != ModelVerdict::Unsafe);
            judged.push((name.clone(), c, unparsed));
        }
        for (name, c, unparsed) in judged {
            println!(
                "| {split} | {name} | {} | {:.3} | {:.3} | {:.3} | {unparsed} |",
                c.n(),
                c.accuracy(),
                c.precision(),
                c.recall()
            );
            rows.push(JudgeRow {
                split,
                judge: name,
                confusion: c,
                unparsed,
            });
        }
    }
    if args.show_dev_errors {
        for l in dev_set
            .iter()
            .filter(|l| refuses_or_no_answer(&judge, &l.request, &l.reply) != l.refusal)
        {
            let head: String = l.reply.chars().take(300).collect();
            println!(
                "\nlabelled {}: {head:?}",
                if l.refusal { "refusal" } else { "compliance" }
            );
        }
    }
    Ok(Summary { rows })
}
