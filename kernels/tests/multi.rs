//! The multi-tensor API (`basin_kernels::optim::multi`): on the CPU it must give exactly the
//! references' bits; with `--features cuda` on a machine with a GPU, the device must give the
//! same bits as the CPU (odd sizes and views included, which take the kernels' scalar path).

use basin_kernels::optim::adamw::{adamw_ema_step, adamw_step, AdamWParams, AdamWTensors, Step};
use basin_kernels::optim::ema::ema_blend;
use basin_kernels::optim::multi::MultiTensor;
use candle_core::{DType, Device, Tensor, Var};

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618 + seed as f32 * 2.17).sin() * 43758.547).fract() * scale)
        .collect()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Buffers of one tensor, on `dev`: θ, g, m, v, θ̄ (and a bf16 copy of θ).
struct Buffers {
    theta: Var,
    grad: Tensor,
    m: Var,
    v: Var,
    ema: Var,
    param: Var,
}

/// Shapes with lengths that are not multiples of 4, and one longer than a kernel chunk.
const SHAPES: [&[usize]; 5] = [&[7], &[3, 5], &[576], &[130, 131], &[16384 * 2 + 3]];

fn buffers(dev: &Device, grad_dtype: DType) -> Vec<Buffers> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n: usize = shape.iter().product();
            let t = |seed: u32, scale: f32| {
                Tensor::from_vec(values(n, i as u32 * 10 + seed, scale), *shape, dev).unwrap()
            };
            let theta = t(0, 0.5);
            // Every other gradient is a view that starts one element into its buffer: an
            // address the kernels' 16-byte path cannot take.
            let grad = if i % 2 == 1 {
                let flat = values(n + 1, i as u32 * 10 + 1, 0.01);
                Tensor::from_vec(flat, n + 1, dev)
                    .unwrap()
                    .narrow(0, 1, n)
                    .unwrap()
                    .reshape(*shape)
                    .unwrap()
            } else {
                t(1, 0.01)
            };
            Buffers {
                param: Var::from_tensor(&theta.to_dtype(DType::BF16).unwrap()).unwrap(),
                theta: Var::from_tensor(&theta).unwrap(),
                grad: grad.to_dtype(grad_dtype).unwrap(),
                m: Var::from_tensor(&t(2, 1e-3)).unwrap(),
                v: Var::from_tensor(&t(3, 1e-5).abs().unwrap()).unwrap(),
                ema: Var::from_tensor(&t(4, 0.5)).unwrap(),
            }
        })
        .collect()
}

fn tensors(b: &[Buffers], ema: bool, param: bool) -> Vec<AdamWTensors<'_>> {
    b.iter()
        .map(|b| AdamWTensors {
            theta: &b.theta,
            theta_lo: None,
            grad: &b.grad,
            m: &b.m,
            v: &b.v,
            ema: ema.then_some(&b.ema),
            ema_lo: None,
            param: param.then_some(&b.param),
        })
        .collect()
}

fn scalars() -> Step {
    let p = AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    Step::new(&p, 4)
}

#[test]
fn cpu_step_equals_the_references_bit_for_bit() {
    let s = scalars();
    for (ema, grad_scale) in [(false, 1.0f32), (true, 0.25)] {
        let b = buffers(&Device::Cpu, DType::F32);
        let want: Vec<_> = b
            .iter()
            .map(|b| {
                let mut theta = host(b.theta.as_tensor());
                let g: Vec<f32> = host(&b.grad).iter().map(|g| g * grad_scale).collect();
                let (mut m, mut v, mut e) = (
                    host(b.m.as_tensor()),
                    host(b.v.as_tensor()),
                    host(b.ema.as_tensor()),
                );
                if ema {
                    adamw_ema_step(&mut theta, &g, &mut m, &mut v, &mut e, &s.with_ema(0.99));
                } else {
                    adamw_step(&mut theta, &g, &mut m, &mut v, &s);
                }
                [theta, m, v, e]
            })
            .collect();
        let mut step = s.with_grad_scale(grad_scale);
        if ema {
            step = step.with_ema(0.99);
        }
        MultiTensor::new()
            .adamw_step(&tensors(&b, ema, true), &step)
            .unwrap();
        for (b, want) in b.iter().zip(want) {
            let got = [&b.theta, &b.m, &b.v, &b.ema].map(|t| host(t.as_tensor()));
            assert_eq!(got, want, "ema={ema} grad_scale={grad_scale}");
            let rounded = host(&b.theta.as_tensor().to_dtype(DType::BF16).unwrap());
            assert_eq!(
                host(b.param.as_tensor()),
                rounded,
                "the bf16 copy is θ rounded"
            );
        }
    }
}

