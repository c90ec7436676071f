//! What the CUDA launchers share: NVRTC compilation at first use (for the device's own
//! architecture), device addresses of candle's buffers, contiguous views of a custom op's
//! inputs. The launchers sit beside what they launch: the optimizer's in
//! `optim/launch.rs`, each fused op's in its own file of `ops/`.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaDevice, Result, Storage, Tensor};
use std::marker::PhantomData;
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

/// An address and how many values lie there.
#[derive(Clone, Copy, Debug)]
struct Span {
    ptr: u64,
    len: usize,
}

impl Span {
    /// The address, for a launch, once the length is checked against the `n` values the
    /// kernel touches (`verb`: reads or writes).
    fn at_least(&self, n: usize, what: &str, verb: &str) -> Result<u64> {
        if self.len < n {
            bail!(
                "{what}: {} values on the device, the kernel {verb} {n}",
                self.len
            )
        }
        Ok(self.ptr)
    }
}

/// f32 or u32 values on the device, borrowed for `'a`: a buffer of the written-out training
/// pass, a range of one, or a weight inside candle's storage. The launchers of that pass take
/// these and check every length against the sizes they are given, so they are safe to call —
/// but for the two whose kernels follow indices held on the device (gathering and scattering
/// rows), which are `unsafe fn`s with the indices' bound as their contract.
#[derive(Clone, Copy, Debug)]
pub struct Dev<'a, T> {
    span: Span,
    _borrow: PhantomData<&'a [T]>,
}

/// Values on the device borrowed for writing.
#[derive(Debug)]
pub struct DevMut<'a, T> {
    span: Span,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr> Dev<'a, T> {
    /// All of a buffer (on candle's stream, the only one the pass uses).
    pub fn of(s: &'a CudaSlice<T>, dev: &CudaDevice) -> Self {
        let stream = dev.cuda_stream();
        let (ptr, _record) = s.device_ptr(&stream);
        Dev::at(ptr, s.len())
    }

    /// A view's values.
    pub fn of_view(
        v: &'a candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
        dev: &CudaDevice,
    ) -> Self {
        let stream = dev.cuda_stream();
        let (ptr, _record) = v.device_ptr(&stream);
        Dev::at(ptr, v.len())
    }

    /// `len` values from `start` of candle's storage (a tensor's: its layout's start and
    /// element count).
    pub fn in_storage(s: &'a candle_core::CudaStorage, start: usize, len: usize) -> Result<Self> {
        let all = Dev::of(s.as_cuda_slice::<T>()?, &s.device);
        all.range(start, len)
    }
}

impl<'a, T> Dev<'a, T> {
    fn at(ptr: u64, len: usize) -> Self {
        Dev {
            span: Span { ptr, len },
            _borrow: PhantomData,
        }
    }

    /// Values `start .. start + len`.
    pub fn range(self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.span.len {
            bail!(
                "device range {start}..{} past the end {}",
                start + len,
                self.span.len
            )
        }
        let ptr = self.span.ptr + (start * std::mem::size_of::<T>()) as u64;
        Ok(Dev::at(ptr, len))
    }

    pub fn len(&self) -> usize {
        self.span.len
    }

    pub fn is_empty(&self) -> bool {
        self.span.len == 0
    }

    /// The address, for a launch that reads `n` values.
    pub(crate) fn at_least(&self, n: usize, what: &str) -> Result<u64> {
        self.span.at_least(n, what, "reads")
    }
}

impl<'a, T: DeviceRepr> DevMut<'a, T> {
    /// All of a buffer, for writing.
    pub fn of(s: &'a mut CudaSlice<T>, dev: &CudaDevice) -> Self {
        let stream = dev.cuda_stream();
        let len = s.len();
        let (ptr, _record) = s.device_ptr_mut(&stream);
        DevMut {
            span: Span { ptr, len },
            _borrow: PhantomData,
        }
    }
}

