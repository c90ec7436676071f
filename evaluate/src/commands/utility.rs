//! `evaluate utility`: the validation loss and perplexity of a model on the held-out rows
//! of prepared training sets, and its replies to prompt sets (MT-Bench, AlpacaEval) with
//! the share that end their turn: `<out>/utility.json` (+ `utility_generations.jsonl`).

use super::{answer, generation, prepared_rows, targets, ModelArgs};
use anyhow::Result;
use basin_lm::artifacts::{ReplyStats, Utility, ValLoss};
use basin_lm::fsutil::sha256_file;
use basin_lm::model::Model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "data/prepared")]
    pub prepared: PathBuf,
    /// Sets whose val rows give the validation loss (`--sets ""`: none).
    #[arg(long, value_delimiter = ',', default_value = "dolly")]
    pub sets: Vec<String>,
    /// Only the first N validation rows of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Prepared prompt sets to answer and save (e.g. mt-bench,alpaca-eval): replies go to
    /// utility_generations.jsonl, with the share of non-empty replies that end with EOS.
    #[arg(long, value_delimiter = ',')]
    pub reply_sets: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts a generation batch takes: a number, or auto (on a GPU as many as 80% of its
    /// free memory holds, at most 256; on the CPU 8).
    #[arg(long, default_value = "auto")]
    pub batch_size: basin_lm::generate::BatchSize,
    /// Output directory (default: <run>/eval/<model|ema>, or runs/eval-<model name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Each evaluated model's output directory and figures.
pub struct Summary {
    pub evaluated: Vec<(PathBuf, Utility)>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let (dtype, device) = args.model.dtype_device()?;
    let mut evaluated = Vec::new();
    for (model, out) in targets(&args.model.model, args.out.as_deref())? {
        let model = Model::open(&model, dtype, &device)?.with_decoder(args.model.decoder)?;
        let utility = evaluate(&model, args, &out)?;
        evaluated.push((out, utility));
    }
    Ok(Summary { evaluated })
}

/// Validation loss and perplexity of `model` on the val rows of the prepared sets, and its
/// replies to the prompts of the reply sets.
fn evaluate(model: &Model, args: &Args, out: &Path) -> Result<Utility> {
    let pad = model.text.tokenizer.eos_id().unwrap_or(0);
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut val = BTreeMap::new();
    for set in args.sets.iter().filter(|s| !s.is_empty()) {
        let (file, rows) = prepared_rows(&args.prepared, set, Some("val"), limit)?;
        let r: Vec<(&[u32], usize)> = rows.iter().map(|r| r.example()).collect();
        let (loss, tokens) = basin_lm::batch::mean_loss(&model.llama, &r, args.micro_batch, pad)?;
        eprintln!(
            "{set}: validation loss {loss:.4} (perplexity {:.2}) over {tokens} reply tokens of {} rows",
            loss.exp(),
            rows.len()
        );
        val.insert(
            set.clone(),
            ValLoss {
                val_loss: loss,
                perplexity: loss.exp(),
                rows: rows.len(),
                reply_tokens: tokens,
                prepared_sha256: sha256_file(&file)?,
            },
        );
    }
    let opts = model.options(args.max_new_tokens)?;
    let mut generations = Vec::new();
    let mut replies_of = BTreeMap::new();
    let reply_sets: Vec<&String> = args.reply_sets.iter().filter(|s| !s.is_empty()).collect();
    for set in &reply_sets {
        let (file, rows) = prepared_rows(&args.prepared, set, None, limit)?;
        let (replies, _) = answer(model, &rows, &opts, args.batch_size, set)?;
        for (row, (reply, g)) in rows.iter().zip(&replies) {
            generations.push(generation(set, row, reply, g.tokens.len(), g.stopped));
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
        replies_of.insert(
            set.to_string(),
            ReplyStats {
                replies: replies.len(),
                non_empty,
                eos_share,
                mean_new_tokens: mean_tokens,
                max_new_tokens: args.max_new_tokens,
                prepared_sha256: sha256_file(&file)?,
            },
        );
    }
    if !reply_sets.is_empty() {
        basin_lm::artifacts::write_lines(&out.join("utility_generations.jsonl"), &generations)?;
    }
    let doc = Utility {
        model: model.path.display().to_string(),
        git_commit: basin_lm::provenance::git_commit(),
        val,
        replies: replies_of,
    };
    basin_lm::artifacts::write(&Utility::path(out), &doc)?;
    eprintln!("wrote {}", Utility::path(out).display());
    Ok(doc)
}
