//! `just bench-kernels`: the optimizer kernels on a SmolLM2-135M-shaped parameter set
//! (272 tensors, 134.5M f32 parameters), on the GPU with `--features cuda` (the CPU
//! references otherwise).
//!
//! 1. Checks the device result of one fused AdamW+EMA step (and of the bf16 variant)
//!    against the CPU reference: max relative error of θ, m, v, θ̄.
//! 2. Times each kernel (mean of 20 launches after 5 warm-ups) and reports the effective
//!    bandwidth, next to the device's copy bandwidth and, when `--torch FILE` names the
//!    JSON of a PyTorch timing run (keys adamw_fused_ms, ema_foreach_lerp_ms, copy_GBps),
//!    PyTorch's fused AdamW and `_foreach_lerp_`.
//!
//! Flags: `--torch FILE`, `--json FILE` (write the figures), `--cpu` (force the CPU),
//! `--layers N` (fewer layers than SmolLM2's 30: a quicker check).

use basin_kernels::optim::adamw::{adamw_ema_step, AdamWParams, AdamWTensors, Step};
use basin_kernels::optim::multi::MultiTensor;
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

/// SmolLM2-135M: vocab 49152, d 576, ffn 1536, 30 layers, 3 kv heads of 64, tied embeddings.
/// `layers` < 30 gives a smaller set of the same kind (`--layers N`, for a quick check).
fn smollm2_shapes(layers: usize) -> Vec<Vec<usize>> {
    let mut s = vec![vec![49152, 576]];
    for _ in 0..layers {
        s.extend([
            vec![576, 576],
            vec![192, 576],
            vec![192, 576],
            vec![576, 576],
            vec![1536, 576],
            vec![1536, 576],
            vec![576, 1536],
            vec![576],
            vec![576],
        ]);
    }
    s.push(vec![576]);
    s
}

/// Deterministic values in [-scale, scale) (SplitMix64), the same on every device.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

struct Set {
    theta: Vec<Var>,
    grad: Vec<Tensor>,
    m: Vec<Var>,
    v: Vec<Var>,
    ema: Vec<Var>,
}

impl Set {
    fn new(shapes: &[Vec<usize>], dev: &Device) -> candle_core::Result<Self> {
        let mut s = Set {
            theta: vec![],
            grad: vec![],
            m: vec![],
            v: vec![],
            ema: vec![],
        };
        for (i, shape) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let t = |seed: u64, scale: f32| {
                Tensor::from_vec(values(n, seed, scale), shape.as_slice(), &Device::Cpu)?
                    .to_device(dev)
            };
            let i = i as u64 * 8;
            s.theta.push(Var::from_tensor(&t(i, 0.1)?)?);
            s.grad.push(t(i + 1, 1e-3)?);
            s.m.push(Var::from_tensor(&t(i + 2, 1e-4)?)?);
            // v ≥ 0: squares of the gradient's scale.
            s.v.push(Var::from_tensor(&t(i + 3, 1e-6)?.abs()?)?);
            s.ema.push(Var::from_tensor(&t(i + 4, 0.1)?)?);
        }
        Ok(s)
    }

    fn tensors(&self, ema: bool) -> Vec<AdamWTensors<'_>> {
        (0..self.theta.len())
            .map(|i| AdamWTensors {
                theta: &self.theta[i],
                theta_lo: None,
                grad: &self.grad[i],
                m: &self.m[i],
                v: &self.v[i],
                ema: ema.then(|| &self.ema[i]),
                ema_lo: None,
                param: None,
            })
            .collect()
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("host copy")
}

/// max |a − b| / max(|b|, tiny) over the elements.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y).abs() / y.abs().max(1e-30)) as f64)
        .fold(0.0, f64::max)
}

