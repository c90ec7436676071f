//! The training loss and its gradients for an f32 model on the CPU, with the forward and
//! backward passes written out layer by layer (llm.c's way) instead of recorded as a graph
//! for candle's autograd.
//!
//! Why: candle's backward gives every node of the graph (~40 a layer: the projections, but
//! also every reshape, transpose, copy and the grouped-query broadcast) a fresh tensor of
//! zeros and adds its gradient into it, and runs attention's small products one batch row
//! at a time; with the same products, the written-out step is faster (docs/performance.md
//! has the figures). Here every
//! gradient is written once into its own buffer, attention runs one (row, head) pair per
//! task, and the rest is the same arithmetic as [`crate::batch::loss`] with `Pass::Train`:
//! the gemm crate's products and basin_kernels' fused row operations (RMSNorm, RoPE,
//! SwiGLU, the masked softmax, the cross-entropy). The tests check the loss and every
//! gradient against candle's autograd of the same model in f64.
//!
//! Per layer, with x the residual stream ([rows, hidden], rows = batch × time):
//!
//! ```text
//! a = rmsnorm(x)    q, k, v = rope(a·Wqᵀ), rope(a·Wkᵀ), a·Wvᵀ    P = softmax(q·kᵀ/√d + bias)
//! x += (P·v)·Woᵀ    m = rmsnorm(x)    x += (silu(m·Wgᵀ) ⊙ m·Wuᵀ)·Wdᵀ
//! ```

use crate::batch::Batch;
use crate::llama::{Layer, Llama, Proj};
use anyhow::{bail, Result};
use basin_kernels::ops::linear::{matmul, View};
use basin_kernels::ops::{cross_entropy, rms_norm, rope, softmax, swiglu};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// Whether [`forward`] can run `model`: f32 weights on the CPU.
pub fn supports(model: &Llama) -> bool {
    model.dtype() == DType::F32 && model.device().is_cpu()
}

/// The sizes of one pass (the written-out decoder's steps too).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    /// Batch rows, time steps, rows · time.
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) n: usize,
    /// Hidden size, query heads, key/value heads, head size, MLP size, vocabulary.
    pub(crate) h: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
    pub(crate) ff: usize,
    pub(crate) vocab: usize,
    pub(crate) eps: f32,
}

impl Dims {
    /// A pass of `b` rows of `t` positions through a model of `c`.
    pub(crate) fn new(c: &crate::architecture::ModelConfig, b: usize, t: usize) -> Self {
        Dims {
            b,
            t,
            n: b * t,
            h: c.hidden_size,
            nh: c.num_attention_heads,
            nkv: c.num_key_value_heads,
            hd: c.head_dim(),
            ff: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
        }
    }
}

/// A weight's f32 values, read in place under the tensor's read lock.
pub(crate) struct Held<'a> {
    storage: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        if t.dtype() != DType::F32 || !t.is_contiguous() || !t.device().is_cpu() {
            bail!("backprop: expected a contiguous f32 CPU tensor, found {t:?}");
        }
        let (storage, layout) = t.storage_and_layout();
        Ok(Held {
            start: layout.start_offset(),
            len: t.elem_count(),
            storage,
        })
    }

    fn values(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => unreachable!("checked in Held::new"),
        }
    }
}

/// The tensors the passes read outside the layers: the embedding, RoPE's tables, the final
/// norm, the output projection.
pub(crate) fn held_globals(model: &Llama) -> Result<Vec<Held<'_>>> {
    [
        &model.embed,
        &model.cos,
        &model.sin,
        &model.norm,
        &model.lm_head,
    ]
    .into_iter()
    .map(Held::new)
    .collect()
}

/// Each layer's tensors, held.
pub(crate) fn held_layers(model: &Llama) -> Result<Vec<Layer<Held<'_>>>> {
    model
        .blocks
        .iter()
        .map(|b| b.as_ref().try_map(Held::new))
        .collect()
}

