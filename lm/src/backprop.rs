//! The training loss and its gradients with the forward and backward passes written out
//! layer by layer (llm.c's way) instead of recorded as a graph for candle's autograd: one
//! pass, two backends. The layer loop, the activation layout and what the forward keeps for
//! the backward are here; a [`Backend`] supplies the products and the row operations — the
//! CPU's ([`cpu`]: the gemm crate and basin_kernels' Rust row functions) or the GPU's
//! (`cuda`, with the `cuda` feature: cuBLAS's GEMMs and basin_kernels' CUDA kernels).
//!
//! Why: candle's backward gives every node of the graph (~40 a layer: the projections, but
//! also every reshape, transpose, copy and the grouped-query broadcast) a fresh tensor of
//! zeros and adds its gradient into it; here every gradient is written once into its own
//! buffer (docs/performance.md has the figures). The tests check the loss and every
//! gradient against candle's autograd of the same model in f64, and the CUDA backend
//! against the CPU's (lm/tests/pass_device.rs).
//!
//! Per layer, with x the residual stream ([rows, hidden], rows = batch × time):
//!
//! ```text
//! a = rmsnorm(x)    q, k, v = rope(a·Wqᵀ), rope(a·Wkᵀ), a·Wvᵀ    P = softmax(q·kᵀ/√d + bias)
//! x += (P·v)·Woᵀ    m = rmsnorm(x)    x += (silu(m·Wgᵀ) ⊙ m·Wuᵀ)·Wdᵀ
//! ```
//!
//! (each projection with its bias where the family has one).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use crate::batch::Batch;
use crate::llama::{Layer, Llama, Proj};
use anyhow::{bail, Result};
use basin_kernels::ops::attention::Heads;
use basin_kernels::ops::embedding::Lookups;
use basin_kernels::ops::linear::View;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};

/// Whether the written-out pass can run `model`: f32 weights on the CPU, or f32 or bf16
/// weights on a GPU in a build with the `cuda` feature.
pub fn supports(model: &Llama) -> bool {
    match model.dtype() {
        DType::F32 => model.device().is_cpu() || on_cuda(model),
        DType::BF16 => on_cuda(model),
        _ => false,
    }
}

fn on_cuda(model: &Llama) -> bool {
    cfg!(feature = "cuda") && model.device().is_cuda()
}

/// Why the written-out pass cannot run `model` (None when it can).
pub fn unsupported(model: &Llama) -> Option<String> {
    if supports(model) {
        return None;
    }
    let gpu = if cfg!(feature = "cuda") {
        "on a GPU"
    } else {
        "on a GPU (in a build with the cuda feature)"
    };
    Some(format!(
        "the written-out pass runs f32 models on the CPU, and f32 or bf16 models {gpu}; this one is {:?} on {:?}",
        model.dtype(),
        model.device()
    ))
}

/// Whether training takes the written-out pass when the config leaves it to basin
/// (`pass = "auto"`): on the CPU for f32. On a GPU not yet — the CUDA backend is built and
/// tested against the CPU's, but until its device tests and the step bench have run on a card
/// (issue 21) `pass = "written"` asks for it explicitly.
pub fn by_default(model: &Llama) -> bool {
    supports(model) && model.device().is_cpu()
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

    pub(crate) fn heads(&self) -> Heads {
        Heads {
            b: self.b,
            nh: self.nh,
            nkv: self.nkv,
            t: self.t,
            hd: self.hd,
        }
    }
}

/// A tensor's values (f32, or bf16 on a GPU), held in place under its read lock.
pub(crate) struct Held<'a> {
    storage: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        if !matches!(t.dtype(), DType::F32 | DType::BF16) || !t.is_contiguous() {
            bail!("backprop: expected a contiguous f32 or bf16 tensor, found {t:?}");
        }
        let (storage, layout) = t.storage_and_layout();
        Ok(Held {
            start: layout.start_offset(),
            len: t.elem_count(),
            storage,
        })
    }

    /// The values of a CPU tensor.
    pub(crate) fn values(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[self.start..self.start + self.len]),
            _ => bail!("backprop: expected f32 values on the CPU"),
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

