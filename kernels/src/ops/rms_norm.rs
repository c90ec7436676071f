//! RMSNorm for training on the CPU, fused: y = x · r · w with r = 1 / √(mean(x²) + ε) per
//! row, and its backward
//!
//!   dx = r · (dy ⊙ w) − x · r³ · Σⱼ(dyⱼ wⱼ xⱼ) / h,      dw = Σ_rows dy ⊙ x · r.
//!
//! Unfused, candle runs it as six elementwise ops forward and about twice as many backward,
//! each writing a [rows, hidden] tensor; fused it is one pass each way. The weight's
//! gradient is summed in chunks of [`ROWS_PER_TASK`] rows, then over the chunks in order,
//! so it has the same bits on every run.

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
    let mut dx = vec![0f32; x.len()];
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

/// The launchers of `rmsnorm_fwd` and `rmsnorm_bwd` (`cuda/pass.cu`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::ROWS_PER_TASK;
    use crate::cuda::{launch_pass, u32_arg, Act, Dev, DevMut};
    use crate::ops::rows::cuda::sum_parts;
    use candle_core::{CudaDevice, Result};

    /// [`super::forward`] over `rows` rows of `h`.
    pub fn forward<T: Act>(
        dev: &CudaDevice,
        x: Dev<T>,
        w: Dev<T>,
        y: DevMut<T>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let n = rows * h;
        let (x, w, y) = (
            x.at_least(n, "rmsnorm: x")?,
            w.at_least(h, "rmsnorm: weight")?,
            y.at_least(n, "rmsnorm: y")?,
        );
        let hh = u32_arg(h, "hidden size")?;
        if rows > 0 {
            launch_pass!(dev, T, "rmsnorm_fwd", (u32_arg(rows, "rows")?, 1); x, w, y, hh, eps);
        }
        Ok(())
    }

    /// [`super::backward`]: dx and dw (written, not added to).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        dy: Dev<T>,
        x: Dev<T>,
        w: Dev<T>,
        dx: DevMut<T>,
        dw: DevMut<T>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let n = rows * h;
        let chunks = rows.div_ceil(ROWS_PER_TASK);
        // SAFETY: rmsnorm_bwd zeroes each chunk's partial before adding into it.
        let mut part = unsafe { dev.alloc::<f32>((chunks * h).max(1)) }?;
        let (g, xs, ws, d) = (
            dy.at_least(n, "rmsnorm backward: dy")?,
            x.at_least(n, "rmsnorm backward: x")?,
            w.at_least(h, "rmsnorm backward: weight")?,
            dx.at_least(n, "rmsnorm backward: dx")?,
        );
        let p = DevMut::of(&mut part, dev).at_least(chunks * h, "partials")?;
        let (r, hh, per) = (
            u32_arg(rows, "rows")?,
            u32_arg(h, "hidden size")?,
            ROWS_PER_TASK as u32,
        );
        if chunks > 0 {
            launch_pass!(dev, T, "rmsnorm_bwd", (u32_arg(chunks, "chunks")?, 1); g, xs, ws, d, p, r, hh, per, eps);
        }
        sum_parts(dev, Dev::of(&part, dev), dw, chunks, h, false)
    }
}