pub(crate) struct Weights<'a> {
    pub(crate) embed: &'a [f32],
    pub(crate) cos: &'a [f32],
    pub(crate) sin: &'a [f32],
    pub(crate) norm: &'a [f32],
    pub(crate) head: &'a [f32],
    pub(crate) layers: Vec<Layer<&'a [f32]>>,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(globals: &'a [Held<'_>], layers: &'a [Layer<Held<'_>>]) -> Result<Self> {
        let v = |i: usize| globals[i].values();
        Ok(Weights {
            embed: v(0),
            cos: v(1),
            sin: v(2),
            norm: v(3),
            head: v(4),
            layers: layers
                .iter()
                .map(|l| l.as_ref().try_map(|h| Ok(h.values())))
                .collect::<Result<_>>()?,
        })
    }
}

/// What a layer's backward needs from its forward.
struct Saved {
    /// The layer's input (the residual stream) and its normed copy.
    x: Vec<f32>,
    a: Vec<f32>,
    /// q, k (after RoPE) and v, head-major: [batch, heads, time, head_dim].
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention's probabilities [batch, heads, time, time] and output [rows, heads·head_dim].
    p: Vec<f32>,
    y: Vec<f32>,
    /// The stream after attention, its normed copy, the MLP's gate and up projections and
    /// silu(gate) ⊙ up.
    x_mid: Vec<f32>,
    m: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    s: Vec<f32>,
}

/// What the forward keeps of a layer: everything its backward reads, or only its input
/// (activation recompute).
enum Kept {
    All(Box<Saved>),
    Input(Vec<f32>),
}

/// A forward pass, kept for its backward.
pub struct Trace<'m> {
    model: &'m Llama,
    d: Dims,
    ids: Vec<u32>,
    /// RoPE's cos and sin for each row: [rows, head_dim / 2].
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The attention mask's additive bias (recompute runs attention again).
    bias: Vec<f32>,
    layers: Vec<Kept>,
    /// The last layer's output at the rows the loss reads, those rows normed, their logits.
    x_loss: Vec<f32>,
    loss_rows: Vec<u32>,
    targets: Vec<u32>,
    normed: Vec<f32>,
    logits: Vec<f32>,
    loss: f64,
}

/// y [rows, out] = x [rows, d_in] · wᵀ (+ b), w [out, d_in].
pub(crate) fn project(
    x: &[f32],
    p: &Proj<&[f32]>,
    rows: usize,
    d_in: usize,
    out: usize,
) -> Vec<f32> {
    let mut y = basin_kernels::ops::linear::forward(x, p.w, rows, d_in, out);
    if let Some(b) = p.b {
        y.par_chunks_mut(out)
            .for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(y, b)| *y += b));
    }
    y
}

/// The gradients of a projection's weight (dyᵀ · x) and bias (dy summed over rows).
fn project_param_grads(
    dy: &[f32],
    x: &[f32],
    p: &Proj<&[f32]>,
    rows: usize,
    d_in: usize,
    out: usize,
) -> Proj<Vec<f32>> {
    Proj {
        w: project_weight_grad(dy, x, rows, d_in, out),
        b: p.b.map(|_| {
            let mut db = vec![0f32; out];
            for row in dy.chunks(out) {
                db.iter_mut().zip(row).for_each(|(a, g)| *a += g);
            }
            db
        }),
    }
}

/// dx (+)= dy · w: the input's gradient of [`project`].
fn project_input_grad(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    d_in: usize,
    out: usize,
    accumulate: bool,
) {
    let (dyv, wv) = (View::new(rows, out), View::new(out, d_in));
    matmul(dx, View::new(rows, d_in), dy, dyv, w, wv, accumulate, true);
}

/// dw = dyᵀ · x: the weight's gradient of [`project`], [out, d_in].
fn project_weight_grad(dy: &[f32], x: &[f32], rows: usize, d_in: usize, out: usize) -> Vec<f32> {
    let mut dw = vec![0f32; out * d_in];
    let (dyv, xv) = (View::new(rows, out), View::new(rows, d_in));
    matmul(
        &mut dw,
        View::new(out, d_in),
        dy,
        dyv.t(),
        x,
        xv,
        false,
        true,
    );
    dw
}

pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
}

/// RoPE's angles for [`to_heads`] and [`from_heads`]: each row's cos and sin, and the
/// direction (1 forward, -1 to rotate a gradient back).
type Rope<'a> = (&'a [f32], &'a [f32], f32);

