//! The projection y = x · wᵀ (x [rows, in], w [out, in], as Hugging Face stores weights)
//! for the CPU, with its gradients
//!
//!   dx = dy · w,      dw = dyᵀ · x.
//!
//! The written-out training pass calls [`matmul`] on strided views (its weight gradients
//! come out as [out, in] directly); inference calls [`linear`], the same GEMM candle runs
//! (gemm crate), with a path for a decoding step's few rows.

use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

/// y [rows, out] = x [rows, d_in] · wᵀ for w [out, d_in], row-major: [`rows_dot`] for a
/// decoding step's few rows (up to [`FEW_ROWS`]), the GEMM beyond.
pub fn forward(x: &[f32], w: &[f32], rows: usize, d_in: usize, out: usize) -> Vec<f32> {
    assert!(
        x.len() == rows * d_in && w.len() == out * d_in,
        "linear: bad sizes"
    );
    if rows <= FEW_ROWS {
        return rows_dot(x, w, rows, d_in, out);
    }
    let (xv, wv) = (View::new(rows, d_in), View::new(out, d_in));
    let mut y = vec![0f32; rows * out];
    matmul(&mut y, View::new(rows, out), x, xv, w, wv.t(), false, true);
    y
}

/// Rows up to which [`forward`] takes [`rows_dot`]: a decoding step's batch. There the
/// product is bound by reading w, which the GEMM (gemm crate) reads more than once —
/// packing it, or through its matrix-vector path — and a row-at-a-time dot product reads
/// once (docs/performance.md has the measurements).
pub const FEW_ROWS: usize = 24;

/// Lanes of a dot product's partial sums: one AVX2 register of f32.
const LANES: usize = 8;

/// Weight rows a task of [`rows_dot`] owns: w's rows are split among the threads in runs
/// of this many.
const ROWS_PER_TASK: usize = 32;

/// y [rows, out] = x · wᵀ as one dot product per (row, output), each summed the same way
/// whatever the batch: lane j of [`LANES`] partial sums takes the terms k ≡ j (mod LANES)
/// in order as fused multiply-adds, the lanes are added pairwise (j + 4, then j + 2, then
/// j + 1), then the tail terms are added in order as fused multiply-adds. So a row's result
/// does not depend on the rows beside it, and the AVX2 kernel gives the bits of the plain
/// reference, [`rows_dot_reference`] (a fused multiply-add rounds once either way).
///
/// w is read once: each task takes a run of w's rows and, a few at a time, multiplies them
/// with every row of x while they are in cache.
pub fn rows_dot(x: &[f32], w: &[f32], rows: usize, d_in: usize, out: usize) -> Vec<f32> {
    assert!(
        x.len() == rows * d_in && w.len() == out * d_in,
        "rows_dot: bad sizes"
    );
    if rows == 0 || out == 0 || d_in == 0 {
        return rows_dot_reference(x, w, rows, d_in, out);
    }
    // yᵀ [out, rows], a task per run of w's rows, then transposed.
    let mut yt = vec![0f32; out * rows];
    yt.par_chunks_mut(ROWS_PER_TASK * rows)
        .zip(w.par_chunks(ROWS_PER_TASK * d_in))
        .for_each(|(yt, w)| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has both features, checked just above; yt and w are
                // whole rows (matching runs of yᵀ's and w's rows).
                return unsafe { avx2::dot_run(yt, x, w, rows, d_in) };
            }
            dot_run_plain(yt, x, w, rows, d_in)
        });
    transpose(&yt, out, rows)
}

/// [`rows_dot`] computed one (row, output) at a time in plain Rust: the reference its
/// kernel is checked against bit for bit.
pub fn rows_dot_reference(x: &[f32], w: &[f32], rows: usize, d_in: usize, out: usize) -> Vec<f32> {
    assert!(
        x.len() == rows * d_in && w.len() == out * d_in,
        "rows_dot: bad sizes"
    );
    let mut y = vec![0f32; rows * out];
    for (yr, xr) in y.chunks_exact_mut(out.max(1)).zip(x.chunks(d_in.max(1))) {
        for (y, wo) in yr.iter_mut().zip(w.chunks(d_in.max(1))) {
            *y = dot_plain(wo, xr);
        }
    }
    y
}

