//! Batched decoding with a KV cache: prompts left-padded to one length (padding masked, each
//! row's positions counted from its own first token), one forward per new token, greedy
//! or seeded temperature/top-p sampling, stopping at end-of-turn or a token budget.

use crate::llama::{attention_bias, KvCache, Llama, Pass};
use crate::rng::{mix64, SplitMix64};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// None: greedy (argmax, lowest id on ties).
    pub sampling: Option<Sampling>,
    /// Tokens that end a reply (not included in it).
    pub stop: Vec<u32>,
    /// Fills left padding and finished rows; masked, so any id works.
    pub pad_id: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// A stop token ended the reply (false: the budget did).
    pub stopped: bool,
}

/// Generates a reply for each prompt, all in one batch. `rows[i]` names prompt `i` within
/// the whole request (its index there): it samples with the seed `mix64(seed ^ rows[i])`,
/// so a prompt's reply does not depend on what it is batched with.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    if prompts.len() != rows.len() {
        bail!("{} prompts but {} row indices", prompts.len(), rows.len());
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(p) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {p} is empty");
    }
    let device = model.device().clone();
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if width + opts.max_new_tokens > model.config.max_positions() {
        bail!(
            "prompt of {width} tokens + {} new exceeds the model's {} positions ({})",
            opts.max_new_tokens,
            model.config.max_positions(),
            model.config.positions_reason()
        );
    }
    let mut ids = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut key_valid = Vec::with_capacity(b);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(opts.pad_id, pad).chain(p.iter().copied()));
        positions.extend(std::iter::repeat_n(0u32, pad).chain(0..p.len() as u32));
        key_valid.push((0..width).map(|i| i >= pad).collect::<Vec<bool>>());
    }
    let seed = opts.sampling.as_ref().map_or(0, |s| s.seed);
    let mut rngs: Vec<SplitMix64> = rows
        .iter()
        .map(|&r| SplitMix64::new(mix64(seed ^ r as u64)))
        .collect();
    let mut cache = KvCache::default();
    let mut out: Vec<Generated> = vec![
        Generated {
            tokens: Vec::new(),
            stopped: false
        };
        b
    ];
    let mut done = vec![false; b];
    let mut input = Tensor::from_vec(ids, (b, width), &device)?;
    let mut pos = Tensor::from_vec(positions, (b, width), &device)?;
    for step in 0..opts.max_new_tokens {
        let n_q = input.dim(1)?;
        let bias = attention_bias(&key_valid, n_q, model.dtype(), &device)?;
        let hidden = model.hidden(&input, &pos, &bias, Some(&mut cache), Pass::Infer)?;
        let last = hidden.narrow(1, n_q - 1, 1)?.squeeze(1)?;
        let logits = model.logits(&last, Pass::Infer)?.to_dtype(DType::F32)?;
        let next = match &opts.sampling {
            None => logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
            Some(s) => {
                let rows = logits.to_vec2::<f32>()?;
                rows.iter()
                    .zip(rngs.iter_mut())
                    .map(|(r, rng)| sample(r, s, rng))
                    .collect()
            }
        };
        let mut feed = Vec::with_capacity(b);
        for (i, &tok) in next.iter().enumerate() {
            if !done[i] {
                if opts.stop.contains(&tok) {
                    done[i] = true;
                    out[i].stopped = true;
                } else {
                    out[i].tokens.push(tok);
                }
            }
            feed.push(if done[i] { opts.pad_id } else { tok });
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        let next_pos: Vec<u32> = prompts.iter().map(|p| (p.len() + step) as u32).collect();
        for row in key_valid.iter_mut() {
            row.push(true);
        }
        input = Tensor::from_vec(feed, (b, 1), &device)?;
        pos = Tensor::from_vec(next_pos, (b, 1), &device)?;
    }
    Ok(out)
}

/// Draws a token from softmax(logits / T), restricted to the smallest set of most likely
/// tokens whose probability reaches top_p.
fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    let t = s.temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(f64, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (((l as f64 - max) / t).exp(), i as u32))
        .collect();
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let total: f64 = probs.iter().map(|p| p.0).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for (p, _) in &probs {
        kept += p / total;
        n += 1;
        if kept >= s.top_p {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.0).sum();
    let mut u = rng.uniform() * mass;
    for (p, id) in &probs[..n] {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs[n - 1].1
}
