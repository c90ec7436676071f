//! The EMA kept in bf16, for pure-bf16 training (issue 22): three ways to store
//! θ̄ ← θ̄ + w·(θ − θ̄) (w = 1 − β) in 16-bit values, as CPU references.
//!
//! With β = 0.999 the EMA moves by 1e-3 of the gap to θ a step: usually below half a bf16
//! unit (bf16 keeps 8 significant bits), so rounding to nearest drops the step and θ̄ stays
//! where it is. Two ways keep the small steps:
//! - **compensated** (Kahan-style): a second bf16 holds what the first could not,
//!   θ̄ = hi + lo; each blend works on hi + lo in f32 and splits the result again. 16 bits
//!   of θ̄, 4 bytes a parameter, deterministic;
//! - **stochastic rounding**: round up with the probability of the fraction cut off, from a
//!   counter-based hash of (seed, step, index): unbiased, 2 bytes a parameter, noisy.
//!
//! `the_compensated_ema_tracks_the_f32_ema_and_rounding_to_nearest_does_not` measures the
//! three against the f32 EMA over 1,000 steps.
//!
//! The weights themselves have the same problem: an AdamW step at lr 2e-5 is below half a
//! bf16 unit of a weight of 0.02. [`adamw_mixed`] keeps θ as the same hi + lo pair (hi is
//! the model's bf16 weight; 4 bytes a parameter in place of bf16 weights plus f32 master
//! weights, 6) and applies the f32 step of [`crate::optim::adamw`] to hi + lo; m and v may
//! be f32 or bf16 ([`Store`]). `train`'s `[state]` config picks the stores.

use crate::optim::adamw::{update, Step};
use crate::optim::ema::blend;
use half::bf16;
use rayon::prelude::*;

/// The blend rounded to the nearest bf16: the baseline that loses small steps.
pub fn ema_blend_nearest(shadow: &mut [bf16], theta: &[bf16], beta: f32) {
    assert_eq!(
        shadow.len(),
        theta.len(),
        "ema_blend_nearest: lengths differ"
    );
    let w = 1.0 - beta;
    for (s, t) in shadow.iter_mut().zip(theta) {
        *s = bf16::from_f32(blend(s.to_f32(), t.to_f32(), w));
    }
}

/// x as hi + lo: hi the nearest bf16, lo the nearest bf16 to what is left.
#[inline(always)]
pub fn split(x: f32) -> (bf16, bf16) {
    let hi = bf16::from_f32(x);
    // x − hi is exact in f32: hi is x rounded, so they share all but its last bits.
    (hi, bf16::from_f32(x - hi.to_f32()))
}

/// The blend on θ̄ = hi + lo (`shadow`, `lo`), split again.
pub fn ema_blend_compensated(shadow: &mut [bf16], lo: &mut [bf16], theta: &[bf16], beta: f32) {
    assert!(
        shadow.len() == theta.len() && lo.len() == theta.len(),
        "ema_blend_compensated: lengths differ"
    );
    let w = 1.0 - beta;
    for ((s, l), t) in shadow.iter_mut().zip(lo.iter_mut()).zip(theta) {
        let x = s.to_f32() + l.to_f32();
        (*s, *l) = split(blend(x, t.to_f32(), w));
    }
}

/// One buffer of the optimizer's state, as it is stored: f32, bf16 rounded to nearest, or
/// a compensated pair θ = hi + lo of bf16 values (16 significant bits, 4 bytes).
pub enum Store<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    Pair(&'a mut [bf16], &'a mut [bf16]),
}