/// [out, rows] → [rows, out].
fn transpose(yt: &[f32], out: usize, rows: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * out + o] = v;
        }
    }
    y
}

/// One dot product in [`rows_dot`]'s order, lane by lane.
fn dot_plain(w: &[f32], x: &[f32]) -> f32 {
    let full = w.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for k in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = w[k + l].mul_add(x[k + l], *a);
        }
    }
    finish(&acc, &w[full..], &x[full..])
}

/// The lanes added pairwise, then the tail terms.
#[inline(always)]
fn finish(acc: &[f32; LANES], w_tail: &[f32], x_tail: &[f32]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
    let mut s = (h[0] + h[2]) + (h[1] + h[3]);
    for (w, x) in w_tail.iter().zip(x_tail) {
        s = w.mul_add(*x, s);
    }
    s
}

/// yᵀ [w rows, rows] for a run of w's rows, one dot product at a time.
fn dot_run_plain(yt: &mut [f32], x: &[f32], w: &[f32], rows: usize, d_in: usize) {
    for (yo, wo) in yt.chunks_exact_mut(rows).zip(w.chunks_exact(d_in)) {
        for (y, xr) in yo.iter_mut().zip(x.chunks_exact(d_in)) {
            *y = dot_plain(wo, xr);
        }
    }
}

