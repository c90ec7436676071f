//! A Llama-family decoder (Llama 2/3, SmolLM2, ...) that both trains and generates.
//!
//!   h_0 = E[ids]
//!   h'  = h + Attn(RMSNorm(h))           grouped-query attention, RoPE, causal + padding mask
//!   h   = h' + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(h')
//!   logits = RMSNorm(h_L) W_head^T        W_head = E when the embeddings are tied
//!
//! Mistral, Qwen2 and Phi-3 are the same network with the differences [`ModelConfig`]
//! records (biases, head size, RoPE scaling, a bound on positions).
//!
//! Every op on the training path has a backward. candle-nn's fused rms_norm, softmax and
//! rope have none, so they are used only when `Pass::Infer` asks for them (generation).
//! Weights use Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).

pub use crate::architecture::ModelConfig;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;

/// Which kernels a forward pass may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Differentiable ops only.
    Train,
    /// candle-nn's fused kernels (no backward): generation and evaluation.
    Infer,
}

/// A projection: its weight [out, in] and, in the families that have one, its bias [out].
#[derive(Clone, Debug)]
pub struct Proj<T> {
    pub w: T,
    pub b: Option<T>,
}

/// One decoder layer's tensors (or their gradients, or views of their values).
#[derive(Clone, Debug)]
pub struct Layer<T> {
    pub attn_norm: T,
    pub q: Proj<T>,
    pub k: Proj<T>,
    pub v: Proj<T>,
    pub o: Proj<T>,
    pub mlp_norm: T,
    pub gate: Proj<T>,
    pub up: Proj<T>,
    pub down: Proj<T>,
}

impl<T> Proj<T> {
    fn as_ref(&self) -> Proj<&T> {
        Proj {
            w: &self.w,
            b: self.b.as_ref(),
        }
    }

    fn try_map<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<Proj<U>> {
        Ok(Proj {
            w: f(self.w)?,
            b: self.b.map(f).transpose()?,
        })
    }
}

impl<T> Layer<T> {
    pub fn as_ref(&self) -> Layer<&T> {
        Layer {
            attn_norm: &self.attn_norm,
            q: self.q.as_ref(),
            k: self.k.as_ref(),
            v: self.v.as_ref(),
            o: self.o.as_ref(),
            mlp_norm: &self.mlp_norm,
            gate: self.gate.as_ref(),
            up: self.up.as_ref(),
            down: self.down.as_ref(),
        }
    }

    /// Applies `f` to every tensor, in [`Self::into_vec`]'s order.
    pub fn try_map<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<Layer<U>> {
        Ok(Layer {
            attn_norm: f(self.attn_norm)?,
            q: self.q.try_map(&mut f)?,
            k: self.k.try_map(&mut f)?,
            v: self.v.try_map(&mut f)?,
            o: self.o.try_map(&mut f)?,
            mlp_norm: f(self.mlp_norm)?,
            gate: self.gate.try_map(&mut f)?,
            up: self.up.try_map(&mut f)?,
            down: self.down.try_map(&mut f)?,
        })
    }

    /// Every tensor (biases where present), in one fixed order.
    pub fn into_vec(self) -> Vec<T> {
        let mut out = Vec::with_capacity(16);
        out.push(self.attn_norm);
        for p in [self.q, self.k, self.v, self.o] {
            out.push(p.w);
            out.extend(p.b);
        }
        out.push(self.mlp_norm);
        for p in [self.gate, self.up, self.down] {
            out.push(p.w);
            out.extend(p.b);
        }
        out
    }
}

pub(crate) type Block = Layer<Tensor>;

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
    pub config: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Tensor,
    /// RoPE's cos and sin of every position's angles, [max_positions, head_dim / 2].
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

