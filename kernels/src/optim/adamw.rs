//! AdamW (Loshchilov & Hutter 2019) as candle_nn::optim::AdamW computes it:
//!
//!   m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//!   m̂ = m / (1−β1^t)             v̂ = v / (1−β2^t)
//!   θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
//!
//! The bias corrections depend on the step only, so the host computes them once per step
//! ([`Step`]), as llm.c does.

use crate::optim::ema::blend;
use candle_core::{Tensor, Var};
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

/// One optimizer step, as the host computes it once and every update reads it: AdamW's
/// constants, the gradient scale of clipping and the EMA's weight. The CPU loops below and
/// the CUDA kernel (`Step` in `cuda/optim.cu`, passed by value) take this struct unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
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
    pub grad_scale: f32,
    /// 1 − β of the EMA when θ̄ is blended with the new θ in this step; 0: no blend.
    pub ema_weight: f32,
}

impl Step {
    /// AdamW's constants at step `t` (1-based) at `p.lr`: no clipping, no EMA blend.
    pub fn new(p: &AdamWParams, t: u64) -> Self {
        assert!(t >= 1, "AdamW steps count from 1");
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        Self {
            lr: p.lr as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            grad_scale: 1.0,
            ema_weight: 0.0,
        }
    }

    /// The same step with every gradient multiplied by `scale` first.
    pub fn with_grad_scale(self, scale: f32) -> Self {
        Self {
            grad_scale: scale,
            ..self
        }
    }

    /// The same step followed by θ̄ ← β·θ̄ + (1−β)·θ.
    pub fn with_ema(self, beta: f32) -> Self {
        Self {
            ema_weight: 1.0 - beta,
            ..self
        }
    }

    /// Whether this step blends the EMA.
    pub fn blends_ema(&self) -> bool {
        self.ema_weight != 0.0
    }
}

/// One parameter tensor's buffers for an AdamW step. Each state buffer is stored as the
/// run's `[state]` config says ([`crate::optim::bf16::Store`]): f32 (the default, and the
/// fast path), bf16 rounded to nearest (m, v), or a compensated bf16 pair (θ, θ̄).
pub struct AdamWTensors<'a> {
    /// θ: f32 master weights (the model's own variable when it computes in f32), or the
    /// model's bf16 weight when θ is kept as a pair with `theta_lo`.
    pub theta: &'a Var,
    /// The low bf16 half of θ = theta + theta_lo.
    pub theta_lo: Option<&'a Var>,
    /// ∂loss/∂θ, f32 or bf16.
    pub grad: &'a Tensor,
    /// AdamW's moments, f32 or bf16 (both the same).
    pub m: &'a Var,
    pub v: &'a Var,
    /// The EMA θ̄ (f32, or the high bf16 half with `ema_lo`), blended with the new θ in the
    /// same pass when given.
    pub ema: Option<&'a Var>,
    pub ema_lo: Option<&'a Var>,
    /// The model's bf16 copy of f32 master weights θ, rewritten from the new θ when given.
    pub param: Option<&'a Var>,
}

impl AdamWTensors<'_> {
    /// Whether every buffer is f32 (the fast path: one plain loop, 16-byte loads on a GPU).
    pub fn all_f32(&self) -> bool {
        use candle_core::DType::F32;
        self.theta_lo.is_none()
            && self.ema_lo.is_none()
            && self.theta.dtype() == F32
            && self.m.dtype() == F32
            && self.v.dtype() == F32
            && self.ema.is_none_or(|e| e.dtype() == F32)
    }
}

/// One element: returns the new θ and updates m, v.
#[inline(always)]
pub(crate) fn update(theta: f32, g: f32, m: &mut f32, v: &mut f32, s: &Step) -> f32 {
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
pub fn adamw_step(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &Step) {
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

/// The AdamW step followed by the EMA blend θ̄ ← θ̄ + w·(θ_new − θ̄), w = `s.ema_weight`
/// (= 1 − β), in one pass.
pub fn adamw_ema_step(
    theta: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    shadow: &mut [f32],
    s: &Step,
) {
    let n = theta.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n && shadow.len() == n,
        "adamw_ema_step: buffers differ in length"
    );
    let w = s.ema_weight;
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
