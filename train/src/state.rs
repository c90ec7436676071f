//! Everything a run carries from step to step, as tensors on the model's device: the f32
//! master weights θ, AdamW's moments m and v, the EMA θ̄, the pre-trained θ₀ (for ‖θ−θ₀‖),
//! and the gradient accumulator. One multi-tensor call updates them all
//! ([`basin_kernels::optim::multi`]: one CUDA launch on a GPU, the CPU references otherwise).
//!
//! When the model computes in f32, θ *is* the model's variable; in bf16, θ is a separate
//! f32 tensor and the step rewrites the model's bf16 copy from it.

use anyhow::{anyhow, bail, Context, Result};
use basin_kernels::optim::adamw::{AdamWTensors, Step};
use basin_kernels::optim::multi::MultiTensor;
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

pub struct Param {
    pub name: String,
    /// The model's variable (f32 or bf16).
    pub var: Var,
    /// f32 master weights when the model is not f32; else θ is `var`.
    master: Option<Var>,
    m: Var,
    v: Var,
    ema: Option<Var>,
    theta0: Tensor,
    /// The sum of the micro-batches' gradients since the last step.
    grad: Option<Tensor>,
    /// θ, kept aside while the model holds θ̄ (only where θ is the model's variable).
    stash: Option<Tensor>,
}

impl Param {
    fn theta(&self) -> &Var {
        self.master.as_ref().unwrap_or(&self.var)
    }

    /// θ, wherever it is at the moment.
    fn theta_now(&self) -> &Tensor {
        self.stash.as_ref().unwrap_or(self.theta().as_tensor())
    }

    fn pick(&self, w: Weights) -> Option<&Tensor> {
        match w {
            Weights::Theta => Some(self.theta_now()),
            Weights::Ema => self.ema.as_ref().map(|e| e.as_tensor()),
        }
    }
}

pub struct TrainState {
    /// Sorted by name: the same order on every run.
    pub params: Vec<Param>,
    kernels: MultiTensor,
    /// What the model's variables hold now.
    in_model: Weights,
}

fn zeros_like(t: &Tensor) -> Result<Var> {
    Ok(Var::zeros(t.shape(), DType::F32, t.device())?)
}

fn f32_copy(t: &Tensor) -> Result<Tensor> {
    // to_dtype is a no-op on an f32 tensor: copy() makes the buffer our own.
    Ok(t.to_dtype(DType::F32)?.copy()?)
}

impl TrainState {
    /// Starts from the model's weights: θ = θ₀ = θ̄ (the EMA's anchor is the pre-trained model).
    pub fn new(varmap: &VarMap, ema: bool) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("varmap lock poisoned"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .map(|name| {
                let var = data[name].clone();
                let t = var.as_tensor();
                let master = match t.dtype() {
                    DType::F32 => None,
                    DType::BF16 => Some(Var::from_tensor(&f32_copy(t)?)?),
                    d => bail!("{name}: training supports f32 and bf16 weights, not {d:?}"),
                };
                let theta0 = f32_copy(t)?;
                Ok(Param {
                    name: name.clone(),
                    master,
                    m: zeros_like(t)?,
                    v: zeros_like(t)?,
                    ema: ema.then(|| Var::from_tensor(&theta0.copy()?)).transpose()?,
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
            .map(|(p, g)| AdamWTensors {
                theta: p.theta(),
                grad: g,
                m: &p.m,
                v: &p.v,
                ema: p.ema.as_ref(),
                param: p.master.is_some().then_some(&p.var),
            })
            .collect();
        self.kernels.adamw_step(&tensors, step)?;
        if feedback {
            for p in &self.params {
                if let Some(ema) = &p.ema {
                    p.theta().set(ema.as_tensor())?;
                    if p.master.is_some() {
                        p.var.set(&ema.as_tensor().to_dtype(p.var.dtype())?)?;
                    }
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
                        .ok_or_else(|| anyhow!("this run has no EMA"))?;
                    if p.master.is_none() && p.stash.is_none() {
                        p.stash = Some(p.var.as_tensor().copy()?);
                    }
                    p.var.set(&ema.as_tensor().to_dtype(p.var.dtype())?)?;
                }
                Weights::Theta => {
                    if let Some(theta) = p.stash.take() {
                        p.var.set(&theta)?;
                    } else if let Some(master) = &p.master {
                        p.var.set(&master.as_tensor().to_dtype(p.var.dtype())?)?;
                    }
                }
            }
        }
        self.in_model = w;
        Ok(())
    }

    /// ‖a − θ₀‖ over every parameter, for a = θ or θ̄ (None without an EMA).
    pub fn distance_from_start(&mut self, w: Weights) -> Result<Option<f64>> {
        let pairs: Option<Vec<(&Tensor, Option<&Tensor>)>> = self
            .params
            .iter()
            .map(|p| Some((p.pick(w)?, Some(&p.theta0))))
            .collect();
        let kernels = &mut self.kernels;
        pairs
            .map(|pairs| Ok(kernels.sum_squares(&pairs)?.sqrt()))
            .transpose()
    }

    /// Writes θ, m, v and θ̄ as one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            let mut put = |kind: &str, t: &Tensor| -> Result<()> {
                tensors.insert(format!("{kind}/{}", p.name), t.to_device(&Device::Cpu)?);
                Ok(())
            };
            put("theta", p.theta_now())?;
            put("m", p.m.as_tensor())?;
            put("v", p.v.as_tensor())?;
            if let Some(e) = &p.ema {
                put("ema", e.as_tensor())?;
            }
        }
        basin_lm::weights::save_safetensors(path, &tensors)
    }

    /// Restores θ, m, v and θ̄ saved by [`Self::save`], and puts θ into the model.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        let saved = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        self.load_into_model(Weights::Theta)?;
        for p in &self.params {
            let set = |kind: &str, var: &Var| -> Result<()> {
                let t = saved
                    .get(&format!("{kind}/{}", p.name))
                    .ok_or_else(|| anyhow!("{}: no {kind}/{}", path.display(), p.name))?;
                if t.shape() != var.shape() || t.dtype() != DType::F32 {
                    bail!(
                        "{}: {kind}/{} is {:?} {:?}; expected f32 {:?}",
                        path.display(),
                        p.name,
                        t.dtype(),
                        t.shape(),
                        var.shape()
                    );
                }
                Ok(var.set(&t.to_device(var.device())?)?)
            };
            set("theta", p.theta())?;
            set("m", &p.m)?;
            set("v", &p.v)?;
            if let Some(e) = &p.ema {
                set("ema", e)?;
            }
            if let Some(master) = &p.master {
                p.var.set(&master.as_tensor().to_dtype(p.var.dtype())?)?;
            }
        }
        Ok(())
    }
}
