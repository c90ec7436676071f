//! The optimizer step and the EMA over a whole model's tensors at once, in place.
//!
//! On a CUDA device every tensor of the list is updated by one kernel launch
//! (`cuda/optim.cu`, a table of pointers and lengths), on candle's stream, over candle's own
//! buffers. On the CPU the same call runs the references of [`crate::optim::adamw`] and
//! [`crate::optim::ema`] tensor by tensor. Both give the same bits (the device check compares them).

use crate::optim::adamw::AdamWTensors;
use crate::optim::adamw::{adamw_ema_step, adamw_step, Step};
use crate::optim::bf16::{adamw_mixed, Store};
use crate::optim::ema::ema_blend;
use crate::optim::norm::{chunk_sums, total};
use candle_core::{bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, Var};
use half::bf16;
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
    of_dtype(t, what, &[DType::F32])
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

/// `t` is contiguous and of one of the `allowed` dtypes.
fn of_dtype(t: &Tensor, what: &str, allowed: &[DType]) -> Result<()> {
    if !allowed.contains(&t.dtype()) {
        let names: Vec<&str> = allowed.iter().map(|d| d.as_str()).collect();
        bail!(
            "{what}: expected {}, found {:?}",
            names.join(" or "),
            t.dtype()
        )
    }
    if !t.is_contiguous() {
        bail!("{what}: expected a contiguous tensor")
    }
    Ok(())
}

