//! The architectures basin runs, read strictly from a checkpoint's `config.json` (either
//! transformers' 4.x form or its 5.x form) or a GGUF file's metadata, and the tensors each
//! one holds.
//!
//! All four families are the same decoder (RMSNorm, grouped-query attention with RoPE, a
//! SwiGLU MLP; [`crate::llama`]); they differ in what [`ModelConfig`] records:
//!
//! | family  | `model_type` | differences from Llama                                    |
//! |---------|--------------|-----------------------------------------------------------|
//! | Llama   | `llama`      | optional biases (`attention_bias`, `mlp_bias`), RoPE scaling `linear`, `dynamic`, `llama3` |
//! | Mistral | `mistral`    | `sliding_window` (4096 when the key is absent)            |
//! | Qwen2   | `qwen2`      | q/k/v biases always; a window only with `use_sliding_window` |
//! | Phi-3   | `phi3`       | q/k/v fused as `qkv_proj`, gate/up as `gate_up_proj`      |
//!
//! Inside basin every model has the same tensors (q, k, v, gate and up apart, under Llama's
//! names: [`ModelConfig::tensors`]); a checkpoint's own layout ([`ModelConfig::checkpoint_tensors`])
//! is converted on load ([`to_internal`]) and back on export ([`to_checkpoint`]), both
//! exactly (a split and a concatenation). Anything a checkpoint asks for that basin does
//! not compute is refused by name: unknown keys, rope types, dropout, activations.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Phi3,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Phi3];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Phi3 => "phi3",
        }
    }

    /// The transformers class that loads it.
    pub fn class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    fn from_model_type(t: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.model_type() == t)
            .ok_or_else(|| {
                anyhow!(
                    "model_type '{t}' is not supported: basin runs {}",
                    Self::ALL.map(|f| f.model_type()).join(", ")
                )
            })
    }
}

