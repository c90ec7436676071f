//! Everything a run carries from step to step, on the host: f32 master weights θ, AdamW's
//! moments m and v, the EMA θ̄, the pre-trained θ₀ (for ‖θ−θ₀‖), and the gradient
//! accumulator. The model's variables get θ after every step.

use crate::config::TrainConfig;
use anyhow::{anyhow, bail, Context, Result};
use basin_kernels::adamw::{adamw_ema_step, adamw_step, StepScalars};
use candle_core::{backprop::GradStore, DType, Device, Shape, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

pub struct Param {
    pub name: String,
    pub var: Var,
    pub theta: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub ema: Option<Vec<f32>>,
    pub theta0: Vec<f32>,
    pub grad: Vec<f32>,
}

pub struct TrainState {
    /// Sorted by name: the same order on every run.
    pub params: Vec<Param>,
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
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
                let theta = host(var.as_tensor())?;
                let n = theta.len();
                Ok(Param {
                    name: name.clone(),
                    ema: ema.then(|| theta.clone()),
                    theta0: theta.clone(),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    grad: vec![0.0; n],
                    theta,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { params })
    }

    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.theta.len()).sum()
    }

    /// Adds one micro-batch's gradients to the accumulator.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for p in &mut self.params {
            let g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| anyhow!("no gradient for {}", p.name))?;
            for (acc, x) in p.grad.iter_mut().zip(host(g)?) {
                *acc += x;
            }
        }
        Ok(())
    }

    /// ‖g‖ over every parameter (f64 sum of squares).
    pub fn grad_norm(&self) -> f64 {
        self.params
            .iter()
            .flat_map(|p| &p.grad)
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// One optimizer step `t` (1-based) at learning rate `lr`: clip, AdamW, then (when due)
    /// the EMA blend and the feedback of θ̄ into θ; θ goes back into the model.
    pub fn step(&mut self, config: &TrainConfig, lr: f64, t: usize, grad_norm: f64) -> Result<()> {
        let clip = if config.grad_clip > 0.0 && grad_norm > config.grad_clip {
            (config.grad_clip / grad_norm) as f32
        } else {
            1.0
        };
        let scalars = StepScalars::new(&config.adamw(), lr, t as u64);
        let e = &config.ema;
        let blend_now = e.enabled && t > e.start && (t - e.start).is_multiple_of(e.every);
        let feedback_now = e.enabled && e.feedback_every > 0 && t.is_multiple_of(e.feedback_every);
        for p in &mut self.params {
            if clip != 1.0 {
                p.grad.iter_mut().for_each(|g| *g *= clip);
            }
            match (&mut p.ema, blend_now) {
                (Some(ema), true) => adamw_ema_step(
                    &mut p.theta,
                    &p.grad,
                    &mut p.m,
                    &mut p.v,
                    ema,
                    &scalars,
                    e.beta as f32,
                ),
                _ => adamw_step(&mut p.theta, &p.grad, &mut p.m, &mut p.v, &scalars),
            }
            if let (Some(ema), true) = (&p.ema, feedback_now) {
                p.theta.copy_from_slice(ema);
            }
            p.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        self.load_into_model(|p| &p.theta)
    }

    /// Sets the model's variables to `pick(param)` (θ, or θ̄ to evaluate the EMA).
    pub fn load_into_model(&self, pick: impl Fn(&Param) -> &Vec<f32>) -> Result<()> {
        for p in &self.params {
            let t = p.var.as_tensor();
            let values = Tensor::from_vec(pick(p).clone(), t.shape().clone(), t.device())?
                .to_dtype(t.dtype())?;
            p.var.set(&values)?;
        }
        Ok(())
    }

    /// ‖a − θ₀‖ over every parameter, for a = θ or θ̄.
    pub fn distance_from_start(&self, pick: impl Fn(&Param) -> Option<&Vec<f32>>) -> Option<f64> {
        let mut sum = 0.0;
        for p in &self.params {
            let a = pick(p)?;
            sum += a
                .iter()
                .zip(&p.theta0)
                .map(|(&x, &y)| ((x - y) as f64).powi(2))
                .sum::<f64>();
        }
        Some(sum.sqrt())
    }

    /// Writes θ, m, v and θ̄ as one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            let shape = p.var.as_tensor().shape().clone();
            let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), shape.clone(), &Device::Cpu);
            tensors.insert(format!("theta/{}", p.name), t(&p.theta)?);
            tensors.insert(format!("m/{}", p.name), t(&p.m)?);
            tensors.insert(format!("v/{}", p.name), t(&p.v)?);
            if let Some(e) = &p.ema {
                tensors.insert(format!("ema/{}", p.name), t(e)?);
            }
        }
        basin_lm::weights::save_safetensors(path, &tensors)
    }

    /// Restores θ, m, v and θ̄ saved by [`Self::save`], and puts θ into the model.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        let saved = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let get = |kind: &str, name: &str, shape: &Shape| -> Result<Vec<f32>> {
            let t = saved
                .get(&format!("{kind}/{name}"))
                .ok_or_else(|| anyhow!("{}: no {kind}/{name}", path.display()))?;
            if t.shape() != shape {
                bail!(
                    "{}: {kind}/{name} has shape {:?}, the model {:?}",
                    path.display(),
                    t.shape(),
                    shape
                );
            }
            host(t)
        };
        for p in &mut self.params {
            let shape = p.var.as_tensor().shape().clone();
            p.theta = get("theta", &p.name, &shape)?;
            p.m = get("m", &p.name, &shape)?;
            p.v = get("v", &p.name, &shape)?;
            if p.ema.is_some() {
                p.ema = Some(get("ema", &p.name, &shape)?);
            }
        }
        self.load_into_model(|p| &p.theta)
    }
}
