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
///
/// An f32 model on the CPU runs the written-out CPU decoder ([`crate::decode::Decoder`]);
/// any other runs candle's graph ([`generate_with_candle`]): [`DecoderKind::Auto`].
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    generate_by(DecoderKind::Auto, model, prompts, rows, opts)
}

/// [`generate`] by the decoder `kind` names (resolved for the model: [`DecoderKind::resolve`]).
pub fn generate_by(
    kind: DecoderKind,
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    match kind.resolve(model)? {
        DecoderKind::Cpu => generate_on_cpu(model, prompts, rows, opts),
        DecoderKind::Pass => generate_written(model, prompts, rows, opts),
        DecoderKind::Graph | DecoderKind::Auto => generate_with_candle(model, prompts, rows, opts),
    }
}

/// Which decoder generates a model's replies (`evaluate --decoder`). Each gives the same
/// greedy replies up to the rounding of its sums (checked against one another in every
/// family: lm/tests/model.rs, and on a GPU lm/tests/decode_device.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// `cpu` for an f32 model on the CPU, `graph` for any other: the decoders that have
    /// been checked where they run.
    Auto,
    /// candle's graph of the model ([`generate_with_candle`]): any device and dtype.
    Graph,
    /// The written-out CPU decoder ([`crate::decode::Decoder`]): an f32 model on the CPU.
    Cpu,
    /// The training pass's layers on the model's device ([`generate_written`]): f32 or
    /// bf16 on a GPU (a KV cache written in place, greedy tokens chosen on the device), f32
    /// on the CPU.
    Pass,
}

impl DecoderKind {
    /// The decoder this choice means for `model` (`Auto` made `Cpu` or `Graph`), or why it
    /// cannot decode it.
    pub fn resolve(self, model: &Llama) -> Result<DecoderKind> {
        Ok(match self {
            DecoderKind::Auto if crate::decode::supports(model) => DecoderKind::Cpu,
            DecoderKind::Auto => DecoderKind::Graph,
            DecoderKind::Cpu if !crate::decode::supports(model) => {
                let (dtype, device) = (model.dtype(), model.device());
                bail!("--decoder cpu decodes an f32 model on the CPU, not {dtype:?} on {device:?}")
            }
            DecoderKind::Pass => {
                if let Some(why) = crate::backprop::unsupported(model) {
                    bail!("--decoder pass: {why}");
                }
                DecoderKind::Pass
            }
            kind => kind,
        })
    }
}

impl std::str::FromStr for DecoderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => DecoderKind::Auto,
            "graph" => DecoderKind::Graph,
            "cpu" => DecoderKind::Cpu,
            "pass" => DecoderKind::Pass,
            _ => return Err(format!("expected auto, graph, cpu or pass, found '{s}'")),
        })
    }
}

impl std::fmt::Display for DecoderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecoderKind::Auto => "auto",
            DecoderKind::Graph => "graph",
            DecoderKind::Cpu => "cpu",
            DecoderKind::Pass => "pass",
        })
    }
}

/// [`generate`] by the written-out CPU decoder ([`DecoderKind::Cpu`]; resolved beforehand).
fn generate_on_cpu(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    let Some(width) = check(model, prompts, rows, opts)? else {
        return Ok(Vec::new());
    };
    let held = crate::decode::HeldModel::of(model)?;
    let mut decoder =
        crate::decode::Decoder::new(model, &held, prompts.len(), width + opts.max_new_tokens)?;
    let b = prompts.len();
    decode_loop(prompts, rows, opts, |ids, positions, key_valid| {
        Ok(Next::Logits(on_host(
            decoder.step(&ids, &positions, key_valid)?,
            b,
        )?))
    })
}

/// A step's logits [b, vocab] (row-major, on the host) as the tensor decode_loop samples.
fn on_host(logits: Vec<f32>, b: usize) -> Result<Tensor> {
    let vocab = logits.len() / b;
    Ok(Tensor::from_vec(
        logits,
        (b, vocab),
        &candle_core::Device::Cpu,
    )?)
}

/// [`generate`] through candle's graph of the model ([`Llama::hidden`] with its KV cache),
/// on any device and dtype: the reference the written-out decoder is tested against.
pub fn generate_with_candle(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    if check(model, prompts, rows, opts)?.is_none() {
        return Ok(Vec::new());
    }
    let device = model.device().clone();
    let b = prompts.len();
    let mut cache = KvCache::default();
    decode_loop(prompts, rows, opts, |ids, positions, key_valid| {
        let t = ids.len() / b;
        let input = Tensor::from_vec(ids, (b, t), &device)?;
        let pos = Tensor::from_vec(positions, (b, t), &device)?;
        let bias = attention_bias(key_valid, t, model.dtype(), &device)?;
        let hidden = model.hidden(&input, &pos, &bias, Some(&mut cache), Pass::Infer)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logits = model.logits(&last, Pass::Infer)?.to_dtype(DType::F32)?;
        Ok(Next::Logits(logits))
    })
}

