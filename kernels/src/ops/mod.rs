//! The model's operations, each beside its CPU reference: the attention softmax and the
//! cross-entropy of a training step fused forward and backward, as candle custom ops and on
//! device buffers (CUDA kernels in `cuda/fused.cu`, each op's launchers in its file); the
//! row operations of the written-out pass — RMSNorm, RoPE and the heads layout, silu(g)·u,
//! gathers and column sums ([`rows`]), the embedding's gradient — as CPU functions with
//! their launchers of `cuda/pass.cu`; attention ([`attention`]: CPU products, cuBLAS batches
//! on the GPU); the matrix products ([`linear`]: the gemm crate, cuBLAS).

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod rms_norm;
pub mod rope;
pub mod rows;
pub mod softmax;
pub mod swiglu;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The values a custom op's contiguous CPU input covers (its layout may start at an offset).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
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
pub(crate) fn cpu_op2<F>(name: &'static str, a: &Tensor, b: &Tensor, fwd: F) -> Result<Tensor>
where
    F: Fn(&[f32], &Layout, &[f32], &Layout) -> (Vec<f32>, Shape) + Send + Sync,
{
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &CpuOp2 { name, fwd })
}

/// fused.cu: the softmax and cross-entropy of a training step.
#[cfg(feature = "cuda")]
static FUSED: crate::cuda::ActSource = crate::cuda::ActSource {
    file: "kernels/cuda/fused.cu",
    modules: ["basin_fused", "basin_fused_bf16"],
    sources: [
        concat!(
            include_str!("../../cuda/bf16.cuh"),
            include_str!("../../cuda/fused.cu")
        ),
        concat!(
            "#define ACT_BF16\n",
            include_str!("../../cuda/bf16.cuh"),
            include_str!("../../cuda/fused.cu")
        ),
    ],
    ptx: [std::sync::OnceLock::new(), std::sync::OnceLock::new()],
};

/// Kernel `name` of fused.cu compiled for `T`.
#[cfg(feature = "cuda")]
fn fused_func<T: crate::cuda::Act>(
    dev: &candle_core::CudaDevice,
    name: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    crate::cuda::act_func::<T>(dev, &FUSED, name)
}
