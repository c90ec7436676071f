//! Launches the kernels of `cuda/optim.cu`: compiled once per process with NVRTC (for the
//! device's own architecture), loaded into candle's context, run on candle's stream over
//! candle's buffers. Nothing goes through the host but a table of pointers.

use super::adamw::{AdamWTensors, Step};
use crate::cuda::{address, compile, Compiled};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, Result, Tensor, Var};
use std::sync::OnceLock;

const SOURCE: &str = concat!(
    include_str!("../../cuda/bf16.cuh"),
    include_str!("../../cuda/optim.cu")
);
const MODULE: &str = "basin_optim";
/// Elements per block: enough work per block that launching it costs little (4 float4s per
/// thread), few enough that the 30 small norm vectors do not leave the GPU idle.
const CHUNK_ELEMS: u32 = super::norm::CHUNK_ELEMS as u32;
/// `SUM_THREADS` in optim.cu: the sum kernel's order depends on it.
const THREADS: u32 = super::norm::THREADS as u32;
/// u64 words per table entry: the `Entry` struct of optim.cu.
const ENTRY_WORDS: usize = 8;
/// u64 words per `MixedEntry` of optim.cu (the flags' bits are `MIXED_*` there).
const MIXED_WORDS: usize = 10;

// SAFETY: `Step` is a #[repr(C)] struct of nine f32, the layout of `Step` in optim.cu.
unsafe impl DeviceRepr for Step {}

/// The PTX of optim.cu.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: Compiled = OnceLock::new();
    compile(&PTX, dev, "kernels/cuda/optim.cu", SOURCE, true)
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

    /// Uploads the entry table and returns it with the chunk table and the block count;
    /// each entry's length is its word `N_AT`.
    fn tables<const W: usize, const N_AT: usize>(
        &mut self,
        entries: &[[u64; W]],
    ) -> Result<(CudaSlice<u64>, u32)> {
        let sizes: Vec<u64> = entries.iter().map(|e| e[N_AT]).collect();
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

    /// One launch of kernel `name` over `entries` (`Entry`s of optim.cu); `last` is its
    /// last argument.
    fn launch<T: DeviceRepr>(
        &mut self,
        name: &str,
        entries: &[[u64; ENTRY_WORDS]],
        last: T,
    ) -> Result<()> {
        self.launch_table::<T, ENTRY_WORDS, 6>(name, entries, last)
    }

    /// One launch of kernel `name` over a table of `W`-word entries whose length is word
    /// `N_AT`.
    fn launch_table<T: DeviceRepr, const W: usize, const N_AT: usize>(
        &mut self,
        name: &str,
        entries: &[[u64; W]],
        last: T,
    ) -> Result<()> {
        let (table, blocks) = self.tables::<W, N_AT>(entries)?;
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
        if !tensors.iter().all(AdamWTensors::all_f32) {
            return self.adamw_mixed(tensors, s);
        }
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

    /// `adamw_mixed` of optim.cu: state kept in bf16 or as pairs.
    fn adamw_mixed(&mut self, tensors: &[AdamWTensors], s: &Step) -> Result<()> {
        use candle_core::DType::BF16;
        let dev = self.dev.clone();
        let entries = tensors
            .iter()
            .map(|t| {
                let opt = |v: Option<&Var>| v.map_or(Ok(0), |v| address(v.as_tensor(), &dev));
                let ema = t.ema.filter(|_| s.blends_ema());
                let flag = |on: bool, bit: u64| if on { bit } else { 0 };
                let flags = flag(t.theta.dtype() == BF16, 1)
                    | flag(t.grad.dtype() == BF16, 2)
                    | flag(t.m.dtype() == BF16, 4)
                    | flag(ema.is_some_and(|e| e.dtype() == BF16), 8);
                Ok([
                    address(t.theta.as_tensor(), &dev)?,
                    opt(t.theta_lo)?,
                    address(t.grad, &dev)?,
                    address(t.m.as_tensor(), &dev)?,
                    address(t.v.as_tensor(), &dev)?,
                    opt(ema)?,
                    opt(t.ema_lo.filter(|_| s.blends_ema()))?,
                    opt(t.param)?,
                    t.theta.elem_count() as u64,
                    flags,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        self.launch_table::<Step, MIXED_WORDS, 8>("adamw_mixed", &entries, *s)
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
        Ok(super::norm::total(sums))
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
