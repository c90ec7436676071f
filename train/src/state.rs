//! Everything a run carries from step to step: θ, AdamW's moments m and v, the EMA θ̄, the
//! pre-trained θ₀ (for ‖θ−θ₀‖), and the gradient accumulator. One multi-tensor call updates
//! them all ([`basin_kernels::optim::multi`]: one CUDA launch on a GPU, the CPU references
//! otherwise).
//!
//! How each is stored is the run's `[state]` config ([`StateConfig`]):
//! - θ: when the model computes in f32, θ *is* the model's variable; in bf16, θ is either a
//!   separate f32 tensor whose bf16 copy the step rewrites (`weights = "f32"`), or the
//!   model's bf16 variable plus a bf16 low half, θ = hi + lo (`weights = "pair"`);
//! - m and v: f32 or bf16;
//! - θ̄: f32 or a pair;
//! - θ₀: f32 on the run's device, on the host, or not kept.

use anyhow::{anyhow, bail, Context, Result};
use basin_kernels::optim::adamw::{AdamWTensors, Step};
use basin_kernels::optim::multi::MultiTensor;
use basin_lm::artifacts::{Keep, StateConfig, Theta0};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Which weights: the trained θ or the EMA θ̄.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    Theta,
    Ema,
}

/// Where θ is kept besides the model's variable.
enum Theta {
    /// θ is the model's (f32) variable.
    Model,
    /// f32 master weights; the model's variable is their bf16 copy.
    Master(Var),
    /// The model's bf16 variable is θ's high half; this is its low half.
    Pair(Var),
}

/// A value kept as f32 (`lo` None) or as a bf16 pair hi + lo.
struct Kept {
    hi: Var,
    lo: Option<Var>,
}

impl Kept {
    /// `t` kept as `keep` says (f32 or a pair).
    fn new(t: &Tensor, keep: Keep) -> Result<Self> {
        let t = t.to_dtype(DType::F32)?;
        Ok(match keep {
            Keep::Pair => {
                let (hi, lo) = split(&t)?;
                Kept {
                    hi: Var::from_tensor(&hi)?,
                    lo: Some(Var::from_tensor(&lo)?),
                }
            }
            _ => Kept {
                hi: Var::from_tensor(&t.copy()?)?,
                lo: None,
            },
        })
    }

    /// The value in f32 (a pair's sum is exact).
    fn f32(&self) -> Result<Tensor> {
        let hi = self.hi.as_tensor().to_dtype(DType::F32)?;
        Ok(match &self.lo {
            Some(lo) => (hi + lo.as_tensor().to_dtype(DType::F32)?)?,
            None => hi,
        })
    }
}

