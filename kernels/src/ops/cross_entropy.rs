//! The cross-entropy of each row of logits against its target, fused:
//!
//!   nll_r = logsumexp(x_r) − x_r[t_r]        ∂nll_r/∂x_r = softmax(x_r) − onehot(t_r)
//!
//! Through candle's log_softmax and gather, a SmolLM2 step at 16 × 512 tokens runs ~12
//! passes over its [8192, 49152] logits (1.6 GB each). Fused, the forward reads the logits
//! once and the backward twice, writing the gradient once (docs/performance.md).

use super::cpu_slice;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// log Σ exp over a row, from its maximum.
fn logsumexp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + x.iter().map(|&a| (a - m).exp()).sum::<f32>().ln()
}

/// CPU reference: the negative log-likelihood of each row's target.
pub fn forward(logits: &[f32], targets: &[u32], v: usize) -> Vec<f32> {
    logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(x, &t)| logsumexp(x) - x[t as usize])
        .collect()
}

/// CPU reference: g_r · (softmax(x_r) − onehot(t_r)) for every row.
pub fn backward(logits: &[f32], targets: &[u32], g: &[f32], v: usize) -> Vec<f32> {
    let mut d = vec![0f32; logits.len()];
    d.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter().zip(g.par_iter()))
        .for_each(|((d, x), (&t, &g))| {
            let lse = logsumexp(x);
            for (j, (d, &a)) in d.iter_mut().zip(x).enumerate() {
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                *d = g * ((a - lse).exp() - onehot);
            }
        });
    d
}

/// The per-row negative log-likelihood [rows] of `logits` [rows, vocab] (f32) at `targets`
/// [rows] (u32), with its gradient for the logits.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, v) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        bail!("cross_entropy_rows: targets must be [{rows}] u32")
    }
    if logits.dtype() != DType::F32 {
        bail!("cross_entropy_rows: expected f32 logits")
    }
    if v > u32::MAX as usize {
        bail!("cross_entropy_rows: vocabulary of {v} is too large")
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, Forward)
}

/// The targets must name a column: a bad id would read outside the row.
fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross_entropy_rows: target {t} is outside the vocabulary of {v}")
    }
    Ok(())
}

struct Forward;

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let targets = cpu_slice::<u32>(s2, l2)?;
        check_targets(targets, v)?;
        let nll = forward(cpu_slice::<f32>(s1, l1)?, targets, v);
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let nll = cuda::xent_forward(s1, l1, s2, l2, rows, v)?;
        Ok((nll, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &Backward)?;
        Ok((Some(d), None))
    }
}

/// ∂loss/∂logits from (logits, targets, ∂loss/∂nll).
struct Backward;

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let d = backward(
            cpu_slice::<f32>(s1, l1)?,
            cpu_slice::<u32>(s2, l2)?,
            cpu_slice::<f32>(s3, l3)?,
            v,
        );
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let d = cuda::xent_backward(s1, l1, s2, l2, s3, l3, rows, v)?;
        Ok((d, l1.shape().clone()))
    }
}
/// The CUDA launchers of this op (kernels in `cuda/fused.cu`): on device buffers (the
/// written-out pass) and on candle's storage (the custom op).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::super::fused_func;
    use crate::cuda::{u32_arg, view, Act, Dev, DevMut};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaDevice, Result};

    /// One block of `XENT_THREADS` (fused.cu) per row.
    fn block_rows(rows: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (u32_arg(rows, "rows")?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// [`super::forward`]: each row's nll (f32 whatever the logits are). A target outside
    /// the vocabulary gives NaN.
    pub fn forward<T: Act>(
        dev: &CudaDevice,
        logits: Dev<T>,
        targets: Dev<u32>,
        nll: DevMut<f32>,
        rows: usize,
        v: usize,
    ) -> Result<()> {
        let (x, t, o) = (
            logits.at_least(rows * v, "cross-entropy: logits")?,
            targets.at_least(rows, "cross-entropy: targets")?,
            nll.at_least(rows, "cross-entropy: nll")?,
        );
        if rows == 0 {
            return Ok(());
        }
        let func = fused_func::<T>(dev, "xent_fwd")?;
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&func);
        let v = u32_arg(v, "vocabulary")?;
        a.arg(&x).arg(&t).arg(&o).arg(&v);
        // SAFETY: the arguments match xent_fwd's signature: rows·v logits, rows targets (the
        // kernel checks each against v), rows outputs; checked above.
        unsafe { a.launch(block_rows(rows)?) }.w()?;
        Ok(())
    }

    /// [`super::backward`]: the logits' gradient from each row's nll's gradient g (f32).
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        logits: Dev<T>,
        targets: Dev<u32>,
        g: Dev<f32>,
        dlogits: DevMut<T>,
        rows: usize,
        v: usize,
    ) -> Result<()> {
        let (x, t, gr, d) = (
            logits.at_least(rows * v, "cross-entropy backward: logits")?,
            targets.at_least(rows, "cross-entropy backward: targets")?,
            g.at_least(rows, "cross-entropy backward: g")?,
            dlogits.at_least(rows * v, "cross-entropy backward: dlogits")?,
        );
        if rows == 0 {
            return Ok(());
        }
        let func = fused_func::<T>(dev, "xent_bwd")?;
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&func);
        let v = u32_arg(v, "vocabulary")?;
        a.arg(&x).arg(&t).arg(&gr).arg(&d).arg(&v);
        // SAFETY: the arguments match xent_bwd's signature; sizes checked above.
        unsafe { a.launch(block_rows(rows)?) }.w()?;
        Ok(())
    }

    /// The custom op's forward on candle's storage.
    pub(super) fn xent_forward(
        logits: &candle_core::CudaStorage,
        ll: &candle_core::Layout,
        targets: &candle_core::CudaStorage,
        lt: &candle_core::Layout,
        rows: usize,
        v: usize,
    ) -> Result<candle_core::CudaStorage> {
        let dev = &logits.device;
        let (x, t) = (view::<f32>(logits, ll)?, view::<u32>(targets, lt)?);
        // SAFETY: the kernel writes every row's value.
        let mut nll = unsafe { dev.alloc::<f32>(rows) }?;
        let (x, t) = (Dev::of_view(&x, dev), Dev::of_view(&t, dev));
        forward(dev, x, t, DevMut::of(&mut nll, dev), rows, v)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(nll, dev.clone()))
    }

    /// The custom op's backward on candle's storage.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn xent_backward(
        logits: &candle_core::CudaStorage,
        ll: &candle_core::Layout,
        targets: &candle_core::CudaStorage,
        lt: &candle_core::Layout,
        grad: &candle_core::CudaStorage,
        lg: &candle_core::Layout,
        rows: usize,
        v: usize,
    ) -> Result<candle_core::CudaStorage> {
        let dev = &logits.device;
        let (x, t, g) = (
            view::<f32>(logits, ll)?,
            view::<u32>(targets, lt)?,
            view::<f32>(grad, lg)?,
        );
        if t.len() != rows || g.len() != rows {
            bail!("cross-entropy backward: expected {rows} targets and gradients")
        }
        // SAFETY: the kernel writes every element.
        let mut d = unsafe { dev.alloc::<f32>(rows * v) }?;
        let (x, t, g) = (
            Dev::of_view(&x, dev),
            Dev::of_view(&t, dev),
            Dev::of_view(&g, dev),
        );
        backward(dev, x, t, g, DevMut::of(&mut d, dev), rows, v)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(d, dev.clone()))
    }
}
