//! A Llama-family decoder (Llama 2/3, SmolLM2, ...) that both trains and generates.
//!
//!   h_0 = E[ids]
//!   h'  = h + Attn(RMSNorm(h))           grouped-query attention, RoPE, causal + padding mask
//!   h   = h' + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(h')
//!   logits = RMSNorm(h_L) W_head^T        W_head = E when the embeddings are tied
//!
//! Every op on the training path has a backward. candle-nn's fused rms_norm, softmax and
//! rope have none, so they are used only when `Pass::Infer` asks for them (generation).
//! Weights use Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

/// The architecture, in Hugging Face `config.json` terms.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if !c.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", c.head_dim());
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (defaults as `transformers.LlamaConfig`).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            rope_theta: Option<f64>,
            rms_norm_eps: Option<f64>,
            tie_word_embeddings: Option<bool>,
            max_position_embeddings: Option<usize>,
            rope_scaling: Option<serde_json::Value>,
        }
        let hf: Hf = serde_json::from_str(text)?;
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("config.json: rope_scaling is not supported yet");
        }
        let c = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
        };
        c.validate()?;
        Ok(c)
    }

    /// A Hugging Face `config.json` that `transformers` loads as `LlamaForCausalLM`.
    pub fn to_hf_json(
        &self,
        dtype: DType,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        })
    }
}

/// Which kernels a forward pass may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Differentiable ops only.
    Train,
    /// candle-nn's fused kernels (no backward): generation and evaluation.
    Infer,
}

pub(crate) struct Block {
    pub(crate) attn_norm: Tensor,
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) o: Tensor,
    pub(crate) mlp_norm: Tensor,
    pub(crate) gate: Tensor,
    pub(crate) up: Tensor,
    pub(crate) down: Tensor,
}

/// Keys and values of the positions seen so far, per layer: [batch, kv_heads, time, head_dim].
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Tensor,
    /// RoPE's cos and sin of every position's angles, [max_position_embeddings, head_dim / 2].
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

/// A projection's weight [out, in] (no bias in Llama).
fn linear(vb: &VarBuilder, out_dim: usize, in_dim: usize, name: &str) -> Result<Tensor> {
    Ok(vb.get((out_dim, in_dim), &format!("{name}.weight"))?)
}

/// x [.., in] · wᵀ for w [out, in], as one 2-D matmul over every row. Broadcasting w over
/// the batch instead (candle-nn's Linear) makes its gradient a batch of per-row GEMMs and a
/// sum over the batch: [batch, in, out] floats written and read again for every weight.
fn project(x: &Tensor, w: &Tensor, pass: Pass) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, d_in) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x = x.reshape((rows, d_in))?;
    let y = if pass == Pass::Infer && x.dtype() == DType::F32 && x.device().is_cpu() {
        // The CPU GEMM that keeps a decoding step's few rows from repacking w (linear.rs).
        basin_kernels::ops::linear::linear(&x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

impl Llama {
    /// Builds the model over the weights in `vb` (Hugging Face names).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let m = vb.pp("model");
        let embed = m.get((c.vocab_size, h), "embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let f = l.pp("mlp");
            blocks.push(Block {
                attn_norm: l.get(h, "input_layernorm.weight")?,
                q: linear(&a, c.num_attention_heads * hd, h, "q_proj")?,
                k: linear(&a, c.num_key_value_heads * hd, h, "k_proj")?,
                v: linear(&a, c.num_key_value_heads * hd, h, "v_proj")?,
                o: linear(&a, h, c.num_attention_heads * hd, "o_proj")?,
                mlp_norm: l.get(h, "post_attention_layernorm.weight")?,
                gate: linear(&f, c.intermediate_size, h, "gate_proj")?,
                up: linear(&f, c.intermediate_size, h, "up_proj")?,
                down: linear(&f, h, c.intermediate_size, "down_proj")?,
            });
        }
        let norm = m.get(h, "norm.weight")?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get((c.vocab_size, h), "lm_head.weight")?
        };
        // RoPE angles θ_{p,i} = p · theta^(-2i/hd), computed in f64 then cast.
        let half = hd / 2;
        let n_pos = c.max_position_embeddings;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let angles: Vec<f64> = (0..n_pos)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a) as f32).collect();
            Ok(Tensor::from_vec(v, (n_pos, half), vb.device())?.to_dtype(vb.dtype())?)
        };
        Ok(Self {
            config: c.clone(),
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Final hidden states [batch, time, hidden] of `ids` [batch, time] at `positions`
    /// [batch, time] (u32), with an additive attention bias [batch, 1, time, keys] (0 where
    /// a query may look, a large negative number elsewhere). With a cache, keys are the
    /// cached positions followed by these.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let half = self.config.head_dim() / 2;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.blocks.len(), || None);
        }
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.config.hidden_size,
        ))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let a = self.attention(
                block,
                &rms_norm(&x, &block.attn_norm, self.config.rms_norm_eps, pass)?,
                &cos,
                &sin,
                bias,
                layer_cache,
                pass,
            )?;
            x = (x + a)?;
            let n = rms_norm(&x, &block.mlp_norm, self.config.rms_norm_eps, pass)?;
            let f = project(
                &swiglu(
                    &project(&n, &block.gate, pass)?,
                    &project(&n, &block.up, pass)?,
                )?,
                &block.down,
                pass,
            )?;
            x = (x + f)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps, pass)
    }

    /// Next-token logits [vocab] (f32) after one whole sequence, without a cache.
    pub fn next_token_logits(&self, ids: &[u32], pass: Pass) -> Result<Vec<f32>> {
        let t = ids.len();
        if t == 0 {
            bail!("next_token_logits: empty sequence");
        }
        let device = self.device();
        let input = Tensor::new(ids, device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0u32, t as u32, device)?.unsqueeze(0)?;
        let bias = attention_bias(&[vec![true; t]], t, self.dtype(), device)?;
        let hidden = self.hidden(&input, &positions, &bias, None, pass)?;
        let logits = self.logits(&hidden.narrow(1, t - 1, 1)?, pass)?;
        Ok(logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }

    /// Logits [.., vocab] of hidden states [.., hidden].
    pub fn logits(&self, hidden: &Tensor, pass: Pass) -> Result<Tensor> {
        // contiguous(): CUDA matmul needs it, and the last position of a batch is a strided view.
        project(&hidden.contiguous()?, &self.lm_head, pass)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        pass: Pass,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope(&heads(project(x, &block.q, pass)?, nh)?, cos, sin, pass)?;
        let mut k = rope(&heads(project(x, &block.k, pass)?, nkv)?, cos, sin, pass)?;
        let mut v = heads(project(x, &block.v, pass)?, nkv)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention: each key/value head serves nh / nkv query heads.
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let raw = q.matmul(&k.t()?)?;
        let probs = if pass == Pass::Train && raw.dtype() != DType::F64 {
            // One fused kernel each way instead of candle's chain of elementwise ops (f64,
            // the gradient checks' precision, keeps the plain ops).
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            basin_kernels::ops::softmax::scaled_masked_softmax(&f32(&raw)?, &f32(bias)?, scale)?
                .to_dtype(raw.dtype())?
        } else {
            softmax(&(raw * scale)?.broadcast_add(bias)?, pass)?
        };
        let y = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        project(&y, &block.o, pass)
    }
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, nkv, n_rep, t, hd))?
        .reshape((b, nkv * n_rep, t, hd))?)
}

