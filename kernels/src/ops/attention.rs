//! Causal attention of a training step, with grouped-query heads, forward and backward:
//!
//!   P = softmax(q·kᵀ/√d + bias),   y = P·v
//!   dP = dy·vᵀ,   dv = Pᵀ·dy,   dS = P ⊙ (dP − Σ dP ⊙ P)/√d,   dq = dS·k,   dk = dSᵀ·q
//!
//! q, k, v and y are head-major ([batch, heads, t, head_dim]); query head h reads key/value
//! head h / (heads / kv_heads), and the bias [batch, 1, t, t] (causal + padding) is shared
//! by a row's heads. The probabilities P are kept for the backward.
//!
//! Decoding attends from t new queries to `keys` ≥ t keys held in a cache of `cap`
//! positions a head ([batch, kv heads, cap, head_dim], the first `keys` filled), under a
//! bias [batch, 1, t, keys]: [`forward_over`], the same products over longer keys.
//!
//! On the CPU each (batch row, head) is one task of small products (the gemm crate's) and
//! the fused softmax; on the GPU the query heads of one key/value head are one [rep·t,
//! head_dim] matrix, so each product is one strided batch of cuBLAS GEMMs over (batch row,
//! key/value head), and the softmax is fused.cu's.

use super::linear::{matmul, View};
use super::softmax;
use rayon::prelude::*;

/// The sizes of an attention: batch rows, query heads, key/value heads, time, head size.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    pub t: usize,
    pub hd: usize,
}

impl Heads {
    /// Query heads per key/value head.
    pub fn rep(&self) -> usize {
        self.nh / self.nkv
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// CPU reference of the forward: (P [batch, heads, t, t], y [batch, heads, t, hd]).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], d: Heads) -> (Vec<f32>, Vec<f32>) {
    forward_over(q, k, v, bias, d, d.t, d.t)
}

/// CPU reference of attention from t queries to the first `keys` of `cap` positions of each
/// key/value head (k, v: [batch, kv heads, cap, hd]) under bias [batch, 1, t, keys]:
/// (P [batch, heads, t, keys], y [batch, heads, t, hd]).
pub fn forward_over(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    d: Heads,
    keys: usize,
    cap: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (t, hd, rep, scale) = (d.t, d.hd, d.rep(), d.scale());
    let mut p = vec![0f32; d.b * d.nh * t * keys];
    let mut y = vec![0f32; q.len()];
    let (tk, th, kh) = (View::new(t, keys), View::new(t, hd), View::new(keys, hd));
    p.par_chunks_mut(t * keys)
        .zip(y.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(i, (p, y))| {
            let b = i / d.nh;
            let kv = b * d.nkv + (i % d.nh) / rep;
            let (k, v) = (
                &k[kv * cap * hd..][..keys * hd],
                &v[kv * cap * hd..][..keys * hd],
            );
            let mut s = vec![0f32; t * keys];
            let q = &q[i * t * hd..][..t * hd];
            matmul(&mut s, tk, q, th, k, kh.t(), false, false);
            let bias = &bias[b * t * keys..][..t * keys];
            p.copy_from_slice(&softmax::forward(&s, bias, keys, 1, t, scale));
            matmul(y, th, p, tk, v, kh, false, false);
        });
    (p, y)
}

/// CPU reference of the backward: (dq, dk, dv) from dy and the forward's q, k, v, P. One task
/// per (batch row, key/value head): it owns that head's dk and dv and its group's dq.
pub fn backward(
    dy: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    d: Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd, rep, scale) = (d.t, d.hd, d.rep(), d.scale());
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let (tt, th) = (View::new(t, t), View::new(t, hd));
    dk.par_chunks_mut(t * hd)
        .zip(dv.par_chunks_mut(t * hd))
        .zip(dq.par_chunks_mut(rep * t * hd))
        .enumerate()
        .for_each(|(j, ((dk, dv), dq))| {
            let (k, v) = (&k[j * t * hd..][..t * hd], &v[j * t * hd..][..t * hd]);
            let mut dp = vec![0f32; t * t];
            for (r, dq) in dq.chunks_mut(t * hd).enumerate() {
                let i = j * rep + r;
                let (q, dy) = (&q[i * t * hd..][..t * hd], &dy[i * t * hd..][..t * hd]);
                let p = &p[i * t * t..][..t * t];
                matmul(&mut dp, tt, dy, th, v, th.t(), false, false);
                matmul(dv, th, p, tt.t(), dy, th, r > 0, false);
                let ds = softmax::backward(&dp, p, t, scale);
                matmul(dq, th, &ds, tt, k, th, false, false);
                matmul(dk, th, &ds, tt.t(), q, th, r > 0, false);
            }
        });
    (dq, dk, dv)
}