/// The AVX2 + FMA kernel of [`rows_dot`]: tiles of weight rows by x rows, each (weight row,
/// x row) pair summed in one register of [`LANES`] partial sums.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{finish, LANES};
    use std::arch::x86_64::*;

    const PREFETCH: usize = 128;

    /// yᵀ [w rows, rows] for a run of w's rows.
    ///
    /// # Safety
    /// Only on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_run(yt: &mut [f32], x: &[f32], w: &[f32], rows: usize, d_in: usize) {
        let n = w.len() / d_in;
        assert!(yt.len() == n * rows && x.len() == rows * d_in && w.len() == n * d_in);
        let mut o = 0;
        while o < n {
            // Tiles of 8 weight rows for one x row, else 4 by 3 (docs/performance.md).
            let wo = if rows == 1 && n - o >= 8 {
                8
            } else if n - o >= 4 {
                4
            } else {
                1
            };
            let mut r = 0;
            while r < rows {
                let xr = (rows - r).min(if wo == 4 { 3 } else { 1 });
                // SAFETY: the CPU has AVX2 and FMA (this function's contract).
                unsafe {
                    match (wo, xr) {
                        (8, _) => tile::<8, 1>(yt, x, w, o, r, rows, d_in),
                        (4, 3) => tile::<4, 3>(yt, x, w, o, r, rows, d_in),
                        (4, 2) => tile::<4, 2>(yt, x, w, o, r, rows, d_in),
                        (4, _) => tile::<4, 1>(yt, x, w, o, r, rows, d_in),
                        _ => tile::<1, 1>(yt, x, w, o, r, rows, d_in),
                    }
                }
                r += xr;
            }
            o += wo;
        }
    }

    /// The dot products of weight rows o..o+WO with x rows r..r+R, into yᵀ.
    ///
    /// # Safety
    /// Only on a CPU with AVX2 and FMA. (Rows outside w or x panic at their slicing.)
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const WO: usize, const R: usize>(
        yt: &mut [f32],
        x: &[f32],
        w: &[f32],
        o: usize,
        r: usize,
        rows: usize,
        d_in: usize,
    ) {
        let ws: [&[f32]; WO] = std::array::from_fn(|i| &w[(o + i) * d_in..][..d_in]);
        let xs: [&[f32]; R] = std::array::from_fn(|j| &x[(r + j) * d_in..][..d_in]);
        let mut acc = [[_mm256_setzero_ps(); R]; WO];
        let full = d_in / LANES * LANES;
        let mut k = 0;
        while k < full {
            // SAFETY: k + LANES <= d_in, the length of every row slice.
            let xv: [__m256; R] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(xs[j].as_ptr().add(k)) });
            for i in 0..WO {
                // A hint only: an address past the row (or past w) is never read.
                _mm_prefetch::<_MM_HINT_T0>(ws[i].as_ptr().wrapping_add(k + PREFETCH) as *const i8);
                // SAFETY: as above.
                let wv = unsafe { _mm256_loadu_ps(ws[i].as_ptr().add(k)) };
                for j in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
                }
            }
            k += LANES;
        }
        for i in 0..WO {
            for j in 0..R {
                let mut lanes = [0f32; LANES];
                // SAFETY: lanes holds LANES f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]) };
                yt[(o + i) * rows + r + j] = finish(&lanes, &ws[i][full..], &xs[j][full..]);
            }
        }
    }
}

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
        // The few-row path (rows_dot) at both ends, and the GEMM's path beyond.
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
    #[test]
    fn rows_dot_equals_its_reference_bit_for_bit_whatever_the_batch() {
        // d_in with a tail past the lanes (and one without); out past a task's run of rows
        // and not a multiple of the tile; every batch size of the path.
        for (d_in, out) in [(37, 2 * ROWS_PER_TASK + 7), (64, 5), (3, 9)] {
            let w: Vec<f32> = (0..out * d_in)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
                .collect();
            let x: Vec<f32> = (0..FEW_ROWS * d_in)
                .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-2)
                .collect();
            let alone: Vec<Vec<f32>> = (0..FEW_ROWS)
                .map(|r| rows_dot(&x[r * d_in..][..d_in], &w, 1, d_in, out))
                .collect();
            for rows in 1..=FEW_ROWS {
                let x = &x[..rows * d_in];
                let got = rows_dot(x, &w, rows, d_in, out);
                let want = rows_dot_reference(x, &w, rows, d_in, out);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{rows} rows of {d_in} by {out}");
                for (r, row) in got.chunks(out).enumerate() {
                    assert_eq!(bits(row), bits(&alone[r]), "row {r} of {rows}");
                }
            }
        }
    }

    /// A column-major BLAS gemm as its reference defines it (what cuBLAS computes):
    /// C[i + j·ldc] = Σ_l op(A)[i, l] · op(B)[l, j] + beta · C, op(X)[i, l] = X[l + i·ld]
    /// transposed, X[i + l·ld] not.
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(g: &ColMajor, a: &[f32], b: &[f32], c: &mut [f32], beta: f32) {
        let at = |x: &[f32], trans: bool, ld: usize, i: usize, l: usize| {
            if trans {
                x[l + i * ld]
            } else {
                x[i + l * ld]
            }
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let sum: f32 = (0..g.k)
                    .map(|l| {
                        at(a, g.trans_first, g.ld_first, i, l)
                            * at(b, g.trans_second, g.ld_second, l, j)
                    })
                    .sum();
                let c = &mut c[i + j * g.ld_out];
                *c = sum + beta * *c;
            }
        }
    }

    /// The arguments cuBLAS gets for a product on row-major views (ops::linear::cuda) give
    /// the CPU's product: every way the pass reads its operands (a or aᵀ, b or bᵀ), with
    /// accumulation, and the one-row and one-column shapes.
    #[test]
    fn column_major_arguments_give_the_row_major_product() {
        for (m, k, n) in [(5, 7, 3), (1, 4, 6), (6, 4, 1), (3, 1, 2), (1, 1, 1)] {
            let a_rows: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b_rows: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
            // The same matrices stored transposed.
            let a_cols: Vec<f32> = (0..k * m).map(|i| a_rows[(i % m) * k + i / m]).collect();
            let b_cols: Vec<f32> = (0..n * k).map(|i| b_rows[(i % k) * n + i / k]).collect();
            let dv = View::new(m, n);
            for (a, av) in [(&a_rows, View::new(m, k)), (&a_cols, View::new(k, m).t())] {
                for (b, bv) in [(&b_rows, View::new(k, n)), (&b_cols, View::new(n, k).t())] {
                    for accumulate in [false, true] {
                        let start: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.1).collect();
                        let mut want = start.clone();
                        matmul(&mut want, dv, a, av, b, bv, accumulate, false);
                        let g = col_major(dv, av, bv).unwrap();
                        let mut got = start.clone();
                        let beta = if accumulate { 1.0 } else { 0.0 };
                        // cuBLAS's first operand is b's memory, its second a's.
                        blas_gemm(&g, b, a, &mut got, beta);
                        for (x, y) in got.iter().zip(&want) {
                            assert!(
                                (x - y).abs() < 1e-5,
                                "{m}x{k}x{n} {av:?} {bv:?} acc {accumulate}: {got:?} vs {want:?}"
                            );
                        }
                    }
                }
            }
        }
        // A view that is neither rows nor columns (both strides > 1) is refused.
        let odd = View {
            rows: 2,
            cols: 2,
            rs: 4,
            cs: 2,
        };
        assert!(col_major(View::new(2, 2), odd, View::new(2, 2)).is_err());
    }
}

