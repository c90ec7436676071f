//! `cargo bench -p basin-kernels --bench linear`: a decoding step's products on the CPU —
//! every weight matrix of the SmolLM2-135M shape (30 layers' q, k, v, o, gate, up, down
//! and the tied [49152, 576] output head: 134.5M f32) times `rows` input rows — through
//! [`rows_dot`] and through the GEMM (gemm crate, as the prefill runs). Reports ms per pass
//! and the rate of reading the weights against this machine's read bandwidth (a sum over
//! the same weights on every thread, measured in the same run).
//!
//! Flags: `--rows 1,8,16` (the batch sizes), `--iters N` (timed passes, default 5).

use basin_kernels::ops::linear::{matmul, rows_dot, View};
use rayon::prelude::*;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

/// The [out, in] shapes of SmolLM2-135M's matrices, in the order a decoding step reads them.
fn shapes() -> Vec<(usize, usize)> {
    let mut s = Vec::new();
    for _ in 0..30 {
        s.extend([
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ]);
    }
    s.push((49152, 576));
    s
}

fn main() {
    let rows: Vec<usize> = arg("--rows")
        .unwrap_or_else(|| "1,8,16".into())
        .split(',')
        .map(|r| r.parse().expect("--rows: numbers"))
        .collect();
    let iters: usize = arg("--iters").map_or(5, |v| v.parse().expect("--iters"));
    let weights: Vec<Vec<f32>> = shapes()
        .iter()
        .enumerate()
        .map(|(i, &(o, d))| {
            (0..o * d)
                .map(|k| ((k * 31 + i) % 97) as f32 * 1e-3)
                .collect()
        })
        .collect();
    let bytes: f64 = weights.iter().map(|w| w.len() as f64 * 4.0).sum();
    // Read bandwidth: a sum over all the weights, as a decoding step reads them.
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed().as_secs_f64() / iters as f64
    };
    let read = time(&mut || {
        let s: f32 = weights
            .par_iter()
            .flat_map(|w| w.par_chunks(1 << 16))
            .map(|w| {
                let mut lanes = [0f32; 16];
                for c in w.chunks_exact(16) {
                    lanes.iter_mut().zip(c).for_each(|(a, v)| *a += v);
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
    });
    let read_gbps = bytes / read / 1e9;
    println!(
        "{:.0} MB of weights; read bandwidth (every thread, a sum): {read_gbps:.1} GB/s",
        bytes / 1e6
    );
    println!(
        "{:<6} {:>12} {:>9} {:>12} {:>9} {:>8}",
        "rows", "rows_dot ms", "GB/s", "GEMM ms", "GB/s", "speedup"
    );
    for &r in &rows {
        let xs: Vec<Vec<f32>> = shapes()
            .iter()
            .map(|&(_, d)| (0..r * d).map(|k| (k % 13) as f32 * 0.1).collect())
            .collect();
        let ours = time(&mut || {
            for ((w, x), &(o, d)) in weights.iter().zip(&xs).zip(&shapes()) {
                std::hint::black_box(rows_dot(x, w, r, d, o));
            }
        });
        let gemm = time(&mut || {
            for ((w, x), &(o, d)) in weights.iter().zip(&xs).zip(&shapes()) {
                let mut y = vec![0f32; r * o];
                let (xv, wv) = (View::new(r, d), View::new(o, d));
                matmul(&mut y, View::new(r, o), x, xv, w, wv.t(), false, true);
                std::hint::black_box(y);
            }
        });
        println!(
            "{r:<6} {:>12.1} {:>9.1} {:>12.1} {:>9.1} {:>7.2}x",
            ours * 1e3,
            bytes / ours / 1e9,
            gemm * 1e3,
            bytes / gemm / 1e9,
            gemm / ours
        );
    }
}
