//! The optimizer step and the EMA over a whole model's tensors at once, in place.
//!
//! On a CUDA device every tensor of the list is updated by one kernel launch
//! (`cuda/optim.cu`, a table of pointers and lengths), on candle's stream, over candle's own
//! buffers. On the CPU the same call runs the references of [`crate::adamw`] and
//! [`crate::ema`] tensor by tensor. Both give the same bits (the device check compares them).

use crate::adamw::{adamw_ema_step, adamw_step, StepScalars};
use crate::ema::ema_blend;
use crate::norm::{chunk_sums, total};
use candle_core::{bail, DType, Device, Result, Tensor, Var};

/// One parameter tensor's buffers for an AdamW step.
pub struct AdamWTensors<'a> {
    /// The f32 master weights θ (the model's own variable when it computes in f32).
    pub theta: &'a Var,
    /// ∂loss/∂θ, f32 or bf16.
    pub grad: &'a Tensor,
    pub m: &'a Var,
    pub v: &'a Var,
    /// The EMA θ̄, blended with the new θ in the same pass when given.
    pub ema: Option<&'a Var>,
    /// The model's bf16 copy of θ, rewritten from the new θ when given.
    pub param: Option<&'a Var>,
}

/// One step's settings on top of AdamW's constants.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Multiplies every gradient first (gradient clipping); 1.0 leaves them untouched.
    pub grad_scale: f32,
    /// The EMA's β when θ̄ is blended in this step.
    pub ema_beta: Option<f32>,
}

/// The launcher of the multi-tensor kernels; holds what it can reuse between steps (the
/// compiled kernels and the chunk table on a CUDA device).
#[derive(Default)]
pub struct MultiTensor {
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::Launcher>,
}

impl MultiTensor {
    pub fn new() -> Self {
        Self::default()
    }

    /// θ, m, v ← AdamW(θ, g·grad_scale, m, v) for every entry; then θ̄ ← β·θ̄ + (1−β)·θ when
    /// `opts.ema_beta` is set, and the bf16 copies ← θ.
    pub fn adamw_step(
        &mut self,
        tensors: &[AdamWTensors],
        s: &StepScalars,
        opts: StepOptions,
    ) -> Result<()> {
        let Some(first) = tensors.first() else {
            return Ok(());
        };
        for t in tensors {
            check(t)?;
        }
        if opts.ema_beta.is_some() && tensors.iter().any(|t| t.ema.is_none()) {
            bail!("adamw_step: an EMA blend was asked for, but a tensor has no EMA buffer")
        }
        match first.theta.device() {
            Device::Cpu => tensors.iter().try_for_each(|t| adamw_cpu(t, s, opts)),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.cuda(dev)?.adamw(tensors, s, opts),
            d => bail!("adamw_step: no kernel for device {d:?}"),
        }
    }

