//! The hand-written kernels: the two updates the paper's method is made of, the norms that
//! watch them, and the fused row-wise operations of a training step:
//!
//! - [`adamw`]: one AdamW step (decoupled weight decay, bias correction), the formula of
//!   `candle_nn::optim::AdamW`, and the fused AdamW+EMA step;
//! - [`ema`]: the exponential moving average of the weights, θ̄ ← β·θ̄ + (1−β)·θ;
//! - [`norm`]: Σ‖a − b‖² in f64 in a fixed order (the gradient norm, the distance from
//!   the start);
//! - [`softmax`] and [`cross_entropy`]: the two row-wise operations of a training step
//!   that candle runs as long chains of elementwise kernels, fused (forward and backward)
//!   as candle custom ops, with CPU references and CUDA kernels (`cuda/fused.cu`);
//! - [`multi`]: AdamW, the EMA and the sums of squares over every tensor of a model at
//!   once — one kernel launch on a CUDA device (`cuda/optim.cu`, feature `cuda`), the CPU
//!   references otherwise.
//!
//! Every kernel has a plain CPU reference on flat f32 buffers beside it (llm.c's habit), and
//! the CUDA kernels are checked against them: the optimizer's bit for bit, the fused
//! row-wise operations to a tolerance.

pub mod adamw;
pub mod cross_entropy;
pub mod ema;
pub mod multi;
pub mod norm;
pub mod softmax;

#[cfg(feature = "cuda")]
mod cuda;

/// The values a custom op's contiguous CPU input covers (its layout may start at an offset).
fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [T]> {
    Ok(&s.as_slice::<T>()?[l.start_offset()..][..l.shape().elem_count()])
}

/// Elements per rayon task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 16;