/// The model's weights as a backend reads them (`&[f32]` on the CPU).
pub(crate) struct Weights<S> {
    pub(crate) embed: S,
    pub(crate) cos: S,
    pub(crate) sin: S,
    pub(crate) norm: S,
    pub(crate) head: S,
    pub(crate) layers: Vec<Layer<S>>,
}

impl<S> Weights<S> {
    /// The held tensors, each read by `f`.
    pub(crate) fn map<'a, 'h>(
        globals: &'a [Held<'h>],
        layers: &'a [Layer<Held<'h>>],
        mut f: impl FnMut(&'a Held<'h>) -> Result<S>,
    ) -> Result<Self> {
        Ok(Weights {
            embed: f(&globals[0])?,
            cos: f(&globals[1])?,
            sin: f(&globals[2])?,
            norm: f(&globals[3])?,
            head: f(&globals[4])?,
            layers: layers
                .iter()
                .map(|l| l.as_ref().try_map(&mut f))
                .collect::<Result<_>>()?,
        })
    }
}

impl<'a> Weights<&'a [f32]> {
    /// The weights of a CPU model.
    pub(crate) fn new<'h>(globals: &'a [Held<'h>], layers: &'a [Layer<Held<'h>>]) -> Result<Self> {
        Weights::map(globals, layers, |h| h.values())
    }
}

/// What the written-out pass needs of a device: its buffers and the operations on them. Every
/// operation writes a fresh buffer or one it is given; none reads what another has not
/// finished writing (a GPU backend runs them in order on one stream).
pub(crate) trait Backend: Sized {
    /// f32 values the backend owns.
    type Buf;
    /// u32 indices (token ids, positions, rows, targets) on the device.
    type Ids;
    /// The embedding's lookups grouped by id ([`Lookups`]) on the device.
    type Lookups;
    /// f32 values read: a buffer's, or a weight's in candle's storage.
    type Src<'a>: Copy
    where
        Self: 'a;

    fn src<'a>(&'a self, b: &'a Self::Buf) -> Self::Src<'a>;
    fn weight<'a>(&'a self, h: &'a Held<'_>) -> Result<Self::Src<'a>>;
    fn ids(&self, v: &[u32]) -> Result<Self::Ids>;
    fn lookups(&self, l: Lookups) -> Result<Self::Lookups>;
    /// A copy of an f32 tensor's values (the attention bias).
    fn copy_of(&self, t: &Tensor) -> Result<Self::Buf>;
    /// A gradient as a tensor shaped like the weight `like`, on its device.
    fn tensor_of(&self, b: Self::Buf, like: &Tensor) -> Result<Tensor>;

