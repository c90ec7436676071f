//! The two updates the paper's method is made of, and the norms that watch them:
//!
//! - [`adamw`]: one AdamW step (decoupled weight decay, bias correction), the formula of
//!   `candle_nn::optim::AdamW`, and the fused AdamW+EMA step;
//! - [`ema`]: the exponential moving average of the weights, θ̄ ← β·θ̄ + (1−β)·θ;
//! - [`norm`]: Σ‖a − b‖² in f64 in a fixed order (the gradient norm, the distance from
//!   the start);
//! - [`multi`]: all of them over every tensor of a model at once — one kernel launch on a CUDA
//!   device (`cuda/optim.cu`, feature `cuda`), the CPU references otherwise.
//!
//! adamw.rs, ema.rs and norm.rs are the plain CPU references on flat f32 buffers (llm.c's habit):
//! the CUDA kernels are checked against them element by element.

pub mod adamw;
pub mod ema;
pub mod multi;
pub mod norm;

#[cfg(feature = "cuda")]
mod cuda;

/// Elements per rayon task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 16;
