//! Causal attention of a training step, with grouped-query heads, forward and backward:
//!
//!   P = softmax(q·kᵀ/√d + bias),   y = P·v
//!   dP = dy·vᵀ,   dv = Pᵀ·dy,   dS = P ⊙ (dP − Σ dP ⊙ P)/√d,   dq = dS·k,   dk = dSᵀ·q
//!
//! q, k, v and y are head-major ([batch, heads, t, head_dim]); query head h reads key/value
//! head h / (heads / kv_heads), and the bias [batch, 1, t, t] (causal + padding) is shared
//! by a row's heads. The probabilities P are kept for the backward.
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
    let (t, hd, rep, scale) = (d.t, d.hd, d.rep(), d.scale());
    let mut p = vec![0f32; d.b * d.nh * t * t];
    let mut y = vec![0f32; q.len()];
    let (tt, th) = (View::new(t, t), View::new(t, hd));
    p.par_chunks_mut(t * t)
        .zip(y.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(i, (p, y))| {
            let b = i / d.nh;
            let kv = b * d.nkv + (i % d.nh) / rep;
            let (k, v) = (&k[kv * t * hd..][..t * hd], &v[kv * t * hd..][..t * hd]);
            let mut s = vec![0f32; t * t];
            let q = &q[i * t * hd..][..t * hd];
            matmul(&mut s, tt, q, th, k, th.t(), false, false);
            let bias = &bias[b * t * t..][..t * t];
            p.copy_from_slice(&softmax::forward(&s, bias, t, 1, t, scale));
            matmul(y, th, p, tt, v, th, false, false);
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

/// The GPU attention: cuBLAS's strided batched GEMMs and fused.cu's softmax.
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::Heads;
    use crate::cuda::{Dev, DevMut};
    use crate::ops::linear::cuda::matmul_batched;
    use crate::ops::linear::View;
    use crate::ops::softmax::cuda as softmax;
    use candle_core::{CudaDevice, Result};

    /// A group's products: (the group's query rows [rep·t, hd], its key/value head [t, hd],
    /// its scores [rep·t, t]) and their strides over the (batch row, key/value head) batch.
    fn shapes(d: Heads) -> ([View; 3], [usize; 3]) {
        let (g, t, hd) = (d.rep() * d.t, d.t, d.hd);
        (
            [View::new(g, hd), View::new(t, hd), View::new(g, t)],
            [g * hd, t * hd, g * t],
        )
    }

    /// [`super::forward`] into p [batch, heads, t, t] and y [batch, heads, t, hd].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        dev: &CudaDevice,
        q: Dev<f32>,
        k: Dev<f32>,
        v: Dev<f32>,
        bias: Dev<f32>,
        mut p: DevMut<f32>,
        y: DevMut<f32>,
        d: Heads,
    ) -> Result<()> {
        let ([qv, kv, sv], [sq, sk, ss]) = shapes(d);
        let batch = d.b * d.nkv;
        // SAFETY: the first product writes every score before the softmax reads them.
        let mut s = unsafe { dev.alloc::<f32>(d.b * d.nh * d.t * d.t) }?;
        let sm = DevMut::of(&mut s, dev);
        matmul_batched(dev, sm, sv, q, qv, k, kv.t(), false, batch, [ss, sq, sk])?;
        let rows = d.b * d.nh * d.t;
        let dims = [rows, d.t, d.nh, d.t];
        softmax::forward(dev, Dev::of(&s, dev), bias, p.reborrow(), dims, d.scale())?;
        let pr = p.as_dev();
        matmul_batched(dev, y, qv, pr, sv, v, kv, false, batch, [sq, ss, sk])
    }

    /// [`super::backward`] into dq, dk, dv (written).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        dev: &CudaDevice,
        dy: Dev<f32>,
        q: Dev<f32>,
        k: Dev<f32>,
        v: Dev<f32>,
        p: Dev<f32>,
        dq: DevMut<f32>,
        dk: DevMut<f32>,
        dv: DevMut<f32>,
        d: Heads,
    ) -> Result<()> {
        let ([qv, kv, sv], [sq, sk, ss]) = shapes(d);
        let batch = d.b * d.nkv;
        let n = d.b * d.nh * d.t * d.t;
        // SAFETY: dP and dS are written in full (a product, the softmax's backward) before
        // they are read.
        let mut dp = unsafe { dev.alloc::<f32>(n) }?;
        // dP = dy·vᵀ;  dv = Pᵀ·dy (the group's heads summed by the product itself).
        let m = DevMut::of(&mut dp, dev);
        matmul_batched(dev, m, sv, dy, qv, v, kv.t(), false, batch, [ss, sq, sk])?;
        matmul_batched(dev, dv, kv, p, sv.t(), dy, qv, false, batch, [sk, ss, sq])?;
        let mut ds = unsafe { dev.alloc::<f32>(n) }?;
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