/// x [.., in] · wᵀ for w [out, in], as one 2-D matmul over every row. Broadcasting w over
/// the batch instead (candle-nn's Linear) makes its gradient a batch of per-row GEMMs and a
/// sum over the batch: [batch, in, out] floats written and read again for every weight.
fn project(x: &Tensor, p: &Proj<Tensor>, pass: Pass) -> Result<Tensor> {
    let w = &p.w;
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
    let y = match &p.b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

impl Llama {
    /// Builds the model over the variables of `varmap` (basin's names:
    /// [`ModelConfig::tensors`]), which must hold exactly those tensors with those shapes.
    pub fn new(config: &ModelConfig, varmap: &VarMap) -> Result<Self> {
        config.validate()?;
        let c = config;
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("varmap lock poisoned"))?;
        let found: std::collections::BTreeMap<String, Vec<usize>> = data
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        crate::architecture::check_tensors(&c.tensors(), &found, "the model's weights")?;
        let get = |name: &str| data[name].as_tensor().clone();
        let proj = |p: &str, bias: bool| Proj {
            w: get(&format!("{p}.weight")),
            b: bias.then(|| get(&format!("{p}.bias"))),
        };
        let embed = get("model.embed_tokens.weight");
        let blocks = (0..c.num_hidden_layers)
            .map(|i| {
                let l = format!("model.layers.{i}");
                Block {
                    attn_norm: get(&format!("{l}.input_layernorm.weight")),
                    q: proj(&format!("{l}.self_attn.q_proj"), c.qkv_bias),
                    k: proj(&format!("{l}.self_attn.k_proj"), c.qkv_bias),
                    v: proj(&format!("{l}.self_attn.v_proj"), c.qkv_bias),
                    o: proj(&format!("{l}.self_attn.o_proj"), c.o_bias),
                    mlp_norm: get(&format!("{l}.post_attention_layernorm.weight")),
                    gate: proj(&format!("{l}.mlp.gate_proj"), c.mlp_bias),
                    up: proj(&format!("{l}.mlp.up_proj"), c.mlp_bias),
                    down: proj(&format!("{l}.mlp.down_proj"), c.mlp_bias),
                }
            })
            .collect();
        let norm = get("model.norm.weight");
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")
        };
        // RoPE angles θ_{p,i} = p · inv_freq_i (scaled as the config says), in f64 then cast.
        let (device, dtype) = (embed.device().clone(), embed.dtype());
        let half = c.head_dim() / 2;
        let n_pos = c.max_positions();
        let inv_freq = c.rope_inv_freq();
        let angles: Vec<f64> = (0..n_pos)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a) as f32).collect();
            Ok(Tensor::from_vec(v, (n_pos, half), &device)?.to_dtype(dtype)?)
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

    /// Refuses positions at or past the model's bound ([`ModelConfig::max_positions`]).
    pub fn check_positions(&self, max_position: usize) -> Result<()> {
        let c = &self.config;
        if max_position >= c.max_positions() {
            bail!(
                "position {max_position} is past the model's {} positions ({})",
                c.max_positions(),
                c.positions_reason()
            );
        }
        Ok(())
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
        // A row's positions never pass its key index (left padding only lowers them).
        let keys = t + cache.as_deref().map_or(0, KvCache::len);
        if keys > 0 {
            self.check_positions(keys - 1)?;
        }
        let half = self.config.head_dim() / 2;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.blocks.len(), || None);
        }
        let mut x = self
            .embed(&ids.flatten_all()?)?
            .reshape((b, t, self.config.hidden_size))?;
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

    /// The embeddings of `ids` [n]. The padding token's row (`pad_token_id`) is read
    /// detached, so that, as in transformers, no gradient reaches it through a lookup.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.index_select(ids, 0)?;
        let Some(pad) = self.config.pad_token_id else {
            return Ok(x);
        };
        let is_pad = ids.eq(pad)?.unsqueeze(1)?.broadcast_as(x.shape())?;
        let fixed = self.embed.detach().index_select(ids, 0)?;
        Ok(is_pad.where_cond(&fixed, &x)?)
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
        let head = Proj {
            w: self.lm_head.clone(),
            b: None,
        };
        project(&hidden.contiguous()?, &head, pass)
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
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let varmap = VarMap::new();
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut data = varmap.data().lock().expect("fresh varmap");
    for (name, shape) in config.tensors() {
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