impl<'a> Store<'a> {
    pub fn len(&self) -> usize {
        match self {
            Store::F32(x) => x.len(),
            Store::Bf16(x) => x.len(),
            Store::Pair(hi, lo) => {
                assert_eq!(hi.len(), lo.len(), "a pair's halves differ in length");
                hi.len()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at `i`, in f32 (a pair's sum is exact: lo is below half a unit of hi).
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Store::F32(x) => x[i],
            Store::Bf16(x) => x[i].to_f32(),
            Store::Pair(hi, lo) => hi[i].to_f32() + lo[i].to_f32(),
        }
    }

    /// Stores `x` at `i`: as it is, rounded to the nearest bf16, or split into hi + lo.
    #[inline(always)]
    fn put(&mut self, i: usize, x: f32) {
        match self {
            Store::F32(s) => s[i] = x,
            Store::Bf16(s) => s[i] = bf16::from_f32(x),
            Store::Pair(hi, lo) => (hi[i], lo[i]) = split(x),
        }
    }

    /// The buffer cut into pieces of `n` elements, in order.
    fn pieces(self, n: usize) -> Vec<Store<'a>> {
        match self {
            Store::F32(x) => x.chunks_mut(n).map(Store::F32).collect(),
            Store::Bf16(x) => x.chunks_mut(n).map(Store::Bf16).collect(),
            Store::Pair(hi, lo) => hi
                .chunks_mut(n)
                .zip(lo.chunks_mut(n))
                .map(|(h, l)| Store::Pair(h, l))
                .collect(),
        }
    }
}

/// AdamW, then the EMA blend when the step has one, over buffers kept in any of the
/// [`Store`]s: each element is widened to f32, updated exactly as
/// [`crate::optim::adamw::adamw_ema_step`] updates it, and stored back (θ̄ is blended with
/// the new θ before θ is stored). With every buffer f32 the bits are those of
/// `adamw_step`/`adamw_ema_step`. `param`, when given, receives the new θ rounded to bf16
/// (the model's copy of f32 master weights). The CUDA kernel `adamw_mixed` does the same.
pub fn adamw_mixed(
    theta: Store,
    grad: &[f32],
    m: Store,
    v: Store,
    ema: Option<Store>,
    param: Option<&mut [bf16]>,
    s: &Step,
) {
    let n = theta.len();
    assert!(
        grad.len() == n
            && m.len() == n
            && v.len() == n
            && ema.as_ref().is_none_or(|e| e.len() == n)
            && param.as_ref().is_none_or(|p| p.len() == n),
        "adamw_mixed: buffers differ in length"
    );
    let ema = ema.filter(|_| s.blends_ema());
    let c = crate::CHUNK;
    let pieces = n.div_ceil(c);
    let emas: Vec<Option<Store>> = match ema {
        Some(e) => e.pieces(c).into_iter().map(Some).collect(),
        None => (0..pieces).map(|_| None).collect(),
    };
    let params: Vec<Option<&mut [bf16]>> = match param {
        Some(p) => p.chunks_mut(c).map(Some).collect(),
        None => (0..pieces).map(|_| None).collect(),
    };
    let work: Vec<_> = theta
        .pieces(c)
        .into_iter()
        .zip(grad.chunks(c))
        .zip(m.pieces(c))
        .zip(v.pieces(c))
        .zip(emas)
        .zip(params)
        .collect();
    work.into_par_iter()
        .for_each(|(((((mut t, g), mut m), mut v), mut e), mut p)| {
            crate::with_fma(|| {
                for i in 0..g.len() {
                    let (mut mi, mut vi) = (m.get(i), v.get(i));
                    let x = update(t.get(i), g[i], &mut mi, &mut vi, s);
                    m.put(i, mi);
                    v.put(i, vi);
                    if let Some(e) = &mut e {
                        let b = blend(e.get(i), x, s.ema_weight);
                        e.put(i, b);
                    }
                    if let Some(p) = &mut p {
                        p[i] = bf16::from_f32(x);
                    }
                    t.put(i, x);
                }
            })
        });
}

/// SplitMix64's finalizer: a counter-based hash, the same on any device.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// x rounded to a neighbouring bf16, up (in magnitude) with the probability of the cut-off
/// fraction, from the 16 random bits `r`.
#[inline(always)]
pub fn round_stochastic(x: f32, r: u16) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    // bf16 is the top half of an f32: adding r to the lower half carries into the top
    // half with probability (lower half)/2^16; the sign bit is left alone.
    let bits = x.to_bits().wrapping_add(u32::from(r)) & 0xffff_0000;
    bf16::from_bits((bits >> 16) as u16)
}

