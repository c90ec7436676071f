//! The two updates the paper's method is made of:
//!
//! - [`adamw`]: one AdamW step (decoupled weight decay, bias correction), the formula of
//!   `candle_nn::optim::AdamW`, and the fused AdamW+EMA step;
//! - [`ema`]: the exponential moving average of the weights, θ̄ ← β·θ̄ + (1−β)·θ;
//! - [`multi`]: both over every tensor of a model in place — one kernel launch on a CUDA
//!   device (`cuda/optim.cu`, feature `cuda`), the CPU references otherwise.
//!
//! adamw.rs and ema.rs are the plain CPU references on flat f32 buffers (llm.c's habit):
//! the CUDA kernels are checked against them element by element.

pub mod adamw;
pub mod ema;
pub mod multi;

#[cfg(feature = "cuda")]
mod cuda;

/// Elements per rayon task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 16;
