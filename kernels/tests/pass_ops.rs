//! The row operations of the written-out training pass: their CPU references checked on
//! their own (layouts, sums in a fixed order, the embedding's grouped lookups), and with
//! `--features cuda` on a machine with a GPU, every CUDA kernel and product of the pass
//! against its CPU reference (`device_ops_match_their_cpu_references`).

use basin_kernels::ops::embedding::{self, Lookups};
use basin_kernels::ops::{rope, rows};

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618 + seed as f32 * 2.17).sin() * 43758.547).fract() * scale)
        .collect()
}

#[test]
fn heads_layout_round_trips_and_rotates_as_rope_does() {
    let (b, t, heads, hd) = (2, 5, 3, 8);
    let rows = b * t;
    let x = values(rows * heads * hd, 1, 2.0);
    let cos = values(rows * hd / 2, 2, 1.0);
    let sin = values(rows * hd / 2, 3, 1.0);
    let plain = rope::to_heads(&x, t, heads, hd, None);
    assert_eq!(rope::from_heads(&plain, t, heads, hd, None), x);
    // Element (row r = b·t + i, head h, j) lands at ((b·heads + h)·t + i)·hd + j.
    let (r, h, j) = (t + 3, 2, 5);
    assert_eq!(
        plain[((heads + h) * t + 3) * hd + j],
        x[(r * heads + h) * hd + j]
    );
    // Rotating on the way in is rope::rotate of the head-major layout (angles per (b, i)).
    let rotated = rope::to_heads(&x, t, heads, hd, Some((&cos, &sin, 1.0)));
    assert_eq!(
        rotated,
        rope::rotate(&plain, &cos, &sin, [b, heads, t, hd], 1.0)
    );
    // And rotating back on the way out undoes it, to rounding.
    let back = rope::from_heads(&rotated, t, heads, hd, Some((&cos, &sin, -1.0)));
    let scale: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let (c, s) = (&cos[r * hd / 2..][..hd / 2], &sin[r * hd / 2..][..hd / 2]);
            let k: Vec<f32> = c.iter().zip(s).map(|(c, s)| c * c + s * s).collect();
            (0..heads).flat_map(move |_| [k.clone(), k.clone()].concat())
        })
        .collect();
    for ((b, x), k) in back.iter().zip(&x).zip(&scale) {
        // cos² + sin² of arbitrary test values is not 1: the round trip scales by it.
        assert!((b - x * k).abs() < 1e-5, "{b} vs {}", x * k);
    }
}

#[test]
fn gathers_scatters_and_column_sums() {
    let (width, table_rows) = (6, 9);
    let table = values(width * table_rows, 4, 3.0);
    let idx = [3u32, 0, 8, 3];
    let g = rows::gather_rows(&table, &idx, width);
    for (r, &i) in idx.iter().enumerate() {
        assert_eq!(
            g[r * width..][..width],
            table[i as usize * width..][..width]
        );
    }
    let distinct = [7u32, 2];
    let s = rows::scatter_rows(&g[..2 * width], &distinct, width, table_rows);
    assert_eq!(s[7 * width..][..width], g[..width]);
    assert_eq!(s[2 * width..][..width], g[width..2 * width]);
    assert_eq!(s.iter().filter(|v| **v != 0.0).count(), 2 * width);
    // The column sum: chunks of ROWS_PER_PART rows, then the chunks in order.
    let n = 3 * rows::ROWS_PER_PART + 5;
    let x = values(n * width, 5, 1.0);
    let sum = rows::col_sum(&x, width);
    for j in 0..width {
        let mut want = 0f32;
        for chunk in x.chunks(width * rows::ROWS_PER_PART) {
            want += chunk.chunks(width).map(|r| r[j]).fold(0f32, |a, v| a + v);
        }
        assert_eq!(sum[j].to_bits(), want.to_bits(), "column {j}");
    }
    let mut y = x[..2 * width].to_vec();
    rows::add_bias(&mut y, &x[..width]);
    assert_eq!(y[width], x[width] + x[0]);
    // A step's 2 positions into a cache of 5 at 3, for 2 blocks; the rest left as it was.
    let mut cache = vec![-1f32; 2 * 5 * width];
    let new = values(2 * 2 * width, 8, 1.0);
    rows::write_cache(&mut cache, &new, 2, 5, 3, width);
    for blk in 0..2 {
        for p in 0..5 {
            let got = &cache[(blk * 5 + p) * width..][..width];
            if p >= 3 {
                assert_eq!(got, &new[(blk * 2 + p - 3) * width..][..width], "{blk} {p}");
            } else {
                assert!(got.iter().all(|&v| v == -1.0), "{blk} {p}");
            }
        }
    }
}

