//! The optimizer's kernels, each beside its CPU reference: the AdamW step and the one
//! [`adamw::Step`] struct it reads, the EMA blend, the f64 sums of squares (gradient norm,
//! distance from the start), and [`multi`], which updates every tensor of a model in one
//! call: one launch of `cuda/optim.cu` on a GPU (`launch.rs`), the references on the CPU;
//! and [`bf16`], the EMA kept in bf16 three ways, for pure-bf16 training.

pub mod adamw;
pub mod bf16;
pub mod ema;
pub mod multi;
pub mod norm;

#[cfg(feature = "cuda")]
mod launch;
