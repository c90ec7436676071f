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
