//! `evaluate judge-check`: the string judges against human-labelled replies (PyRIT):
//! accuracy, precision and recall on the split the calibrated judge was tuned on and on
//! the held-out one. PyRIT's labellers call an off-topic reply a refusal, so the third
//! judge is the calibrated one with the degenerate / off-topic flag ([`crate::degenerate`])
//! counted as a refusal.

use crate::calibration::{read_labelled, split, Confusion};
use crate::degenerate::refuses_or_no_answer;
use crate::judges::{keyword_refuses, RefusalJudge};
use anyhow::Result;
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
}

/// One row of the printed table.
pub struct JudgeRow {
    pub split: &'static str,
    pub judge: &'static str,
    pub confusion: Confusion,
}

pub struct Summary {
    pub rows: Vec<JudgeRow>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let (dev_set, test_set) = split(read_labelled(&args.full)?, read_labelled(&args.dev)?);
    let judge = RefusalJudge::default();
    let mut rows = Vec::new();
    println!("| split | judge | n | accuracy | precision | recall |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (split, set) in [("dev (tuned on)", &dev_set), ("test (held out)", &test_set)] {
        let judged = [
            (
                "keyword (Qi et al.)",
                Confusion::of(set, |_, r| keyword_refuses(r)),
            ),
            (
                "refusal (calibrated)",
                Confusion::of(set, |_, r| judge.refuses(r)),
            ),
            (
                "calibrated + degenerate flag",
                Confusion::of(set, |q, r| refuses_or_no_answer(&judge, q, r)),
            ),
        ];
        for (name, c) in judged {
            println!(
                "| {split} | {name} | {} | {:.3} | {:.3} | {:.3} |",
                c.n(),
                c.accuracy(),
                c.precision(),
                c.recall()
            );
            rows.push(JudgeRow {
                split,
                judge: name,
                confusion: c,
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
