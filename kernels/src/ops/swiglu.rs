//! The MLP's gate for training on the CPU, fused: y = silu(g) ⊙ u with silu(g) = g·σ(g),
//! and its backward
//!
//!   dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))),      du = dy ⊙ silu(g).
//!
//! Unfused, candle writes silu(g) and the product forward, and five [rows, intermediate]
//! tensors backward; fused it is one pass each way.

use crate::CHUNK;
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
