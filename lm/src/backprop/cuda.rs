//! The written-out pass's GPU backend: cuBLAS's GEMMs and basin_kernels' CUDA kernels
//! (`kernels/cuda/pass.cu`, `fused.cu`) on candle's stream, over `CudaSlice`s this pass owns
//! and the weights where candle keeps them. Nothing comes back to the host inside a pass
//! but the loss's sum; the batch's indices go up once.
//!
//! `Cuda<T>` keeps everything — weights, activations, gradients — as `T`: f32 (the CPU
//! pass's arithmetic, f32 GEMMs without TF32), or bf16 for a bf16 model (bf16 GEMMs with f32
//! products and sums; every kernel computes in f32 and rounds what it writes once; the loss
//! rows in f32). A bf16 model's gradients are bf16, as candle's autograd gives them; the
//! optimizer applies them to its f32 master weights (`state.weights`).

use super::{Backend, Held};
use anyhow::{bail, Result};
use basin_kernels::cuda::{Act, Dev, DevMut};
use basin_kernels::ops::attention::{self, Heads};
use basin_kernels::ops::embedding::{self, cuda::DevLookups, Lookups};
use basin_kernels::ops::linear::{self, View};
use basin_kernels::ops::{cross_entropy, rms_norm, rope, rows, swiglu};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

pub(crate) struct Cuda<T> {
    dev: CudaDevice,
    _values: std::marker::PhantomData<T>,
}

impl<T> Cuda<T> {
    pub(crate) fn new(dev: &CudaDevice) -> Self {
        Cuda {
            dev: dev.clone(),
            _values: std::marker::PhantomData,
        }
    }
}

/// Writable access to a buffer.
fn w<'a, T: Act>(b: &'a mut CudaSlice<T>, dev: &CudaDevice) -> DevMut<'a, T> {
    DevMut::of(b, dev)
}

impl<T: Act> Backend for Cuda<T> {
    type Buf = CudaSlice<T>;
    type Ids = CudaSlice<u32>;
    type Lookups = DevLookups;
    type Src<'a> = Dev<'a, T>;

    fn src<'a>(&'a self, b: &'a CudaSlice<T>) -> Dev<'a, T> {
        Dev::of(b, &self.dev)
    }