/// The dtype reductions run in: f32 for 16-bit weights (as transformers does), else as is.
fn reduce_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// RMSNorm: x / sqrt(mean(x²) + eps) · w.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, pass: Pass) -> Result<Tensor> {
    if pass == Pass::Infer {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(reduce_dtype(dtype))?;
    let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    Ok(xf.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(w)?)
}

/// Softmax over keys, in f32 for 16-bit weights.
fn softmax(scores: &Tensor, pass: Pass) -> Result<Tensor> {
    let dtype = scores.dtype();
    let s = scores.to_dtype(reduce_dtype(dtype))?;
    let p = match pass {
        Pass::Infer => candle_nn::ops::softmax_last_dim(&s)?,
        Pass::Train => candle_nn::ops::softmax(&s, D::Minus1)?,
    };
    Ok(p.to_dtype(dtype)?)
}

/// Rotary embedding, half-split layout (Hugging Face): x·cos + rotate_half(x)·sin, with
/// per-row angles cos/sin [batch, time, head_dim/2].
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pass: Pass) -> Result<Tensor> {
    if pass == Pass::Infer {
        return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
    }
    let hd = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// The MLP's gate: silu(g) ⊙ u.
fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(g)? * u)?)
}

/// The additive bias that hides a key from a query.
pub const MASKED: f32 = -1e9;

/// Attention bias [batch, 1, queries, keys] for a batch whose rows have `key_valid` keys
/// (false at padding): query i (at key index `offset + i`) sees valid keys ≤ itself.
pub fn attention_bias(
    key_valid: &[Vec<bool>],
    n_queries: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let n_keys = key_valid.first().map_or(0, Vec::len);
    let offset = n_keys - n_queries;
    let mut v = Vec::with_capacity(b * n_queries * n_keys);
    for row in key_valid {
        if row.len() != n_keys {
            bail!("attention_bias: rows have different key counts");
        }
        for i in 0..n_queries {
            v.extend(
                row.iter()
                    .enumerate()
                    .map(|(j, &ok)| if ok && j <= offset + i { 0.0 } else { MASKED }),
            );
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, n_queries, n_keys), device)?.to_dtype(dtype)?)
}

/// Seeded N(0, std²) initial weights (norms at 1) for a model of `config`, as a VarMap of
/// trainable variables: the tiny test models, reproducible without candle's device RNG.
pub fn random_weights(
    config: &LlamaConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let varmap = VarMap::new();
    let c = config;
    let hd = c.head_dim();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![c.hidden_size]),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![c.num_attention_heads * hd, c.hidden_size],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![c.num_key_value_heads * hd, c.hidden_size],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![c.num_key_value_heads * hd, c.hidden_size],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![c.hidden_size, c.num_attention_heads * hd],
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![c.hidden_size],
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![c.intermediate_size, c.hidden_size],
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![c.intermediate_size, c.hidden_size],
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![c.hidden_size, c.intermediate_size],
            ),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![c.hidden_size]));
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, c.hidden_size]));
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut data = varmap.data().lock().expect("fresh varmap");
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| 0.02 * rng.normal() as f32).collect()
        };
        let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        data.insert(name, candle_core::Var::from_tensor(&t)?);
    }
    drop(data);
    Ok(varmap)
}