/// How RoPE's frequencies are scaled (`rope_type`). transformers' `dynamic` changes the
/// frequencies only for sequences longer than `max_position_embeddings`, which basin
/// refuses, so within the model's positions it is the default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A decoder's shape and arithmetic: everything of `config.json` that changes what it
/// computes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Biases of the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases of gate, up and down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding-window attention: basin refuses positions at or past it instead of masking.
    pub sliding_window: Option<usize>,
    /// transformers' `padding_idx`: the embedding row that a lookup leaves out of training
    /// (the output projection of a tied model still trains it).
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// A plain Llama (no biases, no scaling, head_dim = hidden / heads).
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        rope_theta: f64,
        rms_norm_eps: f64,
        tie_word_embeddings: bool,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            family: Family::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            rope_theta,
            rope_scaling: RopeScaling::Default,
            rms_norm_eps,
            tie_word_embeddings,
            max_position_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            pad_token_id: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions a sequence may use: `max_position_embeddings`, or the sliding window when
    /// it is shorter (within it, windowed attention is plain causal attention).
    pub fn max_positions(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    /// Why [`Self::max_positions`] is what it is, for error messages.
    pub fn positions_reason(&self) -> String {
        match self.sliding_window {
            Some(w) if w < self.max_position_embeddings => format!(
                "sliding_window {w}: basin has no windowed attention, so it refuses longer sequences"
            ),
            _ => format!("max_position_embeddings {}", self.max_position_embeddings),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if !c.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", c.head_dim);
        }
        if c.family == Family::Phi3 && c.head_dim * c.num_attention_heads != c.hidden_size {
            bail!("phi3: head_dim must be hidden_size / num_attention_heads");
        }
        if !(c.rope_theta > 0.0 && c.rms_norm_eps > 0.0) {
            bail!("rope_theta and rms_norm_eps must be positive");
        }
        if c.sliding_window == Some(0) {
            bail!("sliding_window must be positive");
        }
        match c.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } if factor > 0.0 => {}
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } if factor > 0.0
                && low_freq_factor > 0.0
                && high_freq_factor > low_freq_factor
                && original_max_position_embeddings > 0 => {}
            ref s => bail!("rope scaling {s:?} has a non-positive factor (or high ≤ low)"),
        }
        Ok(())
    }

    /// RoPE's inverse frequencies, one per pair of a head's dimensions (f64; transformers
    /// computes them in f32).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim;
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                // Meta's Llama 3.1 scaling (transformers' _compute_llama3_parameters): long
                // wavelengths slowed by `factor`, short ones kept, the band between blended.
                let old = old as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Every tensor of the model as basin holds it (Hugging Face Llama names; q, k, v, gate
    /// and up apart), with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = self;
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        )];
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = |name: &str, rows: usize, cols: usize, bias: bool| {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("{p}.{name}.bias"), vec![rows]));
                }
            };
            proj("self_attn.q_proj", qd, h, c.qkv_bias);
            proj("self_attn.k_proj", kvd, h, c.qkv_bias);
            proj("self_attn.v_proj", kvd, h, c.qkv_bias);
            proj("self_attn.o_proj", h, qd, c.o_bias);
            proj("mlp.gate_proj", ff, h, c.mlp_bias);
            proj("mlp.up_proj", ff, h, c.mlp_bias);
            proj("mlp.down_proj", h, ff, c.mlp_bias);
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !c.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
        }
        out
    }

    /// Every tensor of a checkpoint of this family, in its own layout (Phi-3: fused): basin's
    /// tensors with each group of [`Self::fusions`] replaced by its fused tensor.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let fusions = self.fusions();
        let mut out = Vec::new();
        for (name, shape) in self.tensors() {
            match fusions
                .iter()
                .find(|(_, parts)| parts.iter().any(|(n, _)| *n == name))
            {
                None => out.push((name, shape)),
                Some((fused, parts)) if parts[0].0 == name => {
                    let rows = parts.iter().map(|(_, r)| r).sum();
                    out.push((fused.clone(), vec![rows, shape[1]]));
                }
                Some(_) => {}
            }
        }
        out
    }

    /// The fused tensors of a Phi-3 layer prefix and the parts each splits into, by rows.
    fn fusions(&self) -> Vec<(String, Vec<(String, usize)>)> {
        if self.family != Family::Phi3 {
            return vec![];
        }
        let hd = self.head_dim;
        let (qd, kvd, ff) = (
            self.num_attention_heads * hd,
            self.num_key_value_heads * hd,
            self.intermediate_size,
        );
        (0..self.num_hidden_layers)
            .flat_map(|i| {
                let p = format!("model.layers.{i}");
                [
                    (
                        format!("{p}.self_attn.qkv_proj.weight"),
                        vec![
                            (format!("{p}.self_attn.q_proj.weight"), qd),
                            (format!("{p}.self_attn.k_proj.weight"), kvd),
                            (format!("{p}.self_attn.v_proj.weight"), kvd),
                        ],
                    ),
                    (
                        format!("{p}.mlp.gate_up_proj.weight"),
                        vec![
                            (format!("{p}.mlp.gate_proj.weight"), ff),
                            (format!("{p}.mlp.up_proj.weight"), ff),
                        ],
                    ),
                ]
            })
            .collect()
    }

    /// Reads a Hugging Face `config.json`, strictly: the family from `model_type` (and
    /// `architectures` when given), transformers' defaults for that family where a key is
    /// absent, and a refusal naming any key basin does not know or any value it does not
    /// compute.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let map: Map<String, Value> = serde_json::from_str(text).context("not a JSON object")?;
        let mut f = Fields {
            map: &map,
            used: BTreeSet::new(),
        };
        let model_type = f
            .string("model_type")?
            .ok_or_else(|| anyhow!("no model_type: basin needs it to know the architecture"))?;
        let family = Family::from_model_type(&model_type)?;
        if let Some(archs) = f.take("architectures") {
            let ok = archs
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v.as_str() == Some(family.class())));
            if !ok {
                bail!(
                    "architectures {archs}: basin runs {} (a causal language model) for model_type '{model_type}'",
                    family.class()
                );
            }
        }
        if let Some(act) = f.string("hidden_act")? {
            if act != "silu" {
                bail!("hidden_act '{act}': basin's MLP is SwiGLU with silu");
            }
        }
        for key in ["attention_dropout", "embd_pdrop", "resid_pdrop"] {
            if let Some(p) = f.f64(key)? {
                if p != 0.0 {
                    bail!("{key} {p}: basin trains without dropout");
                }
            }
        }
        let req = |f: &mut Fields, key: &str| {
            f.usize(key)?
                .ok_or_else(|| anyhow!("{key} is missing (basin takes no default for a size)"))
        };
        let vocab_size = req(&mut f, "vocab_size")?;
        let hidden_size = req(&mut f, "hidden_size")?;
        let intermediate_size = req(&mut f, "intermediate_size")?;
        let num_hidden_layers = req(&mut f, "num_hidden_layers")?;
        let num_attention_heads = req(&mut f, "num_attention_heads")?;
        // transformers' class defaults, family by family.
        let num_key_value_heads = f.usize("num_key_value_heads")?.unwrap_or(match family {
            Family::Qwen2 => 32,
            Family::Mistral => 8,
            Family::Llama | Family::Phi3 => num_attention_heads,
        });
        let head_dim = f
            .usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(match family {
            Family::Llama => 2048,
            Family::Qwen2 => 32768,
            Family::Phi3 => 4096,
            Family::Mistral => 4096 * 32,
        });
        let rms_norm_eps = f.f64("rms_norm_eps")?.unwrap_or(match family {
            Family::Phi3 => 1e-5,
            _ => 1e-6,
        });
        let tie_word_embeddings = f.bool("tie_word_embeddings")?.unwrap_or(false);
        // Phi-3's class default (32000) is its real vocabulary's <|endoftext|>.
        let pad_token_id = match (family, f.map.contains_key("pad_token_id")) {
            (Family::Phi3, false) => Some(32000),
            _ => f.typed("pad_token_id", "a token id")?,
        };
        if let Some(p) = pad_token_id.filter(|&p: &u32| p as usize >= vocab_size) {
            bail!("pad_token_id {p} is outside the vocabulary of {vocab_size} (transformers refuses it too)");
        }
        let (attention_bias, mlp_bias) = (f.bool("attention_bias")?, f.bool("mlp_bias")?);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => {
                let a = attention_bias.unwrap_or(false);
                (a, a, mlp_bias.unwrap_or(false))
            }
            other => {
                // transformers' classes of these families hard-code their biases and do not
                // read the keys: a value saying otherwise means a model that is not this class.
                let qkv = other == Family::Qwen2;
                if attention_bias.is_some_and(|a| a != qkv) || mlp_bias == Some(true) {
                    bail!(
                        "attention_bias/mlp_bias disagree with {}: its projections are fixed (q/k/v bias: {qkv})",
                        other.class()
                    );
                }
                (qkv, false, false)
            }
        };
        let sliding_window = sliding_window(&mut f, family, num_hidden_layers)?;
        let (rope_theta, rope_scaling) = rope(&mut f, max_position_embeddings)?;
        let unknown: Vec<&String> = map
            .keys()
            .filter(|k| !f.used.contains(k.as_str()) && !HARMLESS.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "key(s) {} not known to basin for model_type '{model_type}': they may change what the model computes, so basin refuses the model rather than ignore them",
                unknown.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
            );
        }
        let c = Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            tie_word_embeddings,
            max_position_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            pad_token_id,
        };
        c.validate()?;
        Ok(c)
    }

    /// A `config.json` (transformers 4.x form, which 5.x reads too) that loads as this
    /// family's class and computes what basin computes.
    pub fn to_hf_json(&self, dtype: DType, bos: Option<u32>, eos: &[u32]) -> Value {
        let c = self;
        let mut v = json!({
            "architectures": [c.family.class()],
            "model_type": c.family.model_type(),
            "hidden_act": "silu",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "pad_token_id": c.pad_token_id,
            "eos_token_id": match eos { [one] => json!(one), many => json!(many) },
            "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        });
        let o = v.as_object_mut().expect("an object");
        o.insert(
            "rope_scaling".into(),
            match &c.rope_scaling {
                RopeScaling::Default => Value::Null,
                s => serde_json::to_value(s).expect("plain data"),
            },
        );
        match c.family {
            Family::Llama => {
                o.insert("head_dim".into(), json!(c.head_dim));
                o.insert("attention_bias".into(), json!(c.qkv_bias));
                o.insert("mlp_bias".into(), json!(c.mlp_bias));
            }
            Family::Mistral => {
                o.insert("head_dim".into(), json!(c.head_dim));
                o.insert("sliding_window".into(), json!(c.sliding_window));
            }
            Family::Qwen2 => {
                o.insert("head_dim".into(), json!(c.head_dim));
                o.insert(
                    "use_sliding_window".into(),
                    json!(c.sliding_window.is_some()),
                );
                o.insert("sliding_window".into(), json!(c.sliding_window));
                o.insert("max_window_layers".into(), json!(0));
            }
            Family::Phi3 => {
                o.insert("sliding_window".into(), json!(c.sliding_window));
                o.insert("embd_pdrop".into(), json!(0.0));
                o.insert("resid_pdrop".into(), json!(0.0));
            }
        }
        v
    }
}

/// Keys of `config.json` that do not change what the model computes: bookkeeping, token ids
/// (the text side reads them), inference switches and the attribution of remote code.
const HARMLESS: &[&str] = &[
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "auto_map",
    // Llama 2's tensor-parallel slicing of the same products (transformers 4.x).
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "id2label",
    "label2id",
];

/// The keys of a `config.json` read so far.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    used: BTreeSet<String>,
}

