//! `train --plan`: the memory a run needs, part by part, from its config and its model's
//! shape alone (nothing is loaded), against the memory of its device; and the refusal of a
//! run that would not fit, before it loads anything, with the settings that would fit.
//!
//! The parts are what [`crate::state::TrainState`] and the training pass hold, as the
//! run's `[state]` config stores them:
//! - the model's weights in the run's dtype; in bf16, f32 master weights or θ's bf16 low
//!   half (`state.weights`);
//! - AdamW's m and v (f32 or bf16), the EMA θ̄ (f32 or a bf16 pair: 4 bytes either way,
//!   when on), θ₀ (f32 on the device; on the host or off it costs the device nothing);
//! - gradients: one micro-batch's in the weights' dtype, plus the f32 sum when a step has
//!   several micro-batches;
//! - activations: what the written-out pass (`basin_lm::backprop`) keeps for the backward,
//!   per layer `n·(4h + 2·q + 2·kv + 3·ff)` values and the attention probabilities
//!   `b·heads·t²`, for n = b·t tokens of a micro-batch, in the run's dtype (with
//!   `recompute`, each layer's input `n·h` and one layer's activations); the logits and
//!   their gradient over the reply tokens (f32). candle's autograd, which the GPU runs
//!   today, keeps more: on a GPU the figure is a lower bound;
//! - workspace: one layer's activations again (the backward's gradients of them) and one
//!   tensor widened to f32 (accumulation, the distance of a pair).

use crate::config::TrainConfig;
use anyhow::{bail, Result};
use basin_lm::architecture::ModelConfig;
use basin_lm::artifacts::{Keep, Manifest, Theta0};
use basin_lm::memory::device_memory;
use std::path::Path;

/// One part of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub name: String,
    pub bytes: u64,
}

/// The memory a run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub parameters: u64,
    /// Micro-batch rows and tokens a row.
    pub micro_batch: usize,
    pub seq_len: usize,
    pub parts: Vec<Part>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Bytes of a value of the run's dtype.
fn width(dtype: &str) -> Result<u64> {
    match dtype {
        "f32" => Ok(4),
        "bf16" => Ok(2),
        other => bail!("dtype '{other}': expected f32 or bf16"),
    }
}

impl MemoryPlan {
    /// The plan of `config` for a model of shape `model`, rows cut at `seq_len` tokens.
    pub fn of(config: &TrainConfig, model: &ModelConfig, seq_len: usize) -> Result<Self> {
        let d = width(&config.dtype)?;
        let sizes: Vec<u64> = model
            .tensors()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .collect();
        let p: u64 = sizes.iter().sum();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let (b, t) = (config.micro_batch as u64, seq_len as u64);
        let n = b * t;
        let (h, ff, vocab) = (
            model.hidden_size as u64,
            model.intermediate_size as u64,
            model.vocab_size as u64,
        );
        let q = (model.num_attention_heads * model.head_dim) as u64;
        let kv = (model.num_key_value_heads * model.head_dim) as u64;
        let heads = model.num_attention_heads as u64;
        let layer = n * (4 * h + 2 * q + 2 * kv + 3 * ff) + b * heads * t * t;
        let layers = model.num_hidden_layers as u64;
        let dtype = &config.dtype;
        let st = &config.state;
        let part = |name: String, bytes: u64| Part { name, bytes };
        let mut parts = vec![part(format!("weights ({dtype})"), p * d)];
        match (d, st.weights) {
            (4, _) => {}
            (_, Keep::Pair) => parts.push(part(
                "θ's low half (bf16; θ = weight + low half)".into(),
                p * 2,
            )),
            _ => parts.push(part("master weights (f32)".into(), p * 4)),
        }
        let m = match st.moments {
            Keep::Bf16 => ("bf16", 2),
            _ => ("f32", 4),
        };
        parts.push(part(format!("AdamW m ({})", m.0), p * m.1));
        parts.push(part(format!("AdamW v ({})", m.0), p * m.1));
        if config.ema.enabled {
            let kind = match st.ema {
                Keep::Pair => "bf16 pair",
                _ => "f32",
            };
            parts.push(part(format!("EMA θ̄ ({kind})"), p * 4));
        }
        parts.push(match st.theta0 {
            Theta0::Device => part("θ₀ (f32, the distance from the start)".into(), p * 4),
            // On the CPU the host's memory is the run's own.
            Theta0::Host if !config.on_gpu() => {
                part("θ₀ (f32, in host memory: the CPU's own)".into(), p * 4)
            }
            Theta0::Host => part(
                format!("θ₀ (f32 in host memory, {:.2} GiB there)", gib(p * 4)),
                0,
            ),
            Theta0::Off => part("θ₀ (off: no distance)".into(), 0),
        });
        let accumulates = config.batch_size > config.micro_batch;
        parts.push(part(
            if accumulates {
                format!("gradients (a micro-batch's in {dtype}, their f32 sum)")
            } else {
                format!("gradients ({dtype})")
            },
            p * d + if accumulates { p * 4 } else { 0 },
        ));
        parts.push(if config.recompute {
            part(
                format!("activations ({b} x {t} tokens, {layers} layers' inputs and one layer's, recomputed, {dtype})"),
                (layers * n * h + layer + n * h) * d,
            )
        } else {
            part(
                format!("activations ({b} x {t} tokens, {layers} layers, {dtype})"),
                (layers * layer + n * h) * d,
            )
        });
        parts.push(part(
            "logits and their gradient (f32)".into(),
            2 * n * vocab * 4,
        ));
        parts.push(part(
            "workspace (one layer's activation gradients, one tensor in f32)".into(),
            layer * d + largest * 4,
        ));
        Ok(Self {
            parameters: p,
            micro_batch: config.micro_batch,
            seq_len,
            parts,
        })
    }

    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// Whether it fits in `memory` bytes.
    pub fn fits(&self, memory: u64) -> bool {
        self.total() <= memory
    }

