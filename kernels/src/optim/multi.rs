//! The optimizer step and the EMA over a whole model's tensors at once, in place.
//!
//! On a CUDA device every tensor of the list is updated by one kernel launch
//! (`cuda/optim.cu`, a table of pointers and lengths), on candle's stream, over candle's own
//! buffers. On the CPU the same call runs the references of [`crate::optim::adamw`] and
//! [`crate::optim::ema`] tensor by tensor. Both give the same bits (the device check compares them).

use crate::optim::adamw::AdamWTensors;
use crate::optim::adamw::{adamw_ema_step, adamw_step, Step};
use crate::optim::ema::ema_blend;
use crate::optim::norm::{chunk_sums, total};
use candle_core::{bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, Var};
use std::cell::RefCell;

/// The launcher of the multi-tensor kernels; holds what it can reuse between steps (the
/// compiled kernels and the chunk table on a CUDA device).
#[derive(Default)]
pub struct MultiTensor {
    #[cfg(feature = "cuda")]
    cuda: Option<super::launch::Launcher>,
}

impl MultiTensor {
    pub fn new() -> Self {
        Self::default()
    }

    /// θ, m, v ← AdamW(θ, g·grad_scale, m, v) for every entry; then θ̄ ← β·θ̄ + (1−β)·θ when
    /// the step blends the EMA, and the bf16 copies ← θ.
    pub fn adamw_step(&mut self, tensors: &[AdamWTensors], s: &Step) -> Result<()> {
        let Some(first) = tensors.first() else {
            return Ok(());
        };
        for t in tensors {
            check(t)?;
        }
        if s.blends_ema() && tensors.iter().any(|t| t.ema.is_none()) {
            bail!("adamw_step: an EMA blend was asked for, but a tensor has no EMA buffer")
        }
        match first.theta.device() {
            Device::Cpu => tensors.iter().try_for_each(|t| adamw_cpu(t, s)),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.cuda(dev)?.adamw(tensors, s),
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
                with_f32(theta, |theta| {
                    with_f32_mut(ema, |e| {
                        ema_blend(e, theta, beta);
                        Ok(())
                    })
                })?
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.cuda(dev)?.ema_blend(pairs, beta),
            d => bail!("ema_blend: no kernel for device {d:?}"),
        }
    }

    /// Σ over pairs of ‖a − b‖² (b = 0 when absent), in f64 and in the fixed order of
    /// [`crate::optim::norm`]: the same bits on the CPU and on a GPU. `a` is f32 or bf16, `b` f32.
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
    fn cuda(&mut self, dev: &candle_core::CudaDevice) -> Result<&mut super::launch::Launcher> {
        if self.cuda.is_none() {
            self.cuda = Some(super::launch::Launcher::new(dev)?);
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

/// `f` over a CPU variable's f32 values in place: its own buffer, written through
/// candle's in-place op (the variable's write lock), no copy.
fn with_f32_mut<R>(var: &Var, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    struct InPlace<F, R> {
        f: RefCell<Option<F>>,
        out: RefCell<Option<R>>,
    }
    impl<F: FnOnce(&mut [f32]) -> Result<R>, R> InplaceOp1 for InPlace<F, R> {
        fn name(&self) -> &'static str {
            "with_f32_mut"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let CpuStorage::F32(v) = s else {
                bail!("with_f32_mut: expected f32 storage")
            };
            let f = self
                .f
                .borrow_mut()
                .take()
                .expect("an in-place op runs once");
            let values = &mut v[l.start_offset()..][..l.shape().elem_count()];
            *self.out.borrow_mut() = Some(f(values)?);
            Ok(())
        }
    }
    f32_contiguous(var.as_tensor(), "with_f32_mut")?;
    if !var.device().is_cpu() {
        bail!("with_f32_mut: a CPU tensor only")
    }
    let op = InPlace {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    var.as_tensor().inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| candle_core::Error::Msg("with_f32_mut: the op did not run".into()))
}

/// The CPU path: the references of adamw.rs and ema.rs, in place on the variables' own
/// buffers (copying every buffer out and back would double the step's memory traffic).
fn adamw_cpu(t: &AdamWTensors, s: &Step) -> Result<()> {
    // Each buffer is borrowed inside the in-place op of the one before.
    with_f32(t.grad, |grad| {
        with_f32_mut(t.theta, |theta| {
            with_f32_mut(t.m, |m| {
                with_f32_mut(t.v, |v| match t.ema.filter(|_| s.blends_ema()) {
                    Some(ema) => with_f32_mut(ema, |e| {
                        adamw_ema_step(theta, grad, m, v, e, s);
                        Ok(())
                    }),
                    None => {
                        adamw_step(theta, grad, m, v, s);
                        Ok(())
                    }
                })
            })
        })
    })??;
    if let Some(p) = t.param {
        p.set(&t.theta.as_tensor().to_dtype(p.dtype())?)?;
    }
    Ok(())
}
