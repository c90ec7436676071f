//! The written-out pass's GPU backend: cuBLAS's f32 GEMMs and basin_kernels' CUDA kernels
//! (`kernels/cuda/pass.cu`, `fused.cu`) on candle's stream, over `CudaSlice`s this pass owns
//! and the weights where candle keeps them. Nothing comes back to the host inside a pass
//! but the loss's sum; the batch's indices go up once.

use super::{Backend, Held};
use anyhow::{bail, Result};
use basin_kernels::cuda::{Dev, DevMut};
use basin_kernels::ops::attention::{self, Heads};
use basin_kernels::ops::embedding::{self, cuda::DevLookups, Lookups};
use basin_kernels::ops::linear::{self, View};
use basin_kernels::ops::{cross_entropy, rms_norm, rope, rows, swiglu};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

pub(crate) struct Cuda {
    dev: CudaDevice,
}

impl Cuda {
    pub(crate) fn new(dev: &CudaDevice) -> Self {
        Cuda { dev: dev.clone() }
    }
}

/// Writable access to a buffer.
fn w<'a>(b: &'a mut CudaSlice<f32>, dev: &CudaDevice) -> DevMut<'a, f32> {
    DevMut::of(b, dev)
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<u32>;
    type Lookups = DevLookups;
    type Src<'a> = Dev<'a, f32>;

    fn src<'a>(&'a self, b: &'a CudaSlice<f32>) -> Dev<'a, f32> {
        Dev::of(b, &self.dev)
    }

    fn weight<'a>(&'a self, h: &'a Held<'_>) -> Result<Dev<'a, f32>> {
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

    fn copy_of(&self, t: &Tensor) -> Result<CudaSlice<f32>> {
        let held = Held::new(t)?;
        let src = self.weight(&held)?;
        self.copy_buf(src, held.len)
    }

    fn tensor_of(&self, b: CudaSlice<f32>, like: &Tensor) -> Result<Tensor> {
        if b.len() != like.elem_count() {
            bail!("backprop: a gradient of {} values for {like:?}", b.len());
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(b, self.dev.clone()));
        let op = candle_core::op::BackpropOp::none();
        Ok(Tensor::from_storage(storage, like.shape(), op, false))
    }

    fn sum(&self, x: &CudaSlice<f32>, n: usize) -> Result<f64> {
        let host = self.dev.clone_dtoh(x)?;
        Ok(host[..n].iter().map(|&v| v as f64).sum())
    }

    fn linear(
        &self,
        x: Dev<'_, f32>,
        wt: Dev<'_, f32>,
        rows: usize,
        d_in: usize,
        out: usize,
    ) -> Result<CudaSlice<f32>> {
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
        dst: &mut CudaSlice<f32>,
        d: View,
        a: Dev<'_, f32>,
        av: View,
        b: Dev<'_, f32>,
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

    fn output(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: the caller writes all n values before any is read (the trait's contract);
        // until then the memory holds whatever it held, never read.
        Ok(unsafe { self.dev.alloc::<f32>(n.max(1)) }?)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.dev.alloc_zeros::<f32>(n.max(1))?)
    }

    fn copy_buf(&self, x: Dev<'_, f32>, n: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(n)?;
        rows::cuda::add_into(&self.dev, w(&mut out, &self.dev), x, n)?;
        Ok(out)
    }

    fn add_bias(
        &self,
        y: &mut CudaSlice<f32>,
        b: Dev<'_, f32>,
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

    fn col_sum(&self, x: Dev<'_, f32>, rows: usize, cols: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.output(cols)?;
        rows::cuda::col_sum(&self.dev, x, w(&mut out, &self.dev), rows, cols, false)?;
        Ok(out)
    }

    fn add_into(&self, acc: &mut CudaSlice<f32>, x: Dev<'_, f32>, n: usize) -> Result<()> {
        Ok(rows::cuda::add_into(&self.dev, w(acc, &self.dev), x, n)?)
    }

    fn gather_rows(
        &self,
        table: Dev<'_, f32>,
        idx: &CudaSlice<u32>,
        rows: usize,
        width: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.output(rows * width)?;
        let i = Dev::of(idx, &self.dev);
        // SAFETY: the pass gathers rows of the embedding at token ids and of RoPE's tables at
        // positions, both checked on the host (run_forward), and of the last layer's output at
        // the loss rows, which Batch::new made below rows × time.
        unsafe {
            rows::cuda::gather_rows(&self.dev, table, i, w(&mut out, &self.dev), rows, width)?
        };
        Ok(out)
    }

    fn scatter_rows(
        &self,
        src: Dev<'_, f32>,
        idx: &CudaSlice<u32>,
        rows: usize,
        width: usize,
        total: usize,
    ) -> Result<CudaSlice<f32>> {
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
        x: Dev<'_, f32>,
        wt: Dev<'_, f32>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let mut y = self.output(rows * h)?;
        rms_norm::cuda::forward(&self.dev, x, wt, w(&mut y, &self.dev), rows, h, eps)?;
        Ok(y)
    }

    fn rms_norm_backward(
        &self,
        dy: Dev<'_, f32>,
        x: Dev<'_, f32>,
        wt: Dev<'_, f32>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
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

    fn swiglu(&self, g: Dev<'_, f32>, u: Dev<'_, f32>, n: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.output(n)?;
        swiglu::cuda::forward(&self.dev, g, u, w(&mut y, &self.dev), n)?;
        Ok(y)
    }

    fn swiglu_backward(
        &self,
        dy: Dev<'_, f32>,
        g: Dev<'_, f32>,
        u: Dev<'_, f32>,
        n: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (mut dg, mut du) = (self.output(n)?, self.output(n)?);
        let dev = &self.dev;
        swiglu::cuda::backward(dev, dy, g, u, w(&mut dg, dev), w(&mut du, dev), n)?;
        Ok((dg, du))
    }

    fn heads(
        &self,
        x: Dev<'_, f32>,
        rope: Option<(Dev<'_, f32>, Dev<'_, f32>, f32)>,
        rows: usize,
        t: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<CudaSlice<f32>> {
        let mut y = self.output(rows * heads * hd)?;
        let yw = w(&mut y, &self.dev);
        rope::cuda::heads(&self.dev, x, rope, yw, rows, t, heads, hd, inverse)?;
        Ok(y)
    }

    fn attention(
        &self,
        q: Dev<'_, f32>,
        k: Dev<'_, f32>,
        v: Dev<'_, f32>,
        bias: Dev<'_, f32>,
        d: Heads,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let mut p = self.output(d.b * d.nh * d.t * d.t)?;
        let mut y = self.output(d.b * d.nh * d.t * d.hd)?;
        let dev = &self.dev;
        attention::cuda::forward(dev, q, k, v, bias, w(&mut p, dev), w(&mut y, dev), d)?;
        Ok((p, y))
    }

    fn attention_backward(
        &self,
        dy: Dev<'_, f32>,
        q: Dev<'_, f32>,
        k: Dev<'_, f32>,
        v: Dev<'_, f32>,
        p: Dev<'_, f32>,
        d: Heads,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let mut dq = self.output(d.b * d.nh * d.t * d.hd)?;
        let mut dk = self.output(d.b * d.nkv * d.t * d.hd)?;
        let mut dv = self.output(d.b * d.nkv * d.t * d.hd)?;
        let dev = &self.dev;
        let (dqw, dkw, dvw) = (w(&mut dq, dev), w(&mut dk, dev), w(&mut dv, dev));
        attention::cuda::backward(dev, dy, q, k, v, p, dqw, dkw, dvw, d)?;
        Ok((dq, dk, dv))
    }

    fn cross_entropy(
        &self,
        logits: Dev<'_, f32>,
        targets: &CudaSlice<u32>,
        rows: usize,
        v: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut nll = self.output(rows)?;
        let t = Dev::of(targets, &self.dev);
        cross_entropy::cuda::forward(&self.dev, logits, t, w(&mut nll, &self.dev), rows, v)?;
        Ok(nll)
    }

    fn cross_entropy_backward(
        &self,
        logits: Dev<'_, f32>,
        targets: &CudaSlice<u32>,
        g: f32,
        rows: usize,
        v: usize,
    ) -> Result<CudaSlice<f32>> {
        let gs = self.dev.clone_htod(&vec![g; rows.max(1)])?;
        let mut d = self.output(rows * v)?;
        let (t, g) = (Dev::of(targets, &self.dev), Dev::of(&gs, &self.dev));
        cross_entropy::cuda::backward(&self.dev, logits, t, g, w(&mut d, &self.dev), rows, v)?;
        Ok(d)
    }

    fn embedding_backward(
        &self,
        d_embed: &mut CudaSlice<f32>,
        dx: Dev<'_, f32>,
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
