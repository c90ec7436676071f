//! Decoding written out for an f32 model on the CPU: the forward of [`crate::backprop`]
//! without what a backward keeps, over a KV cache allocated once for the whole generation
//! and written in place.
//!
//! candle's graph of the same forward ([`crate::generate::generate_with_candle`], which the
//! GPU and 16-bit weights use) grows the cache by concatenation — a copy of every key and
//! value so far at every token — and broadcasts the grouped-query heads into copies; here a
//! step writes its new keys and values into the cache and each query head reads its group's
//! key/value head where it lies. The products are
//! [`basin_kernels::ops::linear::forward`]'s: a decoding step's few rows take
//! [`basin_kernels::ops::linear::rows_dot`], which reads each weight once, a prompt's
//! prefill the GEMM. The tests check the logits against candle's graph and the replies of
//! the real model against it token for token.
//!
//! [`PassDecoder`] decodes through the training pass's own layers
//! ([`crate::backprop::layer_forward`] over a KV cache) on any of its backends: on a GPU in
//! f32 or bf16 with cuBLAS and the pass's kernels (a few launches a layer, the cache
//! written in place), on the CPU as the check of it against [`Decoder`].

use crate::backprop::{
    held_globals, held_layers, layer_forward, project, Backend, Dims, Held, Keys, Rows, Weights,
};
use crate::llama::{attention_bias, Layer, Llama};
use anyhow::{bail, Result};
use basin_kernels::ops::rows::add_into;
use basin_kernels::ops::{rms_norm, rope, swiglu};
use rayon::prelude::*;

/// Whether [`Decoder`] can run `model`: f32 weights on the CPU.
pub fn supports(model: &Llama) -> bool {
    model.dtype() == candle_core::DType::F32 && model.device().is_cpu()
}

/// The model's weights, held for reading while a generation runs.
pub struct HeldModel<'m> {
    globals: Vec<Held<'m>>,
    layers: Vec<Layer<Held<'m>>>,
}

impl<'m> HeldModel<'m> {
    pub fn of(model: &'m Llama) -> Result<Self> {
        if !supports(model) {
            bail!("the written-out decoder needs an f32 model on the CPU");
        }
        Self::any(model)
    }

    /// The weights of a model on any device and dtype the pass's backends take.
    fn any(model: &'m Llama) -> Result<Self> {
        Ok(Self {
            globals: held_globals(model)?,
            layers: held_layers(model)?,
        })
    }
}

/// The layers of a KV cache for `b` rows of `capacity` positions, and the values of each
/// layer's keys (or values): [b, kv heads, capacity, head_dim].
fn cache_size(model: &Llama, b: usize, capacity: usize) -> (usize, usize) {
    let c = &model.config;
    let per_layer = b * c.num_key_value_heads * capacity * c.head_dim();
    (c.num_hidden_layers, per_layer)
}

/// Checks a decoding step of `ids` and `positions` ([b, t] row-major) with `key_valid` (b
/// rows of the keys so far and the new ones) against a cache of `capacity` positions, `len`
/// of them filled: (t, keys).
fn check_step(
    model: &Llama,
    b: usize,
    (capacity, len): (usize, usize),
    ids: &[u32],
    positions: &[u32],
    key_valid: &[Vec<bool>],
) -> Result<(usize, usize)> {
    let n = ids.len();
    if b == 0 || n == 0 || !n.is_multiple_of(b) || positions.len() != n || key_valid.len() != b {
        bail!(
            "decode step: {n} ids, {} positions and {} mask rows for a batch of {b}",
            positions.len(),
            key_valid.len()
        );
    }
    let t = n / b;
    let keys = len + t;
    if keys > capacity {
        bail!("decode step: {keys} positions exceed the cache's {capacity}");
    }
    if let Some(r) = key_valid.iter().position(|k| k.len() != keys) {
        bail!(
            "decode step: mask row {r} has {} keys, not {keys}",
            key_valid[r].len()
        );
    }
    let vocab = model.config.vocab_size;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {id} is outside the vocabulary of {vocab}");
    }
    let max_pos = positions.iter().copied().max().unwrap_or(0) as usize;
    model.check_positions(max_pos.max(keys - 1))?;
    Ok((t, keys))
}

/// A batch's keys and values, every layer's [batch, kv heads, capacity, head_dim], the
/// first `len` positions filled.
struct Cache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    capacity: usize,
    len: usize,
}

