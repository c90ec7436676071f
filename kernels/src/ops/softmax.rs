//! Attention's softmax for training, fused: y = softmax(scale·s + bias) over the keys, and
//! its backward ds = scale · y ⊙ (dy − Σ dy ⊙ y).
//!
//! Unfused, candle runs the scale, the bias add and the softmax as 6 kernels forward and
//! ~10 backward over [batch, heads, queries, keys] floats, which on a GPU took longer than
//! the layer's matrix products (docs/performance.md). Fused, it is one read and one write
//! each way. The bias [batch, 1, queries, keys] (causal + padding mask) is
//! shared by the heads and gets no gradient.

use super::cpu_slice;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The bias row that score row `r` uses: rows are ((batch·heads + head)·tq + query).
fn bias_row(r: usize, heads: usize, tq: usize) -> usize {
    (r / (heads * tq)) * tq + r % tq
}

/// CPU reference of the forward pass over rows of `n` keys.
pub fn forward(s: &[f32], bias: &[f32], n: usize, heads: usize, tq: usize, scale: f32) -> Vec<f32> {
    let mut y = vec![0f32; s.len()];
    y.par_chunks_mut(n)
        .zip(s.par_chunks(n))
        .enumerate()
        .for_each(|(r, (y, x))| {
            let b = &bias[bias_row(r, heads, tq) * n..][..n];
            let m = x
                .iter()
                .zip(b)
                .map(|(&x, &b)| x * scale + b)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = (x * scale + b - m).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        });
    y
}

/// CPU reference of the backward pass: ds from dy and the forward's y.
pub fn backward(dy: &[f32], y: &[f32], n: usize, scale: f32) -> Vec<f32> {
    let mut ds = vec![0f32; y.len()];
    ds.par_chunks_mut(n)
        .zip(dy.par_chunks(n).zip(y.par_chunks(n)))
        .for_each(|(ds, (g, p))| {
            let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
            for ((d, &g), &p) in ds.iter_mut().zip(g).zip(p) {
                *d = scale * p * (g - dot);
            }
        });
    ds
}

/// softmax(scale·scores + bias) over the last dimension, with its gradient for `scores`.
/// scores: [batch, heads, queries, keys] f32; bias: [batch, 1, queries, keys] f32.
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, tq, n) = scores.dims4()?;
    if bias.dims() != [b, 1, tq, n] {
        bail!(
            "scaled_masked_softmax: bias {:?}, expected [{b}, 1, {tq}, {n}]",
            bias.dims()
        )
    }
    if scores.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        bail!("scaled_masked_softmax: expected f32 scores and bias")
    }
    scores.contiguous()?.apply_op2(
        &bias.contiguous()?,
        Forward {
            scale: scale as f32,
            heads: h,
            tq,
        },
    )
}

