//! AdamW (Loshchilov & Hutter 2019) as candle_nn::optim::AdamW computes it:
//!
//!   m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//!   m̂ = m / (1−β1^t)             v̂ = v / (1−β2^t)
//!   θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
//!
//! The bias corrections depend on the step only, so the host computes them once per step
//! ([`StepScalars`]), as llm.c does.

use crate::ema::blend;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// The paper's setting for full fine-tuning (Qi et al. 2023): lr 2e-5, no weight decay.
    fn default() -> Self {
        Self {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The per-step constants of the update, computed on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − lr·λ
    pub decay: f32,
    /// 1 / (1 − β1^t)
    pub scale_m: f32,
    /// 1 / (1 − β2^t)
    pub scale_v: f32,
    /// Multiplies every gradient first (gradient clipping); 1 leaves them untouched.
    /// `MultiTensor::adamw_step` sets it from its `StepOptions`.
    pub grad_scale: f32,
}

impl StepScalars {
    /// The constants of step `t` (1-based) at learning rate `lr`.
    pub fn new(p: &AdamWParams, lr: f64, t: u64) -> Self {
        assert!(t >= 1, "AdamW steps count from 1");
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        Self {
            lr: lr as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            decay: (1.0 - lr * p.weight_decay) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            grad_scale: 1.0,
        }
    }
}

/// One element: returns the new θ and updates m, v.
#[inline(always)]
fn update(theta: f32, g: f32, m: &mut f32, v: &mut f32, s: &StepScalars) -> f32 {
    // Scaled only when clipping, as the CUDA kernel does (the same bits either way).
    let g = if s.grad_scale == 1.0 {
        g
    } else {
        g * s.grad_scale
    };
    *m = blend(g, *m, s.beta1); // β1·m + (1−β1)·g
    *v = blend(g * g, *v, s.beta2); // β2·v + (1−β2)·g²
    let m_hat = *m * s.scale_m;
    let v_hat = *v * s.scale_v;
    theta * s.decay - s.lr * (m_hat / (v_hat.sqrt() + s.eps))
}

/// θ, m, v ← AdamW(θ, g, m, v), elementwise, in place.
pub fn adamw_step(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    let n = theta.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n,
        "adamw_step: buffers differ in length"
    );
    theta
        .par_chunks_mut(crate::CHUNK)
        .zip(grad.par_chunks(crate::CHUNK))
        .zip(m.par_chunks_mut(crate::CHUNK))
        .zip(v.par_chunks_mut(crate::CHUNK))
        .for_each(|(((t, g), m), v)| {
            crate::with_fma(|| {
                for i in 0..t.len() {
                    t[i] = update(t[i], g[i], &mut m[i], &mut v[i], s);
                }
            })
        });
}

/// The AdamW step followed by the EMA blend θ̄ ← β·θ̄ + (1−β)·θ_new, in one pass.
pub fn adamw_ema_step(
    theta: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    shadow: &mut [f32],
    s: &StepScalars,
    ema_beta: f32,
) {
    let n = theta.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n && shadow.len() == n,
        "adamw_ema_step: buffers differ in length"
    );
    let w = 1.0 - ema_beta;
    theta
        .par_chunks_mut(crate::CHUNK)
        .zip(grad.par_chunks(crate::CHUNK))
        .zip(m.par_chunks_mut(crate::CHUNK))
        .zip(v.par_chunks_mut(crate::CHUNK))
        .zip(shadow.par_chunks_mut(crate::CHUNK))
        .for_each(|((((t, g), m), v), sh)| {
            crate::with_fma(|| {
                for i in 0..t.len() {
                    t[i] = update(t[i], g[i], &mut m[i], &mut v[i], s);
                    sh[i] = blend(sh[i], t[i], w);
                }
            })
        });
}