/// One head's vector of row `row` copied to `dst`, rotated by the row's angles when `rope`
/// is given.
fn place_head(dst: &mut [f32], src: &[f32], row: usize, rope: Option<Rope>) {
    match rope {
        None => dst.copy_from_slice(src),
        Some((cos, sin, sign)) => {
            let half = src.len() / 2;
            let (c, s) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            rope::rotate_row(dst, src, c, s, sign)
        }
    }
}

/// [rows, heads·head_dim] → [batch, heads, time, head_dim], rotating each head by its row's
/// angles when `rope` is given.
fn to_heads(x: &[f32], d: Dims, heads: usize, rope: Option<Rope>) -> Vec<f32> {
    let (t, hd) = (d.t, d.hd);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (b, head) = (bh / heads, bh % heads);
        for (i, dst) in o.chunks_mut(hd).enumerate() {
            let row = b * t + i;
            place_head(dst, &x[(row * heads + head) * hd..][..hd], row, rope);
        }
    });
    out
}

/// The inverse layout change of [`to_heads`]: [batch, heads, time, head_dim] → [rows,
/// heads·head_dim], rotating when `rope` is given.
fn from_heads(xh: &[f32], d: Dims, heads: usize, rope: Option<Rope>) -> Vec<f32> {
    let (t, hd) = (d.t, d.hd);
    let mut out = vec![0f32; xh.len()];
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(row, o)| {
            let (b, i) = (row / t, row % t);
            for (head, dst) in o.chunks_mut(hd).enumerate() {
                place_head(
                    dst,
                    &xh[((b * heads + head) * t + i) * hd..][..hd],
                    row,
                    rope,
                );
            }
        });
    out
}

/// Attention per (batch row, query head), one task each: P = softmax(q·kᵀ/√d + bias) and
/// y = P·v, the key/value head being the query head's group (grouped-query attention).
fn attention(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    let (t, hd, rep) = (d.t, d.hd, d.nh / d.nkv);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut p = vec![0f32; d.b * d.nh * t * t];
    let mut y = vec![0f32; q.len()];
    let (tt, th) = (View::new(t, t), View::new(t, hd));
    p.par_chunks_mut(t * t)
        .zip(y.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(i, (p, y))| {
            let b = i / d.nh;
            let kv = b * d.nkv + (i % d.nh) / rep;
            let (k, v) = (&k[kv * t * hd..][..t * hd], &v[kv * t * hd..][..t * hd]);
            let mut s = vec![0f32; t * t];
            matmul(
                &mut s,
                tt,
                &q[i * t * hd..][..t * hd],
                th,
                k,
                th.t(),
                false,
                false,
            );
            p.copy_from_slice(&softmax::forward(
                &s,
                &bias[b * t * t..][..t * t],
                t,
                1,
                t,
                scale,
            ));
            matmul(y, th, p, tt, v, th, false, false);
        });
    (p, y)
}

/// The gradients of [`attention`] for q, k and v from the output's, dy (head-major). One
/// task per (batch row, key/value head): it owns that head's dk and dv and its group's dq.
fn attention_backward(dy: &[f32], s: &Saved, d: Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd, rep) = (d.t, d.hd, d.nh / d.nkv);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0f32; s.q.len()];
    let mut dk = vec![0f32; s.k.len()];
    let mut dv = vec![0f32; s.v.len()];
    let (tt, th) = (View::new(t, t), View::new(t, hd));
    dk.par_chunks_mut(t * hd)
        .zip(dv.par_chunks_mut(t * hd))
        .zip(dq.par_chunks_mut(rep * t * hd))
        .enumerate()
        .for_each(|(j, ((dk, dv), dq))| {
            let (k, v) = (&s.k[j * t * hd..][..t * hd], &s.v[j * t * hd..][..t * hd]);
            let mut dp = vec![0f32; t * t];
            for (r, dq) in dq.chunks_mut(t * hd).enumerate() {
                let i = j * rep + r;
                let (q, dy) = (&s.q[i * t * hd..][..t * hd], &dy[i * t * hd..][..t * hd]);
                let p = &s.p[i * t * t..][..t * t];
                matmul(&mut dp, tt, dy, th, v, th.t(), false, false);
                matmul(dv, th, p, tt.t(), dy, th, r > 0, false);
                let ds = softmax::backward(&dp, p, t, scale);
                matmul(dq, th, &ds, tt, k, th, false, false);
                matmul(dk, th, &ds, tt.t(), q, th, r > 0, false);
            }
        });
    (dq, dk, dv)
}

