//! Launches the kernels of `cuda/optim.cu`: compiled once per process with NVRTC (for the
//! device's own architecture), loaded into candle's context, run on candle's stream over
//! candle's buffers. Nothing goes through the host but a table of pointers.

use crate::adamw::{AdamWTensors, Step};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, Result, Storage, Tensor, Var};
use std::sync::OnceLock;

const SOURCE: &str = include_str!("../cuda/optim.cu");
const MODULE: &str = "basin_optim";
/// Elements per block: enough work per block that launching it costs little (4 float4s per
/// thread), few enough that the 30 small norm vectors do not leave the GPU idle.
const CHUNK_ELEMS: u32 = crate::norm::CHUNK_ELEMS as u32;
/// `SUM_THREADS` in optim.cu: the sum kernel's order depends on it.
const THREADS: u32 = crate::norm::THREADS as u32;
/// u64 words per table entry: the `Entry` struct of optim.cu.
const ENTRY_WORDS: usize = 8;

// SAFETY: `Step` is a #[repr(C)] struct of nine f32, the layout of `Step` in optim.cu.
unsafe impl DeviceRepr for Step {}

type Compiled = OnceLock<std::result::Result<String, String>>;

/// The PTX of `source` for the device's architecture, compiled at first use. `exact` keeps
/// the compiler from contracting or approximating anything (the optimizer's bit-for-bit
/// promise); the fused training ops only need the usual accuracy.
fn compile(
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

/// The PTX of optim.cu.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: Compiled = OnceLock::new();
    compile(&PTX, dev, "kernels/cuda/optim.cu", SOURCE, true)
}

/// A kernel of fused.cu (the softmax and cross-entropy of a training step).
pub(crate) fn fused_func(
    dev: &CudaDevice,
    name: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    static PTX: Compiled = OnceLock::new();
    let ptx = compile(
        &PTX,
        dev,
        "kernels/cuda/fused.cu",
        include_str!("../cuda/fused.cu"),
        false,
    )?;
    Ok(dev
        .get_or_load_custom_func(name, "basin_fused", ptx)?
        .into_cuda_function())
}