/// Rows of `width` (at least 6) that make greedy decoding's choice hard: a plain row, the
/// largest value twice, a NaN first, a NaN before the largest, all −∞, −0 and +0 as the
/// largest, the largest last, NaNs around one finite value, +∞ twice.
fn argmax_cases(width: usize) -> Vec<f32> {
    let mut rows = Vec::new();
    for case in 0..9 {
        let mut r = values(width, 30 + case, 4.0);
        match case {
            1 => (r[1], r[width - 3]) = (100.0, 100.0),
            2 => (r[0], r[4]) = (f32::NAN, 100.0),
            3 => (r[2], r[width - 1]) = (f32::NAN, 100.0),
            4 => r.fill(f32::NEG_INFINITY),
            5 => {
                r.iter_mut().for_each(|v| *v = -v.abs() - 1.0);
                (r[1], r[3]) = (-0.0, 0.0);
            }
            6 => r[width - 1] = 100.0,
            7 => {
                r.fill(f32::NAN);
                (r[0], r[width / 2]) = (-5.0, -1.0);
            }
            8 => (r[3], r[width - 2]) = (f32::INFINITY, f32::INFINITY),
            _ => {}
        }
        rows.extend(r);
    }
    rows
}

/// Greedy decoding's choice on the host is candle's `argmax` (what the decoding loop calls
/// on host logits): the same index in every row, ties and NaNs included.
#[test]
fn argmax_rows_is_candles_argmax() {
    for width in [6, 7, 5000] {
        let x = argmax_cases(width);
        let got = rows::argmax_rows(&x, width);
        let t = candle_core::Tensor::from_vec(x, (9, width), &candle_core::Device::Cpu).unwrap();
        let want = t
            .argmax(candle_core::D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want, "width {width}");
        assert_eq!(
            got[..3],
            [rows::argmax_rows(&values(width, 30, 4.0), width)[0], 1, 0]
        );
        assert_eq!(got[4..], [0, 1, width as u32 - 1, width as u32 / 2, 3]);
    }
}