fn check(t: &AdamWTensors) -> Result<()> {
    use DType::{BF16, F32};
    let theta = t.theta.as_tensor();
    let both: &[DType] = &[F32, BF16];
    let mut others = vec![("m", t.m.as_tensor()), ("v", t.v.as_tensor())];
    // bf16 weights rounded in place lose AdamW's small steps (bf16.rs): θ is f32 or a pair.
    match t.theta_lo {
        None => of_dtype(
            theta,
            "theta (f32 unless kept as a pair with theta_lo)",
            &[F32],
        )?,
        Some(lo) => {
            of_dtype(theta, "theta (the high half of a pair)", &[BF16])?;
            others.push(("theta_lo", lo.as_tensor()));
            of_dtype(lo.as_tensor(), "theta_lo", &[BF16])?;
        }
    }
    of_dtype(t.m.as_tensor(), "m", both)?;
    of_dtype(t.v.as_tensor(), "v", &[t.m.dtype()])?;
    if let Some(e) = t.ema {
        others.push(("ema", e.as_tensor()));
        of_dtype(e.as_tensor(), "ema", both)?;
    }
    if let Some(lo) = t.ema_lo {
        let Some(e) = t.ema else {
            bail!("ema_lo without ema")
        };
        of_dtype(e.as_tensor(), "ema (the high half of a pair)", &[BF16])?;
        others.push(("ema_lo", lo.as_tensor()));
        of_dtype(lo.as_tensor(), "ema_lo", &[BF16])?;
    }
    for (name, b) in others {
        same(theta, b, "theta", name)?;
    }
    same(theta, t.grad, "theta", "grad")?;
    of_dtype(t.grad, "grad", both)?;
    if let Some(p) = t.param {
        same(theta, p.as_tensor(), "theta", "param")?;
        of_dtype(
            theta,
            "theta (f32 master weights beside a bf16 param)",
            &[F32],
        )?;
        of_dtype(p.as_tensor(), "param", &[BF16])?;
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

/// A CPU variable's values, borrowed for writing.
enum Slice<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
}

/// `f` over a CPU variable's values in place (f32 or bf16): its own buffer, written through
/// candle's in-place op (the variable's write lock), no copy.
fn with_mut<R>(var: &Var, f: impl FnOnce(Slice<'_>) -> Result<R>) -> Result<R> {
    struct InPlace<F, R> {
        f: RefCell<Option<F>>,
        out: RefCell<Option<R>>,
    }
    impl<F: FnOnce(Slice<'_>) -> Result<R>, R> InplaceOp1 for InPlace<F, R> {
        fn name(&self) -> &'static str {
            "with_mut"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let (start, n) = (l.start_offset(), l.shape().elem_count());
            let slice = match s {
                CpuStorage::F32(v) => Slice::F32(&mut v[start..][..n]),
                CpuStorage::BF16(v) => Slice::Bf16(&mut v[start..][..n]),
                _ => bail!("with_mut: expected f32 or bf16 storage"),
            };
            let f = self
                .f
                .borrow_mut()
                .take()
                .expect("an in-place op runs once");
            *self.out.borrow_mut() = Some(f(slice)?);
            Ok(())
        }
    }
    if !var.as_tensor().is_contiguous() || !var.device().is_cpu() {
        bail!("with_mut: a contiguous CPU tensor only")
    }
    let op = InPlace {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    var.as_tensor().inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| candle_core::Error::Msg("with_mut: the op did not run".into()))
}

/// `f` over a CPU variable's f32 values in place.
fn with_f32_mut<R>(var: &Var, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    f32_contiguous(var.as_tensor(), "with_f32_mut")?;
    with_mut(var, |s| match s {
        Slice::F32(v) => f(v),
        Slice::Bf16(_) => bail!("with_f32_mut: expected f32 storage"),
    })
}

/// `f` over several CPU variables' values in place at once, each borrowed inside the
/// in-place op of the one before (in the order given).
fn with_all_mut(vars: &[&Var], f: &mut dyn FnMut(Vec<Slice<'_>>) -> Result<()>) -> Result<()> {
    fn go(
        vars: &[&Var],
        held: Vec<Slice<'_>>,
        f: &mut dyn FnMut(Vec<Slice<'_>>) -> Result<()>,
    ) -> Result<()> {
        match vars.split_first() {
            None => f(held),
            Some((var, rest)) => with_mut(var, move |s| {
                let mut held = held;
                held.push(s);
                go(rest, held, f)
            }),
        }
    }
    go(vars, Vec::new(), f)
}

/// The CPU path: the references of adamw.rs and ema.rs, in place on the variables' own
/// buffers (copying every buffer out and back would double the step's memory traffic).
fn adamw_cpu(t: &AdamWTensors, s: &Step) -> Result<()> {
    if !t.all_f32() {
        return adamw_mixed_cpu(t, s);
    }
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

/// The CPU path for state kept in bf16 or as pairs: [`adamw_mixed`] on the variables' own
/// buffers.
fn adamw_mixed_cpu(t: &AdamWTensors, s: &Step) -> Result<()> {
    let ema = t.ema.filter(|_| s.blends_ema());
    let ema_lo = t.ema_lo.filter(|_| s.blends_ema());
    let mut vars = vec![t.theta, t.m, t.v];
    vars.extend(t.theta_lo);
    vars.extend(ema);
    vars.extend(ema_lo);
    vars.extend(t.param);
    with_f32(t.grad, |grad| {
        with_all_mut(&vars, &mut |held: Vec<Slice<'_>>| {
            let mut held = held.into_iter();
            let mut next = || held.next().expect("one slice a variable");
            let (theta, m, v) = (next(), next(), next());
            let theta_lo = t.theta_lo.map(|_| next());
            let ema = ema.map(|_| next());
            let ema_lo = ema_lo.map(|_| next());
            let param = t.param.map(|_| next());
            let param = match param {
                None => None,
                Some(Slice::Bf16(p)) => Some(p),
                Some(Slice::F32(_)) => bail!("param: expected bf16"),
            };
            adamw_mixed(
                store(theta, theta_lo)?,
                grad,
                store(m, None)?,
                store(v, None)?,
                ema.map(|e| store(e, ema_lo)).transpose()?,
                param,
                s,
            );
            Ok(())
        })
    })?
}

/// A variable's slice (and its low half's) as the [`Store`] it is.
fn store<'a>(hi: Slice<'a>, lo: Option<Slice<'a>>) -> Result<Store<'a>> {
    Ok(match (hi, lo) {
        (Slice::F32(x), None) => Store::F32(x),
        (Slice::Bf16(x), None) => Store::Bf16(x),
        (Slice::Bf16(hi), Some(Slice::Bf16(lo))) => Store::Pair(hi, lo),
        _ => bail!("adamw_step: a pair's halves must both be bf16"),
    })
}
