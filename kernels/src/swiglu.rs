//! The MLP's gate for training on the CPU, fused: y = silu(g) ⊙ u with silu(g) = g·σ(g),
//! and its backward
//!
//!   dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))),      du = dy ⊙ silu(g).
//!
//! Unfused, candle writes silu(g) and the product forward, and five [rows, intermediate]
//! tensors backward; fused it is one pass each way.

use crate::CHUNK;
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// CPU reference of the forward pass.
pub fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
    y
}

/// CPU reference of the backward pass: [dg, du] (dg's n values, then du's) from dy, g, u.
pub fn backward(dy: &[f32], g: &[f32], u: &[f32]) -> Vec<f32> {
    let n = g.len();
    let mut out = vec![0f32; 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            dy.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (dy, (g, u)))| {
            for i in 0..dg.len() {
                let s = sigmoid(g[i]);
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = dy[i] * g[i] * s;
            }
        });
    out
}

/// silu(g) ⊙ u for f32 tensors of one shape on the CPU, with gradients for both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("swiglu: gate {:?} and up {:?} differ", g.dims(), u.dims())
    }
    if g.dtype() != DType::F32 || u.dtype() != DType::F32 {
        bail!("swiglu: expected f32 inputs")
    }
    let fwd = |g: &[f32], lg: &Layout, u: &[f32], _: &Layout| (forward(g, u), lg.shape().clone());
    let bwd = |g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor| {
        // One op writes [2, n]: dg, then du.
        let both = crate::cpu_op3("swiglu-backward", dy, g, u, |dy, g, u| {
            (backward(dy, g, u), Shape::from((2, g.len())))
        })?;
        let dg = both.get(0)?.reshape(g.shape())?;
        let du = both.get(1)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    };
    crate::cpu_op2("swiglu", g, u, fwd, bwd)
}