impl<T> DevMut<'_, T> {
    pub fn len(&self) -> usize {
        self.span.len
    }

    pub fn is_empty(&self) -> bool {
        self.span.len == 0
    }

    /// The address, for a launch that writes `n` values.
    pub(crate) fn at_least(&self, n: usize, what: &str) -> Result<u64> {
        self.span.at_least(n, what, "writes")
    }

    /// The same values borrowed again for writing, for a shorter time.
    pub fn reborrow(&mut self) -> DevMut<'_, T> {
        DevMut {
            span: self.span,
            _borrow: PhantomData,
        }
    }

    /// The same values, for reading.
    pub fn as_dev(&self) -> Dev<'_, T> {
        Dev::at(self.span.ptr, self.span.len)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// What the written-out training pass keeps on the device — activations, weights, gradients:
/// f32, or bf16 with f32 arithmetic. Each has its own compilation of pass.cu and fused.cu
/// (their `act`, bf16.cuh), so a launcher's element type picks the kernels.
pub trait Act:
    sealed::Sealed
    + candle_core::cuda_backend::CudaDType
    + DeviceRepr
    + ValidAsZeroBits
    + Copy
    + 'static
{
    /// Index of the compilation: 0 for f32, 1 for bf16 (ACT_BF16 defined).
    const VARIANT: usize;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    const VARIANT: usize = 0;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Act for half::bf16 {
    const VARIANT: usize = 1;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// A .cu file whose kernels read and write `act` (bf16.cuh), compiled once per element type.
pub(crate) struct ActSource {
    pub(crate) file: &'static str,
    /// The modules' names and sources: [f32, bf16].
    pub(crate) modules: [&'static str; 2],
    pub(crate) sources: [&'static str; 2],
    pub(crate) ptx: [Compiled; 2],
}

/// Kernel `name` of `source` compiled for `T`.
pub(crate) fn act_func<T: Act>(
    dev: &CudaDevice,
    source: &'static ActSource,
    name: &str,
) -> Result<CudaFunction> {
    let v = T::VARIANT;
    let ptx = compile(&source.ptx[v], dev, source.file, source.sources[v], false)?;
    Ok(dev
        .get_or_load_custom_func(name, source.modules[v], ptx)?
        .into_cuda_function())
}

/// The written-out training pass's row operations.
pub(crate) static PASS: ActSource = ActSource {
    file: "kernels/cuda/pass.cu",
    modules: ["basin_pass", "basin_pass_bf16"],
    sources: [
        concat!(
            include_str!("../cuda/bf16.cuh"),
            include_str!("../cuda/pass.cu")
        ),
        concat!(
            "#define ACT_BF16\n",
            include_str!("../cuda/bf16.cuh"),
            include_str!("../cuda/pass.cu")
        ),
    ],
    ptx: [OnceLock::new(), OnceLock::new()],
};

/// Threads per block of pass.cu (its `BLOCK`).
pub(crate) const PASS_BLOCK: u32 = 256;

/// Blocks of [`PASS_BLOCK`] threads for one thread per element of `n`.
pub(crate) fn blocks_for(n: usize) -> Result<u32> {
    u32_arg(n.div_ceil(PASS_BLOCK as usize), "blocks")
}

/// Launches kernel `$name` of pass.cu, compiled for element type `$t`, on candle's stream
/// with a `$grid` of blocks of [`PASS_BLOCK`] threads and the arguments named (locals: the
/// launch borrows them).
macro_rules! launch_pass {
    ($dev:expr, $t:ty, $name:expr, $grid:expr; $($arg:ident),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let func = $crate::cuda::act_func::<$t>($dev, &$crate::cuda::PASS, $name)?;
        let stream = $dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        $( b.arg(&$arg); )*
        let (gx, gy): (u32, u32) = $grid;
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: ($crate::cuda::PASS_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's, in its order and types (pass.cu compiled
        // for `$t`: its `act` is `$t`); every
        // address came from `Dev`/`DevMut::at_least` for the number of values the kernel
        // touches with these sizes. The kernel runs on candle's stream, after what wrote its
        // inputs and before any later use of its buffers; a buffer dropped before the kernel
        // has run is freed in stream order (cudarc frees asynchronously on the stream).
        unsafe { b.launch(cfg) }.w()?;
    }};
}
pub(crate) use launch_pass;
