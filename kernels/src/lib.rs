//! The two updates the paper's method is made of, on flat f32 buffers:
//!
//! - [`adamw`]: one AdamW step (decoupled weight decay, bias correction), the formula of
//!   `candle_nn::optim::AdamW`;
//! - [`ema`]: the exponential moving average of the weights, θ̄ ← β·θ̄ + (1−β)·θ;
//! - [`adamw::adamw_ema_step`]: both in one pass over memory.
//!
//! These are the plain CPU references (used for training on CPU). The CUDA kernels that
//! will sit beside them are checked against them element by element.

pub mod adamw;
pub mod ema;

/// Elements per rayon task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 16;