    /// The plan as lines, ending with `fits: yes|no (X GiB of Y GiB)` when the memory is
    /// known (`memory`: bytes and where the figure comes from).
    pub fn render(&self, memory: Option<(u64, &str)>) -> String {
        let mut s = format!(
            "{:.2} B parameters; micro-batch {} x {} tokens\n",
            self.parameters as f64 / 1e9,
            self.micro_batch,
            self.seq_len
        );
        for p in &self.parts {
            s.push_str(&format!("  {:<64} {:>9.2} GiB\n", p.name, gib(p.bytes)));
        }
        s.push_str(&format!(
            "  {:<64} {:>9.2} GiB\n",
            "total",
            gib(self.total())
        ));
        match memory {
            Some((m, from)) => s.push_str(&format!(
                "memory: {:.2} GiB ({from})\nfits: {} ({:.2} GiB of {:.2} GiB)\n",
                gib(m),
                if self.fits(m) { "yes" } else { "no" },
                gib(self.total()),
                gib(m)
            )),
            None => s.push_str("memory: unknown (give --memory-gib N)\n"),
        }
        s
    }
}

/// The tokens a training row can have: `max_seq_len`, else the longest that prepare wrote
/// into the run's data files (their manifest's `max_seq_len`).
pub fn seq_len(config: &TrainConfig) -> Result<usize> {
    if config.max_seq_len > 0 {
        return Ok(config.max_seq_len);
    }
    let mut longest = 0;
    for file in &config.data {
        match Manifest::entry_of(file)? {
            Some(e) => longest = longest.max(e.max_seq_len),
            None => bail!(
                "{}: not in {} (prepare it, or give --set max_seq_len=N to plan without it)",
                file.display(),
                Manifest::path(file.parent().unwrap_or(Path::new("."))).display()
            ),
        }
    }
    Ok(longest)
}

/// Pure bf16 training, as `--set` values: bf16 weights with a bf16 low half, bf16 moments,
/// the EMA as a bf16 pair, θ₀ on the host.
pub const PURE_BF16: [&str; 5] = [
    "dtype=bf16",
    "state.weights=pair",
    "state.moments=bf16",
    "state.ema=pair",
    "state.theta0=host",
];

/// `config` trained in pure bf16 ([`PURE_BF16`]).
fn pure_bf16(config: &TrainConfig) -> TrainConfig {
    let mut c = config.clone();
    c.dtype = "bf16".into();
    c.state.weights = Keep::Pair;
    c.state.moments = Keep::Bf16;
    c.state.ema = Keep::Pair;
    c.state.theta0 = Theta0::Host;
    c
}