/// The device address of a tensor's first element.
fn address(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
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

pub(crate) struct Launcher {
    dev: CudaDevice,
    /// The chunk table (tensor, chunk) pairs, rebuilt only when the tensor sizes change.
    chunks: Option<(Vec<u64>, CudaSlice<u32>, u32)>,
}

impl Launcher {
    pub(crate) fn new(dev: &CudaDevice) -> Result<Self> {
        ptx(dev)?;
        Ok(Self {
            dev: dev.clone(),
            chunks: None,
        })
    }

    /// Uploads the entry table and returns it with the chunk table and the block count.
    fn tables(&mut self, entries: &[[u64; ENTRY_WORDS]]) -> Result<(CudaSlice<u64>, u32)> {
        let sizes: Vec<u64> = entries.iter().map(|e| e[6]).collect();
        if self.chunks.as_ref().map(|c| &c.0) != Some(&sizes) {
            let mut pairs = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let count = n.div_ceil(CHUNK_ELEMS as u64);
                if count > u32::MAX as u64 {
                    bail!("tensor {i} is too large for the chunk table ({n} elements)");
                }
                for c in 0..count as u32 {
                    pairs.extend([i as u32, c]);
                }
            }
            let blocks = (pairs.len() / 2) as u32;
            let slice = self.dev.clone_htod(&pairs)?;
            self.chunks = Some((sizes, slice, blocks));
        }
        let flat: Vec<u64> = entries.iter().flatten().copied().collect();
        let table = self.dev.clone_htod(&flat)?;
        Ok((table, self.chunks.as_ref().expect("just set").2))
    }

    /// One launch of kernel `name` over `entries`; `last` is its last argument.
    fn launch<T: DeviceRepr>(
        &mut self,
        name: &str,
        entries: &[[u64; ENTRY_WORDS]],
        last: T,
    ) -> Result<()> {
        let (table, blocks) = self.tables(entries)?;
        if blocks == 0 {
            return Ok(());
        }
        let func = self
            .dev
            .get_or_load_custom_func(name, MODULE, ptx(&self.dev)?)?;
        let chunks = &self.chunks.as_ref().expect("tables() sets it").1;
        let mut b = func.builder();
        b.arg(&table).arg(chunks).arg(&CHUNK_ELEMS).arg(&last);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature in optim.cu; every pointer in
        // the table was checked (device, dtype, contiguity, length) by the caller, and the
        // tensors outlive the launch on this stream.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    pub(crate) fn adamw(&mut self, tensors: &[AdamWTensors], s: &Step) -> Result<()> {
        let bf16_grad = tensors[0].grad.dtype() == candle_core::DType::BF16;
        if tensors
            .iter()
            .any(|t| (t.grad.dtype() == candle_core::DType::BF16) != bf16_grad)
        {
            bail!("adamw_step: the gradients must all be f32 or all bf16");
        }
        let dev = self.dev.clone();
        let entries = tensors
            .iter()
            .map(|t| {
                let opt = |v: Option<&Var>| v.map_or(Ok(0), |v| address(v.as_tensor(), &dev));
                Ok(entry(
                    [
                        address(t.theta.as_tensor(), &dev)?,
                        address(t.grad, &dev)?,
                        address(t.m.as_tensor(), &dev)?,
                        address(t.v.as_tensor(), &dev)?,
                        if s.blends_ema() { opt(t.ema)? } else { 0 },
                        opt(t.param)?,
                    ],
                    t.theta.elem_count(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let name = match (s.blends_ema(), bf16_grad) {
            (false, false) => "adamw_f32",
            (false, true) => "adamw_bf16",
            (true, false) => "adamw_ema_f32",
            (true, true) => "adamw_ema_bf16",
        };
        self.launch(name, &entries, *s)
    }

    pub(crate) fn ema_blend(&mut self, pairs: &[(&Var, &Tensor)], beta: f32) -> Result<()> {
        let dev = self.dev.clone();
        let entries = pairs
            .iter()
            .map(|(ema, theta)| {
                let (e, t) = (address(ema.as_tensor(), &dev)?, address(theta, &dev)?);
                Ok(entry([t, 0, 0, 0, e, 0], theta.elem_count()))
            })
            .collect::<Result<Vec<_>>>()?;
        self.launch("ema_blend", &entries, 1.0f32 - beta)
    }
}

impl Launcher {
    /// Σ‖a − b‖² in f64: one partial sum per chunk on the device, added on the host.
    pub(crate) fn sum_squares(&mut self, pairs: &[(&Tensor, Option<&Tensor>)]) -> Result<f64> {
        let bf16 = pairs[0].0.dtype() == candle_core::DType::BF16;
        if pairs
            .iter()
            .any(|(a, _)| (a.dtype() == candle_core::DType::BF16) != bf16)
        {
            bail!("sum_squares: the tensors must all be f32 or all bf16");
        }
        let dev = self.dev.clone();
        let entries = pairs
            .iter()
            .map(|(a, b)| {
                let b = b.map_or(Ok(0), |b| address(b, &dev))?;
                Ok(entry([b, address(a, &dev)?, 0, 0, 0, 0], a.elem_count()))
            })
            .collect::<Result<Vec<_>>>()?;
        let blocks: u64 = entries
            .iter()
            .map(|e| e[6].div_ceil(CHUNK_ELEMS as u64))
            .sum();
        if blocks == 0 {
            return Ok(0.0);
        }
        let partials = self.dev.alloc_zeros::<f64>(blocks as usize)?;
        let ptr = {
            let stream = self.dev.cuda_stream();
            let (p, _sync) = partials.device_ptr(&stream);
            p
        };
        self.launch(
            if bf16 { "sum_sq_bf16" } else { "sum_sq_f32" },
            &entries,
            ptr,
        )?;
        let sums = self.dev.clone_dtoh(&partials)?;
        Ok(crate::norm::total(sums))
    }
}

/// An `Entry` of optim.cu: [theta, grad, m, v, ema, param, n, vec4] (0 = absent).
fn entry(ptrs: [u64; 6], n: usize) -> [u64; ENTRY_WORDS] {
    let aligned = ptrs.iter().all(|&p| p.is_multiple_of(16));
    // A bf16 buffer is read 4 elements (8 bytes) at a time: 8-byte alignment suffices, and
    // every base address from the allocator is 256-byte aligned, so 16 covers both.
    let vec4 = u64::from(aligned && n.is_multiple_of(4));
    let [theta, grad, m, v, ema, param] = ptrs;
    [theta, grad, m, v, ema, param, n as u64, vec4]
}

/// A contiguous f32 or u32 view of a custom op's input, from its storage and layout.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
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

/// One warp per row, 8 rows per block.
fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `XENT_THREADS` (fused.cu) per row.
fn block_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn u32_arg(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{what} {n} does not fit the kernel's u32")))
}

/// fused.cu's softmax_fwd; `dims` = [rows, n, heads, tq].
pub(crate) fn softmax_forward(
    s: &candle_core::CudaStorage,
    ls: &candle_core::Layout,
    bias: &candle_core::CudaStorage,
    lb: &candle_core::Layout,
    dims: [usize; 4],
    scale: f32,
) -> Result<candle_core::CudaStorage> {
    let dev = &s.device;
    let (x, b) = (view::<f32>(s, ls)?, view::<f32>(bias, lb)?);
    let [rows, n, heads, tq] = dims;
    // SAFETY: every element is written by the kernel before it is read.
    let mut y = unsafe { dev.alloc::<f32>(rows * n) }?;
    let func = fused_func(dev, "softmax_fwd")?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    let (r, n, h, t) = (
        u32_arg(rows, "rows")?,
        u32_arg(n, "keys")?,
        u32_arg(heads, "heads")?,
        u32_arg(tq, "queries")?,
    );
    a.arg(&x)
        .arg(&b)
        .arg(&mut y)
        .arg(&r)
        .arg(&n)
        .arg(&h)
        .arg(&t)
        .arg(&scale);
    // SAFETY: the arguments match softmax_fwd's signature; x and y hold rows·n floats and
    // the bias (checked [batch, 1, tq, n] by the caller) every row's bias row.
    unsafe { a.launch(warp_rows(rows)) }.w()?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// fused.cu's softmax_bwd; `dims` = [rows, n].
pub(crate) fn softmax_backward(
    dy: &candle_core::CudaStorage,
    ldy: &candle_core::Layout,
    y: &candle_core::CudaStorage,
    ly: &candle_core::Layout,
    dims: [usize; 2],
    scale: f32,
) -> Result<candle_core::CudaStorage> {
    let dev = &dy.device;
    let (g, p) = (view::<f32>(dy, ldy)?, view::<f32>(y, ly)?);
    let [rows, n] = dims;
    if p.len() != rows * n {
        bail!("softmax backward: y and dy differ in size")
    }
    // SAFETY: every element is written by the kernel before it is read.
    let mut ds = unsafe { dev.alloc::<f32>(rows * n) }?;
    let func = fused_func(dev, "softmax_bwd")?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    let (r, n) = (u32_arg(rows, "rows")?, u32_arg(n, "keys")?);
    a.arg(&g).arg(&p).arg(&mut ds).arg(&r).arg(&n).arg(&scale);
    // SAFETY: the arguments match softmax_bwd's signature; all three hold rows·n floats.
    unsafe { a.launch(warp_rows(rows)) }.w()?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(ds, dev.clone()))
}

/// fused.cu's xent_fwd over `rows` rows of `v` logits.
pub(crate) fn xent_forward(
    logits: &candle_core::CudaStorage,
    ll: &candle_core::Layout,
    targets: &candle_core::CudaStorage,
    lt: &candle_core::Layout,
    rows: usize,
    v: usize,
) -> Result<candle_core::CudaStorage> {
    let dev = &logits.device;
    let (x, t) = (view::<f32>(logits, ll)?, view::<u32>(targets, lt)?);
    // SAFETY: the kernel writes every row's value.
    let mut nll = unsafe { dev.alloc::<f32>(rows) }?;
    let func = fused_func(dev, "xent_fwd")?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    let v = u32_arg(v, "vocabulary")?;
    a.arg(&x).arg(&t).arg(&mut nll).arg(&v);
    // SAFETY: the arguments match xent_fwd's signature: rows·v logits, rows targets (the
    // kernel checks each against v), rows outputs.
    unsafe { a.launch(block_rows(rows)) }.w()?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(nll, dev.clone()))
}

/// fused.cu's xent_bwd: the gradient of the logits from the gradient of each row's nll.
#[allow(clippy::too_many_arguments)]
pub(crate) fn xent_backward(
    logits: &candle_core::CudaStorage,
    ll: &candle_core::Layout,
    targets: &candle_core::CudaStorage,
    lt: &candle_core::Layout,
    grad: &candle_core::CudaStorage,
    lg: &candle_core::Layout,
    rows: usize,
    v: usize,
) -> Result<candle_core::CudaStorage> {
    let dev = &logits.device;
    let (x, t, g) = (
        view::<f32>(logits, ll)?,
        view::<u32>(targets, lt)?,
        view::<f32>(grad, lg)?,
    );
    if t.len() != rows || g.len() != rows {
        bail!("cross-entropy backward: expected {rows} targets and gradients")
    }
    // SAFETY: the kernel writes every element.
    let mut d = unsafe { dev.alloc::<f32>(rows * v) }?;
    let func = fused_func(dev, "xent_bwd")?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    let v = u32_arg(v, "vocabulary")?;
    a.arg(&x).arg(&t).arg(&g).arg(&mut d).arg(&v);
    // SAFETY: the arguments match xent_bwd's signature; sizes checked above.
    unsafe { a.launch(block_rows(rows)) }.w()?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(d, dev.clone()))
}