struct Forward {
    scale: f32,
    heads: usize,
    tq: usize,
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.dims()[3];
        let y = forward(
            cpu_slice::<f32>(s1, l1)?,
            cpu_slice::<f32>(s2, l2)?,
            n,
            self.heads,
            self.tq,
            self.scale,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.dims()[3];
        let rows = l1.shape().elem_count() / n;
        let y = cuda::softmax_forward(s1, l1, s2, l2, [rows, n, self.heads, self.tq], self.scale)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = dy
            .contiguous()?
            .apply_op2_no_bwd(y, &Backward { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// ds from (dy, y).
struct Backward {
    scale: f32,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *l1.dims().last().expect("rank 4");
        let ds = backward(
            cpu_slice::<f32>(s1, l1)?,
            cpu_slice::<f32>(s2, l2)?,
            n,
            self.scale,
        );
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = *l1.dims().last().expect("rank 4");
        let rows = l1.shape().elem_count() / n;
        let ds = cuda::softmax_backward(s1, l1, s2, l2, [rows, n], self.scale)?;
        Ok((ds, l1.shape().clone()))
    }
}
/// The CUDA launchers of this op (kernels in `cuda/fused.cu`): on device buffers (the
/// written-out pass's attention) and on candle's storage (the custom op).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::super::fused_func;
    use crate::cuda::{u32_arg, view, Act, Dev, DevMut};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaDevice, Result};

    /// One warp per row, 8 rows per block.
    fn warp_rows(rows: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (u32_arg(rows.div_ceil(8), "blocks")?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// [`super::forward`]: y = softmax(scale·s + bias) over rows of n; `dims` = [rows, n,
    /// heads, tq], the bias [batch, 1, tq, n].
    pub fn forward<T: Act>(
        dev: &CudaDevice,
        s: Dev<T>,
        bias: Dev<T>,
        y: DevMut<T>,
        dims: [usize; 4],
        scale: f32,
    ) -> Result<()> {
        let [rows, n, heads, tq] = dims;
        if heads == 0 || tq == 0 || !rows.is_multiple_of(heads * tq) {
            bail!("softmax: {rows} rows are not batches of {heads} heads × {tq} queries")
        }
        let x = s.at_least(rows * n, "softmax: scores")?;
        let b = bias.at_least(rows / heads * n, "softmax: bias")?;
        let o = y.at_least(rows * n, "softmax: y")?;
        let func = fused_func::<T>(dev, "softmax_fwd")?;
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&func);
        let (r, n, h, t) = (
            u32_arg(rows, "rows")?,
            u32_arg(n, "keys")?,
            u32_arg(heads, "heads")?,
            u32_arg(tq, "queries")?,
        );
        a.arg(&x)
            .arg(&b)
            .arg(&o)
            .arg(&r)
            .arg(&n)
            .arg(&h)
            .arg(&t)
            .arg(&scale);
        // SAFETY: the arguments match softmax_fwd's signature; x and y hold rows·n floats and
        // the bias a row for each (batch, query), checked above.
        unsafe { a.launch(warp_rows(rows)?) }.w()?;
        Ok(())
    }

    /// [`super::backward`]: ds from dy and y, rows of n.
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        dy: Dev<T>,
        y: Dev<T>,
        ds: DevMut<T>,
        dims: [usize; 2],
        scale: f32,
    ) -> Result<()> {
        let [rows, n] = dims;
        let (g, p, d) = (
            dy.at_least(rows * n, "softmax backward: dy")?,
            y.at_least(rows * n, "softmax backward: y")?,
            ds.at_least(rows * n, "softmax backward: ds")?,
        );
        let func = fused_func::<T>(dev, "softmax_bwd")?;
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&func);
        let (r, n) = (u32_arg(rows, "rows")?, u32_arg(n, "keys")?);
        a.arg(&g).arg(&p).arg(&d).arg(&r).arg(&n).arg(&scale);
        // SAFETY: the arguments match softmax_bwd's signature; all three hold rows·n floats.
        unsafe { a.launch(warp_rows(rows)?) }.w()?;
        Ok(())
    }

    /// The custom op's forward on candle's storage; `dims` = [rows, n, heads, tq].
    pub(super) fn softmax_forward(
        s: &candle_core::CudaStorage,
        ls: &candle_core::Layout,
        bias: &candle_core::CudaStorage,
        lb: &candle_core::Layout,
        dims: [usize; 4],
        scale: f32,
    ) -> Result<candle_core::CudaStorage> {
        let dev = &s.device;
        let (x, b) = (view::<f32>(s, ls)?, view::<f32>(bias, lb)?);
        // SAFETY: every element is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<f32>(dims[0] * dims[1]) }?;
        let (x, b) = (Dev::of_view(&x, dev), Dev::of_view(&b, dev));
        forward(dev, x, b, DevMut::of(&mut y, dev), dims, scale)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    /// The custom op's backward on candle's storage; `dims` = [rows, n].
    pub(super) fn softmax_backward(
        dy: &candle_core::CudaStorage,
        ldy: &candle_core::Layout,
        y: &candle_core::CudaStorage,
        ly: &candle_core::Layout,
        dims: [usize; 2],
        scale: f32,
    ) -> Result<candle_core::CudaStorage> {
        let dev = &dy.device;
        let (g, p) = (view::<f32>(dy, ldy)?, view::<f32>(y, ly)?);
        if p.len() != dims[0] * dims[1] || g.len() != p.len() {
            bail!("softmax backward: y and dy differ in size")
        }
        // SAFETY: every element is written by the kernel before it is read.
        let mut ds = unsafe { dev.alloc::<f32>(dims[0] * dims[1]) }?;
        let (g, p) = (Dev::of_view(&g, dev), Dev::of_view(&p, dev));
        backward(dev, g, p, DevMut::of(&mut ds, dev), dims, scale)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(ds, dev.clone()))
    }
}