/// An f32 tensor as a bf16 pair: hi rounded to nearest, lo the rest rounded.
fn split(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let hi = x.to_dtype(DType::BF16)?;
    let lo = (x - hi.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
    Ok((hi, lo))
}

/// A copy of `t` in host memory (a fresh buffer even on the CPU, where `to_device` would
/// share the storage that an in-place write then changes).
fn host_copy(t: &Tensor) -> Result<Tensor> {
    Ok(if t.device().is_cpu() {
        t.copy()?
    } else {
        t.to_device(&Device::Cpu)?
    })
}

pub struct Param {
    pub name: String,
    /// The model's variable (f32 or bf16).
    pub var: Var,
    theta: Theta,
    m: Var,
    v: Var,
    ema: Option<Kept>,
    /// f32, on the device or the host; None when the distance is off.
    theta0: Option<Tensor>,
    /// The sum of the micro-batches' gradients since the last step.
    grad: Option<Tensor>,
    /// What the model's variable held of θ while it holds θ̄ (host memory).
    stash: Option<Tensor>,
}

impl Param {
    /// The model variable's part of θ, wherever it is at the moment.
    fn var_now(&self) -> Result<Tensor> {
        Ok(match &self.stash {
            Some(s) => s.to_device(self.var.device())?,
            None => self.var.as_tensor().clone(),
        })
    }

    /// θ in f32.
    fn theta_f32(&self) -> Result<Tensor> {
        Ok(match &self.theta {
            Theta::Model => self.var_now()?,
            Theta::Master(m) => m.as_tensor().clone(),
            Theta::Pair(lo) => {
                (self.var_now()?.to_dtype(DType::F32)? + lo.as_tensor().to_dtype(DType::F32)?)?
            }
        })
    }

    fn pick(&self, w: Weights) -> Result<Option<Tensor>> {
        match w {
            Weights::Theta => Ok(Some(self.theta_f32()?)),
            Weights::Ema => self.ema.as_ref().map(Kept::f32).transpose(),
        }
    }

    /// θ ← x (f32), in every copy of it.
    fn set_theta(&self, x: &Tensor) -> Result<()> {
        match &self.theta {
            Theta::Model => self.var.set(x)?,
            Theta::Master(m) => {
                m.set(x)?;
                self.var.set(&x.to_dtype(self.var.dtype())?)?;
            }
            Theta::Pair(lo) => {
                let (hi, l) = split(x)?;
                self.var.set(&hi)?;
                lo.set(&l)?;
            }
        }
        Ok(())
    }

    /// The buffers a checkpoint holds, by kind, in their own dtypes: those of
    /// [`Self::buffer_vars`], θ's part of the model's variable wherever it is now.
    fn buffers(&self) -> Result<Vec<(&'static str, Tensor)>> {
        self.buffer_vars()
            .into_iter()
            .map(|(kind, var)| {
                let t = if std::ptr::eq(var, &self.var) {
                    self.var_now()?
                } else {
                    var.as_tensor().clone()
                };
                Ok((kind, t))
            })
            .collect()
    }

    /// The variables [`Self::buffers`] names, to restore into (θ's high half: the model's).
    fn buffer_vars(&self) -> Vec<(&'static str, &Var)> {
        let mut out = vec![];
        match &self.theta {
            Theta::Model => out.push(("theta", &self.var)),
            Theta::Master(m) => out.push(("theta", m)),
            Theta::Pair(lo) => {
                out.push(("theta", &self.var));
                out.push(("theta_lo", lo));
            }
        }
        out.push(("m", &self.m));
        out.push(("v", &self.v));
        if let Some(e) = &self.ema {
            out.push(("ema", &e.hi));
            if let Some(lo) = &e.lo {
                out.push(("ema_lo", lo));
            }
        }
        out
    }
}

pub struct TrainState {
    /// Sorted by name: the same order on every run.
    pub params: Vec<Param>,
    kernels: MultiTensor,
    /// What the model's variables hold now.
    in_model: Weights,
}

impl TrainState {
    /// Starts from the model's weights: θ = θ₀ = θ̄ (the EMA's anchor is the pre-trained
    /// model), stored as `keep` says (validated with the model's dtype).
    pub fn new(varmap: &VarMap, ema: bool, keep: &StateConfig) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("varmap lock poisoned"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let moments = match keep.moments {
            Keep::Bf16 => DType::BF16,
            _ => DType::F32,
        };
        let params = names
            .into_iter()
            .map(|name| {
                let var = data[name].clone();
                let t = var.as_tensor();
                let theta = match (t.dtype(), keep.weights) {
                    (DType::F32, Keep::F32) => Theta::Model,
                    (DType::BF16, Keep::F32) => {
                        Theta::Master(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
                    }
                    (DType::BF16, Keep::Pair) => {
                        Theta::Pair(Var::zeros(t.shape(), DType::BF16, t.device())?)
                    }
                    (d, w) => {
                        bail!("{name}: weights {d:?} cannot be trained with state.weights = {w:?}")
                    }
                };
                let theta0 = match keep.theta0 {
                    Theta0::Device => Some(t.to_dtype(DType::F32)?.copy()?),
                    Theta0::Host => Some(host_copy(&t.to_dtype(DType::F32)?)?),
                    Theta0::Off => None,
                };
                Ok(Param {
                    name: name.clone(),
                    theta,
                    m: Var::zeros(t.shape(), moments, t.device())?,
                    v: Var::zeros(t.shape(), moments, t.device())?,
                    ema: ema.then(|| Kept::new(t, keep.ema)).transpose()?,
                    theta0,
                    grad: None,
                    stash: None,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            kernels: MultiTensor::new(),
            in_model: Weights::Theta,
        })
    }

    /// Whether θ̄ is kept (the run has the EMA on).
    pub fn has_ema(&self) -> bool {
        self.params.iter().any(|p| p.ema.is_some())
    }

    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Adds one micro-batch's gradients to the accumulator (in f32 once there are two).
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for p in &mut self.params {
            let g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| anyhow!("no gradient for {}", p.name))?
                .detach()
                .contiguous()?;
            p.grad = Some(match p.grad.take() {
                None => g,
                Some(acc) => (acc.to_dtype(DType::F32)? + g.to_dtype(DType::F32)?)?,
            });
        }
        Ok(())
    }

    /// ‖g‖ over every parameter (an f64 sum of squares, one kernel on a GPU).
    pub fn grad_norm(&mut self) -> Result<f64> {
        let grads: Vec<(&Tensor, Option<&Tensor>)> = self
            .params
            .iter()
            .filter_map(|p| p.grad.as_ref().map(|g| (g, None)))
            .collect();
        if grads.len() != self.params.len() {
            bail!("grad_norm: no gradient accumulated since the last step");
        }
        Ok(self.kernels.sum_squares(&grads)?.sqrt())
    }

    /// One optimizer step ([`crate::optim::step`]: clip, AdamW, and the EMA blend when
    /// due), then, with `feedback`, θ̄ copied into θ. The model holds the new θ afterwards.
    pub fn step(&mut self, step: &Step, feedback: bool) -> Result<()> {
        self.load_into_model(Weights::Theta)?;
        let grads: Vec<Tensor> = self
            .params
            .iter_mut()
            .map(|p| p.grad.take())
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("optimizer step: no gradient accumulated"))?;
        let tensors: Vec<AdamWTensors> = self
            .params
            .iter()
            .zip(&grads)
            .map(|(p, g)| {
                let (theta, theta_lo, param) = match &p.theta {
                    Theta::Model => (&p.var, None, None),
                    Theta::Master(m) => (m, None, Some(&p.var)),
                    Theta::Pair(lo) => (&p.var, Some(lo), None),
                };
                AdamWTensors {
                    theta,
                    theta_lo,
                    grad: g,
                    m: &p.m,
                    v: &p.v,
                    ema: p.ema.as_ref().map(|e| &e.hi),
                    ema_lo: p.ema.as_ref().and_then(|e| e.lo.as_ref()),
                    param,
                }
            })
            .collect();
        self.kernels.adamw_step(&tensors, step)?;
        if feedback {
            for p in &self.params {
                if let Some(ema) = &p.ema {
                    p.set_theta(&ema.f32()?)?;
                }
            }
        }
        Ok(())
    }

    /// Puts θ or θ̄ into the model's variables (θ̄ to evaluate the EMA; θ to go on training).
    pub fn load_into_model(&mut self, w: Weights) -> Result<()> {
        if w == self.in_model {
            return Ok(());
        }
        for p in &mut self.params {
            match w {
                Weights::Ema => {
                    let ema = p
                        .ema
                        .as_ref()
                        .ok_or_else(|| anyhow!("this run has no EMA"))?
                        .f32()?;
                    if !matches!(p.theta, Theta::Master(_)) && p.stash.is_none() {
                        p.stash = Some(host_copy(p.var.as_tensor())?);
                    }
                    p.var.set(&ema.to_dtype(p.var.dtype())?)?;
                }
                Weights::Theta => {
                    if let Some(theta) = p.stash.take() {
                        p.var.set(&theta.to_device(p.var.device())?)?;
                    } else if let Theta::Master(master) = &p.theta {
                        p.var.set(&master.as_tensor().to_dtype(p.var.dtype())?)?;
                    }
                }
            }
        }
        self.in_model = w;
        Ok(())
    }

    /// ‖a − θ₀‖ over every parameter, for a = θ or θ̄; None without an EMA (for θ̄) or with
    /// θ₀ off. Where a is f32 beside θ₀, one multi-tensor sum; otherwise (pairs, θ₀ on the
    /// host of a GPU run) tensor by tensor, each widened and moved to θ₀'s device first, so
    /// that no more than one tensor's copy exists at a time (the sum's order differs: the
    /// last bits may too).
    pub fn distance_from_start(&mut self, w: Weights) -> Result<Option<f64>> {
        if self.params.iter().any(|p| p.theta0.is_none()) {
            return Ok(None);
        }
        if w == Weights::Ema && !self.has_ema() {
            return Ok(None);
        }
        let direct = self.params.iter().all(|p| {
            let here = p
                .theta0
                .as_ref()
                .is_some_and(|t0| t0.device().same_device(p.var.device()));
            here && match w {
                Weights::Theta => p.stash.is_none() && !matches!(p.theta, Theta::Pair(_)),
                Weights::Ema => p.ema.as_ref().is_some_and(|e| e.lo.is_none()),
            }
        });
        if direct {
            // No copies: each is the tensor itself.
            let values: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.pick(w)?.ok_or_else(|| anyhow!("{}: no EMA", p.name)))
                .collect::<Result<_>>()?;
            let pairs: Vec<(&Tensor, Option<&Tensor>)> = values
                .iter()
                .zip(&self.params)
                .map(|(t, p)| (t, p.theta0.as_ref()))
                .collect();
            return Ok(Some(self.kernels.sum_squares(&pairs)?.sqrt()));
        }
        let mut sum = 0.0;
        for p in &self.params {
            let t0 = p.theta0.as_ref().expect("checked above");
            let a = p
                .pick(w)?
                .ok_or_else(|| anyhow!("{}: no EMA", p.name))?
                .to_device(t0.device())?;
            sum += self.kernels.sum_squares(&[(&a, Some(t0))])?;
        }
        Ok(Some(sum.sqrt()))
    }

    /// θ or θ̄ of every parameter in f32 as the state holds it (a pair's sum, f32 master
    /// weights), by name, in host memory (one tensor at a time on the device); None for θ̄
    /// without an EMA.
    pub fn values_f32(&self, w: Weights) -> Result<Option<HashMap<String, Tensor>>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let Some(t) = p.pick(w)? else {
                return Ok(None);
            };
            out.insert(p.name.clone(), host_copy(&t)?);
        }
        Ok(Some(out))
    }

    /// Writes θ, m, v and θ̄ as one safetensors file, each buffer in its own dtype (a pair
    /// as its two halves).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            for (kind, t) in p.buffers()? {
                tensors.insert(format!("{kind}/{}", p.name), t.to_device(&Device::Cpu)?);
            }
        }
        basin_lm::weights::save_safetensors(path, &tensors)
    }

    /// Restores what [`Self::save`] wrote, and puts θ into the model.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        let saved = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        self.load_into_model(Weights::Theta)?;
        for p in &self.params {
            for (kind, var) in p.buffer_vars() {
                let t = saved
                    .get(&format!("{kind}/{}", p.name))
                    .ok_or_else(|| anyhow!("{}: no {kind}/{}", path.display(), p.name))?;
                if t.shape() != var.shape() || t.dtype() != var.dtype() {
                    bail!(
                        "{}: {kind}/{} is {:?} {:?}; expected {:?} {:?} (the run's [state] config)",
                        path.display(),
                        p.name,
                        t.dtype(),
                        t.shape(),
                        var.dtype(),
                        var.shape()
                    );
                }
                var.set(&t.to_device(var.device())?)?;
            }
            if let Theta::Master(master) = &p.theta {
                p.var.set(&master.as_tensor().to_dtype(p.var.dtype())?)?;
            }
        }
        Ok(())
    }
}
