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

/// CPU reference of the backward pass: (dg, du) from dy, g, u.
pub fn backward(dy: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = g.len();
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
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
    (dg, du)
}

/// The launchers of `swiglu_fwd` and `swiglu_bwd` (`cuda/pass.cu`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use crate::cuda::{blocks_for, launch_pass, Act, Dev, DevMut};
    use candle_core::{CudaDevice, Result};

    /// [`super::forward`] over `n` values.
    pub fn forward<T: Act>(
        dev: &CudaDevice,
        g: Dev<T>,
        u: Dev<T>,
        y: DevMut<T>,
        n: usize,
    ) -> Result<()> {
        let (g, u, y) = (
            g.at_least(n, "swiglu: g")?,
            u.at_least(n, "swiglu: u")?,
            y.at_least(n, "swiglu: y")?,
        );
        let n64 = n as u64;
        if n > 0 {
            launch_pass!(dev, T, "swiglu_fwd", (blocks_for(n)?, 1); g, u, y, n64);
        }
        Ok(())
    }

    /// [`super::backward`], dg and du into their own buffers.
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        dy: Dev<T>,
        g: Dev<T>,
        u: Dev<T>,
        dg: DevMut<T>,
        du: DevMut<T>,
        n: usize,
    ) -> Result<()> {
        let (d, g, u) = (
            dy.at_least(n, "swiglu backward: dy")?,
            g.at_least(n, "swiglu backward: g")?,
            u.at_least(n, "swiglu backward: u")?,
        );
        let (dg, du) = (
            dg.at_least(n, "swiglu backward: dg")?,
            du.at_least(n, "swiglu backward: du")?,
        );
        let n64 = n as u64;
        if n > 0 {
            launch_pass!(dev, T, "swiglu_bwd", (blocks_for(n)?, 1); d, g, u, dg, du, n64);
        }
        Ok(())
    }
}