/// Settings that would make the run fit in `memory` bytes (each alone, or pure bf16 as
/// one), as `--set` values: only those `train` would take with the rest of the config (no
/// `dtype=bf16` for a run with `recompute = true` on the CPU, where bf16 trains through
/// candle's autograd).
pub fn fitting_changes(
    config: &TrainConfig,
    model: &ModelConfig,
    seq_len: usize,
    memory: u64,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    // A config that does not validate on its own says so elsewhere; its plan still lists
    // what fits.
    let checked = config.validate().is_ok();
    let fits = |c: &TrainConfig, t: usize| -> Result<bool> {
        Ok((!checked || c.validate().is_ok()) && MemoryPlan::of(c, model, t)?.fits(memory))
    };
    // The largest micro-batch that divides the batch and fits.
    if let Some(m) = (1..config.micro_batch)
        .rev()
        .filter(|m| config.batch_size.is_multiple_of(*m))
        .find(|&m| {
            let c = TrainConfig {
                micro_batch: m,
                ..config.clone()
            };
            fits(&c, seq_len).unwrap_or(false)
        })
    {
        out.push(format!("micro_batch={m}"));
    }
    if config.ema.enabled {
        let mut c = config.clone();
        c.ema.enabled = false;
        if fits(&c, seq_len)? {
            out.push("ema.enabled=false".into());
        }
    }
    if config.dtype == "f32" {
        let c = TrainConfig {
            dtype: "bf16".into(),
            ..config.clone()
        };
        if fits(&c, seq_len)? {
            out.push("dtype=bf16".into());
        }
    }
    if config.state.theta0 == Theta0::Device {
        let mut c = config.clone();
        c.state.theta0 = Theta0::Host;
        if fits(&c, seq_len)? {
            out.push("state.theta0=host".into());
        }
    }
    let pure = pure_bf16(config);
    if pure != *config && fits(&pure, seq_len)? {
        out.push(PURE_BF16.join(" --set "));
    }
    if !config.recompute {
        let c = TrainConfig {
            recompute: true,
            ..config.clone()
        };
        // Where the written-out pass runs (recompute lives there).
        if c.written_pass() && fits(&c, seq_len)? {
            out.push("recompute=true".into());
        }
    }
    if let Some(t) = [2048, 1024, 512, 256, 128]
        .into_iter()
        .filter(|&t| t < seq_len)
        .find(|&t| fits(config, t).unwrap_or(false))
    {
        out.push(format!("max_seq_len={t}"));
    }
    Ok(out)
}

/// The plan of a run as `train --plan` prints it, and whether it fits (None: memory
/// unknown). `memory_gib` overrides the device's own figure.
pub fn plan(config: &TrainConfig, memory_gib: Option<f64>) -> Result<(String, Option<bool>)> {
    let model = basin_lm::weights::read_config(&config.model)?;
    let t = seq_len(config)?;
    let plan = MemoryPlan::of(config, &model, t)?;
    let memory = match memory_gib {
        Some(g) => Some(((g * GIB) as u64, "--memory-gib".to_string())),
        None => device_memory(&config.device).unwrap_or_else(|e| {
            eprintln!("warning: {e:#} (give --memory-gib N)");
            None
        }),
    };
    let mut text = format!(
        "plan of run {} on {}: model {}, {}",
        config.name,
        config.device,
        config.model.display(),
        plan.render(memory.as_ref().map(|(m, from)| (*m, from.as_str())))
    );
    let fits = memory.as_ref().map(|(m, _)| plan.fits(*m));
    if let (Some(false), Some((m, _))) = (fits, &memory) {
        let changes = fitting_changes(config, &model, t, *m)?;
        text.push_str(&if changes.is_empty() {
            "no one setting of micro_batch, ema, dtype, state, recompute or max_seq_len makes it fit\n".into()
        } else {
            format!(
                "each of these would fit: --set {}\n",
                changes.join(", --set ")
            )
        });
    }
    Ok((text, fits))
}