#[test]
fn embedding_gradient_groups_lookups_by_id_in_row_order() {
    let ids = [5u32, 1, 5, 0, 7, 5, 1];
    let l = Lookups::new(&ids, Some(0));
    assert_eq!(l.ids, vec![1, 5, 7]);
    assert_eq!(l.starts, vec![0, 2, 5, 6]);
    assert_eq!(l.rows, vec![1, 6, 0, 2, 5, 4]);
    let width = 4;
    let dx = values(ids.len() * width, 6, 1.0);
    let base = values(8 * width, 7, 1.0);
    let mut got = base.clone();
    embedding::backward(&mut got, &dx, &l, width);
    // The plain loop: every position's gradient added to its id's row, rows in order,
    // the padding id left alone.
    let mut want = base;
    for (r, &id) in ids.iter().enumerate() {
        if id != 0 {
            for j in 0..width {
                want[id as usize * width + j] += dx[r * width + j];
            }
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
}

/// Says that the device check could not run here, on stderr and — under `just test` — in
/// its summary (a `skipped` line in `$BASIN_TEST_LOG`, the format of basin_lm::testkit, which
/// this crate cannot depend on).
fn skipped(reason: &str) {
    let test = "pass_ops::device_ops_match_their_cpu_references";
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("BASIN_TEST_LOG").filter(|v| !v.is_empty()) {
        use std::io::Write;
        let line = format!("skipped\t{test}\t{reason}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .expect("BASIN_TEST_LOG is writable");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn device_ops_match_their_cpu_references() {
    skipped("built without the cuda feature (scripts/device-pass.sh runs it on a GPU)");
}

#[cfg(feature = "cuda")]
#[test]
fn device_ops_match_their_cpu_references() {
    device::run();
}

#[cfg(feature = "cuda")]
mod device {
    use super::skipped;
    use basin_kernels::cuda::{Act, Dev, DevMut};
    use basin_kernels::ops::attention::{self, Heads};
    use basin_kernels::ops::embedding::{self, cuda::DevLookups, Lookups};
    use basin_kernels::ops::linear::{self, View};
    use basin_kernels::ops::{cross_entropy, rms_norm, rope, rows, swiglu};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::{CudaDevice, Device};
    use half::bf16;

    /// An element type of the pass's kernels, as the test writes and reads it.
    trait Elem: Act {
        const NAME: &'static str;
        /// What rounding a result to this type can change, relative to the largest value (a
        /// unit in the last place: half of it to nearest, once more where the f32 sums of
        /// the kernel and of the reference round apart).
        const ROUNDING: f32;
        fn of(x: f32) -> Self;
        fn get(self) -> f32;
    }

    impl Elem for f32 {
        const NAME: &'static str = "f32";
        const ROUNDING: f32 = 0.0;
        fn of(x: f32) -> Self {
            x
        }
        fn get(self) -> f32 {
            self
        }
    }

    impl Elem for bf16 {
        const NAME: &'static str = "bf16";
        const ROUNDING: f32 = 1.0 / 256.0;
        fn of(x: f32) -> Self {
            bf16::from_f32(x)
        }
        fn get(self) -> f32 {
            self.to_f32()
        }
    }

    /// The device, and the element type the kernels under test read and write.
    struct Gpu<T>(CudaDevice, std::marker::PhantomData<T>);

    impl<T: Elem> Gpu<T> {
        /// Values as `T` holds them (the CPU references read these: the same inputs).
        fn held(&self, v: &[f32]) -> Vec<f32> {
            v.iter().map(|&x| T::of(x).get()).collect()
        }
        fn values(&self, n: usize, seed: u32, scale: f32) -> Vec<f32> {
            self.held(&super::values(n, seed, scale))
        }
        fn up(&self, v: &[f32]) -> CudaSlice<T> {
            let t: Vec<T> = v.iter().map(|&x| T::of(x)).collect();
            self.0.clone_htod(&t).unwrap()
        }
        fn up32(&self, v: &[f32]) -> CudaSlice<f32> {
            self.0.clone_htod(v).unwrap()
        }
        fn ids(&self, v: &[u32]) -> CudaSlice<u32> {
            self.0.clone_htod(v).unwrap()
        }
        fn out(&self, n: usize) -> CudaSlice<T> {
            self.0.alloc_zeros::<T>(n).unwrap()
        }
        fn out32(&self, n: usize) -> CudaSlice<f32> {
            self.0.alloc_zeros::<f32>(n).unwrap()
        }
        fn down(&self, s: &CudaSlice<T>) -> Vec<f32> {
            self.0
                .clone_dtoh(s)
                .unwrap()
                .into_iter()
                .map(T::get)
                .collect()
        }
        fn down32(&self, s: &CudaSlice<f32>) -> Vec<f32> {
            self.0.clone_dtoh(s).unwrap()
        }
        fn r<'a, U: Act>(&self, s: &'a CudaSlice<U>) -> Dev<'a, U> {
            Dev::of(s, &self.0)
        }
        fn w<'a, U: Act>(&self, s: &'a mut CudaSlice<U>) -> DevMut<'a, U> {
            DevMut::of(s, &self.0)
        }

        /// Largest |a − b| relative to the largest |b| (or 1), at most `tol` in f32, at
        /// most `tol` + a rounding of `T` otherwise.
        fn close(&self, what: &str, a: &[f32], b: &[f32], tol: f32) {
            self.close_to(what, a, b, tol + T::ROUNDING);
        }

        /// As [`Self::close`], with the tolerance given as is: for results that went
        /// through several roundings to `T` (attention's scores, then its probabilities).
        fn close_to(&self, what: &str, a: &[f32], b: &[f32], tol: f32) {
            let what = format!("{what} ({})", T::NAME);
            assert_eq!(a.len(), b.len(), "{what}: lengths");
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("{what}: worst difference {worst:.2e} of {scale:.2e}");
            assert!(worst <= tol * scale, "{what}: {worst} > {tol} × {scale}");
        }

        /// Bit for bit: the kernel's f32 sums in the reference's order, rounded once to `T`.
        fn same(&self, what: &str, got: Vec<f32>, want: Vec<f32>) {
            assert_eq!(got, self.held(&want), "{what} ({})", T::NAME);
        }
    }

    pub(super) fn run() {
        let dev = match Device::new_cuda(0) {
            Ok(Device::Cuda(d)) => d,
            _ => return skipped("no CUDA device"),
        };
        check(Gpu::<f32>(dev.clone(), std::marker::PhantomData));
        check(Gpu::<bf16>(dev, std::marker::PhantomData));
    }

    /// Every kernel and product of the pass on `T` against its CPU reference on the same
    /// (`T`-held) inputs.
    fn check<T: Elem>(g: Gpu<T>) {
        let d = &g.0;

        // RMSNorm, forward and backward (rows not a multiple of the partial's 32).
        let (rows_n, h) = (70, 300);
        let (x, wt, dy) = (
            g.values(rows_n * h, 1, 2.0),
            g.values(h, 2, 1.0),
            g.values(rows_n * h, 3, 1.0),
        );
        let (gx, gw, gdy) = (g.up(&x), g.up(&wt), g.up(&dy));
        let mut y = g.out(rows_n * h);
        rms_norm::cuda::forward(d, g.r(&gx), g.r(&gw), g.w(&mut y), rows_n, h, 1e-5).unwrap();
        g.close(
            "rmsnorm",
            &g.down(&y),
            &rms_norm::forward(&x, &wt, 1e-5),
            1e-6,
        );
        let (mut dx, mut dw) = (g.out(rows_n * h), g.out(h));
        rms_norm::cuda::backward(
            d,
            g.r(&gdy),
            g.r(&gx),
            g.r(&gw),
            g.w(&mut dx),
            g.w(&mut dw),
            rows_n,
            h,
            1e-5,
        )
        .unwrap();
        let (cdx, cdw) = rms_norm::backward(&dy, &x, &wt, 1e-5);
        g.close("rmsnorm dx", &g.down(&dx), &cdx, 1e-5);
        g.close("rmsnorm dw", &g.down(&dw), &cdw, 1e-5);

        // silu(g)·u.
        let n = 5000;
        let (gg, uu, dd) = (
            g.values(n, 4, 6.0),
            g.values(n, 5, 2.0),
            g.values(n, 6, 1.0),
        );
        let (ggd, uud, ddd) = (g.up(&gg), g.up(&uu), g.up(&dd));
        let mut s = g.out(n);
        swiglu::cuda::forward(d, g.r(&ggd), g.r(&uud), g.w(&mut s), n).unwrap();
        g.close("swiglu", &g.down(&s), &swiglu::forward(&gg, &uu), 1e-6);
        let (mut dg, mut du) = (g.out(n), g.out(n));
        swiglu::cuda::backward(
            d,
            g.r(&ddd),
            g.r(&ggd),
            g.r(&uud),
            g.w(&mut dg),
            g.w(&mut du),
            n,
        )
        .unwrap();
        let (cdg, cdu) = swiglu::backward(&dd, &gg, &uu);
        g.close("swiglu dg", &g.down(&dg), &cdg, 1e-6);
        g.close("swiglu du", &g.down(&du), &cdu, 1e-6);

        // The head layout, both ways, with and without RoPE.
        let (b, t, heads, hd) = (2, 7, 3, 8);
        let rn = b * t;
        let (xh, cos, sin) = (
            g.values(rn * heads * hd, 7, 2.0),
            g.values(rn * hd / 2, 8, 1.0),
            g.values(rn * hd / 2, 9, 1.0),
        );
        let (gxh, gcos, gsin) = (g.up(&xh), g.up(&cos), g.up(&sin));
        for (inverse, rot) in [
            (false, None),
            (false, Some(1.0f32)),
            (true, None),
            (true, Some(-1.0)),
        ] {
            let mut out = g.out(xh.len());
            let dev_rope = rot.map(|sign| (g.r(&gcos), g.r(&gsin), sign));
            rope::cuda::heads(
                d,
                g.r(&gxh),
                dev_rope,
                g.w(&mut out),
                rn,
                t,
                heads,
                hd,
                inverse,
            )
            .unwrap();
            let cpu_rope = rot.map(|sign| (cos.as_slice(), sin.as_slice(), sign));
            let want = if inverse {
                rope::from_heads(&xh, t, heads, hd, cpu_rope)
            } else {
                rope::to_heads(&xh, t, heads, hd, cpu_rope)
            };
            g.close(
                &format!("heads inverse={inverse} rope={rot:?}"),
                &g.down(&out),
                &want,
                1e-6,
            );
        }

        // Gather, scatter, add, bias, column sum.
        let (width, table_rows) = (40, 50);
        let table = g.values(width * table_rows, 10, 3.0);
        let idx = [3u32, 0, 49, 3, 17];
        let gt = g.up(&table);
        let gi = g.ids(&idx);
        let mut gath = g.out(idx.len() * width);
        // SAFETY: every index is below the table's 50 rows.
        unsafe {
            rows::cuda::gather_rows(
                d,
                g.r(&gt),
                Dev::of(&gi, d),
                g.w(&mut gath),
                idx.len(),
                width,
            )
        }
        .unwrap();
        g.same(
            "gather",
            g.down(&gath),
            rows::gather_rows(&table, &idx, width),
        );
        let distinct = g.ids(&[9u32, 4, 30]);
        let mut sc = g.out(table_rows * width);
        // SAFETY: every index is below the output's 50 rows.
        unsafe {
            rows::cuda::scatter_rows(d, g.r(&gath), Dev::of(&distinct, d), g.w(&mut sc), 3, width)
        }
        .unwrap();
        g.same(
            "scatter",
            g.down(&sc),
            rows::scatter_rows(&g.down(&gath)[..3 * width], &[9, 4, 30], width, table_rows),
        );
        let mut acc = g.up(&table);
        rows::cuda::add_into(d, g.w(&mut acc), g.r(&gt), table.len()).unwrap();
        g.same(
            "add",
            g.down(&acc),
            table.iter().map(|v| v + v).collect::<Vec<_>>(),
        );
        let bias = g.values(width, 11, 1.0);
        let mut biased = g.up(&table);
        rows::cuda::add_bias(d, g.w(&mut biased), g.r(&g.up(&bias)), table_rows, width).unwrap();
        let mut want = table.clone();
        rows::add_bias(&mut want, &bias);
        g.same("bias", g.down(&biased), want);
        let mut cs = g.out(width);
        rows::cuda::col_sum(d, g.r(&gt), g.w(&mut cs), table_rows, width, false).unwrap();
        // The same order of additions: the same bits.
        g.same("column sum", g.down(&cs), rows::col_sum(&table, width));

        // The embedding's gradient.
        let ids = [5u32, 1, 5, 0, 7, 5, 1, 49];
        let l = Lookups::new(&ids, Some(0));
        let dxe = g.values(ids.len() * width, 12, 1.0);
        let mut de = g.up(&table);
        let dl = DevLookups::new(d, &l).unwrap();
        embedding::cuda::backward(d, g.w(&mut de), g.r(&g.up(&dxe)), &dl, width).unwrap();
        let mut want = table.clone();
        embedding::backward(&mut want, &dxe, &l, width);
        g.same("embedding gradient", g.down(&de), want);

        // Products on transposed views, and accumulation.
        let (m, k, nn) = (33, 20, 17);
        let a = g.values(m * k, 13, 1.0);
        let bm = g.values(nn * k, 14, 1.0);
        let (ga, gb) = (g.up(&a), g.up(&bm));
        for (bv, acc) in [(View::new(nn, k).t(), false), (View::new(nn, k).t(), true)] {
            let init = g.values(m * nn, 15, 1.0);
            let mut gd = g.up(&init);
            linear::cuda::matmul(
                d,
                g.w(&mut gd),
                View::new(m, nn),
                g.r(&ga),
                View::new(m, k),
                g.r(&gb),
                bv,
                acc,
            )
            .unwrap();
            let mut want = init.clone();
            linear::matmul(
                &mut want,
                View::new(m, nn),
                &a,
                View::new(m, k),
                &bm,
                bv,
                acc,
                false,
            );
            g.close(&format!("matmul acc={acc}"), &g.down(&gd), &want, 1e-5);
        }
        // dW = dyᵀ·x: both operands transposed or not.
        let dyw = g.values(m * nn, 16, 1.0);
        let mut gdw = g.out(nn * k);
        linear::cuda::matmul(
            d,
            g.w(&mut gdw),
            View::new(nn, k),
            g.r(&g.up(&dyw)),
            View::new(m, nn).t(),
            g.r(&ga),
            View::new(m, k),
            false,
        )
        .unwrap();
        let mut want = vec![0f32; nn * k];
        linear::matmul(
            &mut want,
            View::new(nn, k),
            &dyw,
            View::new(m, nn).t(),
            &a,
            View::new(m, k),
            false,
            false,
        );
        g.close("matmul aᵀ·b", &g.down(&gdw), &want, 1e-5);

        // Attention with grouped queries (4 query heads on 2 key/value heads), padding.
        let hs = Heads {
            b: 2,
            nh: 4,
            nkv: 2,
            t: 9,
            hd: 8,
        };
        let (qn, kn) = (hs.b * hs.nh * hs.t * hs.hd, hs.b * hs.nkv * hs.t * hs.hd);
        let (q, kk, v) = (
            g.values(qn, 17, 1.0),
            g.values(kn, 18, 1.0),
            g.values(kn, 19, 1.0),
        );
        let mut bias = Vec::new();
        for row in 0..hs.b {
            for i in 0..hs.t {
                for j in 0..hs.t {
                    let ok = j <= i && !(row == 1 && j >= 6);
                    bias.push(if ok { 0f32 } else { -1e9 });
                }
            }
        }
        let bias = g.held(&bias);
        let (gq, gk, gv, gbias) = (g.up(&q), g.up(&kk), g.up(&v), g.up(&bias));
        // In bf16 the scores (and in the backward dP and dS) are rounded between the products
        // and the softmax, where the CPU reference keeps f32: a few roundings deep.
        let deep = if T::ROUNDING > 0.0 { 5e-2 } else { 1e-5 };
        let (mut p, mut y) = (g.out(hs.b * hs.nh * hs.t * hs.t), g.out(qn));
        attention::cuda::forward(
            d,
            g.r(&gq),
            g.r(&gk),
            g.r(&gv),
            g.r(&gbias),
            g.w(&mut p),
            g.w(&mut y),
            hs,
        )
        .unwrap();
        let (cp, cy) = attention::forward(&q, &kk, &v, &bias, hs);
        g.close_to("attention P", &g.down(&p), &cp, deep);
        g.close_to("attention y", &g.down(&y), &cy, deep);
        let dya = g.values(qn, 20, 1.0);
        let (mut dq, mut dk, mut dv) = (g.out(qn), g.out(kn), g.out(kn));
        attention::cuda::backward(
            d,
            g.r(&g.up(&dya)),
            g.r(&gq),
            g.r(&gk),
            g.r(&gv),
            g.r(&p),
            g.w(&mut dq),
            g.w(&mut dk),
            g.w(&mut dv),
            hs,
        )
        .unwrap();
        let (cdq, cdk, cdv) = attention::backward(&dya, &q, &kk, &v, &cp, hs);
        g.close_to("attention dq", &g.down(&dq), &cdq, deep);
        g.close_to("attention dk", &g.down(&dk), &cdk, deep);
        g.close_to("attention dv", &g.down(&dv), &cdv, deep);

        // Decoding: a step's keys into the cache, and attention over the cache's first keys
        // (2 new queries over 6 of 8 positions; the rest of the cache never read).
        let (blocks, tn, cap, at) = (hs.b * hs.nkv, 2, 8, 4);
        let cache0 = g.values(blocks * cap * hs.hd, 22, 1.0);
        let fresh = g.values(blocks * tn * hs.hd, 23, 1.0);
        let mut gc = g.up(&cache0);
        rows::cuda::write_cache(
            d,
            g.w(&mut gc),
            g.r(&g.up(&fresh)),
            blocks,
            tn,
            cap,
            at,
            hs.hd,
        )
        .unwrap();
        let mut want = cache0.clone();
        rows::write_cache(&mut want, &fresh, tn, cap, at, hs.hd);
        g.same("write_cache", g.down(&gc), want.clone());
        let hd2 = Heads { t: tn, ..hs };
        let keys = at + tn;
        let q2 = g.values(hs.b * hs.nh * tn * hs.hd, 24, 1.0);
        let mut bias2 = Vec::new();
        for row in 0..hs.b {
            for i in 0..tn {
                for j in 0..keys {
                    let ok = j <= at + i && !(row == 1 && j < 1);
                    bias2.push(if ok { 0f32 } else { -1e9 });
                }
            }
        }
        let bias2 = g.held(&bias2);
        let vc = g.up(&want);
        let (mut p2, mut y2) = (g.out(hs.b * hs.nh * tn * keys), g.out(q2.len()));
        attention::cuda::forward_over(
            d,
            g.r(&g.up(&q2)),
            g.r(&gc),
            g.r(&vc),
            g.r(&g.up(&bias2)),
            g.w(&mut p2),
            g.w(&mut y2),
            hd2,
            [keys, cap],
        )
        .unwrap();
        let (cp2, cy2) = attention::forward_over(&q2, &want, &want, &bias2, hd2, keys, cap);
        g.close_to("attention over a cache P", &g.down(&p2), &cp2, deep);
        g.close_to("attention over a cache y", &g.down(&y2), &cy2, deep);

        // A device copy keeps every bit (−0 and NaN included), and only the first n values.
        let mut src = g.values(1000, 25, 3.0);
        (src[1], src[2]) = (-0.0, f32::NAN);
        let mut copied = g.up(&vec![7.0; 1001]);
        rows::cuda::copy(d, g.w(&mut copied), g.r(&g.up(&src)), 1000).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let got = g.down(&copied);
        assert_eq!(bits(&got[..1000]), bits(&src), "copy ({})", T::NAME);
        assert_eq!(got[1000], 7.0, "copy: past n ({})", T::NAME);

        // Greedy decoding's choice, a row shorter than a warp and one longer than a block.
        for width in [7, 5000] {
            let x = g.held(&super::argmax_cases(width));
            let mut idx = d.alloc_zeros::<u32>(9).unwrap();
            rows::cuda::argmax_rows(d, g.r(&g.up(&x)), DevMut::of(&mut idx, d), 9, width).unwrap();
            let got = d.clone_dtoh(&idx).unwrap();
            let what = format!("argmax_rows width {width} ({})", T::NAME);
            assert_eq!(got, rows::argmax_rows(&x, width), "{what}");
        }

        // The cross-entropy on device buffers, a row longer than a block.
        let (xr, vv) = (3, 5000);
        let logits = g.values(xr * vv, 21, 10.0);
        let targets = [4999u32, 0, 2500];
        let (gl, gtg) = (g.up(&logits), g.ids(&targets));
        let mut nll = g.out32(xr);
        cross_entropy::cuda::forward(d, g.r(&gl), Dev::of(&gtg, d), g.w(&mut nll), xr, vv).unwrap();
        g.close(
            "cross-entropy",
            &g.down32(&nll),
            &cross_entropy::forward(&logits, &targets, vv),
            1e-5,
        );
        let gr = [0.5f32, 0.25, 0.125];
        let mut dl = g.out(xr * vv);
        cross_entropy::cuda::backward(
            d,
            g.r(&gl),
            Dev::of(&gtg, d),
            g.r(&g.up32(&gr)),
            g.w(&mut dl),
            xr,
            vv,
        )
        .unwrap();
        g.close(
            "cross-entropy backward",
            &g.down(&dl),
            &cross_entropy::backward(&logits, &targets, &gr, vv),
            1e-5,
        );

        // A launcher refuses a buffer shorter than what its kernel would touch.
        let mut short = g.out(10);
        let err = rms_norm::cuda::forward(d, g.r(&gx), g.r(&gw), g.w(&mut short), rows_n, h, 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("the kernel writes"), "{err}");
    }
}