/// [`generate`] through the written-out training pass's layers on the model's device
/// ([`crate::decode`]'s `PassDecoder`: f32 or bf16 on a GPU, f32 on the CPU, where it is the
/// check of the GPU's path against the CPU decoder): a KV cache allocated once and written
/// in place, a few launches a layer on a GPU; greedy decoding picks each token where the
/// logits are ([`crate::decode::Step::greedy`]). This is `--decoder pass`
/// ([`DecoderKind::Pass`]); `auto` does not pick it on a GPU until its device test
/// (lm/tests/decode_device.rs) has run on a card: candle's graph decodes there.
pub fn generate_written(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    let Some(width) = check(model, prompts, rows, opts)? else {
        return Ok(Vec::new());
    };
    let b = prompts.len();
    let capacity = width + opts.max_new_tokens;
    let greedy = opts.sampling.is_none();
    crate::decode::with_pass_decoder(model, b, capacity, |step| {
        decode_loop(prompts, rows, opts, |ids, positions, key_valid| {
            Ok(if greedy {
                Next::Tokens(step.greedy(&ids, &positions, key_valid)?)
            } else {
                Next::Logits(on_host(step.logits(&ids, &positions, key_valid)?, b)?)
            })
        })
    })
}

/// Checks a request; the prompts' common (padded) width, or None when there are none.
fn check(
    model: &Llama,
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
) -> Result<Option<usize>> {
    if prompts.len() != rows.len() {
        bail!("{} prompts but {} row indices", prompts.len(), rows.len());
    }
    if prompts.is_empty() {
        return Ok(None);
    }
    if let Some(p) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {p} is empty");
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if width + opts.max_new_tokens > model.config.max_positions() {
        bail!(
            "prompt of {width} tokens + {} new exceeds the model's {} positions ({})",
            opts.max_new_tokens,
            model.config.max_positions(),
            model.config.positions_reason()
        );
    }
    Ok(Some(width))
}

/// What a decoding step hands [`decode_loop`]: the next-token logits [b, vocab] (f32)
/// after each row's last token, or, when greedy decoding chose where the logits were, the
/// tokens (the same choice as `argmax` of the logits).
enum Next {
    Logits(Tensor),
    Tokens(Vec<u32>),
}

/// The decoding loop over a forward `step(ids, positions, key_valid)` that feeds [b, t]
/// tokens (row-major) and returns what comes [`Next`]: the prompts left-padded to one
/// width, then one token a row per step.
fn decode_loop(
    prompts: &[Vec<u32>],
    rows: &[usize],
    opts: &GenerateOptions,
    mut step: impl FnMut(Vec<u32>, Vec<u32>, &[Vec<bool>]) -> Result<Next>,
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
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
    let mut out: Vec<Generated> = vec![
        Generated {
            tokens: Vec::new(),
            stopped: false
        };
        b
    ];
    let mut done = vec![false; b];
    for i in 0..opts.max_new_tokens {
        let next = match (step(ids, positions, &key_valid)?, &opts.sampling) {
            (Next::Tokens(tokens), None) => tokens,
            (Next::Logits(logits), None) => logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
            (Next::Logits(logits), Some(s)) => {
                let rows = logits.to_vec2::<f32>()?;
                rows.iter()
                    .zip(rngs.iter_mut())
                    .map(|(r, rng)| sample(r, s, rng))
                    .collect()
            }
            (Next::Tokens(_), Some(_)) => bail!("sampling needs the logits, not greedy tokens"),
        };
        if next.len() != b {
            bail!("a decoding step chose {} tokens for {b} rows", next.len());
        }
        let mut feed = Vec::with_capacity(b);
        for (r, &tok) in next.iter().enumerate() {
            if !done[r] {
                if opts.stop.contains(&tok) {
                    done[r] = true;
                    out[r].stopped = true;
                } else {
                    out[r].tokens.push(tok);
                }
            }
            feed.push(if done[r] { opts.pad_id } else { tok });
        }
        if done.iter().all(|&d| d) || i + 1 == opts.max_new_tokens {
            break;
        }
        positions = prompts.iter().map(|p| (p.len() + i) as u32).collect();
        for row in key_valid.iter_mut() {
            row.push(true);
        }
        ids = feed;
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

/// How many prompts one generation batch takes (`--batch-size`): a number, or `auto` —
/// on a GPU as many as its free memory holds ([`fitting_batch`]), on the CPU
/// [`CPU_BATCH`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSize {
    Auto,
    Fixed(usize),
}

/// `auto`'s batch on the CPU: the fixed default `evaluate` had before `auto` (its CPU
/// figures in docs/performance.md are at batch 1 and 8). On the CPU memory is not what
/// limits a batch, and past a few rows the decoder's throughput grows slowly.
pub const CPU_BATCH: usize = 8;

/// The largest batch `auto` picks on a GPU: past it a batch gains little throughput and
/// pads more (prompts differ in length).
pub const MAX_AUTO_BATCH: usize = 256;

impl std::str::FromStr for BatchSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BatchSize::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(BatchSize::Fixed(n)),
                _ => Err(format!("expected a positive number or auto, found '{s}'")),
            },
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Auto => write!(f, "auto"),
            BatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Bytes of device memory one sequence of `prompt` + `new` tokens takes while candle's graph