impl Fields<'_> {
    /// The value of `key`, unless absent or null.
    fn take(&mut self, key: &str) -> Option<&Value> {
        self.used.insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        what: &str,
    ) -> Result<Option<T>> {
        self.take(key)
            .map(|v| {
                serde_json::from_value(v.clone())
                    .map_err(|_| anyhow!("{key}: expected {what}, found {v}"))
            })
            .transpose()
    }

    fn usize(&mut self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer")
    }
    fn f64(&mut self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number")
    }
    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false")
    }
    fn string(&mut self, key: &str) -> Result<Option<String>> {
        self.typed(key, "a string")
    }
}

/// The attention window, as the family's transformers class decides it.
fn sliding_window(f: &mut Fields, family: Family, layers: usize) -> Result<Option<usize>> {
    let window = f.usize("sliding_window")?;
    let layer_types: Option<Vec<String>> = f.typed("layer_types", "a list of strings")?;
    if let Some(types) = &layer_types {
        if types.len() != layers {
            bail!(
                "layer_types has {} entries for {layers} layers",
                types.len()
            );
        }
        if let Some(t) = types
            .iter()
            .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
        {
            bail!("layer_types: '{t}' attention is not implemented");
        }
    }
    let any_sliding = layer_types
        .as_ref()
        .map(|t| t.iter().any(|t| t == "sliding_attention"));
    Ok(match family {
        Family::Llama => {
            if window.is_some() || any_sliding == Some(true) {
                bail!("sliding_window/layer_types: LlamaForCausalLM has no windowed attention");
            }
            None
        }
        // Mistral's class default is 4096 when the key is absent (null means none).
        Family::Mistral => match f.map.get("sliding_window") {
            None => Some(4096),
            Some(_) => window,
        },
        Family::Phi3 => window,
        Family::Qwen2 => {
            let enabled = f.bool("use_sliding_window")?.unwrap_or(false);
            let first = f.usize("max_window_layers")?.unwrap_or(28);
            let sliding = match any_sliding {
                Some(s) => s,
                None => enabled && first < layers,
            };
            match (sliding, window) {
                (false, _) => None,
                // Qwen2's class default window is 4096.
                (true, w) => Some(w.unwrap_or(4096)),
            }
        }
    })
}