fn flat<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

/// One layer's forward from its input `x`: what its backward needs, and its output.
fn layer_forward(
    x: Vec<f32>,
    l: &Layer<&[f32]>,
    d: Dims,
    cos: &[f32],
    sin: &[f32],
    bias: &[f32],
) -> (Saved, Vec<f32>) {
    let (qd, kvd) = (d.nh * d.hd, d.nkv * d.hd);
    let a = rms_norm::forward(&x, l.attn_norm, d.eps);
    let rot = Some((cos, sin, 1.0));
    let q = to_heads(&project(&a, &l.q, d.n, d.h, qd), d, d.nh, rot);
    let k = to_heads(&project(&a, &l.k, d.n, d.h, kvd), d, d.nkv, rot);
    let v = to_heads(&project(&a, &l.v, d.n, d.h, kvd), d, d.nkv, None);
    let (p, yh) = attention(&q, &k, &v, bias, d);
    let y = from_heads(&yh, d, d.nh, None);
    let mut x_mid = project(&y, &l.o, d.n, qd, d.h);
    add_into(&mut x_mid, &x);
    let m = rms_norm::forward(&x_mid, l.mlp_norm, d.eps);
    let g = project(&m, &l.gate, d.n, d.h, d.ff);
    let u = project(&m, &l.up, d.n, d.h, d.ff);
    let s = swiglu::forward(&g, &u);
    let mut x_out = project(&s, &l.down, d.n, d.ff, d.h);
    add_into(&mut x_out, &x_mid);
    let saved = Saved {
        x,
        a,
        q,
        k,
        v,
        p,
        y,
        x_mid,
        m,
        g,
        u,
        s,
    };
    (saved, x_out)
}

/// The forward pass of `model` (f32, CPU) on `batch`, keeping every layer's activations for
/// the backward.
pub fn forward<'m>(model: &'m Llama, batch: &Batch) -> Result<Trace<'m>> {
    forward_with(model, batch, false)
}

/// The forward pass; with `recompute`, each layer keeps only its input, and the backward
/// runs the layer's forward again from it (the same arithmetic: the same bits).
pub fn forward_with<'m>(model: &'m Llama, batch: &Batch, recompute: bool) -> Result<Trace<'m>> {
    if !supports(model) {
        bail!("backprop: the written-out passes need an f32 model on the CPU");
    }
    if batch.n_loss_tokens == 0 {
        bail!("the batch has no reply tokens to compute a loss on");
    }
    let (b, t) = batch.ids.dims2()?;
    let d = Dims::new(&model.config, b, t);
    let (globals, layer_held) = (held_globals(model)?, held_layers(model)?);
    let w = Weights::new(&globals, &layer_held)?;
    let ids: Vec<u32> = flat(&batch.ids)?;
    let positions: Vec<u32> = flat(&batch.positions)?;
    let bias: Vec<f32> = flat(&batch.bias.to_dtype(DType::F32)?)?;
    let half = d.hd / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(d.n * half),
        Vec::with_capacity(d.n * half),
    );
    model.check_positions(positions.iter().copied().max().unwrap_or(0) as usize)?;
    for &p in &positions {
        cos.extend_from_slice(&w.cos[p as usize * half..][..half]);
        sin.extend_from_slice(&w.sin[p as usize * half..][..half]);
    }
    let mut x = Vec::with_capacity(d.n * d.h);
    for &id in &ids {
        if id as usize >= d.vocab {
            bail!("token id {id} is outside the vocabulary of {}", d.vocab);
        }
        x.extend_from_slice(&w.embed[id as usize * d.h..][..d.h]);
    }
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let (saved, x_out) = layer_forward(std::mem::take(&mut x), l, d, &cos, &sin, &bias);
        layers.push(if recompute {
            Kept::Input(saved.x)
        } else {
            Kept::All(Box::new(saved))
        });
        x = x_out;
    }
    let loss_rows: Vec<u32> = flat(&batch.loss_positions)?;
    let targets: Vec<u32> = flat(&batch.loss_targets)?;
    // RMSNorm is row by row: only the rows the loss reads need it.
    let mut x_loss = Vec::with_capacity(loss_rows.len() * d.h);
    for &r in &loss_rows {
        x_loss.extend_from_slice(&x[r as usize * d.h..][..d.h]);
    }
    let normed = rms_norm::forward(&x_loss, w.norm, d.eps);
    let head = Proj { w: w.head, b: None };
    let logits = project(&normed, &head, loss_rows.len(), d.h, d.vocab);
    let nll = cross_entropy::forward(&logits, &targets, d.vocab);
    let loss = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
    drop(w);
    drop((globals, layer_held));
    Ok(Trace {
        model,
        d,
        ids,
        cos,
        sin,
        bias,
        layers,
        x_loss,
        loss_rows,
        targets,
        normed,
        logits,
        loss,
    })
}

