//! The projection y = x · wᵀ (x [rows, in], w [out, in], as Hugging Face stores weights)
//! for the CPU, with its gradients
//!
//!   dx = dy · w,      dw = dyᵀ · x.
//!
//! The written-out training pass calls [`matmul`] on strided views (its weight gradients
//! come out as [out, in] directly); inference calls [`linear`], the same GEMM candle runs
//! (gemm crate), with a path for a decoding step's few rows.

use candle_core::{bail, DType, Layout, Result, Shape, Tensor};

/// A matrix inside a flat buffer: `rows` x `cols`, element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major `rows` x `cols` matrix.
    pub fn new(rows: usize, cols: usize) -> Self {
        View {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose: the same values read the other way.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element lies inside a buffer of `len` values.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// dst = a · b, or dst += a · b with `accumulate`: the gemm crate's kernels (candle's own),
/// on every rayon thread when `parallel`, else on this one.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    d: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    accumulate: bool,
    parallel: bool,
) {
    assert!(
        d.rows == av.rows && d.cols == bv.cols && av.cols == bv.rows,
        "matmul: {d:?} = {av:?} · {bv:?}"
    );
    assert!(
        d.fits(dst.len()) && av.fits(a.len()) && bv.fits(b.len()),
        "matmul: a view runs past its buffer"
    );
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three views lie inside their buffers (checked above), and dst is borrowed
    // mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            av.cols,
            dst.as_mut_ptr(),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            a.as_ptr(),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr(),
            bv.cs as isize,
            bv.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// CPU reference: y [rows, out] = x [rows, d_in] · wᵀ for w [out, d_in], row-major.
pub fn forward(x: &[f32], w: &[f32], rows: usize, d_in: usize, out: usize) -> Vec<f32> {
    assert!(
        x.len() == rows * d_in && w.len() == out * d_in,
        "linear: bad sizes"
    );
    let (xv, wv) = (View::new(rows, d_in), View::new(out, d_in));
    if (2..=FEW_ROWS).contains(&rows) {
        // yᵀ [out, rows], then transposed: see FEW_ROWS.
        let mut yt = vec![0f32; rows * out];
        matmul(
            &mut yt,
            View::new(out, rows).t(),
            x,
            xv,
            w,
            wv.t(),
            false,
            true,
        );
        let mut y = vec![0f32; rows * out];
        for (o, col) in yt.chunks(rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * out + o] = v;
            }
        }
        return y;
    }
    let mut y = vec![0f32; rows * out];
    matmul(&mut y, View::new(rows, out), x, xv, w, wv.t(), false, true);
    y
}

/// Rows up to which [`forward`] has the GEMM write yᵀ and transposes it after (from 2: one
/// row is the same either way, and the GEMM has its own path for it): a decoding
/// step's few rows. With a row-major y the gemm crate swaps the operands and copies all of
/// w into its packed layout on every call; writing yᵀ it keeps w as the right operand
/// (docs/performance.md has the measurement).
pub const FEW_ROWS: usize = 32;

/// x [rows, in] · wᵀ for w [out, in], f32 on the CPU, for inference: no gradient flows
/// through it (training takes candle's matmul or the written-out pass).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, d_in) = x.dims2()?;
    let (_, w_in) = w.dims2()?;
    if w_in != d_in {
        bail!(
            "linear: x {:?} and weight {:?} differ in their inner size",
            x.dims(),
            w.dims()
        )
    }
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        bail!("linear: expected f32 input and weight")
    }
    let fwd = |x: &[f32], lx: &Layout, w: &[f32], lw: &Layout| {
        let (rows, d_in, out) = (lx.dims()[0], lx.dims()[1], lw.dims()[0]);
        (forward(x, w, rows, d_in, out), Shape::from((rows, out)))
    };
    super::cpu_op2("linear", x, w, fwd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_is_x_times_w_transposed_for_few_rows_and_many() {
        let (d_in, out) = (37, 53);
        let w: Vec<f32> = (0..out * d_in)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.01)
            .collect();
        // 1 row, the few-row path (2..=FEW_ROWS) at both ends, and the GEMM's path beyond.
        for rows in [1, 2, 5, FEW_ROWS, FEW_ROWS + 1, 70] {
            let x: Vec<f32> = (0..rows * d_in)
                .map(|i| ((i * 5 % 19) as f32 - 9.0) * 0.1)
                .collect();
            let y = forward(&x, &w, rows, d_in, out);
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..d_in)
                        .map(|i| x[r * d_in + i] as f64 * w[o * d_in + i] as f64)
                        .sum();
                    let got = y[r * out + o] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "rows {rows}: y[{r}, {o}] {got} vs {want}"
                    );
                }
            }
        }
    }
}