/// Attention's products as strided batches over (batch row, key/value head), the GPU's
/// way: the rep query heads of a key/value head lie one after another head-major, so they
/// are one [rep·t, hd] matrix. The views of (that query group, its key/value head [t, hd],
/// the group's scores [rep·t, t]) and their strides (elements) from one batch entry to the
/// next; the batch has batch rows × key/value heads entries.
pub fn groups(d: Heads) -> ([View; 3], [usize; 3]) {
    groups_over(d, d.t, d.t)
}

/// [`groups`] for t queries over the first `keys` of `cap` cached positions a key/value
/// head: the key/value views are [keys, hd], cap · hd apart.
pub fn groups_over(d: Heads, keys: usize, cap: usize) -> ([View; 3], [usize; 3]) {
    let (g, hd) = (d.rep() * d.t, d.hd);
    (
        [View::new(g, hd), View::new(keys, hd), View::new(g, keys)],
        [g * hd, cap * hd, g * keys],
    )
}

/// The GPU attention: cuBLAS's strided batched GEMMs and fused.cu's softmax. The scores and
/// their gradients are kept as `T`, as the probabilities are (PyTorch's eager bf16 attention
/// keeps them so too).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{groups, groups_over, Heads};
    use crate::cuda::{Act, Dev, DevMut};
    use crate::ops::linear::cuda::matmul_batched;
    use crate::ops::softmax::cuda as softmax;
    use candle_core::{CudaDevice, Result};

    /// [`super::forward`] into p [batch, heads, t, t] and y [batch, heads, t, hd].
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Act>(
        dev: &CudaDevice,
        q: Dev<T>,
        k: Dev<T>,
        v: Dev<T>,
        bias: Dev<T>,
        p: DevMut<T>,
        y: DevMut<T>,
        d: Heads,
    ) -> Result<()> {
        forward_over(dev, q, k, v, bias, p, y, d, [d.t, d.t])
    }

    /// [`super::forward_over`] into p [batch, heads, t, keys] and y [batch, heads, t, hd];
    /// `over` = [keys, cap].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_over<T: Act>(
        dev: &CudaDevice,
        q: Dev<T>,
        k: Dev<T>,
        v: Dev<T>,
        bias: Dev<T>,
        mut p: DevMut<T>,
        y: DevMut<T>,
        d: Heads,
        over: [usize; 2],
    ) -> Result<()> {
        let [keys, cap] = over;
        if keys < d.t || keys > cap {
            candle_core::bail!(
                "attention: {keys} keys for {} queries in a cache of {cap}",
                d.t
            )
        }
        let ([qv, kv, sv], [sq, sk, ss]) = groups_over(d, keys, cap);
        let batch = d.b * d.nkv;
        // SAFETY: the first product writes every score before the softmax reads them.
        let mut s = unsafe { dev.alloc::<T>(d.b * d.nh * d.t * keys) }?;
        let sm = DevMut::of(&mut s, dev);
        matmul_batched(dev, sm, sv, q, qv, k, kv.t(), false, batch, [ss, sq, sk])?;
        let rows = d.b * d.nh * d.t;
        let dims = [rows, keys, d.nh, d.t];
        softmax::forward(dev, Dev::of(&s, dev), bias, p.reborrow(), dims, d.scale())?;
        let pr = p.as_dev();
        matmul_batched(dev, y, qv, pr, sv, v, kv, false, batch, [sq, ss, sk])
    }

    /// [`super::backward`] into dq, dk, dv (written).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        dy: Dev<T>,
        q: Dev<T>,
        k: Dev<T>,
        v: Dev<T>,
        p: Dev<T>,
        dq: DevMut<T>,
        dk: DevMut<T>,
        dv: DevMut<T>,
        d: Heads,
    ) -> Result<()> {
        let ([qv, kv, sv], [sq, sk, ss]) = groups(d);
        let batch = d.b * d.nkv;
        let n = d.b * d.nh * d.t * d.t;
        // SAFETY: dP and dS are written in full (a product, the softmax's backward) before
        // they are read.
        let mut dp = unsafe { dev.alloc::<T>(n) }?;
        // dP = dy·vᵀ;  dv = Pᵀ·dy (the group's heads summed by the product itself).
        let m = DevMut::of(&mut dp, dev);
        matmul_batched(dev, m, sv, dy, qv, v, kv.t(), false, batch, [ss, sq, sk])?;
        matmul_batched(dev, dv, kv, p, sv.t(), dy, qv, false, batch, [sk, ss, sq])?;
        let mut ds = unsafe { dev.alloc::<T>(n) }?;
        let dims = [d.b * d.nh * d.t, d.t];
        softmax::backward(
            dev,
            Dev::of(&dp, dev),
            p,
            DevMut::of(&mut ds, dev),
            dims,
            d.scale(),
        )?;
        // dq = dS·k;  dk = dSᵀ·q.
        let dsr = Dev::of(&ds, dev);
        matmul_batched(dev, dq, qv, dsr, sv, k, kv, false, batch, [sq, ss, sk])?;
        matmul_batched(dev, dk, kv, dsr, sv.t(), q, qv, false, batch, [sk, ss, sq])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dst_i (+)= a_i · b_i for each of `batch` entries at the strides given: the GPU's
    /// strided batch, on the CPU.
    #[allow(clippy::too_many_arguments)]
    fn batched(
        dst: &mut [f32],
        d: View,
        a: &[f32],
        av: View,
        b: &[f32],
        bv: View,
        batch: usize,
        s: [usize; 3],
    ) {
        for i in 0..batch {
            let (o, x, y) = (&mut dst[i * s[0]..], &a[i * s[1]..], &b[i * s[2]..]);
            matmul(o, d, x, av, y, bv, false, false);
        }
    }

    /// The GPU's grouped products (cuda::forward, cuda::backward: the same views, strides
    /// and order), run on the CPU with the CPU softmax, give the CPU attention: grouped
    /// queries (3 per key/value head), a padded row.
    #[test]
    fn grouped_products_are_the_per_head_attention() {
        let d = Heads {
            b: 2,
            nh: 6,
            nkv: 2,
            t: 5,
            hd: 4,
        };
        let val = |n: usize, seed: f32| {
            (0..n)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect::<Vec<f32>>()
        };
        let (qn, kn) = (d.b * d.nh * d.t * d.hd, d.b * d.nkv * d.t * d.hd);
        let (q, k, v, dy) = (val(qn, 1.0), val(kn, 2.0), val(kn, 3.0), val(qn, 4.0));
        let mut bias = Vec::new();
        for row in 0..d.b {
            for i in 0..d.t {
                for j in 0..d.t {
                    bias.push(if j <= i && !(row == 1 && j >= 3) {
                        0.0
                    } else {
                        -1e9
                    });
                }
            }
        }
        let ([qv, kv, sv], [sq, sk, ss]) = groups(d);
        let batch = d.b * d.nkv;
        let n = d.b * d.nh * d.t * d.t;
        // Forward: S = q·kᵀ, P = softmax, y = P·v.
        let mut s = vec![0f32; n];
        batched(&mut s, sv, &q, qv, &k, kv.t(), batch, [ss, sq, sk]);
        let p = softmax::forward(&s, &bias, d.t, d.nh, d.t, d.scale());
        let mut y = vec![0f32; qn];
        batched(&mut y, qv, &p, sv, &v, kv, batch, [sq, ss, sk]);
        let (cp, cy) = forward(&q, &k, &v, &bias, d);
        let close = |what: &str, a: &[f32], b: &[f32]| {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{what}: {worst}");
        };
        close("P", &p, &cp);
        close("y", &y, &cy);
        // Backward: dP = dy·vᵀ, dv = Pᵀ·dy, dS, dq = dS·k, dk = dSᵀ·q.
        let mut dp = vec![0f32; n];
        batched(&mut dp, sv, &dy, qv, &v, kv.t(), batch, [ss, sq, sk]);
        let mut dv = vec![0f32; kn];
        batched(&mut dv, kv, &p, sv.t(), &dy, qv, batch, [sk, ss, sq]);
        let ds = softmax::backward(&dp, &p, d.t, d.scale());
        let mut dq = vec![0f32; qn];
        batched(&mut dq, qv, &ds, sv, &k, kv, batch, [sq, ss, sk]);
        let mut dk = vec![0f32; kn];
        batched(&mut dk, kv, &ds, sv.t(), &q, qv, batch, [sk, ss, sq]);
        let (cdq, cdk, cdv) = backward(&dy, &q, &k, &v, &cp, d);
        close("dq", &dq, &cdq);
        close("dk", &dk, &cdk);
        close("dv", &dv, &cdv);
    }

    /// Attention over a cache (decoding): 3 new queries over 7 of 9 cached positions, a
    /// padded row. The GPU's grouped products over the cache's strides, on the CPU, and
    /// forward_over, against the plain per-query loop; the positions past `keys` (NaN
    /// here) are never read.
    #[test]
    fn attention_over_a_cache_reads_its_first_keys() {
        let d = Heads {
            b: 2,
            nh: 4,
            nkv: 2,
            t: 3,
            hd: 4,
        };
        let (keys, cap) = (7, 9);
        let val = |n: usize, seed: f32| {
            (0..n)
                .map(|i| (i as f32 * 0.53 + seed).sin())
                .collect::<Vec<f32>>()
        };
        let qn = d.b * d.nh * d.t * d.hd;
        let cache = |seed| {
            let mut c = val(d.b * d.nkv * cap * d.hd, seed);
            for (i, x) in c.iter_mut().enumerate() {
                if (i / d.hd) % cap >= keys {
                    *x = f32::NAN;
                }
            }
            c
        };
        let (q, k, v) = (val(qn, 1.0), cache(2.0), cache(3.0));
        // Row 1's first two positions are padding; query i sees keys up to keys - t + i.
        let mut bias = Vec::new();
        for row in 0..d.b {
            for i in 0..d.t {
                for j in 0..keys {
                    let ok = j <= keys - d.t + i && !(row == 1 && j < 2);
                    bias.push(if ok { 0.0 } else { -1e9 });
                }
            }
        }
        let (cp, cy) = forward_over(&q, &k, &v, &bias, d, keys, cap);
        // The plain loop.
        let mut want = vec![0f32; qn];
        for b in 0..d.b {
            for h in 0..d.nh {
                let kv = b * d.nkv + h / d.rep();
                for i in 0..d.t {
                    let qi = &q[((b * d.nh + h) * d.t + i) * d.hd..][..d.hd];
                    let s: Vec<f32> = (0..keys)
                        .map(|j| {
                            let kj = &k[(kv * cap + j) * d.hd..][..d.hd];
                            let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                            dot * d.scale() + bias[(b * d.t + i) * keys + j]
                        })
                        .collect();
                    let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let y = &mut want[((b * d.nh + h) * d.t + i) * d.hd..][..d.hd];
                    for (j, ej) in e.iter().enumerate() {
                        for (y, vj) in y.iter_mut().zip(&v[(kv * cap + j) * d.hd..][..d.hd]) {
                            *y += ej / sum * vj;
                        }
                    }
                }
            }
        }
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            worst(&cy, &want) < 1e-5,
            "forward_over: {}",
            worst(&cy, &want)
        );
        // The GPU's products: S = q·kᵀ and y = P·v as strided batches over the cache.
        let ([qv, kv, sv], [sq, sk, ss]) = groups_over(d, keys, cap);
        let batch = d.b * d.nkv;
        let mut s = vec![0f32; d.b * d.nh * d.t * keys];
        batched(&mut s, sv, &q, qv, &k, kv.t(), batch, [ss, sq, sk]);
        let p = softmax::forward(&s, &bias, keys, d.nh, d.t, d.scale());
        let mut y = vec![0f32; qn];
        batched(&mut y, qv, &p, sv, &v, kv, batch, [sq, ss, sk]);
        assert!(worst(&p, &cp) < 1e-6, "P: {}", worst(&p, &cp));
        assert!(worst(&y, &want) < 1e-5, "grouped: {}", worst(&y, &want));
    }
}
