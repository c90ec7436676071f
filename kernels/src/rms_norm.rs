//! RMSNorm for training on the CPU, fused: y = x · r · w with r = 1 / √(mean(x²) + ε) per
//! row, and its backward
//!
//!   dx = r · (dy ⊙ w) − x · r³ · Σⱼ(dyⱼ wⱼ xⱼ) / h,      dw = Σ_rows dy ⊙ x · r.
//!
//! Unfused, candle runs it as six elementwise ops forward and about twice as many backward,
//! each writing a [rows, hidden] tensor; fused it is one pass each way. The weight's
//! gradient is summed in chunks of [`ROWS_PER_TASK`] rows, then over the chunks in order,
//! so it has the same bits on every run.

use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per rayon task, and per partial sum of the weight's gradient.
pub const ROWS_PER_TASK: usize = 32;

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// CPU reference of the forward pass over rows of `w.len()` values.
pub fn forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
                let r = inv_rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            }
        });
    y
}

/// CPU reference of the backward pass: (dx, dw) from dy and the forward's inputs.
pub fn backward(dy: &[f32], x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    // Room for dw after dx: the backward op returns both in one buffer without a copy.
    let mut dx = Vec::with_capacity(x.len() + h);
    dx.resize(x.len(), 0f32);
    let partial_dw: Vec<Vec<f32>> = dx
        .par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .zip(dy.par_chunks(h * ROWS_PER_TASK))
        .map(|((dx, x), dy)| {
            let mut dw = vec![0f32; h];
            for ((dx, x), dy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
                let r = inv_rms(x, eps);
                let s: f32 = dy.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = r * r * r * s / h as f32;
                for j in 0..h {
                    dx[j] = r * dy[j] * w[j] - x[j] * c;
                    dw[j] += dy[j] * x[j] * r;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; h];
    for p in &partial_dw {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

/// RMSNorm over the last dimension of `x` [.., hidden] with weight `w` [hidden], f32 on the
/// CPU, with gradients for both.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [h] {
        bail!("rms_norm: weight {:?}, expected [{h}]", w.dims())
    }
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        bail!("rms_norm: expected f32 input and weight")
    }
    let eps = eps as f32;
    let fwd = move |x: &[f32], lx: &Layout, w: &[f32], _: &Layout| {
        (forward(x, w, eps), lx.shape().clone())
    };
    let bwd = move |x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor| {
        // One op writes [rows + 1, hidden]: dx, then dw as the last row.
        let h = w.dim(0)?;
        let rows = x.elem_count() / h;
        let both = crate::cpu_op3("rms-norm-backward", dy, x, w, move |dy, x, w| {
            let (mut dx, dw) = backward(dy, x, w, eps);
            dx.extend_from_slice(&dw);
            (dx, Shape::from((rows + 1, w.len())))
        })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw)))
    };
    crate::cpu_op2("rms-norm", x, w, fwd, bwd)
}
