//! Training and generation speed on the SmolLM2-135M shape (random init: the speed does not
//! depend on the weights), the figures PyTorch's baselines measure:
//!
//! - a training step (forward, backward, AdamW) on `--batch` x `--seq` random tokens, loss
//!   on every token: f32 through the written-out pass (lm/src/backprop.rs, on the CPU or the
//!   GPU) and, on a GPU, bf16 through it too (`bf16`: bf16 weights and activations, f32
//!   master weights), and f32 and bf16 through candle's autograd (`f32-autograd`,
//!   `bf16-autograd`): tokens/s and the time of each phase;
//! - greedy generation, `--gen-batch` prompts of 64 random tokens + 64 new tokens (and
//!   batch 1): on a GPU through candle's graph (what `generate` runs there) and through the
//!   training pass's layers (`generate_written`) in f32 and bf16.
//!
//! Defaults: 16 x 512 and batch 64 on a GPU, 4 x 128 and batch 8 on the CPU (the shapes of
//! the PyTorch + transformers figures we compare with). `--torch FILE` prints PyTorch's
//! figures (a JSON of hf_train_*_tok_s / hf_generate_*_tok_s keys on a GPU, of
//! scripts/torch_cpu_bench.py's keys on the CPU: `just bench-cpu-torch`) beside ours; `--json
//! FILE` writes ours; `--dtype f32|f32-autograd|bf16|bf16-autograd|bf16-pure` trains in that
//! one only (bf16-pure: pure bf16 state with the EMA, as configs/paper-7b.toml, through
//! autograd as `pass = "auto"` trains it; GPU only, and only when named),
//! `--train-only` skips generation (`--gen-only` training), `--layers N` keeps N of the 30 layers, `--warm N` sets
//! the untimed steps (for a profiler: `--train-only --dtype f32 --layers 4 --warm 1 --iters
//! 1`). `--model-config FILE` trains another shape (configs/models/*.json): with
//! `--dtype bf16-pure --batch 4 --seq 512 --train-only --iters 3 --warm 1` on the 7B shape it
//! is issue 22's GPU run, beside `train --plan` of the same micro-batch. Each training line
//! also gives TFLOP/s and MFU (against `--peak-tflops`, default 989) and, on a GPU, the memory
//! in use after the steps. `just bench` runs it.

use basin_lm::artifacts::{Keep, StateConfig, Theta0};
use basin_lm::backprop;
use basin_lm::batch::{loss, Batch};
use basin_lm::generate::{generate, generate_written, GenerateOptions};
use basin_lm::llama::{random_weights, Llama, ModelConfig, Pass};
use basin_lm::rng::SplitMix64;
use candle_core::{DType, Device};
use std::time::Instant;
use train::config::TrainConfig;
use train::state::TrainState;

/// The SmolLM2-135M shape, or `--model-config FILE`'s (a config.json such as those of
/// configs/models/); `--layers N` keeps N layers.
fn shape() -> anyhow::Result<ModelConfig> {
    let mut cfg = match arg("--model-config") {
        Some(path) => basin_lm::weights::read_config(std::path::Path::new(&path))?,
        None => ModelConfig::llama(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, true, 2048),
    };
    if let Some(layers) = arg("--layers").and_then(|v| v.parse().ok()) {
        cfg.num_hidden_layers = layers;
    }
    Ok(cfg)
}

