//! The copies and sums between the written-out pass's layers, each a CPU reference beside
//! its kernel (`cuda/pass.cu`): rows gathered by index (the embedding lookup, RoPE's angles
//! of each position, the rows the loss reads) and scattered back, a residual added in, a
//! bias added to every row, and a column sum (a bias's gradient) in a fixed order — partial
//! sums over chunks of [`ROWS_PER_PART`] rows, then the chunks in order — so that it has the
//! same bits on every run and on both backends; a decoding step's new keys or values
//! written into their places in the KV cache ([`write_cache`]), and greedy decoding's
//! choice of each row's largest logit ([`argmax_rows`]).

use crate::CHUNK;
use rayon::prelude::*;

/// Rows per partial sum of [`col_sum`].
pub const ROWS_PER_PART: usize = 32;

/// out[r] = table[idx[r]], rows of `width`.
pub fn gather_rows(table: &[f32], idx: &[u32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; idx.len() * width];
    out.par_chunks_mut(width)
        .zip(idx.par_iter())
        .for_each(|(o, &i)| o.copy_from_slice(&table[i as usize * width..][..width]));
    out
}

/// A buffer of `total` rows of `width`, zero but for rows idx[r] = src[r] (distinct indices).
pub fn scatter_rows(src: &[f32], idx: &[u32], width: usize, total: usize) -> Vec<f32> {
    let mut out = vec![0f32; total * width];
    for (r, &i) in idx.iter().enumerate() {
        out[i as usize * width..][..width].copy_from_slice(&src[r * width..][..width]);
    }
    out
}

/// acc += x.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
}

/// y[r] += b for every row r of `b.len()` values.
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len())
        .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
}

/// cache[blk, at + i] = x[blk, i] for every block blk and i < t: x [blocks, t, width] into
/// the cache [blocks, cap, width] (a layer's keys or values, blocks = batch × kv heads).
pub fn write_cache(cache: &mut [f32], x: &[f32], t: usize, cap: usize, at: usize, width: usize) {
    let block = t * width;
    cache
        .par_chunks_mut(cap * width)
        .zip(x.par_chunks(block))
        .for_each(|(c, x)| c[at * width..][..block].copy_from_slice(x));
}

/// Greedy decoding's choice in each row of `width` values: the index of its largest value,
/// the first on ties, NaNs passed over — 0 when the row starts with a NaN. A running maximum
/// replaced only by a strictly larger value, as candle's `argmax` on the CPU (what the
/// decoding loop calls on host logits), so either gives the same tokens.
pub fn argmax_rows(x: &[f32], width: usize) -> Vec<u32> {
    x.chunks(width)
        .map(|row| {
            let (mut at, mut best) = (0, row[0]);
            for (j, &v) in row.iter().enumerate() {
                if best < v {
                    (at, best) = (j, v);
                }
            }
            at as u32
        })
        .collect()
}