/// Refuses a run whose plan does not fit its device's memory (`memory_gib`, else the
/// GPU's free memory; nor a GPU whose memory cannot be read, nor a run that cannot be
/// planned), before anything is loaded. On the CPU a plan past the host's available memory
/// is a warning, not a refusal: the system may page, and the plan is an estimate.
pub fn check_fits(config: &TrainConfig, memory_gib: Option<f64>) -> Result<()> {
    if memory_gib.is_none() && !config.on_gpu() {
        if let Ok((text, Some(false))) = plan(config, None) {
            eprintln!(
                "warning: the run may not fit the host's available memory (it may page or be killed):\n{text}"
            );
        }
        return Ok(());
    }
    match plan(config, memory_gib) {
        Ok((text, Some(false))) => bail!("the run does not fit its device's memory:\n{text}"),
        Ok(_) => Ok(()),
        // A plan that cannot be made (a data file without a manifest) does not stop a run.
        Err(e) => {
            eprintln!("warning: no memory plan ({e:#}); the run goes on unchecked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dtype: &str, ema: bool, micro_batch: usize, batch_size: usize) -> TrainConfig {
        let mut c = TrainConfig {
            dtype: dtype.into(),
            micro_batch,
            batch_size,
            ..TrainConfig::default()
        };
        c.ema.enabled = ema;
        c
    }

    fn llama_2_7b() -> ModelConfig {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/llama-2-7b-chat.json");
        basin_lm::weights::read_config(&path).unwrap()
    }

    #[test]
    fn the_optimizer_state_is_counted_part_by_part() {
        let m = llama_2_7b();
        let plan = MemoryPlan::of(&config("bf16", true, 1, 1), &m, 512).unwrap();
        let p = plan.parameters;
        assert!((6.7e9..6.8e9).contains(&(p as f64)), "{p}");
        let bytes = |name: &str| {
            plan.parts
                .iter()
                .find(|x| x.name.starts_with(name))
                .unwrap()
                .bytes
        };
        assert_eq!(bytes("weights (bf16)"), 2 * p);
        assert_eq!(bytes("master weights"), 4 * p);
        for part in ["AdamW m", "AdamW v", "EMA", "θ₀"] {
            assert_eq!(bytes(part), 4 * p, "{part}");
        }
        // One micro-batch a step: no f32 sum.
        assert_eq!(bytes("gradients"), 2 * p);
        // Activations: 32 layers of 512·(4·4096 + 2·4096 + 2·4096 + 3·11008) values and
        // 32 heads · 512² probabilities, plus the embeddings' output, 2 bytes each.
        let layer = 512 * (8 * 4096 + 3 * 11008) + 32 * 512 * 512;
        assert_eq!(bytes("activations"), (32 * layer + 512 * 4096) * 2);
        // An f32 run has no master copy; accumulation adds the f32 sum.
        let f32 = MemoryPlan::of(&config("f32", false, 4, 16), &m, 512).unwrap();
        assert!(f32
            .parts
            .iter()
            .all(|x| !x.name.starts_with("master") && !x.name.starts_with("EMA")));
        let g = f32
            .parts
            .iter()
            .find(|x| x.name.starts_with("gradients"))
            .unwrap();
        assert_eq!(g.bytes, 8 * p);
    }

    #[test]
    fn a_plan_that_does_not_fit_names_the_settings_that_would() {
        let m = llama_2_7b();
        let c = config("f32", true, 4, 16);
        let t = 512;
        let need = MemoryPlan::of(&c, &m, t).unwrap().total();
        // f32 with the EMA: 4 (θ) + 8 (m, v) + 4 (θ̄) + 4 (θ₀) + 8 (gradients) bytes a parameter.
        assert!(need > 28 * 6_700_000_000, "{need}");
        let text = MemoryPlan::of(&c, &m, t)
            .unwrap()
            .render(Some((141 << 30, "test")));
        assert!(
            text.ends_with(&format!("fits: no ({:.2} GiB of 141.00 GiB)\n", gib(need))),
            "{text}"
        );
        // Dropping the EMA saves 4 bytes a parameter: enough when the card holds just that.
        let without = MemoryPlan::of(&config("f32", false, 4, 16), &m, t)
            .unwrap()
            .total();
        let changes = fitting_changes(&c, &m, t, without).unwrap();
        assert!(
            changes.contains(&"ema.enabled=false".to_string()),
            "{changes:?}"
        );
        assert!(
            !changes.iter().any(|c| c.starts_with("max_seq_len")),
            "{changes:?}"
        );
        let small = fitting_changes(&c, &m, t, 1 << 30).unwrap();
        assert!(small.is_empty(), "{small:?}");
    }

    /// A setting that fits but that `train` would refuse with the rest of the config is not
    /// offered: bf16 on the CPU trains through candle's autograd, which has no recompute.
    #[test]
    fn only_settings_train_would_take_are_offered() {
        let m = llama_2_7b();
        let mut c = config("f32", false, 4, 16);
        c.data = vec!["data/prepared/dolly.parquet".into()];
        c.validate().unwrap();
        let bf16 = MemoryPlan::of(&config("bf16", false, 4, 16), &m, 512)
            .unwrap()
            .total();
        // As f32 without recompute: bf16 fits, and is offered.
        let changes = fitting_changes(&c, &m, 512, bf16).unwrap();
        assert!(changes.contains(&"dtype=bf16".to_string()), "{changes:?}");
        // With recompute on the CPU, neither bf16 nor pure bf16 is.
        c.recompute = true;
        c.validate().unwrap();
        let changes = fitting_changes(&c, &m, 512, bf16).unwrap();
        assert!(
            !changes.iter().any(|s| s.contains("dtype=bf16")),
            "{changes:?}"
        );
        let mut taken = c.clone();
        taken.dtype = "bf16".into();
        assert!(taken.validate().is_err());
    }

    /// Issue 22's target: Qi et al.'s 7B run (micro-batch 4 x 512, the EMA on) fits a
    /// 141 GiB card in pure bf16, and neither f32 nor bf16 with f32 state does; the plan
    /// of the refused one names pure bf16 as a setting that fits.
    #[test]
    fn pure_bf16_fits_the_7b_run_on_141_gib_and_f32_state_does_not() {
        let m = llama_2_7b();
        let card = 141u64 << 30;
        let on_gpu = |c: TrainConfig| TrainConfig {
            device: "cuda".into(),
            ..c
        };
        let f32 = on_gpu(config("f32", true, 4, 128));
        let mixed = on_gpu(config("bf16", true, 4, 128));
        let pure = pure_bf16(&mixed);
        let total = |c: &TrainConfig| MemoryPlan::of(c, &m, 512).unwrap().total();
        assert!(total(&f32) > card && total(&mixed) > card);
        assert!(total(&pure) < card, "{:.1} GiB", gib(total(&pure)));
        let plan = MemoryPlan::of(&pure, &m, 512).unwrap();
        let p = plan.parameters;
        let bytes = |name: &str| {
            plan.parts
                .iter()
                .find(|x| x.name.starts_with(name))
                .unwrap_or_else(|| panic!("no part {name}: {:?}", plan.parts))
                .bytes
        };
        // 2 (weight) + 2 (low half) + 2 + 2 (m, v) + 4 (θ̄ pair) bytes; θ₀ costs the card nothing.
        assert_eq!(bytes("weights (bf16)") + bytes("θ's low half"), 4 * p);
        assert_eq!(bytes("AdamW m (bf16)") + bytes("AdamW v (bf16)"), 4 * p);
        assert_eq!(bytes("EMA θ̄ (bf16 pair)"), 4 * p);
        assert_eq!(bytes("θ₀ (f32 in host memory"), 0);
        // On the CPU the host's memory is the run's own: θ₀ there counts.
        let on_cpu = TrainConfig {
            device: "cpu".into(),
            ..pure.clone()
        };
        let cpu_plan = MemoryPlan::of(&on_cpu, &m, 512).unwrap();
        assert_eq!(cpu_plan.total(), plan.total() + 4 * p);
        assert!(plan.parts.iter().all(|x| !x.name.starts_with("master")));
        let changes = fitting_changes(&mixed, &m, 512, card).unwrap();
        assert!(changes.contains(&PURE_BF16.join(" --set ")), "{changes:?}");
        // Recompute keeps each layer's input and one layer's activations.
        let mut cpu = config("f32", false, 4, 4);
        let full = MemoryPlan::of(&cpu, &m, 512).unwrap();
        cpu.recompute = true;
        let less = MemoryPlan::of(&cpu, &m, 512).unwrap();
        let act = |p: &MemoryPlan| {
            p.parts
                .iter()
                .find(|x| x.name.starts_with("activations"))
                .unwrap()
                .bytes
        };
        let layer = 2048 * (8 * 4096 + 3 * 11008) + 4 * 32 * 512 * 512;
        assert_eq!(act(&less), (32 * 2048 * 4096 + layer + 2048 * 4096) * 4);
        assert!(
            act(&less) * 5 < act(&full),
            "{} vs {}",
            act(&less),
            act(&full)
        );
    }
}
