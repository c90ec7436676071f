//! The hand-written kernels, split by who uses them, each beside a plain CPU reference on
//! flat f32 buffers (llm.c's habit) and checked against it — the optimizer's bit for bit,
//! the fused row-wise operations to a tolerance:
//!
//! - [`optim`]: the two updates the paper's method is made of and the norms that watch
//!   them — AdamW (the one [`optim::adamw::Step`] struct from the config to the kernel), the
//!   EMA of the weights, f64 sums of squares, and [`optim::multi`], every tensor of a model
//!   in one call (one launch of `cuda/optim.cu` on a GPU);
//! - [`ops`]: the model's operations for the written-out training pass (RMSNorm, RoPE and
//!   the heads layout, silu(g)·u, attention, the cross-entropy, the embedding's gradient,
//!   gathers and sums, the products): CPU functions, and with the `cuda` feature their
//!   launchers of `cuda/pass.cu` and `cuda/fused.cu` and cuBLAS; the softmax and
//!   cross-entropy also as candle custom ops (the autograd path).
//!
//! `cuda` (with the feature): what the launchers share — NVRTC at first use, and
//! `cuda::Dev`/`DevMut`, device buffers with their lengths, which every launcher
//! checks against what its kernel touches.

pub mod ops;
pub mod optim;

#[cfg(feature = "cuda")]
pub mod cuda;

/// Elements per rayon task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 16;

/// Runs `f` as code built for AVX2 and FMA when the CPU has them, else as plain x86-64.
///
/// The optimizer's updates are fused multiply-adds (`mul_add`: the CUDA kernels' `fmaf`,
/// bit for bit). Without the FMA instructions in the build, each is a libm call and the
/// loops do not vectorize; built for them, the same loops vectorize and give the same bits.
#[inline]
pub(crate) fn with_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// Only on a CPU with AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has both features, checked just above.
            return unsafe { run(f) };
        }
    }
    f()
}