/// RoPE's base and scaling from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
fn rope(f: &mut Fields, max_positions: usize) -> Result<(f64, RopeScaling)> {
    let top_theta = f.f64("rope_theta")?;
    let top_partial = f.f64("partial_rotary_factor")?;
    let top_original = f.usize("original_max_position_embeddings")?;
    let params = match (
        f.take("rope_parameters").cloned(),
        f.take("rope_scaling").cloned(),
    ) {
        (Some(p), _) => p,
        (None, Some(s)) => s,
        (None, None) => Value::Object(Map::new()),
    };
    let params = params.as_object().ok_or_else(|| {
        anyhow!("rope_parameters/rope_scaling: expected an object, found {params}")
    })?;
    let mut p = Fields {
        map: params,
        used: BTreeSet::new(),
    };
    let theta = p.f64("rope_theta")?.or(top_theta).unwrap_or(10_000.0);
    let partial = p
        .f64("partial_rotary_factor")?
        .or(top_partial)
        .unwrap_or(1.0);
    if partial != 1.0 {
        bail!("partial_rotary_factor {partial}: basin rotates whole heads only");
    }
    let kind = match (p.string("rope_type")?, p.string("type")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => "default".into(),
    };
    let factor = |p: &mut Fields| {
        p.f64("factor")?
            .ok_or_else(|| anyhow!("rope scaling '{kind}' without a factor"))
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor(&mut p)? },
        "dynamic" => {
            // Only positions past the original length change; basin's are bounded by it.
            if let Some(o) = p.usize("original_max_position_embeddings")? {
                if o != max_positions {
                    bail!("dynamic rope with original_max_position_embeddings {o} ≠ max_position_embeddings {max_positions} is not implemented");
                }
            }
            RopeScaling::Dynamic { factor: factor(&mut p)? }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: factor(&mut p)?,
            low_freq_factor: p
                .f64("low_freq_factor")?
                .ok_or_else(|| anyhow!("llama3 rope without low_freq_factor"))?,
            high_freq_factor: p
                .f64("high_freq_factor")?
                .ok_or_else(|| anyhow!("llama3 rope without high_freq_factor"))?,
            // transformers prefers a top-level original_max_position_embeddings.
            original_max_position_embeddings: top_original
                .or(p.usize("original_max_position_embeddings")?)
                .unwrap_or(max_positions),
        },
        "longrope" | "su" | "yarn" => bail!(
            "rope_type '{kind}' (Phi-3 128k and Phi-3.5 use longrope) is not implemented; the 4k-context models load"
        ),
        other => bail!("rope_type '{other}' is not implemented (basin has default, linear, dynamic, llama3)"),
    };
    let unknown: Vec<&String> = params
        .keys()
        .filter(|k| !p.used.contains(k.as_str()))
        .collect();
    if !unknown.is_empty() {
        bail!("rope parameters {unknown:?} are not used by rope_type '{kind}' in basin");
    }
    Ok((theta, scaling))
}