/// A generation's forward passes: each [`Decoder::step`] feeds a batch's next tokens and
/// returns the logits after each row's last one.
pub struct Decoder<'a> {
    model: &'a Llama,
    w: Weights<&'a [f32]>,
    /// Batch rows.
    b: usize,
    cache: Cache,
}

impl<'a> Decoder<'a> {
    /// A decoder for `b` rows of up to `capacity` positions each (prompt and reply).
    pub fn new(
        model: &'a Llama,
        held: &'a HeldModel<'_>,
        b: usize,
        capacity: usize,
    ) -> Result<Self> {
        let (layers, per_layer) = cache_size(model, b, capacity);
        Ok(Self {
            model,
            w: Weights::new(&held.globals, &held.layers)?,
            b,
            cache: Cache {
                k: (0..layers).map(|_| vec![0f32; per_layer]).collect(),
                v: (0..layers).map(|_| vec![0f32; per_layer]).collect(),
                capacity,
                len: 0,
            },
        })
    }

    /// Feeds `ids` [b, t] at `positions` [b, t] (row-major), appending t positions to the
    /// cache, and returns the next-token logits [b, vocab] after each row's last token.
    /// `key_valid[r]` tells, for each of the len + t keys, whether row r may attend to it
    /// (false at left padding); a query sees the valid keys up to its own.
    pub fn step(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<Vec<f32>> {
        let (b, n, len) = (self.b, ids.len(), self.cache.len);
        let fill = (self.cache.capacity, len);
        let (t, keys) = check_step(self.model, b, fill, ids, positions, key_valid)?;
        let d = Dims::new(&self.model.config, b, t);
        let half = d.hd / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for &p in positions {
            cos.extend_from_slice(&self.w.cos[p as usize * half..][..half]);
            sin.extend_from_slice(&self.w.sin[p as usize * half..][..half]);
        }
        let mut x = Vec::with_capacity(n * d.h);
        for &id in ids {
            x.extend_from_slice(&self.w.embed[id as usize * d.h..][..d.h]);
        }
        let (qd, kvd) = (d.nh * d.hd, d.nkv * d.hd);
        let cap = self.cache.capacity;
        for (l, (k_cache, v_cache)) in self
            .w
            .layers
            .iter()
            .zip(self.cache.k.iter_mut().zip(self.cache.v.iter_mut()))
        {
            let a = rms_norm::forward(&x, l.attn_norm, d.eps);
            let mut q = project(&a, &l.q, n, d.h, qd)?;
            let k = project(&a, &l.k, n, d.h, kvd)?;
            let v = project(&a, &l.v, n, d.h, kvd)?;
            rotate_heads(&mut q, &cos, &sin, d.hd);
            // The new keys (rotated) and values, each into its place in the cache.
            for row in 0..n {
                let (r, i) = (row / t, row % t);
                for head in 0..d.nkv {
                    let at = ((r * d.nkv + head) * cap + len + i) * d.hd;
                    let src = &k[row * kvd + head * d.hd..][..d.hd];
                    let (c, s) = (&cos[row * half..][..half], &sin[row * half..][..half]);
                    rope::rotate_row(&mut k_cache[at..at + d.hd], src, c, s, 1.0);
                    v_cache[at..at + d.hd].copy_from_slice(&v[row * kvd + head * d.hd..][..d.hd]);
                }
            }
            let y = attention(&q, k_cache, v_cache, key_valid, d, len, cap);
            let mut x_mid = project(&y, &l.o, n, qd, d.h)?;
            add_into(&mut x_mid, &x);
            let m = rms_norm::forward(&x_mid, l.mlp_norm, d.eps);
            let g = project(&m, &l.gate, n, d.h, d.ff)?;
            let u = project(&m, &l.up, n, d.h, d.ff)?;
            x = project(&swiglu::forward(&g, &u), &l.down, n, d.ff, d.h)?;
            add_into(&mut x, &x_mid);
        }
        self.cache.len = keys;
        // Each row's last position: normed, then onto the vocabulary.
        let mut last = Vec::with_capacity(b * d.h);
        for r in 0..b {
            last.extend_from_slice(&x[((r + 1) * t - 1) * d.h..][..d.h]);
        }
        let normed = rms_norm::forward(&last, self.w.norm, d.eps);
        let head = crate::llama::Proj {
            w: self.w.head,
            b: None,
        };
        project(&normed, &head, b, d.h, d.vocab)
    }
}

/// A generation's forward passes through the written-out pass's layers on backend `B`: each
/// [`PassDecoder::step`] feeds a batch's next tokens, writes their keys and values into the
/// cache (every layer's [b, kv heads, capacity, head_dim], allocated once) and returns the
/// logits after each row's last token, on the host.
pub(crate) struct PassDecoder<'a, B: Backend> {
    be: &'a B,
    model: &'a Llama,
    w: Weights<B::Src<'a>>,
    b: usize,
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    capacity: usize,
    len: usize,
}

