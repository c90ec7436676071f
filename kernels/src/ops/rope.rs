//! Rotary position embedding for training on the CPU, fused, in the half-split layout:
//! with x = [x₁, x₂] (the two halves of a head),
//!
//!   y₁ = x₁·cos − x₂·sin,      y₂ = x₂·cos + x₁·sin.
//!
//! A rotation's transpose is the rotation by the opposite angle, so the backward is the same
//! pass with −sin. Unfused, candle builds rotate_half(x) from two narrows, a negation and a
//! concatenation, then two products and a sum, forward and backward.

use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 64;

/// CPU reference: rotates each row of `x` [batch, heads, time, head_dim] by its angles,
/// `cos`/`sin` [batch, time, head_dim / 2]; `sign` −1 rotates back (the backward).
pub fn rotate(x: &[f32], cos: &[f32], sin: &[f32], dims: [usize; 4], sign: f32) -> Vec<f32> {
    let [_, heads, t, hd] = dims;
    let half = hd / 2;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(hd * ROWS_PER_TASK)
        .zip(x.par_chunks(hd * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (y, x))| {
            for (i, (y, x)) in y.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                // Row r is (batch, head, position); its angles are row (batch, position).
                let a = (r / (heads * t)) * t + r % t;
                rotate_row(
                    y,
                    x,
                    &cos[a * half..][..half],
                    &sin[a * half..][..half],
                    sign,
                );
            }
        });
    y
}

/// One head's vector: y = x rotated by the angles whose cosines and sines are `c` and `s`
/// (half a head each), backwards when `sign` is -1.
pub fn rotate_row(y: &mut [f32], x: &[f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for j in 0..half {
        let sj = sign * s[j];
        y1[j] = x1[j] * c[j] - x2[j] * sj;
        y2[j] = x2[j] * c[j] + x1[j] * sj;
    }
}

/// RoPE's angles for a layout change: each row's cos and sin ([rows, head_dim / 2]) and the
/// direction (1 forward, −1 to rotate a gradient back).
pub type Angles<'a> = (&'a [f32], &'a [f32], f32);

/// One head's vector of row `row` copied to `dst`, rotated by the row's angles when given.
fn place_head(dst: &mut [f32], src: &[f32], row: usize, rope: Option<Angles>) {
    match rope {
        None => dst.copy_from_slice(src),
        Some((cos, sin, sign)) => {
            let half = src.len() / 2;
            let (c, s) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            rotate_row(dst, src, c, s, sign)
        }
    }
}

/// CPU reference of attention's layout change: x [rows, heads·hd] (rows = batch × t) →
/// [batch, heads, t, hd], each head rotated by its row's angles when `rope` is given.
pub fn to_heads(x: &[f32], t: usize, heads: usize, hd: usize, rope: Option<Angles>) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (b, head) = (bh / heads, bh % heads);
        for (i, dst) in o.chunks_mut(hd).enumerate() {
            let row = b * t + i;
            place_head(dst, &x[(row * heads + head) * hd..][..hd], row, rope);
        }
    });
    out
}

/// CPU reference of the way back: [batch, heads, t, hd] → [rows, heads·hd], rotating when
/// `rope` is given.
pub fn from_heads(xh: &[f32], t: usize, heads: usize, hd: usize, rope: Option<Angles>) -> Vec<f32> {
    let mut out = vec![0f32; xh.len()];
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(row, o)| {
            let (b, i) = (row / t, row % t);
            for (head, dst) in o.chunks_mut(hd).enumerate() {
                place_head(
                    dst,
                    &xh[((b * heads + head) * t + i) * hd..][..hd],
                    row,
                    rope,
                );
            }
        });
    out
}

/// The launcher of `heads` (`cuda/pass.cu`): [`to_heads`], or [`from_heads`] when
/// `inverse`.
#[cfg(feature = "cuda")]
pub mod cuda {
    use crate::cuda::{blocks_for, launch_pass, u32_arg, Act, Dev, DevMut};
    use candle_core::{bail, CudaDevice, Result};

    /// RoPE's angles on the device: cos, sin ([rows, head_dim / 2]) and the direction.
    pub type Angles<'a, T> = (Dev<'a, T>, Dev<'a, T>, f32);

    /// `rows` rows (batch × `t`) of `heads` heads of `hd` values from x to y.
    #[allow(clippy::too_many_arguments)]
    pub fn heads<T: Act>(
        dev: &CudaDevice,
        x: Dev<T>,
        rope: Option<Angles<T>>,
        y: DevMut<T>,
        rows: usize,
        t: usize,
        nheads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        if !hd.is_multiple_of(2) || t == 0 || !rows.is_multiple_of(t) {
            bail!("heads: head size {hd} must be even and rows {rows} a multiple of t {t}")
        }
        let n = rows * nheads * hd;
        let (xs, ys) = (x.at_least(n, "heads: x")?, y.at_least(n, "heads: y")?);
        let (cos, sin, sign) = match rope {
            Some((c, s, sign)) => (
                c.at_least(rows * hd / 2, "heads: cos")?,
                s.at_least(rows * hd / 2, "heads: sin")?,
                sign,
            ),
            // A null cos is the kernel's "copy without rotating".
            None => (0u64, 0u64, 1.0f32),
        };
        let (r, tt, h, d, inv) = (
            u32_arg(rows, "rows")?,
            u32_arg(t, "time")?,
            u32_arg(nheads, "heads")?,
            u32_arg(hd, "head size")?,
            inverse as u32,
        );
        if n > 0 {
            launch_pass!(dev, T, "heads", (blocks_for(n / 2)?, 1); xs, cos, sin, ys, r, tt, h, d, sign, inv);
        }
        Ok(())
    }
}