/// Names and shapes found in a checkpoint, checked against what the architecture needs:
/// an error lists every missing, unexpected and wrong-shaped tensor.
pub fn check_tensors(
    expected: &[(String, Vec<usize>)],
    found: &BTreeMap<String, Vec<usize>>,
    origin: &str,
) -> Result<()> {
    let want: BTreeMap<&str, &Vec<usize>> = expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let missing: Vec<&str> = want
        .keys()
        .filter(|n| !found.contains_key(**n))
        .copied()
        .collect();
    let unexpected: Vec<&str> = found
        .keys()
        .filter(|n| !want.contains_key(n.as_str()))
        .map(String::as_str)
        .collect();
    let wrong: Vec<String> = found
        .iter()
        .filter_map(|(n, s)| {
            want.get(n.as_str())
                .filter(|w| **w != s)
                .map(|w| format!("{n}: expected {w:?}, found {s:?}"))
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let list = |v: &[&str]| {
        let mut s = v.iter().take(8).copied().collect::<Vec<_>>().join(", ");
        if v.len() > 8 {
            s.push_str(&format!(", ... ({} in all)", v.len()));
        }
        s
    };
    let mut msg =
        format!("{origin}: the tensors do not match the architecture its config describes");
    if !missing.is_empty() {
        msg.push_str(&format!("\n  missing: {}", list(&missing)));
    }
    if !unexpected.is_empty() {
        msg.push_str(&format!("\n  unexpected: {}", list(&unexpected)));
    }
    if !wrong.is_empty() {
        let w: Vec<&str> = wrong.iter().map(String::as_str).collect();
        msg.push_str(&format!("\n  wrong shape: {}", list(&w)));
    }
    bail!(msg)
}

/// A checkpoint's tensors (its family's layout) as basin holds them: fused ones split by rows.
pub fn to_internal(
    c: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    for (fused, parts) in c.fusions() {
        let t = tensors
            .remove(&fused)
            .ok_or_else(|| anyhow!("{fused} is missing"))?;
        let mut row = 0;
        for (name, rows) in parts {
            tensors.insert(name, t.narrow(0, row, rows)?.contiguous()?);
            row += rows;
        }
    }
    Ok(tensors)
}

/// basin's tensors in the family's own layout: the parts of fused ones concatenated by rows.
pub fn to_checkpoint(
    c: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    for (fused, parts) in c.fusions() {
        let parts: Vec<Tensor> = parts
            .iter()
            .map(|(name, _)| {
                tensors
                    .remove(name)
                    .ok_or_else(|| anyhow!("{name} is missing"))
            })
            .collect::<Result<_>>()?;
        tensors.insert(fused, Tensor::cat(&parts, 0)?);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(model_type: &str) -> Map<String, Value> {
        json!({"model_type": model_type, "vocab_size": 64, "hidden_size": 16,
               "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "pad_token_id": null})
        .as_object()
        .unwrap()
        .clone()
    }

    fn parse(m: &Map<String, Value>) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&Value::Object(m.clone()).to_string())
    }

    fn refused(m: &Map<String, Value>, needle: &str) {
        let e = format!("{:#}", parse(m).unwrap_err());
        assert!(e.contains(needle), "expected '{needle}' in: {e}");
    }

    #[test]
    fn both_rope_forms_read_the_same() {
        let scaling = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut old = base("llama");
        old.insert("rope_theta".into(), json!(500000.0));
        old.insert("rope_scaling".into(), scaling.clone());
        let mut new = base("llama");
        let mut p = scaling.as_object().unwrap().clone();
        p.insert("rope_theta".into(), json!(500000.0));
        new.insert("rope_parameters".into(), Value::Object(p));
        let (a, b) = (parse(&old).unwrap(), parse(&new).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn llama3_scaling_keeps_high_slows_low_and_blends_between() {
        let mut c = parse(&base("llama")).unwrap();
        c.head_dim = 64;
        c.rope_theta = 500000.0;
        let plain = c.rope_inv_freq();
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled = c.rope_inv_freq();
        let wavelen = |f: f64| 2.0 * std::f64::consts::PI / f;
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 2048.0 {
                assert_eq!(p, s);
            } else if wavelen(*p) > 8192.0 {
                assert!((s - p / 8.0).abs() < 1e-18);
            } else {
                assert!(*s < *p && *s > p / 8.0);
            }
        }
        assert!(plain.iter().any(|&p| wavelen(p) < 2048.0));
        assert!(plain.iter().any(|&p| wavelen(p) > 8192.0));
    }

    #[test]
    fn family_defaults_follow_transformers() {
        let mut m = base("mistral");
        m.remove("num_key_value_heads");
        m.insert("num_attention_heads".into(), json!(8));
        let c = parse(&m).unwrap();
        assert_eq!((c.num_key_value_heads, c.sliding_window), (8, Some(4096)));
        m.insert("sliding_window".into(), Value::Null);
        assert_eq!(parse(&m).unwrap().sliding_window, None);
        let q = parse(&base("qwen2")).unwrap();
        assert!(q.qkv_bias && !q.o_bias && q.sliding_window.is_none());
        let mut q = base("qwen2");
        q.insert("use_sliding_window".into(), json!(true));
        q.insert("max_window_layers".into(), json!(1));
        q.insert("sliding_window".into(), json!(32));
        assert_eq!(parse(&q).unwrap().max_positions(), 32);
        let p = parse(&base("phi3")).unwrap();
        assert_eq!((p.rms_norm_eps, p.max_position_embeddings), (1e-5, 4096));
        let mut m = base("phi3");
        m.remove("pad_token_id");
        m.insert("vocab_size".into(), json!(32064));
        assert_eq!(parse(&m).unwrap().pad_token_id, Some(32000));
        m.insert("vocab_size".into(), json!(64));
        refused(&m, "pad_token_id 32000 is outside the vocabulary");
    }

    #[test]
    fn what_basin_does_not_compute_is_refused_by_name() {
        refused(&base("gemma"), "model_type 'gemma' is not supported");
        let mut m = base("llama");
        m.insert("quantization_config".into(), json!({"bits": 4}));
        refused(&m, "'quantization_config'");
        let mut m = base("phi3");
        m.insert(
            "rope_scaling".into(),
            json!({"type": "longrope", "short_factor": [1.0]}),
        );
        refused(&m, "rope_type 'longrope'");
        let mut m = base("llama");
        m.insert(
            "rope_scaling".into(),
            json!({"rope_type": "yarn", "factor": 4.0}),
        );
        refused(&m, "rope_type 'yarn'");
        let mut m = base("llama");
        m.insert("hidden_act".into(), json!("gelu"));
        refused(&m, "hidden_act 'gelu'");
        let mut m = base("phi3");
        m.insert("resid_pdrop".into(), json!(0.1));
        refused(&m, "resid_pdrop 0.1");
        let mut m = base("phi3");
        m.insert("partial_rotary_factor".into(), json!(0.75));
        refused(&m, "partial_rotary_factor 0.75");
        let mut m = base("llama");
        m.insert(
            "architectures".into(),
            json!(["LlamaForSequenceClassification"]),
        );
        refused(&m, "LlamaForSequenceClassification");
        let mut m = base("llama");
        m.remove("hidden_size");
        refused(&m, "hidden_size is missing");
        let mut m = base("llama");
        m.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": 2.0, "beta": 1}),
        );
        refused(&m, "\"beta\"");
    }

    #[test]
    fn phi3_fused_tensors_split_and_join_exactly() {
        let mut m = base("phi3");
        m.insert("num_key_value_heads".into(), json!(4));
        let c = parse(&m).unwrap();
        let names: BTreeSet<String> = c.checkpoint_tensors().into_iter().map(|t| t.0).collect();
        assert!(names.contains("model.layers.1.self_attn.qkv_proj.weight"));
        assert!(!names.contains("model.layers.1.self_attn.q_proj.weight"));
        let dev = candle_core::Device::Cpu;
        let ckpt: HashMap<String, Tensor> = c
            .checkpoint_tensors()
            .into_iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let len: usize = s.iter().product();
                let t = Tensor::arange(0f32, len as f32, &dev).unwrap();
                (n, (t + i as f64).unwrap().reshape(s).unwrap())
            })
            .collect();
        let inner = to_internal(&c, ckpt.clone()).unwrap();
        let want: BTreeMap<String, Vec<usize>> = c.tensors().into_iter().collect();
        let got: BTreeMap<String, Vec<usize>> = inner
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        assert_eq!(want, got);
        let back = to_checkpoint(&c, inner).unwrap();
        for (n, t) in &ckpt {
            let diff = (t - &back[n]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{n}");
        }
    }

    #[test]
    fn check_tensors_names_each_problem() {
        let expected = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let found: BTreeMap<String, Vec<usize>> =
            [("a".to_string(), vec![3, 2]), ("c".to_string(), vec![1])].into();
        let e = check_tensors(&expected, &found, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing: b"), "{e}");
        assert!(e.contains("unexpected: c"), "{e}");
        assert!(e.contains("a: expected [2, 3], found [3, 2]"), "{e}");
    }
}