impl<'a, B: Backend> PassDecoder<'a, B> {
    /// A decoder for `b` rows of up to `capacity` positions each (prompt and reply).
    fn new(
        be: &'a B,
        model: &'a Llama,
        held: &'a HeldModel<'_>,
        b: usize,
        capacity: usize,
    ) -> Result<Self> {
        let (layers, per_layer) = cache_size(model, b, capacity);
        let zeros = || {
            (0..layers)
                .map(|_| be.zeros(per_layer))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            be,
            model,
            w: Weights::map(&held.globals, &held.layers, |h| be.weight(h))?,
            b,
            k: zeros()?,
            v: zeros()?,
            capacity,
            len: 0,
        })
    }

    /// [`Decoder::step`] on `B`, the logits [b, vocab] left where `B` keeps them.
    fn forward(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<B::Buf> {
        let (be, b, len) = (self.be, self.b, self.len);
        let fill = (self.capacity, len);
        let (t, keys) = check_step(self.model, b, fill, ids, positions, key_valid)?;
        let d = Dims::new(&self.model.config, b, t);
        let n = d.n;
        let pos = be.ids(positions)?;
        let bias = attention_bias(key_valid, t, self.model.dtype(), self.model.device())?;
        let rows = Rows {
            cos: be.gather_rows(self.w.cos, &pos, n, d.hd / 2)?,
            sin: be.gather_rows(self.w.sin, &pos, n, d.hd / 2)?,
            bias: be.copy_of(&bias)?,
        };
        let mut x = be.gather_rows(self.w.embed, &be.ids(ids)?, n, d.h)?;
        let caches = self.k.iter_mut().zip(self.v.iter_mut());
        for (l, (k, v)) in self.w.layers.iter().zip(caches) {
            let cache = Keys::Cache {
                k,
                v,
                at: len,
                cap: self.capacity,
            };
            x = layer_forward(be, x, l, d, &rows, cache)?.1;
        }
        self.len = keys;
        // Each row's last position: normed, then onto the vocabulary.
        let last: Vec<u32> = (0..b).map(|r| ((r + 1) * t - 1) as u32).collect();
        let x_last = be.gather_rows(be.src(&x), &be.ids(&last)?, b, d.h)?;
        let normed = be.rms_norm(be.src(&x_last), self.w.norm, b, d.h, d.eps)?;
        be.linear(be.src(&normed), self.w.head, b, d.h, d.vocab)
    }
}

/// A decoding step of a decoder on the model's device: the ids, positions and key_valid of
/// [`Decoder::step`] in; out either the logits or, for greedy decoding, the tokens chosen
/// where the logits are (on a GPU only `b` ids then cross to the host, not [b, vocab] f32).
pub trait Step {
    /// The logits [b, vocab] after each row's last token, on the host.
    fn logits(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<Vec<f32>>;
    /// Each row's greedy next token: where its logits first hold their largest value
    /// (`rows::argmax_rows`, the same choice as candle's `argmax` of [`Step::logits`]).
    fn greedy(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<Vec<u32>>;
}

impl<B: Backend> Step for PassDecoder<'_, B> {
    fn logits(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<Vec<f32>> {
        let logits = self.forward(ids, positions, key_valid)?;
        self.be
            .to_host(logits, self.b * self.model.config.vocab_size)
    }

    fn greedy(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        key_valid: &[Vec<bool>],
    ) -> Result<Vec<u32>> {
        let logits = self.forward(ids, positions, key_valid)?;
        self.be
            .argmax_rows(logits, self.b, self.model.config.vocab_size)
    }
}

/// Runs `run` with a [`PassDecoder`] for `b` rows of up to `capacity` positions on the
/// model's device (the pass's backend for it: f32 on the CPU, f32 or bf16 on a GPU), as a
/// [`Step`].
pub fn with_pass_decoder<R>(
    model: &Llama,
    b: usize,
    capacity: usize,
    run: impl FnOnce(&mut dyn Step) -> Result<R>,
) -> Result<R> {
    fn on<B: Backend, R>(
        be: &B,
        model: &Llama,
        b: usize,
        capacity: usize,
        run: impl FnOnce(&mut dyn Step) -> Result<R>,
    ) -> Result<R> {
        let held = HeldModel::any(model)?;
        let mut dec = PassDecoder::new(be, model, &held, b, capacity)?;
        run(&mut dec)
    }
    if let Some(why) = crate::backprop::unsupported(model) {
        bail!("decoding through the written-out pass: {why}");
    }
    match model.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) if model.dtype() == candle_core::DType::BF16 => {
            let be = crate::backprop::cuda::Cuda::<half::bf16>::new(dev);
            on(&be, model, b, capacity, run)
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            let be = crate::backprop::cuda::Cuda::<f32>::new(dev);
            on(&be, model, b, capacity, run)
        }
        _ => on(&crate::backprop::cpu::Cpu, model, b, capacity, run),
    }
}