/// Training FLOPs a token: 6 per weight of the products (forward 2, backward 4) plus
/// attention's scores and weighted sum, 12·layers·hidden·t (the usual count, causal
/// masking not subtracted).
fn flops_per_token(cfg: &ModelConfig, t: usize) -> f64 {
    let weights: usize = cfg
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let embed = cfg.vocab_size * cfg.hidden_size;
    let products = weights - if cfg.tie_word_embeddings { 0 } else { embed };
    6.0 * products as f64
        + 12.0 * (cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t) as f64
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn random_ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

#[derive(Default)]
struct Phases {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

/// A training forward pass, kept for its backward.
enum Forward<'m> {
    Written(Box<backprop::Trace<'m>>),
    Autograd(candle_core::Tensor),
}

/// Mean seconds of one training step over `iters` steps after `warm`, by phase.
fn train_step(
    dev: &Device,
    dtype: DType,
    pure: bool,
    written: bool,
    b: usize,
    t: usize,
    iters: usize,
) -> anyhow::Result<(f64, Phases)> {
    let cfg = shape()?;
    let varmap = random_weights(&cfg, 0, dtype, dev)?;
    let model = Llama::new(&cfg, &varmap)?;
    let mut config = TrainConfig {
        lr: 1e-5,
        ..TrainConfig::default()
    };
    if pure {
        // Pure bf16 with the EMA blended every step, as configs/paper-7b.toml trains.
        config.state = StateConfig {
            weights: Keep::Pair,
            moments: Keep::Bf16,
            ema: Keep::Pair,
            theta0: Theta0::Host,
            ..StateConfig::default()
        };
        config.ema.enabled = true;
    }
    let mut state = TrainState::new(&varmap, config.ema.enabled, &config.state)?;
    let ids = random_ids(b * t, 1, cfg.vocab_size);
    let rows: Vec<(&[u32], usize)> = ids.chunks(t).map(|r| (r, 0)).collect();
    let batch = Batch::new(&rows, 0, dtype, dev)?;
    let warm = arg("--warm").and_then(|v| v.parse().ok()).unwrap_or(2);
    let mut p = Phases::default();
    let mut total = 0.0;
    for i in 0..warm + iters {
        dev.synchronize()?;
        let t0 = Instant::now();
        // As train runs it (`loss_and_grads`), timed by phase: the written-out pass (f32 on
        // the CPU, f32 or bf16 on the GPU) or candle's autograd.
        let forward = if written {
            Forward::Written(Box::new(backprop::forward(&model, &batch)?))
        } else {
            Forward::Autograd(loss(&model, &batch, Pass::Train)?)
        };
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = match forward {
            Forward::Written(trace) => trace.backward(1.0)?,
            Forward::Autograd(l) => l.backward()?,
        };
        dev.synchronize()?;
        let t2 = Instant::now();
        state.accumulate(&grads)?;
        drop(grads);
        let norm = state.grad_norm()?;
        state.step(
            &train::optim::step(&config, i + 1, warm + iters, norm),
            false,
        )?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if i >= warm {
            p.forward += (t1 - t0).as_secs_f64() / iters as f64;
            p.backward += (t2 - t1).as_secs_f64() / iters as f64;
            p.optimizer += (t3 - t2).as_secs_f64() / iters as f64;
            total += (t3 - t0).as_secs_f64() / iters as f64;
        }
    }
    Ok((total, p))
}

/// New tokens/s of greedy generation: `b` prompts of 64 tokens, 64 new tokens each, in
/// `dtype`, through the training pass's layers (`written`: `generate_written`) or as
/// `generate` decodes (the CPU decoder on the CPU, candle's graph on a GPU).
fn generation(dev: &Device, b: usize, dtype: DType, written: bool) -> anyhow::Result<f64> {
    let cfg = shape()?;
    let varmap = random_weights(&cfg, 0, dtype, dev)?;
    let model = Llama::new(&cfg, &varmap)?;
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| random_ids(64, 10 + i as u64, cfg.vocab_size))
        .collect();
    let rows: Vec<usize> = (0..b).collect();
    let opts = GenerateOptions {
        max_new_tokens: 64,
        sampling: None,
        stop: vec![],
        pad_id: 0,
    };
    let decode = if written { generate_written } else { generate };
    decode(
        &model,
        &prompts[..1],
        &rows[..1],
        &GenerateOptions {
            max_new_tokens: 4,
            ..opts.clone()
        },
    )?;
    dev.synchronize()?;
    let t0 = Instant::now();
    let out = decode(&model, &prompts, &rows, &opts)?;
    dev.synchronize()?;
    let new: usize = out.iter().map(|g| g.tokens.len()).sum();
    Ok(new as f64 / t0.elapsed().as_secs_f64())
}

/// Bytes of GPU memory in use (nvidia-smi), None off a GPU or without nvidia-smi.
fn gpu_used(gpu: bool) -> Option<u64> {
    gpu.then(|| basin_lm::memory::gpu_memory(0).ok().map(|(_, used)| used))
        .flatten()
}

fn main() -> anyhow::Result<()> {
    let dev = if std::env::args().any(|a| a == "--cpu") {
        Device::Cpu
    } else {
        Device::cuda_if_available(0)?
    };
    let gpu = dev.is_cuda();
    let num = |name: &str, gpu_default: usize, cpu_default: usize| -> anyhow::Result<usize> {
        Ok(
            arg(name).map_or(Ok(if gpu { gpu_default } else { cpu_default }), |v| {
                v.parse()
            })?,
        )
    };
    let (b, t) = (num("--batch", 16, 4)?, num("--seq", 512, 128)?);
    let iters = num("--iters", 10, 3)?;
    let gen_batch = num("--gen-batch", 64, 8)?;
    let torch: Option<serde_json::Value> = arg("--torch")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut report = serde_json::json!({"device": format!("{dev:?}"), "batch": b, "seq": t});
    println!(
        "{:<40} {:>12} {:>12} {:>7}",
        "figure", "ours", "PyTorch", "ratio"
    );
    let row = |name: &str, ours: f64, torch_key: &str| {
        let theirs = torch.as_ref().and_then(|j| j[torch_key].as_f64());
        let (ts, ratio) = theirs.map_or(("-".to_string(), "-".to_string()), |x| {
            (format!("{x:.0}"), format!("{:.2}x", ours / x))
        });
        println!("{name:<40} {ours:>12.0} {ts:>12} {ratio:>7}");
    };
    // (dtype, name, written-out pass): on a GPU f32 and bf16 both ways.
    let dtypes: &[(DType, &str, bool)] = if gpu {
        &[
            (DType::F32, "f32", true),
            (DType::F32, "f32-autograd", false),
            (DType::BF16, "bf16", true),
            (DType::BF16, "bf16-autograd", false),
            (DType::BF16, "bf16-pure", false),
        ]
    } else {
        &[(DType::F32, "f32", true)]
    };
    let only = arg("--dtype");
    let peak_tflops: f64 = arg("--peak-tflops").map_or(Ok(989.0), |v| v.parse())?;
    let cfg = shape()?;
    let gen_only = std::env::args().any(|a| a == "--gen-only");
    for &(dtype, name, written) in dtypes.iter().filter(|(_, n, _)| match only.as_deref() {
        _ if gen_only => false,
        Some(o) => o == *n,
        // bf16-pure (the 7B memory setting) only when asked for.
        None => *n != "bf16-pure",
    }) {
        let before = gpu_used(gpu);
        let (secs, p) = train_step(&dev, dtype, name == "bf16-pure", written, b, t, iters)?;
        let used = gpu_used(gpu);
        let tok_s = (b * t) as f64 / secs;
        let key = if gpu {
            // PyTorch's bf16 step is pure bf16 (torch_shape_baseline.py): every bf16 row compares
            // to it; both f32 rows to its f32 step.
            let torch_name = name.split('-').next().unwrap_or(name);
            format!("hf_train_{torch_name}_b{b}_s{t}_tok_s")
        } else {
            format!("train_{name}_b{b}_s{t}_tok_s")
        };
        let pass = if written { "written-out" } else { "autograd" };
        row(
            &format!("train {name} {b}x{t} tokens/s ({pass})"),
            tok_s,
            &key,
        );
        println!(
            "  step {:.1} ms: forward {:.1}, backward {:.1}, optimizer (accumulate, norm, AdamW) {:.1}",
            secs * 1e3,
            p.forward * 1e3,
            p.backward * 1e3,
            p.optimizer * 1e3
        );
        report[format!("train_{name}")] = serde_json::json!({"tokens_per_s": tok_s, "step_ms": secs * 1e3,
            "forward_ms": p.forward * 1e3, "backward_ms": p.backward * 1e3, "optimizer_ms": p.optimizer * 1e3});
        let tflops = tok_s * flops_per_token(&cfg, t) / 1e12;
        println!(
            "  {tflops:.1} TFLOP/s: {:.1}% of {peak_tflops} (--peak-tflops; 989: H100/H200 SXM dense bf16)",
            100.0 * tflops / peak_tflops
        );
        if let (Some(a), Some(z)) = (before, used) {
            println!(
                "  GPU memory in use after the steps: {:.2} GiB ({:.2} GiB before; candle's pool keeps its high-water mark)",
                z as f64 / (1u64 << 30) as f64,
                a as f64 / (1u64 << 30) as f64
            );
            report[format!("train_{name}_gpu_used_gib")] = (z as f64 / (1u64 << 30) as f64).into();
        }
        report[format!("train_{name}_tflops")] = tflops.into();
    }
    let gen_batches = if std::env::args().any(|a| a == "--train-only") {
        vec![]
    } else {
        vec![1, gen_batch]
    };
    // (dtype, name, through the training pass's layers): on a GPU candle's graph (what
    // `generate` runs there) and the pass's decoder in f32 and bf16; on the CPU its decoder.
    let decoders: &[(DType, &str, bool)] = if gpu {
        &[
            (DType::F32, "f32", false),
            (DType::F32, "f32-written", true),
            (DType::BF16, "bf16-written", true),
        ]
    } else {
        &[(DType::F32, "f32", false)]
    };
    for gb in gen_batches {
        for &(dtype, name, written) in decoders {
            let tok_s = generation(&dev, gb, dtype, written)?;
            // PyTorch's figure is f32 (torch_shape_baseline.py): the f32 rows compare to it.
            let key = if gpu {
                format!("hf_generate_{name}_b{gb}_tok_s").replace("-written", "")
            } else {
                format!("generate_f32_b{gb}_new64_tok_s")
            };
            let how = match (gpu, written) {
                (true, true) => "the training pass's layers",
                (true, false) => "candle's graph",
                (false, _) => "the CPU decoder",
            };
            row(
                &format!("generate {name} batch {gb} new tokens/s ({how})"),
                tok_s,
                &key,
            );
            report[format!("generate_{name}_b{gb}")] = tok_s.into();
        }
    }
    if let Some(path) = arg("--json") {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