/// generates it in `dtype_bytes`-wide values: its KV cache over every layer (and one layer's
/// copy while the cache grows), one layer's activations over the prompt (the residual
/// stream and norms, q/k/v with their RoPE copies, attention's output, the MLP's three
/// [t, ff] values, and the scores and probabilities [heads, t, t] in f32), and the last
/// position's logits in f32 twice. An upper estimate: what `auto` divides free memory by.
pub fn generation_bytes(
    c: &crate::architecture::ModelConfig,
    dtype_bytes: usize,
    prompt: usize,
    new: usize,
) -> u64 {
    let (w, hd) = (dtype_bytes as u64, c.head_dim() as u64);
    let (h, ff, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (nh, nkv, layers) = (
        c.num_attention_heads as u64,
        c.num_key_value_heads as u64,
        c.num_hidden_layers as u64,
    );
    let (p, len) = (prompt as u64, (prompt + new) as u64);
    let kv = 2 * (layers + 1) * nkv * hd * len * w;
    let activations = p * (4 * h + 2 * (nh + 2 * nkv) * hd + 2 * nh * hd + 4 * ff) * w;
    let scores = 2 * nh * p * p * 4;
    kv + activations + scores + 2 * v * 4
}

/// `auto`'s batch on a GPU with `free` bytes: 80% of them over [`generation_bytes`] of the
/// longest prompt, at least 1 and at most [`MAX_AUTO_BATCH`] and `prompts`.
pub fn fitting_batch(per_sequence: u64, free: u64, prompts: usize) -> usize {
    let fits = (free / 5 * 4) / per_sequence.max(1);
    (fits as usize).clamp(1, MAX_AUTO_BATCH).min(prompts.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architecture::ModelConfig;

    #[test]
    fn batch_size_is_a_positive_number_or_auto() {
        assert_eq!("auto".parse::<BatchSize>(), Ok(BatchSize::Auto));
        assert_eq!("16".parse::<BatchSize>(), Ok(BatchSize::Fixed(16)));
        for bad in ["0", "-1", "eight", ""] {
            let err = bad.parse::<BatchSize>().unwrap_err();
            assert!(err.contains("positive number or auto"), "{bad}: {err}");
        }
        assert_eq!(BatchSize::Fixed(3).to_string(), "3");
        assert_eq!(BatchSize::Auto.to_string(), "auto");
    }

    /// The memory a sequence takes grows by its KV cache's row per new token (every layer's
    /// keys and values, and the copy of one while the cache grows), and with the prompt by
    /// more than that (the prompt's activations and scores besides its cache).
    #[test]
    fn a_sequence_takes_its_kv_cache_and_its_prompts_activations() {
        let smol = ModelConfig::llama(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, true, 2048);
        let kv_row = 2 * 31 * 3 * 64 * 2;
        let bytes = |p, n| generation_bytes(&smol, 2, p, n);
        assert_eq!(bytes(64, 65) - bytes(64, 64), kv_row);
        assert!(bytes(65, 64) - bytes(64, 64) > kv_row);
        // bf16, 64 + 64 tokens: a few MB (the cache alone is 128 rows).
        let b = bytes(64, 64);
        assert!((128 * kv_row..16 << 20).contains(&b), "{b}");
        assert!(generation_bytes(&smol, 4, 64, 64) > b);
    }

    #[test]
    fn the_fitting_batch_is_clamped() {
        let gib = 1u64 << 30;
        // 80% of the free memory over a sequence's bytes.
        assert_eq!(fitting_batch(gib / 10, gib, 1000), 8);
        // At least one, at most MAX_AUTO_BATCH and the prompts there are.
        assert_eq!(fitting_batch(2 * gib, gib, 1000), 1);
        assert_eq!(fitting_batch(1, 80 * gib, 1000), MAX_AUTO_BATCH);
        assert_eq!(fitting_batch(1, 80 * gib, 40), 40);
        assert_eq!(fitting_batch(0, 0, 0), 1);
    }
}