    fn weight<'a>(&'a self, h: &'a Held<'_>) -> Result<Dev<'a, T>> {
        match &*h.storage {
            Storage::Cuda(cs) => Ok(Dev::in_storage(cs, h.start, h.len)?),
            _ => bail!("backprop: expected a weight on the GPU"),
        }
    }

    fn ids(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        // An empty upload is refused by the driver: keep one unused element.
        Ok(self
            .dev
            .clone_htod(if v.is_empty() { &[0u32][..] } else { v })?)
    }

    fn lookups(&self, l: Lookups) -> Result<DevLookups> {
        Ok(DevLookups::new(&self.dev, &l)?)
    }

    fn copy_of(&self, t: &Tensor) -> Result<CudaSlice<T>> {
        let held = Held::new(t)?;
        let src = self.weight(&held)?;
        self.copy_buf(src, held.len)
    }

    fn tensor_of(&self, b: CudaSlice<T>, like: &Tensor) -> Result<Tensor> {
        if b.len() != like.elem_count() {
            bail!("backprop: a gradient of {} values for {like:?}", b.len());
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(b, self.dev.clone()));
        let op = candle_core::op::BackpropOp::none();
        Ok(Tensor::from_storage(storage, like.shape(), op, false))
    }

    fn linear(
        &self,
        x: Dev<'_, T>,
        wt: Dev<'_, T>,
        rows: usize,
        d_in: usize,
        out: usize,
    ) -> Result<CudaSlice<T>> {
        let mut y = self.output(rows * out)?;
        let (xv, wv) = (View::new(rows, d_in), View::new(out, d_in));
        linear::cuda::matmul(
            &self.dev,
            w(&mut y, &self.dev),
            View::new(rows, out),
            x,
            xv,
            wt,
            wv.t(),
            false,
        )?;
        Ok(y)
    }

    fn matmul(
        &self,
        dst: &mut CudaSlice<T>,
        d: View,
        a: Dev<'_, T>,
        av: View,
        b: Dev<'_, T>,
        bv: View,
        accumulate: bool,
    ) -> Result<()> {
        Ok(linear::cuda::matmul(
            &self.dev,
            w(dst, &self.dev),
            d,
            a,
            av,
            b,
            bv,
            accumulate,
        )?)
    }

    fn output(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller writes all n values before any is read (the trait's contract);
        // until then the memory holds whatever it held, never read.
        Ok(unsafe { self.dev.alloc::<T>(n.max(1)) }?)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.dev.alloc_zeros::<T>(n.max(1))?)
    }

    fn copy_buf(&self, x: Dev<'_, T>, n: usize) -> Result<CudaSlice<T>> {
        let mut out = self.output(n)?;
        rows::cuda::copy(&self.dev, w(&mut out, &self.dev), x, n)?;
        Ok(out)
    }

    fn add_bias(
        &self,
        y: &mut CudaSlice<T>,
        b: Dev<'_, T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        Ok(rows::cuda::add_bias(
            &self.dev,
            w(y, &self.dev),
            b,
            rows,
            cols,
        )?)
    }

    fn col_sum(&self, x: Dev<'_, T>, rows: usize, cols: usize) -> Result<CudaSlice<T>> {
        let mut out = self.output(cols)?;
        rows::cuda::col_sum(&self.dev, x, w(&mut out, &self.dev), rows, cols, false)?;
        Ok(out)
    }

    fn add_into(&self, acc: &mut CudaSlice<T>, x: Dev<'_, T>, n: usize) -> Result<()> {
        Ok(rows::cuda::add_into(&self.dev, w(acc, &self.dev), x, n)?)
    }

    fn gather_rows(
        &self,
        table: Dev<'_, T>,
        idx: &CudaSlice<u32>,
        rows: usize,
        width: usize,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.output(rows * width)?;
        let i = Dev::of(idx, &self.dev);
        // SAFETY: the pass gathers rows of the embedding at token ids and of RoPE's tables at
        // positions, both checked on the host (run_forward; decode::check_step when
        // decoding), of the last layer's output at the loss rows, which Batch::new made below
        // rows × time, and (decoding) at each row's last position, below rows × time.
        unsafe {
            rows::cuda::gather_rows(&self.dev, table, i, w(&mut out, &self.dev), rows, width)?
        };
        Ok(out)
    }

    fn scatter_rows(
        &self,
        src: Dev<'_, T>,
        idx: &CudaSlice<u32>,
        rows: usize,
        width: usize,
        total: usize,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.zeros(total * width)?;
        let i = Dev::of(idx, &self.dev);
        // SAFETY: `out` holds `total` rows and the pass scatters only to the loss rows, which
        // Batch::new made below rows × time = total.
        unsafe {
            rows::cuda::scatter_rows(&self.dev, src, i, w(&mut out, &self.dev), rows, width)?
        };
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: Dev<'_, T>,
        wt: Dev<'_, T>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let mut y = self.output(rows * h)?;
        rms_norm::cuda::forward(&self.dev, x, wt, w(&mut y, &self.dev), rows, h, eps)?;
        Ok(y)
    }

    fn rms_norm_backward(
        &self,
        dy: Dev<'_, T>,
        x: Dev<'_, T>,
        wt: Dev<'_, T>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let (mut dx, mut dw) = (self.output(rows * h)?, self.output(h)?);
        let dev = &self.dev;
        rms_norm::cuda::backward(
            dev,
            dy,
            x,
            wt,
            w(&mut dx, dev),
            w(&mut dw, dev),
            rows,
            h,
            eps,
        )?;
        Ok((dx, dw))
    }

    fn swiglu(&self, g: Dev<'_, T>, u: Dev<'_, T>, n: usize) -> Result<CudaSlice<T>> {
        let mut y = self.output(n)?;
        swiglu::cuda::forward(&self.dev, g, u, w(&mut y, &self.dev), n)?;
        Ok(y)
    }

    fn swiglu_backward(
        &self,
        dy: Dev<'_, T>,
        g: Dev<'_, T>,
        u: Dev<'_, T>,
        n: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let (mut dg, mut du) = (self.output(n)?, self.output(n)?);
        let dev = &self.dev;
        swiglu::cuda::backward(dev, dy, g, u, w(&mut dg, dev), w(&mut du, dev), n)?;
        Ok((dg, du))
    }

    fn heads(
        &self,
        x: Dev<'_, T>,
        rope: Option<(Dev<'_, T>, Dev<'_, T>, f32)>,
        rows: usize,
        t: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<CudaSlice<T>> {
        let mut y = self.output(rows * heads * hd)?;
        let yw = w(&mut y, &self.dev);
        rope::cuda::heads(&self.dev, x, rope, yw, rows, t, heads, hd, inverse)?;
        Ok(y)
    }

    fn attention(
        &self,
        q: Dev<'_, T>,
        k: Dev<'_, T>,
        v: Dev<'_, T>,
        bias: Dev<'_, T>,
        d: Heads,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let mut p = self.output(d.b * d.nh * d.t * d.t)?;
        let mut y = self.output(d.b * d.nh * d.t * d.hd)?;
        let dev = &self.dev;
        attention::cuda::forward(dev, q, k, v, bias, w(&mut p, dev), w(&mut y, dev), d)?;
        Ok((p, y))
    }

    fn attention_over(
        &self,
        q: Dev<'_, T>,
        k: Dev<'_, T>,
        v: Dev<'_, T>,
        bias: Dev<'_, T>,
        d: Heads,
        keys: usize,
        cap: usize,
    ) -> Result<CudaSlice<T>> {
        let mut p = self.output(d.b * d.nh * d.t * keys)?;
        let mut y = self.output(d.b * d.nh * d.t * d.hd)?;
        let dev = &self.dev;
        let (pw, yw) = (w(&mut p, dev), w(&mut y, dev));
        attention::cuda::forward_over(dev, q, k, v, bias, pw, yw, d, [keys, cap])?;
        Ok(y)
    }

    fn write_cache(
        &self,
        cache: &mut CudaSlice<T>,
        x: Dev<'_, T>,
        blocks: usize,
        t: usize,
        cap: usize,
        at: usize,
        width: usize,
    ) -> Result<()> {
        let c = w(cache, &self.dev);
        Ok(rows::cuda::write_cache(
            &self.dev, c, x, blocks, t, cap, at, width,
        )?)
    }

    fn to_host(&self, x: CudaSlice<T>, n: usize) -> Result<Vec<f32>> {
        let values = self.dev.clone_dtoh(&x)?;
        Ok(values[..n].iter().map(|&v| v.to_f32()).collect())
    }

    fn argmax_rows(&self, x: CudaSlice<T>, rows: usize, width: usize) -> Result<Vec<u32>> {
        let mut idx = self.dev.alloc_zeros::<u32>(rows.max(1))?;
        let out = DevMut::of(&mut idx, &self.dev);
        rows::cuda::argmax_rows(&self.dev, Dev::of(&x, &self.dev), out, rows, width)?;
        let mut got = self.dev.clone_dtoh(&idx)?;
        got.truncate(rows);
        Ok(got)
    }

    fn attention_backward(
        &self,
        dy: Dev<'_, T>,
        q: Dev<'_, T>,
        k: Dev<'_, T>,
        v: Dev<'_, T>,
        p: Dev<'_, T>,
        d: Heads,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
        let mut dq = self.output(d.b * d.nh * d.t * d.hd)?;
        let mut dk = self.output(d.b * d.nkv * d.t * d.hd)?;
        let mut dv = self.output(d.b * d.nkv * d.t * d.hd)?;
        let dev = &self.dev;
        let (dqw, dkw, dvw) = (w(&mut dq, dev), w(&mut dk, dev), w(&mut dv, dev));
        attention::cuda::backward(dev, dy, q, k, v, p, dqw, dkw, dvw, d)?;
        Ok((dq, dk, dv))
    }

    fn nll_sum(
        &self,
        logits: Dev<'_, T>,
        targets: &CudaSlice<u32>,
        rows: usize,
        v: usize,
    ) -> Result<f64> {
        // SAFETY: the kernel writes every row's value before the copy reads them.
        let mut nll = unsafe { self.dev.alloc::<f32>(rows.max(1)) }?;
        let t = Dev::of(targets, &self.dev);
        cross_entropy::cuda::forward(&self.dev, logits, t, w(&mut nll, &self.dev), rows, v)?;
        let host = self.dev.clone_dtoh(&nll)?;
        Ok(host[..rows].iter().map(|&v| v as f64).sum())
    }

    fn cross_entropy_backward(
        &self,
        logits: Dev<'_, T>,
        targets: &CudaSlice<u32>,
        g: f32,
        rows: usize,
        v: usize,
    ) -> Result<CudaSlice<T>> {
        let gs = self.dev.clone_htod(&vec![g; rows.max(1)])?;
        let mut d = self.output(rows * v)?;
        let (t, g) = (Dev::of(targets, &self.dev), Dev::of(&gs, &self.dev));
        cross_entropy::cuda::backward(&self.dev, logits, t, g, w(&mut d, &self.dev), rows, v)?;
        Ok(d)
    }

    fn embedding_backward(
        &self,
        d_embed: &mut CudaSlice<T>,
        dx: Dev<'_, T>,
        l: &DevLookups,
        width: usize,
    ) -> Result<()> {
        Ok(embedding::cuda::backward(
            &self.dev,
            w(d_embed, &self.dev),
            dx,
            l,
            width,
        )?)
    }
}