#[test]
fn cpu_ema_blend_equals_the_reference() {
    let b = buffers(&Device::Cpu, DType::F32);
    let want: Vec<Vec<f32>> = b
        .iter()
        .map(|b| {
            let mut e = host(b.ema.as_tensor());
            ema_blend(&mut e, &host(b.theta.as_tensor()), 0.9);
            e
        })
        .collect();
    let pairs: Vec<(&Var, &Tensor)> = b.iter().map(|b| (&b.ema, b.theta.as_tensor())).collect();
    MultiTensor::new().ema_blend(&pairs, 0.9).unwrap();
    for (b, want) in b.iter().zip(want) {
        assert_eq!(host(b.ema.as_tensor()), want);
    }
}

#[test]
fn bad_buffers_are_refused_with_their_names() {
    let s = scalars();
    let b = buffers(&Device::Cpu, DType::F32);
    let mut mt = MultiTensor::new();
    let plain = s;
    // m of another shape.
    let mut t = tensors(&b, false, false);
    t[0].m = &b[1].m;
    let err = mt.adamw_step(&t, &plain).unwrap_err().to_string();
    assert!(err.contains("theta") && err.contains('m'), "{err}");
    // An EMA blend without EMA buffers.
    let with_ema = s.with_ema(0.9);
    let err = mt
        .adamw_step(&tensors(&b, false, false), &with_ema)
        .unwrap_err()
        .to_string();
    assert!(err.contains("EMA"), "{err}");
    // bf16 master weights.
    let bf = Var::from_tensor(&b[0].theta.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    let mut t = tensors(&b, false, false);
    t[0].theta = &bf;
    let err = mt.adamw_step(&t, &plain).unwrap_err().to_string();
    assert!(err.contains("theta") && err.contains("f32"), "{err}");
    // Nothing was written by the refused calls.
    assert_eq!(host(b[0].theta.as_tensor()), values(7, 0, 0.5));
}

/// Σ‖grad‖² and Σ‖θ̄ − θ‖² of the buffers, by `sum_squares`.
fn sums(b: &[Buffers]) -> (f64, f64) {
    let mut k = MultiTensor::new();
    let grads: Vec<(&Tensor, Option<&Tensor>)> = b.iter().map(|b| (&b.grad, None)).collect();
    let diffs: Vec<(&Tensor, Option<&Tensor>)> = b
        .iter()
        .map(|b| (b.ema.as_tensor(), Some(b.theta.as_tensor())))
        .collect();
    (
        k.sum_squares(&grads).unwrap(),
        k.sum_squares(&diffs).unwrap(),
    )
}

#[test]
fn cpu_sum_squares_is_the_f64_sum() {
    for grad_dtype in [DType::F32, DType::BF16] {
        let b = buffers(&Device::Cpu, grad_dtype);
        let (grads, diffs) = sums(&b);
        let plain = |x: &Tensor, y: Option<&Tensor>| -> f64 {
            let x = host(x);
            let y = y.map(host).unwrap_or_else(|| vec![0.0; x.len()]);
            x.iter()
                .zip(&y)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum()
        };
        let want_g: f64 = b.iter().map(|b| plain(&b.grad, None)).sum();
        let want_d: f64 = b
            .iter()
            .map(|b| plain(b.ema.as_tensor(), Some(b.theta.as_tensor())))
            .sum();
        assert!(
            (grads - want_g).abs() <= 1e-12 * want_g,
            "{grads} vs {want_g}"
        );
        assert!(
            (diffs - want_d).abs() <= 1e-12 * want_d,
            "{diffs} vs {want_d}"
        );
    }
    let b = buffers(&Device::Cpu, DType::F32);
    let err = MultiTensor::new()
        .sum_squares(&[(&b[0].grad, Some(b[1].theta.as_tensor()))])
        .unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
}

/// Buffers of one tensor with the state kept as pure-bf16 training keeps it: θ and θ̄ as
/// compensated pairs (hi, lo), m and v in `moments`.
struct Mixed {
    theta: Var,
    theta_lo: Var,
    grad: Tensor,
    m: Var,
    v: Var,
    ema: Var,
    ema_lo: Var,
}

/// x as bf16 pairs: hi rounded to nearest, lo the rest rounded.
fn pair(x: &Tensor) -> (Var, Var) {
    let hi = x.to_dtype(DType::BF16).unwrap();
    let lo = (x - hi.to_dtype(DType::F32).unwrap())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    (
        Var::from_tensor(&hi).unwrap(),
        Var::from_tensor(&lo).unwrap(),
    )
}

fn mixed(dev: &Device, grad_dtype: DType, moments: DType) -> Vec<Mixed> {
    buffers(dev, grad_dtype)
        .into_iter()
        .map(|b| {
            let (theta, theta_lo) = pair(b.theta.as_tensor());
            let (ema, ema_lo) = pair(b.ema.as_tensor());
            let cast = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(moments).unwrap());
            Mixed {
                theta,
                theta_lo,
                grad: b.grad,
                m: cast(&b.m).unwrap(),
                v: cast(&b.v).unwrap(),
                ema,
                ema_lo,
            }
        })
        .collect()
}

