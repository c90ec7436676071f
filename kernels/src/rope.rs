//! Rotary position embedding for training on the CPU, fused, in the half-split layout:
//! with x = [x₁, x₂] (the two halves of a head),
//!
//!   y₁ = x₁·cos − x₂·sin,      y₂ = x₂·cos + x₁·sin.
//!
//! A rotation's transpose is the rotation by the opposite angle, so the backward is the same
//! pass with −sin. Unfused, candle builds rotate_half(x) from two narrows, a negation and a
//! concatenation, then two products and a sum, forward and backward.

use crate::cpu_slice;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
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
                let (c, s) = (&cos[a * half..][..half], &sin[a * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for j in 0..half {
                    let sj = sign * s[j];
                    y1[j] = x1[j] * c[j] - x2[j] * sj;
                    y2[j] = x2[j] * c[j] + x1[j] * sj;
                }
            }
        });
    y
}

/// RoPE of `x` [batch, heads, time, head_dim] with per-row angles `cos`/`sin` [batch, time,
/// head_dim / 2], f32 on the CPU, with the gradient for `x` (the angles are constants).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    if hd % 2 != 0 || cos.dims() != [b, t, hd / 2] || sin.dims() != cos.dims() {
        bail!(
            "rope: x {:?} needs an even head size and angles [{b}, {t}, {}]; got cos {:?}, sin {:?}",
            x.dims(),
            hd / 2,
            cos.dims(),
            sin.dims()
        )
    }
    if [x, cos, sin].iter().any(|t| t.dtype() != DType::F32) {
        bail!("rope: expected f32 inputs")
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { sign: 1.0 })
}

struct Rope {
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims();
        let y = rotate(
            cpu_slice(s1, l1)?,
            cpu_slice(s2, l2)?,
            cpu_slice(s3, l3)?,
            [d[0], d[1], d[2], d[3]],
            self.sign,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope { sign: -self.sign };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}