    /// y [rows, out] = x [rows, d_in] · wᵀ, w [out, d_in].
    fn linear(
        &self,
        x: Self::Src<'_>,
        w: Self::Src<'_>,
        rows: usize,
        d_in: usize,
        out: usize,
    ) -> Result<Self::Buf>;
    /// dst = a·b (+ dst with `accumulate`) on row-major views; `dst` holds d.rows·d.cols.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        dst: &mut Self::Buf,
        d: View,
        a: Self::Src<'_>,
        av: View,
        b: Self::Src<'_>,
        bv: View,
        accumulate: bool,
    ) -> Result<()>;
    /// A buffer of `n` values for an operation to write in full (its contents until then
    /// are unspecified).
    fn output(&self, n: usize) -> Result<Self::Buf>;
    /// `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A copy of `n` values.
    fn copy_buf(&self, x: Self::Src<'_>, n: usize) -> Result<Self::Buf>;
    fn add_bias(&self, y: &mut Self::Buf, b: Self::Src<'_>, rows: usize, cols: usize)
        -> Result<()>;
    /// Σ over the rows of x [rows, cols] (a bias's gradient).
    fn col_sum(&self, x: Self::Src<'_>, rows: usize, cols: usize) -> Result<Self::Buf>;
    /// acc += x, `n` values.
    fn add_into(&self, acc: &mut Self::Buf, x: Self::Src<'_>, n: usize) -> Result<()>;
    /// out[r] = table[idx[r]] for `rows` rows of `width`.
    fn gather_rows(
        &self,
        table: Self::Src<'_>,
        idx: &Self::Ids,
        rows: usize,
        width: usize,
    ) -> Result<Self::Buf>;
    /// `total` rows of `width`, zero but for out[idx[r]] = src[r], r < rows.
    fn scatter_rows(
        &self,
        src: Self::Src<'_>,
        idx: &Self::Ids,
        rows: usize,
        width: usize,
        total: usize,
    ) -> Result<Self::Buf>;
    fn rms_norm(
        &self,
        x: Self::Src<'_>,
        w: Self::Src<'_>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<Self::Buf>;
    /// (dx, dw).
    fn rms_norm_backward(
        &self,
        dy: Self::Src<'_>,
        x: Self::Src<'_>,
        w: Self::Src<'_>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// silu(g) ⊙ u over `n` values.
    fn swiglu(&self, g: Self::Src<'_>, u: Self::Src<'_>, n: usize) -> Result<Self::Buf>;
    /// (dg, du).
    fn swiglu_backward(
        &self,
        dy: Self::Src<'_>,
        g: Self::Src<'_>,
        u: Self::Src<'_>,
        n: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// [rows, heads·hd] → [batch, heads, t, hd] (or back, `inverse`), rotating by each row's
    /// RoPE angles (cos, sin, direction) when given.
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        x: Self::Src<'_>,
        rope: Option<(Self::Src<'_>, Self::Src<'_>, f32)>,
        rows: usize,
        t: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<Self::Buf>;
    /// (P, y) of [`basin_kernels::ops::attention`].
    fn attention(
        &self,
        q: Self::Src<'_>,
        k: Self::Src<'_>,
        v: Self::Src<'_>,
        bias: Self::Src<'_>,
        d: Heads,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// y of [`basin_kernels::ops::attention::forward_over`]: t queries over the first `keys`
    /// of `cap` positions of a KV cache (decoding; no probabilities kept).
    #[allow(clippy::too_many_arguments)]
    fn attention_over(
        &self,
        q: Self::Src<'_>,
        k: Self::Src<'_>,
        v: Self::Src<'_>,
        bias: Self::Src<'_>,
        d: Heads,
        keys: usize,
        cap: usize,
    ) -> Result<Self::Buf>;
    /// x [blocks, t, width] into the cache [blocks, cap, width] at positions at..at + t.
    #[allow(clippy::too_many_arguments)]
    fn write_cache(
        &self,
        cache: &mut Self::Buf,
        x: Self::Src<'_>,
        blocks: usize,
        t: usize,
        cap: usize,
        at: usize,
        width: usize,
    ) -> Result<()>;
    /// A buffer's first `n` values on the host, as f32 (the buffer is used up: on the CPU
    /// it is the result).
    fn to_host(&self, x: Self::Buf, n: usize) -> Result<Vec<f32>>;
    /// Greedy decoding's choice in each of `rows` rows of `width` values of `x`: where the row
    /// first holds its largest value (`rows::argmax_rows`), chosen where `x` is, so only
    /// the indices come to the host.
    fn argmax_rows(&self, x: Self::Buf, rows: usize, width: usize) -> Result<Vec<u32>>;
    /// (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dy: Self::Src<'_>,
        q: Self::Src<'_>,
        k: Self::Src<'_>,
        v: Self::Src<'_>,
        p: Self::Src<'_>,
        d: Heads,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// The sum over rows of each row's negative log-likelihood of its target, each in f32
    /// (the loss's numerator: the one value the host waits for).
    fn nll_sum(
        &self,
        logits: Self::Src<'_>,
        targets: &Self::Ids,
        rows: usize,
        v: usize,
    ) -> Result<f64>;
    /// g · (softmax(logits) − onehot(target)) for every row.
    fn cross_entropy_backward(
        &self,
        logits: Self::Src<'_>,
        targets: &Self::Ids,
        g: f32,
        rows: usize,
        v: usize,
    ) -> Result<Self::Buf>;
    /// d_embed += each looked-up row's gradients.
    fn embedding_backward(
        &self,
        d_embed: &mut Self::Buf,
        dx: Self::Src<'_>,
        l: &Self::Lookups,
        width: usize,
    ) -> Result<()>;
}

/// What a layer's backward needs from its forward (decoding drops it: `p` is empty there).
pub(crate) struct Saved<B: Backend> {
    /// The layer's input (the residual stream) and its normed copy.
    x: B::Buf,
    a: B::Buf,
    /// q, k (after RoPE) and v, head-major: [batch, heads, time, head_dim].
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Attention's probabilities [batch, heads, time, time] and output [rows, heads·head_dim].
    p: B::Buf,
    y: B::Buf,
    /// The stream after attention, its normed copy, the MLP's gate and up projections and
    /// silu(gate) ⊙ up.
    x_mid: B::Buf,
    m: B::Buf,
    g: B::Buf,
    u: B::Buf,
    s: B::Buf,
}

/// What the forward keeps of a layer: everything its backward reads, or only its input
/// (activation recompute).
enum Kept<B: Backend> {
    All(Box<Saved<B>>),
    Input(B::Buf),
}

/// RoPE's angles of each row and the attention bias, read by every layer.
pub(crate) struct Rows<B: Backend> {
    pub(crate) cos: B::Buf,
    pub(crate) sin: B::Buf,
    pub(crate) bias: B::Buf,
}

/// Where a layer's attention finds its keys and values: the layer's own (training: the
/// bias is [batch, 1, t, t]), or a KV cache of `cap` positions a head ([batch, kv heads,
/// cap, head_dim]) that the layer's new keys and values are first written into at
/// positions at..at + t (decoding: the bias is [batch, 1, t, at + t], and no probabilities
/// are kept).
pub(crate) enum Keys<'c, B: Backend> {
    Own,
    Cache {
        k: &'c mut B::Buf,
        v: &'c mut B::Buf,
        at: usize,
        cap: usize,
    },
}

/// A forward pass on one backend, kept for its backward.
struct Run<'m, B: Backend> {
    be: B,
    model: &'m Llama,
    d: Dims,
    rows: Rows<B>,
    /// The batch's token ids (host), whose lookups the embedding's gradient groups.
    ids: Vec<u32>,
    layers: Vec<Kept<B>>,
    /// The last layer's output at the rows the loss reads, those rows normed, their logits.
    x_loss: B::Buf,
    loss_rows: B::Ids,
    n_loss: usize,
    targets: B::Ids,
    normed: B::Buf,
    logits: B::Buf,
    loss: f64,
}

/// A forward pass, kept for its backward.
pub struct Trace<'m> {
    run: Runs<'m>,
}

enum Runs<'m> {
    Cpu(Box<Run<'m, cpu::Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Run<'m, cuda::Cuda<f32>>>),
    #[cfg(feature = "cuda")]
    CudaBf16(Box<Run<'m, cuda::Cuda<half::bf16>>>),
}

/// y [rows, out] = x · wᵀ (+ b) on the CPU: the written-out decoder's projections.
pub(crate) fn project(
    x: &[f32],
    p: &Proj<&[f32]>,
    rows: usize,
    d_in: usize,
    out: usize,
) -> Result<Vec<f32>> {
    project_on(&cpu::Cpu, x, p, rows, d_in, out)
}

/// y [rows, out] = x · wᵀ (+ b).
pub(crate) fn project_on<B: Backend>(
    be: &B,
    x: B::Src<'_>,
    p: &Proj<B::Src<'_>>,
    rows: usize,
    d_in: usize,
    out: usize,
) -> Result<B::Buf> {
    let mut y = be.linear(x, p.w, rows, d_in, out)?;
    if let Some(b) = p.b {
        be.add_bias(&mut y, b, rows, out)?;
    }
    Ok(y)
}

/// The gradients of a projection's weight (dyᵀ · x, [out, d_in]) and bias (dy summed over
/// rows).
fn project_param_grads<B: Backend>(
    be: &B,
    dy: B::Src<'_>,
    x: B::Src<'_>,
    p: &Proj<B::Src<'_>>,
    rows: usize,
    d_in: usize,
    out: usize,
) -> Result<Proj<B::Buf>> {
    let mut dw = be.output(out * d_in)?;
    let (dyv, xv) = (View::new(rows, out), View::new(rows, d_in));
    be.matmul(&mut dw, View::new(out, d_in), dy, dyv.t(), x, xv, false)?;
    Ok(Proj {
        w: dw,
        b: p.b.map(|_| be.col_sum(dy, rows, out)).transpose()?,
    })
}

/// dx (+)= dy · w: the input's gradient of a projection.
#[allow(clippy::too_many_arguments)]
fn project_input_grad<B: Backend>(
    be: &B,
    dx: &mut B::Buf,
    dy: B::Src<'_>,
    w: B::Src<'_>,
    rows: usize,
    d_in: usize,
    out: usize,
    accumulate: bool,
) -> Result<()> {
    let (dyv, wv) = (View::new(rows, out), View::new(out, d_in));
    be.matmul(dx, View::new(rows, d_in), dy, dyv, w, wv, accumulate)
}

/// One layer's forward from its input `x`: what its backward needs, and its output.
pub(crate) fn layer_forward<B: Backend>(
    be: &B,
    x: B::Buf,
    l: &Layer<B::Src<'_>>,
    d: Dims,
    rows: &Rows<B>,
    keys: Keys<'_, B>,
) -> Result<(Saved<B>, B::Buf)> {
    let (qd, kvd, n) = (d.nh * d.hd, d.nkv * d.hd, d.n);
    let a = be.rms_norm(be.src(&x), l.attn_norm, n, d.h, d.eps)?;
    let rot = Some((be.src(&rows.cos), be.src(&rows.sin), 1.0));
    let to_heads = |y: B::Buf, heads, rope| be.heads(be.src(&y), rope, n, d.t, heads, d.hd, false);
    let q = to_heads(project_on(be, be.src(&a), &l.q, n, d.h, qd)?, d.nh, rot)?;
    let k = to_heads(project_on(be, be.src(&a), &l.k, n, d.h, kvd)?, d.nkv, rot)?;
    let v = to_heads(project_on(be, be.src(&a), &l.v, n, d.h, kvd)?, d.nkv, None)?;
    let bias = be.src(&rows.bias);
    let (p, yh) = match keys {
        Keys::Own => be.attention(be.src(&q), be.src(&k), be.src(&v), bias, d.heads())?,
        Keys::Cache {
            k: kc,
            v: vc,
            at,
            cap,
        } => {
            let blocks = d.b * d.nkv;
            be.write_cache(kc, be.src(&k), blocks, d.t, cap, at, d.hd)?;
            be.write_cache(vc, be.src(&v), blocks, d.t, cap, at, d.hd)?;
            let (kc, vc) = (be.src(kc), be.src(vc));
            let yh = be.attention_over(be.src(&q), kc, vc, bias, d.heads(), at + d.t, cap)?;
            (be.output(0)?, yh)
        }
    };
    let y = be.heads(be.src(&yh), None, n, d.t, d.nh, d.hd, true)?;
    drop(yh);
    let mut x_mid = project_on(be, be.src(&y), &l.o, n, qd, d.h)?;
    be.add_into(&mut x_mid, be.src(&x), n * d.h)?;
    let m = be.rms_norm(be.src(&x_mid), l.mlp_norm, n, d.h, d.eps)?;
    let g = project_on(be, be.src(&m), &l.gate, n, d.h, d.ff)?;
    let u = project_on(be, be.src(&m), &l.up, n, d.h, d.ff)?;
    let s = be.swiglu(be.src(&g), be.src(&u), n * d.ff)?;
    let mut x_out = project_on(be, be.src(&s), &l.down, n, d.ff, d.h)?;
    be.add_into(&mut x_out, be.src(&x_mid), n * d.h)?;
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
    Ok((saved, x_out))
}

/// One layer's backward: its weights' gradients, with `dx` — the gradient of the layer's
/// output on entry — turned into that of its input.
fn layer_backward<B: Backend>(
    be: &B,
    dx: &mut B::Buf,
    s: &Saved<B>,
    l: &Layer<B::Src<'_>>,
    d: Dims,
    rows: &Rows<B>,
) -> Result<Layer<B::Buf>> {
    let (qd, kvd, n) = (d.nh * d.hd, d.nkv * d.hd, d.n);
    // The MLP: dx is the gradient of its output (and of the stream after attention).
    let mut ds = be.output(n * d.ff)?;
    project_input_grad(be, &mut ds, be.src(dx), l.down.w, n, d.ff, d.h, false)?;
    let down = project_param_grads(be, be.src(dx), be.src(&s.s), &l.down, n, d.ff, d.h)?;
    let (dg, du) = be.swiglu_backward(be.src(&ds), be.src(&s.g), be.src(&s.u), n * d.ff)?;
    drop(ds);
    let mut dm = be.output(n * d.h)?;
    project_input_grad(be, &mut dm, be.src(&dg), l.gate.w, n, d.h, d.ff, false)?;
    project_input_grad(be, &mut dm, be.src(&du), l.up.w, n, d.h, d.ff, true)?;
    let gate = project_param_grads(be, be.src(&dg), be.src(&s.m), &l.gate, n, d.h, d.ff)?;
    let up = project_param_grads(be, be.src(&du), be.src(&s.m), &l.up, n, d.h, d.ff)?;
    drop((dg, du));
    let (dx_mid, mlp_norm) =
        be.rms_norm_backward(be.src(&dm), be.src(&s.x_mid), l.mlp_norm, n, d.h, d.eps)?;
    be.add_into(dx, be.src(&dx_mid), n * d.h)?;
    // Attention: dx is now the gradient of its output (and of the layer's input).
    let mut dy = be.output(n * qd)?;
    project_input_grad(be, &mut dy, be.src(dx), l.o.w, n, qd, d.h, false)?;
    let o = project_param_grads(be, be.src(dx), be.src(&s.y), &l.o, n, qd, d.h)?;
    let dyh = be.heads(be.src(&dy), None, n, d.t, d.nh, d.hd, false)?;
    drop(dy);
    let (q, k, v, p) = (be.src(&s.q), be.src(&s.k), be.src(&s.v), be.src(&s.p));
    let (dqh, dkh, dvh) = be.attention_backward(be.src(&dyh), q, k, v, p, d.heads())?;
    drop(dyh);
    let back = Some((be.src(&rows.cos), be.src(&rows.sin), -1.0));
    let dq = be.heads(be.src(&dqh), back, n, d.t, d.nh, d.hd, true)?;
    let dk = be.heads(be.src(&dkh), back, n, d.t, d.nkv, d.hd, true)?;
    let dv = be.heads(be.src(&dvh), None, n, d.t, d.nkv, d.hd, true)?;
    drop((dqh, dkh, dvh));
    let mut da = be.output(n * d.h)?;
    project_input_grad(be, &mut da, be.src(&dq), l.q.w, n, d.h, qd, false)?;
    project_input_grad(be, &mut da, be.src(&dk), l.k.w, n, d.h, kvd, true)?;
    project_input_grad(be, &mut da, be.src(&dv), l.v.w, n, d.h, kvd, true)?;
    let q = project_param_grads(be, be.src(&dq), be.src(&s.a), &l.q, n, d.h, qd)?;
    let k = project_param_grads(be, be.src(&dk), be.src(&s.a), &l.k, n, d.h, kvd)?;
    let v = project_param_grads(be, be.src(&dv), be.src(&s.a), &l.v, n, d.h, kvd)?;
    let (dx_in, attn_norm) =
        be.rms_norm_backward(be.src(&da), be.src(&s.x), l.attn_norm, n, d.h, d.eps)?;
    be.add_into(dx, be.src(&dx_in), n * d.h)?;
    Ok(Layer {
        attn_norm,
        q,
        k,
        v,
        o,
        mlp_norm,
        gate,
        up,
        down,
    })
}

/// The forward pass of `model` on `batch` through backend `be`.
fn run_forward<'m, B: Backend>(
    be: B,
    model: &'m Llama,
    batch: &Batch,
    recompute: bool,
) -> Result<Run<'m, B>> {
    if batch.n_loss_tokens == 0 {
        bail!("the batch has no reply tokens to compute a loss on");
    }
    let (b, t) = batch.ids.dims2()?;
    let d = Dims::new(&model.config, b, t);
    let host = &batch.host;
    if let Some(&id) = host.ids.iter().find(|&&id| id as usize >= d.vocab) {
        bail!("token id {id} is outside the vocabulary of {}", d.vocab);
    }
    model.check_positions(host.positions.iter().copied().max().unwrap_or(0) as usize)?;
    let (globals, layer_held) = (held_globals(model)?, held_layers(model)?);
    let w = Weights::map(&globals, &layer_held, |h| be.weight(h))?;
    let (ids, positions) = (be.ids(&host.ids)?, be.ids(&host.positions)?);
    let half = d.hd / 2;
    let rows = Rows {
        cos: be.gather_rows(w.cos, &positions, d.n, half)?,
        sin: be.gather_rows(w.sin, &positions, d.n, half)?,
        bias: be.copy_of(&batch.bias)?,
    };
    let mut x = be.gather_rows(w.embed, &ids, d.n, d.h)?;
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let (saved, x_out) = layer_forward(&be, x, l, d, &rows, Keys::Own)?;
        layers.push(if recompute {
            Kept::Input(saved.x)
        } else {
            Kept::All(Box::new(saved))
        });
        x = x_out;
    }
    let n_loss = host.loss_positions.len();
    let loss_rows = be.ids(&host.loss_positions)?;
    let targets = be.ids(&host.loss_targets)?;
    // RMSNorm is row by row: only the rows the loss reads need it.
    let x_loss = be.gather_rows(be.src(&x), &loss_rows, n_loss, d.h)?;
    drop(x);
    let normed = be.rms_norm(be.src(&x_loss), w.norm, n_loss, d.h, d.eps)?;
    let head = Proj { w: w.head, b: None };
    let logits = project_on(&be, be.src(&normed), &head, n_loss, d.h, d.vocab)?;
    let loss = be.nll_sum(be.src(&logits), &targets, n_loss, d.vocab)? / n_loss as f64;
    drop(w);
    drop((globals, layer_held));
    Ok(Run {
        be,
        model,
        d,
        rows,
        ids: host.ids.clone(),
        layers,
        x_loss,
        loss_rows,
        n_loss,
        targets,
        normed,
        logits,
        loss,
    })
}

impl<B: Backend> Run<'_, B> {
    /// The gradients of `scale` × the loss for every weight of the model.
    fn backward(self, scale: f64) -> Result<GradStore> {
        let (be, d, n_loss) = (&self.be, self.d, self.n_loss);
        let (globals, layer_held) = (held_globals(self.model)?, held_layers(self.model)?);
        let w = Weights::map(&globals, &layer_held, |h| be.weight(h))?;
        let g = (scale / n_loss as f64) as f32;
        let dlogits =
            be.cross_entropy_backward(be.src(&self.logits), &self.targets, g, n_loss, d.vocab)?;
        drop(self.logits);
        let head = Proj { w: w.head, b: None };
        let d_head = project_param_grads(
            be,
            be.src(&dlogits),
            be.src(&self.normed),
            &head,
            n_loss,
            d.h,
            d.vocab,
        )?
        .w;
        let mut dnormed = be.output(n_loss * d.h)?;
        project_input_grad(
            be,
            &mut dnormed,
            be.src(&dlogits),
            w.head,
            n_loss,
            d.h,
            d.vocab,
            false,
        )?;
        drop(dlogits);
        let (dx_loss, d_norm) = be.rms_norm_backward(
            be.src(&dnormed),
            be.src(&self.x_loss),
            w.norm,
            n_loss,
            d.h,
            d.eps,
        )?;
        let mut dx = be.scatter_rows(be.src(&dx_loss), &self.loss_rows, n_loss, d.h, d.n)?;
        drop(dx_loss);
        let mut grads = Vec::with_capacity(self.layers.len());
        for (kept, l) in self.layers.iter().zip(&w.layers).rev() {
            let redone;
            let s = match kept {
                Kept::All(s) => &**s,
                Kept::Input(x) => {
                    let x = be.copy_buf(be.src(x), d.n * d.h)?;
                    redone = layer_forward(be, x, l, d, &self.rows, Keys::Own)?.0;
                    &redone
                }
            };
            grads.push(layer_backward(be, &mut dx, s, l, d, &self.rows)?);
        }
        grads.reverse();
        // A tied output projection is the embedding: its gradient adds into the same buffer.
        let m = self.model;
        let tied = m.embed.id() == m.lm_head.id();
        let (mut d_embed, d_head) = if tied {
            (d_head, None)
        } else {
            (be.zeros(d.vocab * d.h)?, Some(d_head))
        };
        // The padding token's row gets nothing from lookups (transformers' padding_idx).
        let lookups = be.lookups(Lookups::new(&self.ids, m.config.pad_token_id))?;
        be.embedding_backward(&mut d_embed, be.src(&dx), &lookups, d.h)?;
        drop(w);
        drop((globals, layer_held));
        let mut store = GradStore::default();
        let mut put = |t: &Tensor, g: B::Buf| -> Result<()> {
            store.insert(t, be.tensor_of(g, t)?);
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

/// The forward pass of `model` on `batch`, keeping every layer's activations for the
/// backward.
pub fn forward<'m>(model: &'m Llama, batch: &Batch) -> Result<Trace<'m>> {
    forward_with(model, batch, false)
}

/// The forward pass on the model's device (f32 on the CPU or, with the `cuda` feature, f32
/// or bf16 on a GPU); with `recompute`, each layer keeps only its input, and the backward
/// runs the layer's forward again from it (the same arithmetic: the same bits).
pub fn forward_with<'m>(model: &'m Llama, batch: &Batch, recompute: bool) -> Result<Trace<'m>> {
    if let Some(why) = unsupported(model) {
        bail!("backprop: {why}");
    }
    let run = match model.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) if model.dtype() == DType::BF16 => Runs::CudaBf16(Box::new(
            run_forward(cuda::Cuda::new(dev), model, batch, recompute)?,
        )),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => Runs::Cuda(Box::new(run_forward(
            cuda::Cuda::new(dev),
            model,
            batch,
            recompute,
        )?)),
        _ => Runs::Cpu(Box::new(run_forward(cpu::Cpu, model, batch, recompute)?)),
    };
    Ok(Trace { run })
}