/// A product dst = a·b on row-major [`View`]s as a column-major BLAS (cuBLAS) computes it:
/// dst read column-major is dstᵀ, so it computes dstᵀ = bᵀ·aᵀ — `first` is b's memory,
/// `second` a's, each transposed or not, with its leading dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColMajor {
    pub trans_first: bool,
    pub trans_second: bool,
    /// dstᵀ is m × n (m = dst's columns, n = its rows); k = a's columns.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ld_out: usize,
}

/// How a column-major BLAS reads a row-major view's transpose: (transpose?, leading
/// dimension). A view with unit column stride is, read column-major, its own transpose; one
/// with unit row stride is itself and needs a transpose.
fn col_major_operand(v: View) -> Result<(bool, usize)> {
    let (trans, ld, stored_rows) = if v.cs == 1 {
        (false, v.rs, v.cols)
    } else if v.rs == 1 {
        (true, v.cs, v.rows)
    } else {
        bail!("matmul: {v:?} is neither rows nor columns of a matrix")
    };
    // With one stored column the leading dimension is never stepped; a BLAS still wants it
    // at least the column's height.
    Ok((trans, ld.max(stored_rows).max(1)))
}

/// The column-major arguments of dst = a·b (dst's rows contiguous).
pub fn col_major(d: View, av: View, bv: View) -> Result<ColMajor> {
    if d.rows != av.rows || d.cols != bv.cols || av.cols != bv.rows {
        bail!("matmul: {d:?} = {av:?} · {bv:?}")
    }
    if d.cs != 1 {
        bail!("matmul: the output's rows must be contiguous, {d:?}")
    }
    let (trans_first, ld_first) = col_major_operand(bv)?;
    let (trans_second, ld_second) = col_major_operand(av)?;
    Ok(ColMajor {
        trans_first,
        trans_second,
        m: d.cols,
        n: d.rows,
        k: av.cols,
        ld_first,
        ld_second,
        ld_out: d.rs.max(d.cols).max(1),
    })
}