impl Trace<'_> {
    /// The mean cross-entropy over the batch's reply tokens.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The gradients of `scale` × the loss for every weight of the model, keyed by the
    /// model's tensors as candle's autograd keys them (a tied output projection adds into
    /// the embedding's).
    pub fn backward(self, scale: f64) -> Result<GradStore> {
        let d = self.d;
        let (globals, layer_held) = (held_globals(self.model)?, held_layers(self.model)?);
        let w = Weights::new(&globals, &layer_held)?;
        let rows = self.loss_rows.len();
        let g = vec![(scale / rows as f64) as f32; rows];
        let dlogits = cross_entropy::backward(&self.logits, &self.targets, &g, d.vocab);
        drop(self.logits);
        let d_head = project_weight_grad(&dlogits, &self.normed, rows, d.h, d.vocab);
        let mut dnormed = vec![0f32; rows * d.h];
        project_input_grad(&mut dnormed, &dlogits, w.head, rows, d.h, d.vocab, false);
        drop(dlogits);
        let (dx_loss, d_norm) = rms_norm::backward(&dnormed, &self.x_loss, w.norm, d.eps);
        let mut dx = vec![0f32; d.n * d.h];
        for (j, &r) in self.loss_rows.iter().enumerate() {
            dx[r as usize * d.h..][..d.h].copy_from_slice(&dx_loss[j * d.h..][..d.h]);
        }
        let (qd, kvd) = (d.nh * d.hd, d.nkv * d.hd);
        let back = Some((self.cos.as_slice(), self.sin.as_slice(), -1.0));
        let mut grads = Vec::with_capacity(self.layers.len());
        for (kept, l) in self.layers.iter().zip(&w.layers).rev() {
            let redone;
            let s = match kept {
                Kept::All(s) => &**s,
                Kept::Input(x) => {
                    let (cos, sin) = (&self.cos, &self.sin);
                    redone = layer_forward(x.clone(), l, d, cos, sin, &self.bias).0;
                    &redone
                }
            };
            // The MLP: dx is the gradient of its output (and of the stream after attention).
            let mut ds = vec![0f32; d.n * d.ff];
            project_input_grad(&mut ds, &dx, l.down.w, d.n, d.ff, d.h, false);
            let down = project_param_grads(&dx, &s.s, &l.down, d.n, d.ff, d.h);
            let dgu = swiglu::backward(&ds, &s.g, &s.u);
            let (dg, du) = dgu.split_at(d.n * d.ff);
            let mut dm = vec![0f32; d.n * d.h];
            project_input_grad(&mut dm, dg, l.gate.w, d.n, d.h, d.ff, false);
            project_input_grad(&mut dm, du, l.up.w, d.n, d.h, d.ff, true);
            let gate = project_param_grads(dg, &s.m, &l.gate, d.n, d.h, d.ff);
            let up = project_param_grads(du, &s.m, &l.up, d.n, d.h, d.ff);
            let (dx_mid, mlp_norm) = rms_norm::backward(&dm, &s.x_mid, l.mlp_norm, d.eps);
            add_into(&mut dx, &dx_mid);
            // Attention: dx is now the gradient of its output (and of the layer's input).
            let mut dy = vec![0f32; d.n * qd];
            project_input_grad(&mut dy, &dx, l.o.w, d.n, qd, d.h, false);
            let o = project_param_grads(&dx, &s.y, &l.o, d.n, qd, d.h);
            let (dqh, dkh, dvh) = attention_backward(&to_heads(&dy, d, d.nh, None), s, d);
            let dq = from_heads(&dqh, d, d.nh, back);
            let dk = from_heads(&dkh, d, d.nkv, back);
            let dv = from_heads(&dvh, d, d.nkv, None);
            let mut da = vec![0f32; d.n * d.h];
            project_input_grad(&mut da, &dq, l.q.w, d.n, d.h, qd, false);
            project_input_grad(&mut da, &dk, l.k.w, d.n, d.h, kvd, true);
            project_input_grad(&mut da, &dv, l.v.w, d.n, d.h, kvd, true);
            let q = project_param_grads(&dq, &s.a, &l.q, d.n, d.h, qd);
            let k = project_param_grads(&dk, &s.a, &l.k, d.n, d.h, kvd);
            let v = project_param_grads(&dv, &s.a, &l.v, d.n, d.h, kvd);
            let (dx_in, attn_norm) = rms_norm::backward(&da, &s.x, l.attn_norm, d.eps);
            add_into(&mut dx, &dx_in);
            grads.push(Layer {
                attn_norm,
                q,
                k,
                v,
                o,
                mlp_norm,
                gate,
                up,
                down,
            });
        }
        grads.reverse();
        // A tied output projection is the embedding: its gradient adds into the same buffer.
        let tied = self.model.embed.id() == self.model.lm_head.id();
        let (mut d_embed, d_head) = if tied {
            (d_head, None)
        } else {
            (vec![0f32; d.vocab * d.h], Some(d_head))
        };
        // The padding token's row gets nothing from lookups (transformers' padding_idx).
        let pad = self.model.config.pad_token_id;
        for (r, &id) in self.ids.iter().enumerate() {
            if Some(id) == pad {
                continue;
            }
            let row = &mut d_embed[id as usize * d.h..][..d.h];
            row.iter_mut()
                .zip(&dx[r * d.h..][..d.h])
                .for_each(|(a, g)| *a += g);
        }
        drop(w);
        drop((globals, layer_held));
        let m = self.model;
        let mut store = GradStore::default();
        let mut put = |t: &Tensor, g: Vec<f32>| -> Result<()> {
            store.insert(t, Tensor::from_vec(g, t.shape(), t.device())?);
            Ok(())
        };
        put(&m.embed, d_embed)?;
        if let Some(d_head) = d_head {
            put(&m.lm_head, d_head)?;
        }
        put(&m.norm, d_norm)?;
        for (b, g) in m.blocks.iter().zip(grads) {
            for (t, g) in b.as_ref().into_vec().into_iter().zip(g.into_vec()) {
                put(t, g)?;
            }
        }
        Ok(store)
    }
}

/// The training loss of `model` on `batch` and the gradients of `scale` × that loss for
/// every weight: the written-out passes of this module for an f32 model on the CPU (with
/// activation recompute when asked), candle's autograd of [`crate::batch::loss`] otherwise
/// (other dtypes, other devices), which has no recompute: asking for it there is an error.
pub fn loss_and_grads(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    recompute: bool,
) -> Result<(f64, GradStore)> {
    if supports(model) {
        let trace = forward_with(model, batch, recompute)?;
        let l = trace.loss();
        return Ok((l, trace.backward(scale)?));
    }
    if recompute {
        bail!("recompute: activation recompute is in the written-out pass, which runs f32 models on the CPU; this model ({:?} on {:?}) trains through candle's autograd", model.dtype(), model.device());
    }
    let l = crate::batch::loss(model, batch, crate::llama::Pass::Train)?;
    let grads = l.affine(scale, 0.0)?.backward()?;
    Ok((l.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
}