impl Trace<'_> {
    /// The mean cross-entropy over the batch's reply tokens.
    pub fn loss(&self) -> f64 {
        match &self.run {
            Runs::Cpu(r) => r.loss,
            #[cfg(feature = "cuda")]
            Runs::Cuda(r) => r.loss,
            #[cfg(feature = "cuda")]
            Runs::CudaBf16(r) => r.loss,
        }
    }

    /// The gradients of `scale` × the loss for every weight of the model, keyed by the
    /// model's tensors as candle's autograd keys them (a tied output projection adds into
    /// the embedding's), on the model's device.
    pub fn backward(self, scale: f64) -> Result<GradStore> {
        match self.run {
            Runs::Cpu(r) => r.backward(scale),
            #[cfg(feature = "cuda")]
            Runs::Cuda(r) => r.backward(scale),
            #[cfg(feature = "cuda")]
            Runs::CudaBf16(r) => r.backward(scale),
        }
    }
}

/// How a training step computes its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The written-out passes of this module, with activation recompute when asked.
    Written { recompute: bool },
    /// candle's autograd of [`crate::batch::loss`] (any dtype, any device; no recompute).
    Autograd,
}

/// The training loss of `model` on `batch` and the gradients of `scale` × that loss for
/// every weight, by `route`.
pub fn loss_and_grads(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    route: Route,
) -> Result<(f64, GradStore)> {
    match route {
        Route::Written { recompute } => {
            let trace = forward_with(model, batch, recompute)?;
            let l = trace.loss();
            Ok((l, trace.backward(scale)?))
        }
        Route::Autograd => {
            let l = crate::batch::loss(model, batch, crate::llama::Pass::Train)?;
            let grads = l.affine(scale, 0.0)?.backward()?;
            Ok((l.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
        }
    }
}
