//! Σ‖a − b‖² over a model's tensors in f64: the gradient norm (b = 0) that clipping needs
//! every step, and the distance from the start ‖θ − θ₀‖ that every step logs.
//!
//! The sum has a fixed order so the CUDA kernel (`sum_sq` in cuda/optim.cu) and this
//! reference give the same bits:
//!
//! - each tensor is cut into chunks of [`CHUNK_ELEMS`] elements, one GPU block each;
//! - in a chunk, "thread" t sums the quads (4 consecutive elements) t, t + 256, t + 512, …,
//!   each quad's elements in order;
//! - the 256 thread sums are added as a tree: x[i] += x[i + s] for s = 128, 64, …, 1;
//! - the chunk sums are added on the host, tensor by tensor, chunk by chunk.
//!
//! Every term is (a − b)² with a and b widened to f64 first: exact for f32 inputs.

use rayon::prelude::*;

/// Elements per chunk: one GPU block (shared with the optimizer kernels).
pub const CHUNK_ELEMS: usize = 16384;
/// Threads per GPU block, the width of the tree.
pub const THREADS: usize = 256;

/// One chunk's sum in the kernel's order.
fn chunk_sum(a: &[f32], b: Option<&[f32]>) -> f64 {
    let mut acc = [0f64; THREADS];
    for (q, quad) in a.chunks(4).enumerate() {
        let t = q % THREADS;
        for (k, &x) in quad.iter().enumerate() {
            let d = match b {
                Some(b) => x as f64 - b[4 * q + k] as f64,
                None => x as f64,
            };
            acc[t] += d * d;
        }
    }
    let mut s = THREADS / 2;
    while s > 0 {
        for i in 0..s {
            acc[i] += acc[i + s];
        }
        s /= 2;
    }
    acc[0]
}

/// The chunk sums of one tensor pair, in chunk order.
pub fn chunk_sums(a: &[f32], b: Option<&[f32]>) -> Vec<f64> {
    if let Some(b) = b {
        assert_eq!(a.len(), b.len(), "sum of squares: a and b differ in length");
    }
    a.par_chunks(CHUNK_ELEMS)
        .enumerate()
        .map(|(c, chunk)| {
            let b = b.map(|b| &b[c * CHUNK_ELEMS..c * CHUNK_ELEMS + chunk.len()]);
            chunk_sum(chunk, b)
        })
        .collect()
}

/// Adds chunk sums in order (the host's last step on either device).
pub fn total(sums: impl IntoIterator<Item = f64>) -> f64 {
    sums.into_iter().fold(0.0, |acc, s| acc + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_f64_sum_closely() {
        let n = 3 * CHUNK_ELEMS + 1234;
        let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos()).collect();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum();
        let got = total(chunk_sums(&a, Some(&b)));
        assert!(((got - want) / want).abs() < 1e-12, "{got} vs {want}");
        let norm: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!((total(chunk_sums(&a, None)) - norm).abs() / norm < 1e-12);
        assert_eq!(chunk_sums(&a, None).len(), 4, "one sum per chunk");
    }
}