    /// θ̄ ← β·θ̄ + (1−β)·θ for every pair (θ̄, θ) of f32 tensors.
    pub fn ema_blend(&mut self, pairs: &[(&Var, &Tensor)], beta: f32) -> Result<()> {
        let Some(first) = pairs.first() else {
            return Ok(());
        };
        for (ema, theta) in pairs {
            same(ema.as_tensor(), theta, "ema", "theta")?;
            f32_contiguous(ema.as_tensor(), "ema")?;
            f32_contiguous(theta, "theta")?;
        }
        match first.0.device() {
            Device::Cpu => pairs.iter().try_for_each(|(ema, theta)| {
                let mut e = host(ema.as_tensor())?;
                ema_blend(&mut e, &host(theta)?, beta);
                set(ema, e)
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.cuda(dev)?.ema_blend(pairs, beta),
            d => bail!("ema_blend: no kernel for device {d:?}"),
        }
    }

    /// Σ over pairs of ‖a − b‖² (b = 0 when absent), in f64 and in the fixed order of
    /// [`crate::norm`]: the same bits on the CPU and on a GPU. `a` is f32 or bf16, `b` f32.
    pub fn sum_squares(&mut self, pairs: &[(&Tensor, Option<&Tensor>)]) -> Result<f64> {
        let Some(first) = pairs.first() else {
            return Ok(0.0);
        };
        for (a, b) in pairs {
            if !matches!(a.dtype(), DType::F32 | DType::BF16) || !a.is_contiguous() {
                bail!("sum_squares: expected a contiguous f32 or bf16 tensor")
            }
            if let Some(b) = b {
                same(a, b, "a", "b")?;
                f32_contiguous(b, "b")?;
            }
        }
        match first.0.device() {
            Device::Cpu => {
                let mut sums = Vec::new();
                for (a, b) in pairs {
                    sums.extend(with_f32(a, |a| match b {
                        Some(b) => with_f32(b, |b| chunk_sums(a, Some(b))),
                        None => Ok(chunk_sums(a, None)),
                    })??);
                }
                Ok(total(sums))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.cuda(dev)?.sum_squares(pairs),
            d => bail!("sum_squares: no kernel for device {d:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&mut self, dev: &candle_core::CudaDevice) -> Result<&mut crate::cuda::Launcher> {
        if self.cuda.is_none() {
            self.cuda = Some(crate::cuda::Launcher::new(dev)?);
        }
        Ok(self.cuda.as_mut().expect("just set"))
    }
}

fn f32_contiguous(t: &Tensor, what: &str) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("{what}: expected f32, found {:?}", t.dtype())
    }
    if !t.is_contiguous() {
        bail!("{what}: expected a contiguous tensor")
    }
    Ok(())
}

fn same(a: &Tensor, b: &Tensor, an: &str, bn: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{an} has shape {:?} but {bn} {:?}", a.shape(), b.shape())
    }
    if !a.device().same_device(b.device()) {
        bail!("{an} and {bn} are on different devices")
    }
    Ok(())
}

fn check(t: &AdamWTensors) -> Result<()> {
    let theta = t.theta.as_tensor();
    f32_contiguous(theta, "theta")?;
    for (name, b) in [("m", t.m), ("v", t.v)]
        .into_iter()
        .chain(t.ema.map(|e| ("ema", e)))
    {
        same(theta, b.as_tensor(), "theta", name)?;
        f32_contiguous(b.as_tensor(), name)?;
    }
    same(theta, t.grad, "theta", "grad")?;
    if !matches!(t.grad.dtype(), DType::F32 | DType::BF16) || !t.grad.is_contiguous() {
        bail!("grad: expected a contiguous f32 or bf16 tensor")
    }
    if let Some(p) = t.param {
        same(theta, p.as_tensor(), "theta", "param")?;
        if p.dtype() != DType::BF16 || !p.as_tensor().is_contiguous() {
            bail!("param: expected a contiguous bf16 tensor")
        }
    }
    Ok(())
}

/// `f` over a CPU tensor's values as f32: its own buffer when it is a contiguous f32 one
/// (no copy), else a widened copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cs) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&cs.as_slice::<f32>()?[start..start + t.elem_count()]));
        }
    }
    Ok(f(&host(t)?))
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn set(var: &Var, values: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)?;
    var.set(&t.to_dtype(var.dtype())?)
}

/// The CPU path: the references of adamw.rs and ema.rs over host copies.
fn adamw_cpu(t: &AdamWTensors, s: &StepScalars, opts: StepOptions) -> Result<()> {
    let mut theta = host(t.theta.as_tensor())?;
    let mut grad = host(t.grad)?;
    if opts.grad_scale != 1.0 {
        grad.iter_mut().for_each(|g| *g *= opts.grad_scale);
    }
    let (mut m, mut v) = (host(t.m.as_tensor())?, host(t.v.as_tensor())?);
    match (t.ema, opts.ema_beta) {
        (Some(ema), Some(beta)) => {
            let mut e = host(ema.as_tensor())?;
            adamw_ema_step(&mut theta, &grad, &mut m, &mut v, &mut e, s, beta);
            set(ema, e)?;
        }
        _ => adamw_step(&mut theta, &grad, &mut m, &mut v, s),
    }
    set(t.m, m)?;
    set(t.v, v)?;
    if let Some(p) = t.param {
        set(p, theta.clone())?;
    }
    set(t.theta, theta)
}
