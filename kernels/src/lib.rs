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
//! - [`rms_norm`], [`rope`] and [`swiglu`]: the rest of a layer's elementwise work, fused
//!   forward and backward, on row slices: the CPU training pass (`basin_lm::backprop`)
//!   calls them; [`linear`]: the CPU matrix products (a strided GEMM, and x · wᵀ for
//!   inference, which keeps a decoding step's few rows from repacking the weights);
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
pub mod linear;
pub mod multi;
pub mod norm;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The values a custom op's contiguous CPU input covers (its layout may start at an offset).
fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    Ok(&s.as_slice::<T>()?[l.start_offset()..][..l.shape().elem_count()])
}

/// An f32 op on the CPU over two inputs, without a backward: the projection of a decoding
/// step ([`linear::linear`]). `fwd` gets the inputs' values and layouts and returns the
/// output's values and shape.
struct CpuOp2<F> {
    name: &'static str,
    fwd: F,
}

impl<F> CustomOp2 for CpuOp2<F>
where
    F: Fn(&[f32], &Layout, &[f32], &Layout) -> (Vec<f32>, Shape) + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (values, shape) = (self.fwd)(cpu_slice(s1, l1)?, l1, cpu_slice(s2, l2)?, l2);
        Ok((CpuStorage::F32(values), shape))
    }
}

/// Applies `fwd` to `a` and `b` (f32, made contiguous) as a CPU op without a gradient.
fn cpu_op2<F>(name: &'static str, a: &Tensor, b: &Tensor, fwd: F) -> Result<Tensor>
where
    F: Fn(&[f32], &Layout, &[f32], &Layout) -> (Vec<f32>, Shape) + Send + Sync,
{
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &CpuOp2 { name, fwd })
}

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