/// The blend, stochastically rounded; `key` (e.g. the step) and the index pick the bits.
pub fn ema_blend_stochastic(shadow: &mut [bf16], theta: &[bf16], beta: f32, seed: u64, key: u64) {
    assert_eq!(
        shadow.len(),
        theta.len(),
        "ema_blend_stochastic: lengths differ"
    );
    let w = 1.0 - beta;
    let base = mix(seed ^ mix(key));
    for (i, (s, t)) in shadow.iter_mut().zip(theta).enumerate() {
        let r = mix(base ^ i as u64) as u16;
        *s = round_stochastic(blend(s.to_f32(), t.to_f32(), w), r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_holds_sixteen_bits_and_a_zero_step_changes_nothing() {
        let x = 0.123_456_79_f32;
        let (hi, lo) = split(x);
        let err = (hi.to_f32() + lo.to_f32() - x).abs();
        assert!(err <= x * 2f32.powi(-16), "{err}");
        assert!((hi.to_f32() - x).abs() > err, "lo holds what hi could not");
        let (mut s, mut l) = (vec![hi], vec![lo]);
        ema_blend_compensated(&mut s, &mut l, &[bf16::from_f32(5.0)], 1.0);
        assert_eq!((s[0], l[0]), (hi, lo));
    }

    /// 1,000 AdamW steps at lr 2e-5 on weights of scale 0.02 with f32 master weights, and
    /// with θ kept as a compensated bf16 pair: the pair follows the f32 weights to < 1e-3 of
    /// their movement; bf16 weights updated in place (rounded to nearest) barely move.
    #[test]
    fn compensated_adamw_follows_f32_master_weights() {
        use crate::optim::adamw::{adamw_step, AdamWParams};
        let n = 4096;
        let start: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32(0.02 * ((i as f32 * 0.37).sin())))
            .collect();
        let mut master: Vec<f32> = start.iter().map(|x| x.to_f32()).collect();
        let (mut hi, mut lo) = (start.clone(), vec![bf16::ZERO; n]);
        let mut plain = start.clone();
        let zeros = || vec![0f32; n];
        let (mut m1, mut v1, mut m2, mut v2, mut m3, mut v3) =
            (zeros(), zeros(), zeros(), zeros(), zeros(), zeros());
        let p = AdamWParams::default();
        for t in 1..=1000u64 {
            let s = Step::new(&p, t);
            // A gradient that keeps its sign for a while per weight.
            let g: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.11 + t as f32 * 0.003).cos())
                .collect();
            adamw_step(&mut master, &g, &mut m1, &mut v1, &s);
            adamw_mixed(
                Store::Pair(&mut hi, &mut lo),
                &g,
                Store::F32(&mut m2),
                Store::F32(&mut v2),
                None,
                None,
                &s,
            );
            let mut x: Vec<f32> = plain.iter().map(|x| x.to_f32()).collect();
            adamw_step(&mut x, &g, &mut m3, &mut v3, &s);
            plain = x.iter().map(|&x| bf16::from_f32(x)).collect();
        }
        let norm = |f: &dyn Fn(usize) -> f32| -> f64 {
            (0..n).map(|i| f64::from(f(i)).powi(2)).sum::<f64>().sqrt()
        };
        let moved = norm(&|i| master[i] - start[i].to_f32());
        let e_pair = norm(&|i| hi[i].to_f32() + lo[i].to_f32() - master[i]) / moved;
        let e_plain = norm(&|i| plain[i].to_f32() - master[i]) / moved;
        eprintln!("AdamW in bf16 after 1000 steps, error relative to the f32 weights' movement: compensated {e_pair:.5}, rounded to nearest {e_plain:.3}");
        assert!(e_pair < 1e-3, "{e_pair}");
        assert!(e_plain > 0.5, "{e_plain}");
    }

    /// With every buffer f32, the mixed step is the f32 kernels' step, bit for bit; with
    /// m and v in bf16 they are those values rounded to nearest.
    #[test]
    fn the_mixed_step_on_f32_stores_is_the_f32_step() {
        use crate::optim::adamw::{adamw_ema_step, AdamWParams};
        let n = 3 * crate::CHUNK + 5;
        let vals = |k: f32, scale: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * k).sin() * scale).collect()
        };
        let s = Step::new(&AdamWParams::default(), 3)
            .with_grad_scale(0.5)
            .with_ema(0.99);
        let g = vals(0.3, 0.01);
        let (mut t1, mut m1, mut v1, mut e1) = (
            vals(0.1, 0.02),
            vals(0.2, 1e-3),
            vals(0.4, 1e-6),
            vals(0.5, 0.02),
        );
        for x in &mut v1 {
            *x = x.abs();
        }
        let (mut t2, mut m2, mut v2, mut e2) = (t1.clone(), m1.clone(), v1.clone(), e1.clone());
        let mut p = vec![bf16::ZERO; n];
        adamw_ema_step(&mut t1, &g, &mut m1, &mut v1, &mut e1, &s);
        adamw_mixed(
            Store::F32(&mut t2),
            &g,
            Store::F32(&mut m2),
            Store::F32(&mut v2),
            Some(Store::F32(&mut e2)),
            Some(&mut p),
            &s,
        );
        assert_eq!((&t1, &m1, &v1, &e1), (&t2, &m2, &v2, &e2));
        assert!(p.iter().zip(&t1).all(|(p, t)| *p == bf16::from_f32(*t)));
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() {
        // 1 + 1/4 of a bf16 unit at 1.0 (2^-7).
        let x = 1.0 + 0.25 * 2f32.powi(-7);
        let (down, up) = (1.0f32, 1.0 + 2f32.powi(-7));
        let n = 1 << 16;
        let mut sum = 0.0f64;
        for i in 0..n {
            let y = round_stochastic(x, mix(i) as u16).to_f32();
            assert!(y == down || y == up, "{y}");
            sum += f64::from(y);
        }
        let mean = sum / n as f64;
        assert!((mean - f64::from(x)).abs() < 2e-5, "{mean} vs {x}");
        // Negative values round in magnitude the same way.
        assert_eq!(round_stochastic(-x, 0).to_f32(), -down);
        assert_eq!(round_stochastic(-x, u16::MAX).to_f32(), -up);
        assert!(round_stochastic(f32::NAN, 7).is_nan());
    }

    /// θ drifts by 2e-5 a step (an AdamW step at lr 2e-5) from weights of scale 0.02, and is
    /// kept in bf16; its EMA (β = 0.999) is kept three ways in bf16 and once in f32 over the
    /// same bf16 θ. After 1,000 steps the error of each against the f32 EMA, relative to how
    /// far the f32 EMA moved: rounding to nearest loses most of the movement, stochastic
    /// rounding keeps it on average with noise, the compensated pair keeps it to < 1%.
    #[test]
    fn the_compensated_ema_tracks_the_f32_ema_and_rounding_to_nearest_does_not() {
        let n = 1 << 14;
        let (beta, steps) = (0.999f32, 1000u64);
        let mut state = 42u64;
        let mut uniform = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            (mix(state) >> 11) as f64 / (1u64 << 53) as f64
        };
        let theta0: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller: N(0, 0.02²).
                let (u, v) = (uniform().max(1e-300), uniform());
                (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let direction: Vec<f32> = (0..n)
            .map(|_| if uniform() < 0.5 { -1.0 } else { 1.0 })
            .collect();
        let mut theta: Vec<f32> = theta0.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let start: Vec<bf16> = theta.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut reference: Vec<f32> = start.iter().map(|x| x.to_f32()).collect();
        let (mut nearest, mut stochastic) = (start.clone(), start.clone());
        let (mut hi, mut lo) = (start.clone(), vec![bf16::ZERO; n]);
        for t in 1..=steps {
            for (x, d) in theta.iter_mut().zip(&direction) {
                // Drift plus noise, 2e-5 a step.
                *x += 2e-5 * (0.5 * d + if uniform() < 0.5 { -0.5 } else { 0.5 });
            }
            let theta_bf16: Vec<bf16> = theta.iter().map(|&x| bf16::from_f32(x)).collect();
            for (r, t) in reference.iter_mut().zip(&theta_bf16) {
                *r = blend(*r, t.to_f32(), 1.0 - beta);
            }
            ema_blend_nearest(&mut nearest, &theta_bf16, beta);
            ema_blend_stochastic(&mut stochastic, &theta_bf16, beta, 7, t);
            ema_blend_compensated(&mut hi, &mut lo, &theta_bf16, beta);
        }
        let moved: f64 = reference
            .iter()
            .zip(&start)
            .map(|(r, s)| f64::from(r - s.to_f32()).powi(2))
            .sum::<f64>()
            .sqrt();
        let error = |got: &dyn Fn(usize) -> f32| -> f64 {
            let e: f64 = (0..n)
                .map(|i| f64::from(got(i) - reference[i]).powi(2))
                .sum();
            e.sqrt() / moved
        };
        let e_nearest = error(&|i| nearest[i].to_f32());
        let e_stochastic = error(&|i| stochastic[i].to_f32());
        let e_compensated = error(&|i| hi[i].to_f32() + lo[i].to_f32());
        eprintln!(
            "EMA in bf16 after {steps} steps, error relative to the f32 EMA's movement: \
             nearest {e_nearest:.3}, stochastic {e_stochastic:.3}, compensated {e_compensated:.5}"
        );
        assert!(
            e_nearest > 0.5,
            "rounding to nearest should lose the small steps"
        );
        assert!(e_compensated < 0.01, "{e_compensated}");
        assert!(e_compensated < e_stochastic && e_stochastic < e_nearest);
    }
}
