//! The written-out pass's CPU backend: the gemm crate's products
//! ([`basin_kernels::ops::linear`]) and basin_kernels' row functions on `Vec<f32>`s, each
//! parallel over rayon's threads.

use super::{Backend, Held};
use anyhow::Result;
use basin_kernels::ops::attention::{self, Heads};
use basin_kernels::ops::embedding::{self, Lookups};
use basin_kernels::ops::linear::{matmul, View};
use basin_kernels::ops::{cross_entropy, rms_norm, rope, rows, swiglu};
use candle_core::Tensor;

pub(crate) struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Lookups = Lookups;
    type Src<'a> = &'a [f32];

    fn src<'a>(&'a self, b: &'a Vec<f32>) -> &'a [f32] {
        b
    }

    fn weight<'a>(&'a self, h: &'a Held<'_>) -> Result<&'a [f32]> {
        h.values()
    }

    fn ids(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }

    fn lookups(&self, l: Lookups) -> Result<Lookups> {
        Ok(l)
    }

    fn copy_of(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn tensor_of(&self, b: Vec<f32>, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(b, like.shape(), like.device())?)
    }

    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        rows: usize,
        d_in: usize,
        out: usize,
    ) -> Result<Vec<f32>> {
        Ok(basin_kernels::ops::linear::forward(x, w, rows, d_in, out))
    }

    fn matmul(
        &self,
        dst: &mut Vec<f32>,
        d: View,
        a: &[f32],
        av: View,
        b: &[f32],
        bv: View,
        accumulate: bool,
    ) -> Result<()> {
        matmul(dst, d, a, av, b, bv, accumulate, true);
        Ok(())
    }

    fn output(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; n])
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; n])
    }

    fn copy_buf(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(x[..n].to_vec())
    }

    fn add_bias(&self, y: &mut Vec<f32>, b: &[f32], rows: usize, cols: usize) -> Result<()> {
        rows::add_bias(&mut y[..rows * cols], b);
        Ok(())
    }

    fn col_sum(&self, x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
        Ok(rows::col_sum(&x[..rows * cols], cols))
    }

    fn add_into(&self, acc: &mut Vec<f32>, x: &[f32], n: usize) -> Result<()> {
        rows::add_into(&mut acc[..n], &x[..n]);
        Ok(())
    }

    fn gather_rows(
        &self,
        table: &[f32],
        idx: &Vec<u32>,
        rows: usize,
        width: usize,
    ) -> Result<Vec<f32>> {
        Ok(rows::gather_rows(table, &idx[..rows], width))
    }

    fn scatter_rows(
        &self,
        src: &[f32],
        idx: &Vec<u32>,
        rows: usize,
        width: usize,
        total: usize,
    ) -> Result<Vec<f32>> {
        Ok(rows::scatter_rows(src, &idx[..rows], width, total))
    }

    fn rms_norm(&self, x: &[f32], w: &[f32], rows: usize, h: usize, eps: f32) -> Result<Vec<f32>> {
        Ok(rms_norm::forward(&x[..rows * h], w, eps))
    }

    fn rms_norm_backward(
        &self,
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(rms_norm::backward(&dy[..rows * h], &x[..rows * h], w, eps))
    }

    fn swiglu(&self, g: &[f32], u: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(swiglu::forward(&g[..n], &u[..n]))
    }

    fn swiglu_backward(
        &self,
        dy: &[f32],
        g: &[f32],
        u: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(swiglu::backward(&dy[..n], &g[..n], &u[..n]))
    }

    fn heads(
        &self,
        x: &[f32],
        rope: Option<(&[f32], &[f32], f32)>,
        rows: usize,
        t: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<Vec<f32>> {
        let x = &x[..rows * heads * hd];
        Ok(if inverse {
            rope::from_heads(x, t, heads, hd, rope)
        } else {
            rope::to_heads(x, t, heads, hd, rope)
        })
    }

    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        d: Heads,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(attention::forward(q, k, v, bias, d))
    }

    fn attention_over(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        d: Heads,
        keys: usize,
        cap: usize,
    ) -> Result<Vec<f32>> {
        Ok(attention::forward_over(q, k, v, bias, d, keys, cap).1)
    }

    fn write_cache(
        &self,
        cache: &mut Vec<f32>,
        x: &[f32],
        blocks: usize,
        t: usize,
        cap: usize,
        at: usize,
        width: usize,
    ) -> Result<()> {
        if at + t > cap || cache.len() < blocks * cap * width || x.len() < blocks * t * width {
            anyhow::bail!("cache: {t} positions at {at} of {cap} do not fit");
        }
        rows::write_cache(cache, &x[..blocks * t * width], t, cap, at, width);
        Ok(())
    }

    fn to_host(&self, mut x: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        x.truncate(n);
        Ok(x)
    }

    fn argmax_rows(&self, x: Vec<f32>, rows: usize, width: usize) -> Result<Vec<u32>> {
        Ok(rows::argmax_rows(&x[..rows * width], width))
    }

    fn attention_backward(
        &self,
        dy: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        p: &[f32],
        d: Heads,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok(attention::backward(dy, q, k, v, p, d))
    }

    fn nll_sum(&self, logits: &[f32], targets: &Vec<u32>, rows: usize, v: usize) -> Result<f64> {
        let nll = cross_entropy::forward(&logits[..rows * v], &targets[..rows], v);
        Ok(nll.iter().map(|&x| x as f64).sum())
    }

    fn cross_entropy_backward(
        &self,
        logits: &[f32],
        targets: &Vec<u32>,
        g: f32,
        rows: usize,
        v: usize,
    ) -> Result<Vec<f32>> {
        let g = vec![g; rows];
        Ok(cross_entropy::backward(
            &logits[..rows * v],
            &targets[..rows],
            &g,
            v,
        ))
    }

    fn embedding_backward(
        &self,
        d_embed: &mut Vec<f32>,
        dx: &[f32],
        l: &Lookups,
        width: usize,
    ) -> Result<()> {
        embedding::backward(d_embed, dx, l, width);
        Ok(())
    }
}