fn time_ms(dev: &Device, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    dev.synchronize().expect("sync");
    let t = Instant::now();
    let iters = 20;
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("sync");
    t.elapsed().as_secs_f64() * 1e3 / iters as f64
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let force_cpu = std::env::args().any(|a| a == "--cpu");
    let dev = if force_cpu {
        Device::Cpu
    } else {
        Device::cuda_if_available(0)?
    };
    let layers = arg("--layers").map_or(Ok(30), |l| l.parse())?;
    let shapes = smollm2_shapes(layers);
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "kernels bench: {} tensors, {n} parameters, device {dev:?}",
        shapes.len()
    );
    let p = AdamWParams {
        lr: 1e-3,
        weight_decay: 0.1,
        ..AdamWParams::default()
    };
    let s = Step::new(&p, 3);
    let beta = 0.99f32;
    let set = Set::new(&shapes, &dev)?;
    let mut mt = MultiTensor::new();
    let mut report =
        serde_json::json!({"device": format!("{dev:?}"), "params": n, "tensors": shapes.len()});

    // 1. The device against the CPU reference, one fused step with clipping.
    let before: Vec<[Vec<f32>; 5]> = (0..shapes.len())
        .map(|i| {
            [
                host(set.theta[i].as_tensor()),
                host(&set.grad[i]),
                host(set.m[i].as_tensor()),
                host(set.v[i].as_tensor()),
                host(set.ema[i].as_tensor()),
            ]
        })
        .collect();
    mt.adamw_step(&set.tensors(true), &s.with_grad_scale(0.5).with_ema(beta))?;
    let mut worst = [0f64; 4];
    for (i, [theta, grad, m, v, ema]) in before.into_iter().enumerate() {
        let (mut theta, mut m, mut v, mut ema) = (theta, m, v, ema);
        let grad: Vec<f32> = grad.iter().map(|g| g * 0.5).collect();
        adamw_ema_step(
            &mut theta,
            &grad,
            &mut m,
            &mut v,
            &mut ema,
            &s.with_ema(beta),
        );
        let got = [&set.theta[i], &set.m[i], &set.v[i], &set.ema[i]].map(|t| host(t.as_tensor()));
        for (w, (g, want)) in worst.iter_mut().zip(got.iter().zip([&theta, &m, &v, &ema])) {
            *w = w.max(max_rel(g, want));
        }
    }
    println!(
        "device vs CPU reference, fused AdamW+EMA step: max relative error θ {:.1e}, m {:.1e}, v {:.1e}, θ̄ {:.1e}",
        worst[0], worst[1], worst[2], worst[3]
    );
    report["max_rel_err"] =
        serde_json::json!({"theta": worst[0], "m": worst[1], "v": worst[2], "ema": worst[3]});

    // The bf16 variant: bf16 gradients in, bf16 copy of θ out, against the same reference.
    let bf_grad: Vec<Tensor> = set
        .grad
        .iter()
        .map(|g| g.to_dtype(DType::BF16))
        .collect::<Result<_, _>>()?;
    let bf_param: Vec<Var> = set
        .theta
        .iter()
        .map(|t| Var::from_tensor(&t.as_tensor().to_dtype(DType::BF16)?))
        .collect::<Result<_, _>>()?;
    let bf_tensors = |ema: bool| -> Vec<AdamWTensors> {
        (0..shapes.len())
            .map(|i| AdamWTensors {
                theta: &set.theta[i],
                theta_lo: None,
                grad: &bf_grad[i],
                m: &set.m[i],
                v: &set.v[i],
                ema: ema.then(|| &set.ema[i]),
                ema_lo: None,
                param: Some(&bf_param[i]),
            })
            .collect()
    };
    let mut bf_worst = 0f64;
    {
        let before: Vec<Vec<f32>> = (0..shapes.len())
            .map(|i| host(set.theta[i].as_tensor()))
            .collect();
        let mut m_host: Vec<Vec<f32>> = (0..shapes.len())
            .map(|i| host(set.m[i].as_tensor()))
            .collect();
        let mut v_host: Vec<Vec<f32>> = (0..shapes.len())
            .map(|i| host(set.v[i].as_tensor()))
            .collect();
        mt.adamw_step(&bf_tensors(false), &s)?;
        for i in 0..shapes.len() {
            let mut theta = before[i].clone();
            let g = host(&bf_grad[i]);
            basin_kernels::optim::adamw::adamw_step(
                &mut theta,
                &g,
                &mut m_host[i],
                &mut v_host[i],
                &s,
            );
            let want = host(
                &Tensor::from_vec(theta.clone(), theta.len(), &Device::Cpu)?
                    .to_dtype(DType::BF16)?,
            );
            bf_worst = bf_worst
                .max(max_rel(&host(set.theta[i].as_tensor()), &theta))
                .max(max_rel(&host(bf_param[i].as_tensor()), &want));
        }
    }
    println!("device vs CPU reference, bf16 AdamW step (f32 master, bf16 grad and copy): max relative error {bf_worst:.1e}");
    report["max_rel_err_bf16"] = bf_worst.into();

    // The sums of squares (gradient norm, distance from the start) against the reference.
    let norm_pairs: Vec<(&Tensor, Option<&Tensor>)> = set
        .grad
        .iter()
        .zip(&set.theta)
        .map(|(g, t)| (g, Some(t.as_tensor())))
        .collect();
    let got = mt.sum_squares(&norm_pairs)?;
    let want = basin_kernels::optim::norm::total(norm_pairs.iter().flat_map(|(a, b)| {
        basin_kernels::optim::norm::chunk_sums(&host(a), Some(&host(b.unwrap())))
    }));
    println!(
        "device vs CPU reference, Σ‖g − θ‖² in f64: {got:e} vs {want:e} ({})",
        if got.to_bits() == want.to_bits() {
            "equal bits"
        } else {
            "DIFFERENT"
        }
    );
    report["sum_sq_equal_bits"] = (got.to_bits() == want.to_bits()).into();

    // 2. Timings. Bytes per parameter: AdamW reads θ g m v, writes θ m v (28); the EMA reads
    // θ̄ θ, writes θ̄ (12); fused: 36; bf16 AdamW: f32 θ m v, bf16 g and copy (28); the sum
    // of squares reads g (4), or θ and θ₀ (8). The sums include the copy of the partial sums
    // to the host, as the training loop uses them.
    let copy_gbps = copy_bandwidth(&dev)?;
    println!("device copy: {copy_gbps:.0} GB/s (read + write)");
    report["copy_GBps"] = copy_gbps.into();
    let adamw = set.tensors(false);
    let fused = set.tensors(true);
    let pairs: Vec<(&Var, &Tensor)> = set
        .ema
        .iter()
        .zip(&set.theta)
        .map(|(e, t)| (e, t.as_tensor()))
        .collect();
    let with_ema = s.with_ema(beta);
    let bf = bf_tensors(false);
    let grad_norm: Vec<(&Tensor, Option<&Tensor>)> = set.grad.iter().map(|g| (g, None)).collect();
    let distance: Vec<(&Tensor, Option<&Tensor>)> = set
        .theta
        .iter()
        .zip(&set.ema)
        .map(|(t, e)| (t.as_tensor(), Some(e.as_tensor())))
        .collect();
    let rows = [
        (
            "adamw_f32",
            28.0,
            time_ms(&dev, || mt.adamw_step(&adamw, &s).expect("adamw")),
        ),
        (
            "ema_blend",
            12.0,
            time_ms(&dev, || mt.ema_blend(&pairs, beta).expect("ema")),
        ),
        (
            "adamw_ema_f32 (fused)",
            36.0,
            time_ms(&dev, || mt.adamw_step(&fused, &with_ema).expect("fused")),
        ),
        (
            "adamw_bf16 (f32 master)",
            28.0,
            time_ms(&dev, || mt.adamw_step(&bf, &s).expect("bf16")),
        ),
        (
            "sum_sq (gradient norm)",
            4.0,
            time_ms(&dev, || {
                mt.sum_squares(&grad_norm).expect("norm");
            }),
        ),
        (
            "sum_sq (‖θ − θ₀‖)",
            8.0,
            time_ms(&dev, || {
                mt.sum_squares(&distance).expect("distance");
            }),
        ),
    ];
    let torch: Option<serde_json::Value> = arg("--torch")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    println!(
        "{:<26} {:>9} {:>9} {:>8}",
        "kernel", "ms", "GB/s", "of copy"
    );
    for (name, bytes, ms) in rows {
        let gbps = bytes * n as f64 / (ms * 1e-3) / 1e9;
        println!(
            "{name:<26} {ms:>9.3} {gbps:>9.0} {:>7.0}%",
            100.0 * gbps / copy_gbps
        );
        report["kernels"][name] =
            serde_json::json!({"ms": ms, "GBps": gbps, "of_copy": gbps / copy_gbps});
    }
    if let Some(t) = &torch {
        let (adamw, lerp) = (
            t["adamw_fused_ms"].as_f64(),
            t["ema_foreach_lerp_ms"].as_f64(),
        );
        if let (Some(a), Some(l)) = (adamw, lerp) {
            let ours = report["kernels"]["adamw_ema_f32 (fused)"]["ms"]
                .as_f64()
                .unwrap_or(f64::NAN);
            println!(
                "PyTorch (same call): fused AdamW {a:.3} ms + _foreach_lerp_ {l:.3} ms = {:.3} ms; ours fused {ours:.3} ms: {:.2}x; torch copy {:.0} GB/s",
                a + l,
                (a + l) / ours,
                t["copy_GBps"].as_f64().unwrap_or(f64::NAN)
            );
        }
        report["torch"] = t.clone();
    }
    if let Some(path) = arg("--json") {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Device-to-device copy of 2^27 f32 (read + write), the bandwidth the kernels aim at.
fn copy_bandwidth(dev: &Device) -> anyhow::Result<f64> {
    let n = 1usize << 27;
    let x = Tensor::zeros(n, DType::F32, dev)?;
    let y = Var::zeros(n, DType::F32, dev)?;
    let ms = time_ms(dev, || y.set(&x).expect("copy"));
    Ok(8.0 * n as f64 / (ms * 1e-3) / 1e9)
}
