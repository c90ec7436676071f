//! The EMA of the weights in parameter space (the paper's method):
//!
//!   θ̄_0 = θ_pre,   θ̄_t = β·θ̄_{t−1} + (1−β)·θ_t
//!
//! written as θ̄ + (1−β)(θ − θ̄): with β close to 1 the increment is small, and adding it to
//! θ̄ keeps θ̄'s precision (θ̄ is kept in f32 because a 1e-3 step is below bf16 resolution).

use rayon::prelude::*;

/// θ̄ ← β·θ̄ + (1−β)·θ, elementwise, in place.
pub fn ema_blend(shadow: &mut [f32], theta: &[f32], beta: f32) {
    assert_eq!(
        shadow.len(),
        theta.len(),
        "ema_blend: shadow and weights differ in length"
    );
    let w = 1.0 - beta;
    shadow
        .par_chunks_mut(crate::CHUNK)
        .zip(theta.par_chunks(crate::CHUNK))
        .for_each(|(s, t)| {
            crate::with_fma(|| {
                for (s, &t) in s.iter_mut().zip(t) {
                    *s = blend(*s, t, w);
                }
            })
        });
}

/// s + w·(t − s), as one fused multiply-add.
#[inline(always)]
pub(crate) fn blend(s: f32, t: f32, w: f32) -> f32 {
    w.mul_add(t - s, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_closed_form() {
        let theta = [1.0f32, -2.0, 3.5];
        let mut s = [0.5f32, 0.5, 0.5];
        ema_blend(&mut s, &theta, 1.0);
        assert_eq!(s, [0.5, 0.5, 0.5], "beta = 1 keeps the anchor");
        ema_blend(&mut s, &theta, 0.0);
        assert_eq!(s, theta, "beta = 0 copies the weights");
        // Constant weights: after k steps θ̄ = θ + β^k (θ̄_0 − θ).
        let (beta, k) = (0.9f32, 25);
        let mut s = [0.0f32; 3];
        for _ in 0..k {
            ema_blend(&mut s, &theta, beta);
        }
        for (got, t) in s.iter().zip(theta) {
            let want = t as f64 * (1.0 - (beta as f64).powi(k));
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn large_buffers_split_across_threads_give_the_same_result() {
        let n = 3 * crate::CHUNK + 17;
        let theta: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let mut a: Vec<f32> = (0..n).map(|i| (i as f32).cos()).collect();
        let mut b = a.clone();
        ema_blend(&mut a, &theta, 0.99);
        for (s, &t) in b.iter_mut().zip(&theta) {
            *s = blend(*s, t, 1.0 - 0.99);
        }
        assert_eq!(a, b);
    }
}