/// The products on the GPU: cuBLAS's GEMM on the same row-major [`View`]s as [`matmul`], one
/// product or a strided batch of them. f32 operands go through the f32 GEMM (no TF32: the
/// CPU pass's arithmetic); bf16 operands through the mixed one — bf16 in and out, f32
/// products and sums, one rounding of the result (which with `accumulate` includes dst's
/// old value). The arguments are [`col_major`]'s, which a test checks on the CPU against the
/// BLAS definition.
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::View;
    use crate::cuda::{Act, Dev, DevMut};
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t as Op;
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::{CudaDevice, Result};

    /// Values a view reaches: one past its last element.
    fn extent(v: View) -> usize {
        if v.rows == 0 || v.cols == 0 {
            0
        } else {
            (v.rows - 1) * v.rs + (v.cols - 1) * v.cs + 1
        }
    }

    fn int(n: usize) -> Result<i32> {
        i32::try_from(n)
            .map_err(|_| candle_core::Error::Msg(format!("matmul: {n} is too large for cuBLAS")))
    }

    /// dst = a · b (dst += a · b with `accumulate`) for `batch` products, the i-th at offsets
    /// i·stride (elements) in each buffer; dst's rows must be contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_batched<T: Act>(
        dev: &CudaDevice,
        dst: DevMut<T>,
        d: View,
        a: Dev<T>,
        av: View,
        b: Dev<T>,
        bv: View,
        accumulate: bool,
        batch: usize,
        strides: [usize; 3],
    ) -> Result<()> {
        let g = super::col_major(d, av, bv)?;
        if batch == 0 || d.rows == 0 || d.cols == 0 {
            return Ok(());
        }
        let [sd, sa, sb] = strides;
        let reach = |v: View, stride: usize| (batch - 1) * stride + extent(v);
        let cp = dst.at_least(reach(d, sd), "matmul: output")?;
        let ap = a.at_least(reach(av, sa), "matmul: a")?;
        let bp = b.at_least(reach(bv, sb), "matmul: b")?;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        let blas = dev.cublas_handle();
        let handle: sys::cublasHandle_t = *blas.handle();
        let (m, n, k) = (int(g.m)?, int(g.n)?, int(g.k)?);
        let (lda, ldb, ldc) = (int(g.ld_first)?, int(g.ld_second)?, int(g.ld_out)?);
        let (ta, tb, batch) = (op(g.trans_first), op(g.trans_second), int(batch)?);
        let (sa, sb, sd) = (sa as i64, sb as i64, sd as i64);
        // SAFETY: the handle runs on candle's stream, where the buffers are used; every
        // address covers what the product reads or writes (checked above: `reach`) in values
        // of T, the type each call names; the scalars are host f32 values that outlive the
        // call (f32 is the scale type of both the f32 GEMM and the 32F compute type).
        // One product is a batch of one (its strides never stepped).
        unsafe {
            if T::VARIANT == <f32 as Act>::VARIANT {
                result::sgemm_strided_batched(
                    handle,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    &alpha,
                    bp as *const f32,
                    lda,
                    sb,
                    ap as *const f32,
                    ldb,
                    sa,
                    &beta,
                    cp as *mut f32,
                    ldc,
                    sd,
                    batch,
                )
            } else {
                use sys::{cublasComputeType_t as Compute, cudaDataType as Ty};
                let bf16 = Ty::CUDA_R_16BF;
                result::gemm_strided_batched_ex(
                    handle,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    (&alpha as *const f32).cast(),
                    bp as *const _,
                    bf16,
                    lda,
                    sb,
                    ap as *const _,
                    bf16,
                    ldb,
                    sa,
                    (&beta as *const f32).cast(),
                    cp as *mut _,
                    bf16,
                    ldc,
                    sd,
                    batch,
                    Compute::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))
    }

    /// dst = a · b, or dst += a · b with `accumulate`: [`super::matmul`] on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: Act>(
        dev: &CudaDevice,
        dst: DevMut<T>,
        d: View,
        a: Dev<T>,
        av: View,
        b: Dev<T>,
        bv: View,
        accumulate: bool,
    ) -> Result<()> {
        matmul_batched(dev, dst, d, a, av, b, bv, accumulate, 1, [0; 3])
    }
}
