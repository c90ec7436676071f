//! What the CUDA launchers share: NVRTC compilation at first use (for the device's own
//! architecture), device addresses of candle's buffers, contiguous views of a custom op's
//! inputs. The launchers sit beside what they launch: the optimizer's in
//! `optim/launch.rs`, each fused op's in its own file of `ops/`.

use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaDevice, Result, Storage, Tensor};
use std::sync::OnceLock;

pub(crate) type Compiled = OnceLock<std::result::Result<String, String>>;

/// The PTX of `source` for the device's architecture, compiled at first use. `exact` keeps
/// the compiler from contracting or approximating anything (the optimizer's bit-for-bit
/// promise); the fused training ops only need the usual accuracy.
pub(crate) fn compile(
    cell: &'static Compiled,
    dev: &CudaDevice,
    file: &str,
    source: &str,
    exact: bool,
) -> Result<&'static str> {
    let compiled = cell.get_or_init(|| {
        let (major, minor) = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| format!("compute capability: {e}"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let opts = if exact {
            CompileOptions {
                arch: Some(arch),
                fmad: Some(false),
                prec_div: Some(true),
                prec_sqrt: Some(true),
                ftz: Some(false),
                ..Default::default()
            }
        } else {
            CompileOptions {
                arch: Some(arch),
                ..Default::default()
            }
        };
        compile_ptx_with_opts(source, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {file}: {e}"))
    });
    match compiled {
        Ok(src) => Ok(src.as_str()),
        Err(e) => bail!("{e}"),
    }
}

/// The device address of a tensor's first element.
pub(crate) fn address(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("expected a CUDA tensor")
    };
    let stream = dev.cuda_stream();
    let (base, size) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(s) => (s.device_ptr(&stream).0, 2),
        _ => bail!("expected an f32 or bf16 tensor, found {:?}", t.dtype()),
    };
    Ok(base + (layout.start_offset() * size) as u64)
}

/// A contiguous f32 or u32 view of a custom op's input, from its storage and layout.
pub(crate) fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a candle_core::CudaStorage,
    l: &candle_core::Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !l.is_contiguous() {
        bail!("fused op: expected a contiguous input")
    }
    let start = l.start_offset();
    Ok(s.as_cuda_slice::<T>()?
        .slice(start..start + l.shape().elem_count()))
}

pub(crate) fn u32_arg(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{what} {n} does not fit the kernel's u32")))
}