/// Rotates every head of every row of `x` [rows, heads · hd] by its row's angles.
fn rotate_heads(x: &mut [f32], cos: &[f32], sin: &[f32], hd: usize) {
    let half = hd / 2;
    let rows = cos.len() / half;
    let width = x.len() / rows.max(1);
    x.par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
        let (c, s) = (&cos[row * half..][..half], &sin[row * half..][..half]);
        let mut src = vec![0f32; hd];
        for head in xr.chunks_mut(hd) {
            src.copy_from_slice(head);
            rope::rotate_row(head, &src, c, s, 1.0);
        }
    });
}

/// Attention of the step's queries q [rows, heads · hd] over the cache (the first
/// len + t positions of each row), one task per (batch row, query head): scores q·k/√hd
/// over the valid keys up to the query's own, their softmax, and its weighted sum of the
/// values. Returns [rows, heads · hd].
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[Vec<bool>],
    d: Dims,
    len: usize,
    cap: usize,
) -> Vec<f32> {
    let (t, hd, rep) = (d.t, d.hd, d.nh / d.nkv);
    let scale = 1.0 / (hd as f32).sqrt();
    // Head-major [b, heads, t, hd], then laid out as rows.
    let mut yh = vec![0f32; d.b * d.nh * t * hd];
    yh.par_chunks_mut(t * hd)
        .enumerate()
        .for_each(|(task, out)| {
            let (r, head) = (task / d.nh, task % d.nh);
            let base = (r * d.nkv + head / rep) * cap * hd;
            let (kh, vh) = (&k[base..][..cap * hd], &v[base..][..cap * hd]);
            let valid = &key_valid[r];
            let mut p = vec![0f32; len + t];
            for (i, y) in out.chunks_mut(hd).enumerate() {
                let qi = &q[((r * t + i) * d.nh + head) * hd..][..hd];
                let upto = len + i + 1;
                let mut max = f32::NEG_INFINITY;
                for j in 0..upto {
                    if valid[j] {
                        let s = dot(qi, &kh[j * hd..][..hd]) * scale;
                        p[j] = s;
                        max = max.max(s);
                    }
                }
                if max == f32::NEG_INFINITY {
                    // A padding query: no key to see (its output is never read).
                    continue;
                }
                let mut sum = 0f32;
                for j in 0..upto {
                    if valid[j] {
                        p[j] = (p[j] - max).exp();
                        sum += p[j];
                    }
                }
                for j in 0..upto {
                    if valid[j] {
                        let pj = p[j] / sum;
                        for (y, v) in y.iter_mut().zip(&vh[j * hd..][..hd]) {
                            *y += pj * v;
                        }
                    }
                }
            }
        });
    if t == 1 {
        return yh;
    }
    let mut y = vec![0f32; yh.len()];
    y.par_chunks_mut(d.nh * hd)
        .enumerate()
        .for_each(|(row, yr)| {
            let (r, i) = (row / t, row % t);
            for (head, dst) in yr.chunks_mut(hd).enumerate() {
                dst.copy_from_slice(&yh[((r * d.nh + head) * t + i) * hd..][..hd]);
            }
        });
    y
}

/// a · b in eight partial sums (so that it vectorizes), added pairwise, then the tail.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let h: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
    (h[0] + h[2]) + (h[1] + h[3]) + tail
}