/// Σ over the rows of x [rows, cols]: each chunk of [`ROWS_PER_PART`] rows summed, then
/// the chunks in order.
pub fn col_sum(x: &[f32], cols: usize) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = x
        .par_chunks(cols * ROWS_PER_PART)
        .map(|rows| {
            let mut p = vec![0f32; cols];
            for row in rows.chunks(cols) {
                p.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            p
        })
        .collect();
    let mut out = vec![0f32; cols];
    for p in &parts {
        out.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    out
}

/// The launchers of these operations (kernels in `cuda/pass.cu`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::ROWS_PER_PART;
    use crate::cuda::{blocks_for, launch_pass, u32_arg, Act, Dev, DevMut, PASS_BLOCK};
    use candle_core::{CudaDevice, Result};

    /// [`super::gather_rows`].
    ///
    /// # Safety
    /// Every index must name a row of `table` (index · width + width ≤ its length): the
    /// indices are on the device, where this cannot check them (the written-out pass checks
    /// token ids and positions on the host first).
    pub unsafe fn gather_rows<T: Act>(
        dev: &CudaDevice,
        table: Dev<T>,
        idx: Dev<u32>,
        out: DevMut<T>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let (t, i, o) = (
            table.at_least(width, "gather: table")?,
            idx.at_least(rows, "gather: indices")?,
            out.at_least(rows * width, "gather: output")?,
        );
        let w = u32_arg(width, "width")?;
        if rows > 0 {
            launch_pass!(dev, T, "gather_rows", (u32_arg(rows, "rows")?, 1); t, i, o, w);
        }
        Ok(())
    }

    /// [`super::scatter_rows`] into `out`, which holds zeros (or what the other rows keep).
    ///
    /// # Safety
    /// Every index must name a row of `out` (as for [`gather_rows`]).
    pub unsafe fn scatter_rows<T: Act>(
        dev: &CudaDevice,
        src: Dev<T>,
        idx: Dev<u32>,
        out: DevMut<T>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let (s, i, o) = (
            src.at_least(rows * width, "scatter: source")?,
            idx.at_least(rows, "scatter: indices")?,
            out.at_least(width, "scatter: output")?,
        );
        let w = u32_arg(width, "width")?;
        if rows > 0 {
            launch_pass!(dev, T, "scatter_rows", (u32_arg(rows, "rows")?, 1); s, i, o, w);
        }
        Ok(())
    }

    /// [`super::write_cache`] for `blocks` blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache<T: Act>(
        dev: &CudaDevice,
        cache: DevMut<T>,
        x: Dev<T>,
        blocks: usize,
        t: usize,
        cap: usize,
        at: usize,
        width: usize,
    ) -> Result<()> {
        if at + t > cap {
            candle_core::bail!("cache: {t} positions at {at} past its {cap}")
        }
        let n = blocks * t * width;
        let (c, x) = (
            cache.at_least(blocks * cap * width, "cache")?,
            x.at_least(n, "cache: new values")?,
        );
        let (n64, tt, cc, a, w) = (
            n as u64,
            u32_arg(t, "positions")?,
            u32_arg(cap, "capacity")?,
            u32_arg(at, "position")?,
            u32_arg(width, "width")?,
        );
        if n > 0 {
            launch_pass!(dev, T, "write_cache", (blocks_for(n)?, 1); x, c, n64, tt, cc, a, w);
        }
        Ok(())
    }

    /// [`super::argmax_rows`] of x [rows, width] into `idx` [rows].
    pub fn argmax_rows<T: Act>(
        dev: &CudaDevice,
        x: Dev<T>,
        idx: DevMut<u32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        if width == 0 {
            candle_core::bail!("argmax: rows of no values")
        }
        let (x, i) = (
            x.at_least(rows * width, "argmax: x")?,
            idx.at_least(rows, "argmax: indices")?,
        );
        let w = u32_arg(width, "width")?;
        if rows > 0 {
            launch_pass!(dev, T, "argmax_rows", (u32_arg(rows, "rows")?, 1); x, i, w);
        }
        Ok(())
    }

    /// out[..n] = x[..n]: a device-to-device copy on candle's stream (one copy, not a kernel
    /// that adds into zeros; the CPU's is `to_vec`).
    pub fn copy<T: Act>(dev: &CudaDevice, out: DevMut<T>, x: Dev<T>, n: usize) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async;
        use candle_core::cuda_backend::WrapErr;
        let (o, x) = (out.at_least(n, "copy: out")?, x.at_least(n, "copy: x")?);
        if n > 0 {
            let stream = dev.cuda_stream();
            stream.context().bind_to_thread().w()?;
            let bytes = n * std::mem::size_of::<T>();
            // SAFETY: both spans hold at least n values (at_least above); the copy runs on
            // candle's stream in order with the kernels that write x and read out, as a
            // launch does (see `launch_pass`).
            unsafe { memcpy_dtod_async(o, x, bytes, stream.cu_stream()) }.w()?;
        }
        Ok(())
    }

    /// [`super::add_into`] over `n` values.
    pub fn add_into<T: Act>(dev: &CudaDevice, acc: DevMut<T>, x: Dev<T>, n: usize) -> Result<()> {
        let (a, x) = (acc.at_least(n, "add: acc")?, x.at_least(n, "add: x")?);
        let n64 = n as u64;
        if n > 0 {
            launch_pass!(dev, T, "add_into", (blocks_for(n)?, 1); a, x, n64);
        }
        Ok(())
    }

    /// [`super::add_bias`] over `rows` rows of `b`'s `cols` values.
    pub fn add_bias<T: Act>(
        dev: &CudaDevice,
        y: DevMut<T>,
        b: Dev<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        let (y, b) = (y.at_least(n, "bias: y")?, b.at_least(cols, "bias: b")?);
        let (n64, c) = (n as u64, u32_arg(cols, "columns")?);
        if n > 0 {
            launch_pass!(dev, T, "add_bias", (blocks_for(n)?, 1); y, b, n64, c);
        }
        Ok(())
    }

    /// [`super::col_sum`] of x [rows, cols] into `out` [cols], added to it when `accumulate`.
    pub fn col_sum<T: Act>(
        dev: &CudaDevice,
        x: Dev<T>,
        out: DevMut<T>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let parts = rows.div_ceil(ROWS_PER_PART);
        // SAFETY: col_partial writes every partial before col_sum reads it.
        let mut part = unsafe { dev.alloc::<f32>((parts * cols).max(1)) }?;
        let xs = x.at_least(rows * cols, "column sum: x")?;
        let p = DevMut::of(&mut part, dev).at_least(parts * cols, "column sum: partials")?;
        let (r, c, per) = (
            u32_arg(rows, "rows")?,
            u32_arg(cols, "columns")?,
            ROWS_PER_PART as u32,
        );
        let col_blocks = u32_arg(cols.div_ceil(PASS_BLOCK as usize), "blocks")?;
        if parts > 0 {
            launch_pass!(dev, T, "col_partial", (col_blocks, u32_arg(parts, "parts")?); xs, p, r, c, per);
        }
        sum_parts(dev, Dev::of(&part, dev), out, parts, cols, accumulate)
    }

    /// out[j] (+)= Σ_k part[k, j], k in order: the last stage of a column sum (the partials
    /// f32 whatever `out` holds).
    pub(crate) fn sum_parts<T: Act>(
        dev: &CudaDevice,
        part: Dev<f32>,
        out: DevMut<T>,
        parts: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let p = part.at_least(parts * cols, "column sum: partials")?;
        let o = out.at_least(cols, "column sum: output")?;
        let (k, c, acc) = (
            u32_arg(parts, "parts")?,
            u32_arg(cols, "columns")?,
            accumulate as u32,
        );
        let col_blocks = u32_arg(cols.div_ceil(PASS_BLOCK as usize), "blocks")?;
        if cols > 0 {
            launch_pass!(dev, T, "col_sum", (col_blocks, 1); p, o, k, c, acc);
        }
        Ok(())
    }
}