fn mixed_tensors(b: &[Mixed], ema: bool) -> Vec<AdamWTensors<'_>> {
    b.iter()
        .map(|b| AdamWTensors {
            theta: &b.theta,
            theta_lo: Some(&b.theta_lo),
            grad: &b.grad,
            m: &b.m,
            v: &b.v,
            ema: ema.then_some(&b.ema),
            ema_lo: ema.then_some(&b.ema_lo),
            param: None,
        })
        .collect()
}

fn bits(v: &Var) -> Vec<u16> {
    v.as_tensor()
        .to_dtype(DType::BF16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .into_iter()
        .map(|x| x.to_bits())
        .collect()
}

/// The buffers' values, each as raw bits (f32 or bf16 words).
fn mixed_bits(b: &Mixed) -> Vec<(&'static str, Vec<u32>)> {
    let raw = |v: &Var| -> Vec<u32> {
        if v.dtype() == DType::F32 {
            host(v.as_tensor()).iter().map(|x| x.to_bits()).collect()
        } else {
            bits(v).into_iter().map(u32::from).collect()
        }
    };
    vec![
        ("theta", raw(&b.theta)),
        ("theta_lo", raw(&b.theta_lo)),
        ("m", raw(&b.m)),
        ("v", raw(&b.v)),
        ("ema", raw(&b.ema)),
        ("ema_lo", raw(&b.ema_lo)),
    ]
}

/// The pure-bf16 state through `MultiTensor` on the CPU gives exactly the bits of the
/// reference `adamw_mixed` on plain vectors.
#[test]
fn cpu_mixed_step_equals_the_reference_bit_for_bit() {
    use basin_kernels::optim::bf16::{adamw_mixed, Store};
    use half::bf16;
    let s = scalars();
    for moments in [DType::F32, DType::BF16] {
        for (ema, grad_dtype, grad_scale) in [(false, DType::F32, 1.0f32), (true, DType::BF16, 0.5)]
        {
            let b = mixed(&Device::Cpu, grad_dtype, moments);
            let mut step = s.with_grad_scale(grad_scale);
            if ema {
                step = step.with_ema(0.99);
            }
            let want: Vec<_> = b
                .iter()
                .map(|b| {
                    let v16 = |v: &Var| -> Vec<bf16> {
                        bits(v).into_iter().map(bf16::from_bits).collect()
                    };
                    let (mut hi, mut lo, mut ehi, mut elo) =
                        (v16(&b.theta), v16(&b.theta_lo), v16(&b.ema), v16(&b.ema_lo));
                    let (mut m32, mut v32) = (host(b.m.as_tensor()), host(b.v.as_tensor()));
                    let (mut m16, mut v16_) = (v16(&b.m), v16(&b.v));
                    let (m, v) = if moments == DType::F32 {
                        (Store::F32(&mut m32), Store::F32(&mut v32))
                    } else {
                        (Store::Bf16(&mut m16), Store::Bf16(&mut v16_))
                    };
                    adamw_mixed(
                        Store::Pair(&mut hi, &mut lo),
                        &host(&b.grad),
                        m,
                        v,
                        ema.then_some(Store::Pair(&mut ehi, &mut elo)),
                        None,
                        &step,
                    );
                    let w = |x: Vec<bf16>| x.into_iter().map(|x| u32::from(x.to_bits())).collect();
                    let f = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect();
                    let (m, v) = if moments == DType::F32 {
                        (f(m32), f(v32))
                    } else {
                        (w(m16), w(v16_))
                    };
                    vec![
                        ("theta", w(hi)),
                        ("theta_lo", w(lo)),
                        ("m", m),
                        ("v", v),
                        ("ema", w(ehi)),
                        ("ema_lo", w(elo)),
                    ]
                })
                .collect();
            MultiTensor::new()
                .adamw_step(&mixed_tensors(&b, ema), &step)
                .unwrap();
            for (b, want) in b.iter().zip(want) {
                assert_eq!(mixed_bits(b), want, "moments {moments:?} ema={ema}");
            }
            // The step moved θ: hi + lo is no longer the start.
            let start = mixed(&Device::Cpu, grad_dtype, moments);
            assert_ne!(bits(&b[4].theta_lo), bits(&start[4].theta_lo));
        }
    }
}

/// The device check: every kernel on the GPU against the CPU, on the same inputs.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_equal_the_cpu_bit_for_bit() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("cuda_kernels_equal_the_cpu_bit_for_bit: SKIPPED (no CUDA device)");
        return;
    };
    let s = scalars();
    for grad_dtype in [DType::F32, DType::BF16] {
        for (ema, param, grad_scale) in [(false, false, 1.0f32), (true, true, 0.5)] {
            let (c, g) = (buffers(&Device::Cpu, grad_dtype), buffers(&gpu, grad_dtype));
            let mut step = s.with_grad_scale(grad_scale);
            if ema {
                step = step.with_ema(0.99);
            }
            MultiTensor::new()
                .adamw_step(&tensors(&c, ema, param), &step)
                .unwrap();
            MultiTensor::new()
                .adamw_step(&tensors(&g, ema, param), &step)
                .unwrap();
            for (c, g) in c.iter().zip(&g) {
                for (name, a, b) in [
                    ("theta", &c.theta, &g.theta),
                    ("m", &c.m, &g.m),
                    ("v", &c.v, &g.v),
                    ("ema", &c.ema, &g.ema),
                    ("param", &c.param, &g.param),
                ] {
                    assert_eq!(
                        host(a.as_tensor()),
                        host(b.as_tensor()),
                        "{name}: grad {grad_dtype:?} ema={ema} param={param}"
                    );
                }
            }
        }
    }
    let (c, g) = (buffers(&Device::Cpu, DType::F32), buffers(&gpu, DType::F32));
    for b in [&c, &g] {
        let pairs: Vec<(&Var, &Tensor)> = b.iter().map(|b| (&b.ema, b.theta.as_tensor())).collect();
        MultiTensor::new().ema_blend(&pairs, 0.9).unwrap();
    }
    for (c, g) in c.iter().zip(&g) {
        assert_eq!(
            host(c.ema.as_tensor()),
            host(g.ema.as_tensor()),
            "ema_blend"
        );
    }
    // The pure-bf16 state (pairs, bf16 or f32 moments): the same bits on both.
    for moments in [DType::F32, DType::BF16] {
        for (ema, grad_dtype) in [(false, DType::F32), (true, DType::BF16)] {
            let (c, g) = (
                mixed(&Device::Cpu, grad_dtype, moments),
                mixed(&gpu, grad_dtype, moments),
            );
            let mut step = s.with_grad_scale(0.5);
            if ema {
                step = step.with_ema(0.99);
            }
            for b in [&c, &g] {
                MultiTensor::new()
                    .adamw_step(&mixed_tensors(b, ema), &step)
                    .unwrap();
            }
            for (c, g) in c.iter().zip(&g) {
                assert_eq!(
                    mixed_bits(c),
                    mixed_bits(g),
                    "mixed: moments {moments:?} ema={ema}"
                );
            }
        }
    }
    // The sums of squares, in the same order on both: equal bits.
    for grad_dtype in [DType::F32, DType::BF16] {
        let (c, g) = (
            sums(&buffers(&Device::Cpu, grad_dtype)),
            sums(&buffers(&gpu, grad_dtype)),
        );
        assert_eq!(
            c.0.to_bits(),
            g.0.to_bits(),
            "sum of squares, {grad_dtype:?}: {c:?} vs {g:?}"
        );
        assert_eq!(
            c.1.to_bits(),
            g.1.to_bits(),
            "sum of squared differences: {c:?} vs {g:?}"
        );
    }
}
