//! The fused training ops against candle's own ops (whose gradients the model's tests check
//! by finite differences): values and gradients on the CPU; with `--features cuda` on a
//! machine with a GPU, the device against the CPU.

use basin_kernels::cross_entropy::cross_entropy_rows;
use basin_kernels::softmax::scaled_masked_softmax;
use candle_core::{DType, Device, Tensor, Var, D};

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618 + seed as f32 * 2.17).sin() * 43758.547).fract() * scale)
        .collect()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Scores [2, 3, 5, 7], a causal + padding bias [2, 1, 5, 7], and a weight for the output.
fn attention_inputs(dev: &Device) -> (Var, Tensor, Tensor) {
    let (b, h, tq, n) = (2, 3, 5, 7);
    let s = Tensor::from_vec(values(b * h * tq * n, 1, 4.0), (b, h, tq, n), dev).unwrap();
    let mut bias = Vec::new();
    for row in 0..b {
        for i in 0..tq {
            for j in 0..n {
                // Row 1 has 2 padded keys; query i sees keys up to i + 2.
                let ok = j <= i + 2 && !(row == 1 && j >= 5);
                bias.push(if ok { 0f32 } else { -1e9 });
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, tq, n), dev).unwrap();
    let w = Tensor::from_vec(values(b * h * tq * n, 2, 1.0), (b, h, tq, n), dev).unwrap();
    (Var::from_tensor(&s).unwrap(), bias, w)
}

/// The softmax's output and ∂Σ(w ⊙ y)/∂s, fused or by candle's ops.
fn softmax_and_grad(s: &Var, bias: &Tensor, w: &Tensor, fused: bool) -> (Vec<f32>, Vec<f32>) {
    let scale = 0.125;
    let y = if fused {
        scaled_masked_softmax(s.as_tensor(), bias, scale).unwrap()
    } else {
        let z = (s.as_tensor() * scale)
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        candle_nn::ops::softmax(&z, D::Minus1).unwrap()
    };
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    (host(&y), host(grads.get(s.as_tensor()).unwrap()))
}

/// Logits [6, 11], targets, and a per-row weight (a mask over the mean).
fn xent_inputs(dev: &Device) -> (Var, Tensor, Tensor) {
    let logits = Tensor::from_vec(values(66, 3, 8.0), (6, 11), dev).unwrap();
    let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], dev).unwrap();
    let weight = Tensor::new(&[1.0f32, 0.0, 0.5, 2.0, 1.0, 0.25], dev).unwrap();
    (Var::from_tensor(&logits).unwrap(), targets, weight)
}

/// Per-row nll and ∂Σ(weight ⊙ nll)/∂logits, fused or by log_softmax + gather.
fn xent_and_grad(x: &Var, targets: &Tensor, weight: &Tensor, fused: bool) -> (Vec<f32>, Vec<f32>) {
    let nll = if fused {
        cross_entropy_rows(x.as_tensor(), targets).unwrap()
    } else {
        candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    };
    let grads = (&nll * weight)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (host(&nll), host(grads.get(x.as_tensor()).unwrap()))
}

#[test]
fn fused_softmax_matches_candles_ops_and_their_gradient() {
    let (s, bias, w) = attention_inputs(&Device::Cpu);
    let (y, g) = softmax_and_grad(&s, &bias, &w, true);
    let (y_ref, g_ref) = softmax_and_grad(&s, &bias, &w, false);
    assert!(max_abs(&y, &y_ref) < 1e-6, "{}", max_abs(&y, &y_ref));
    assert!(max_abs(&g, &g_ref) < 1e-6, "{}", max_abs(&g, &g_ref));
    // Masked keys get nothing.
    assert_eq!(y[5], 0.0, "row 0, query 0 cannot see key 5");
}

#[test]
fn fused_cross_entropy_matches_log_softmax_and_gather() {
    let (x, t, w) = xent_inputs(&Device::Cpu);
    let (nll, g) = xent_and_grad(&x, &t, &w, true);
    let (nll_ref, g_ref) = xent_and_grad(&x, &t, &w, false);
    assert!(max_abs(&nll, &nll_ref) < 1e-5, "{nll:?} vs {nll_ref:?}");
    assert!(max_abs(&g, &g_ref) < 1e-6, "{}", max_abs(&g, &g_ref));
    assert!(
        g[11..22].iter().all(|&v| v == 0.0),
        "a row of weight 0 has no gradient"
    );
}

#[test]
fn bad_inputs_are_refused() {
    let dev = Device::Cpu;
    let (s, bias, _) = attention_inputs(&dev);
    let wrong = bias.narrow(2, 0, 4).unwrap();
    assert!(scaled_masked_softmax(s.as_tensor(), &wrong, 1.0).is_err());
    let (x, _, _) = xent_inputs(&dev);
    let outside = Tensor::new(&[0u32, 1, 2, 3, 4, 11], &dev).unwrap();
    let err = cross_entropy_rows(x.as_tensor(), &outside).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let f64_logits = x.as_tensor().to_dtype(DType::F64).unwrap();
    assert!(cross_entropy_rows(&f64_logits, &outside).is_err());
}

/// The device check: GPU against CPU, values and gradients.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_ops_match_the_cpu() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("cuda_fused_ops_match_the_cpu: SKIPPED (no CUDA device)");
        return;
    };
    let (s, bias, w) = attention_inputs(&Device::Cpu);
    let (gs, gbias, gw) = attention_inputs(&gpu);
    let (y, g) = softmax_and_grad(&s, &bias, &w, true);
    let (gy, gg) = softmax_and_grad(&gs, &gbias, &gw, true);
    assert!(max_abs(&y, &gy) < 1e-6, "softmax: {}", max_abs(&y, &gy));
    assert!(
        max_abs(&g, &gg) < 1e-6,
        "softmax grad: {}",
        max_abs(&g, &gg)
    );
    let (x, t, wt) = xent_inputs(&Device::Cpu);
    let (gx, gt, gwt) = xent_inputs(&gpu);
    let (nll, d) = xent_and_grad(&x, &t, &wt, true);
    let (gnll, gd) = xent_and_grad(&gx, &gt, &gwt, true);
    assert!(max_abs(&nll, &gnll) < 1e-5, "xent: {nll:?} vs {gnll:?}");
    assert!(max_abs(&d, &gd) < 1e-6, "xent grad: {}", max_abs(&d, &gd));
    // A row longer than one block's threads, as the real vocabulary is.
    let big = Tensor::from_vec(values(3 * 5000, 9, 10.0), (3, 5000), &Device::Cpu).unwrap();
    let targets = Tensor::new(&[4999u32, 0, 2500], &Device::Cpu).unwrap();
    let cpu = host(&cross_entropy_rows(&big, &targets).unwrap());
    let dev = host(
        &cross_entropy_rows(
            &big.to_device(&gpu).unwrap(),
            &targets.to_device(&gpu).unwrap(),
        )
        .unwrap(),
    );
    assert!(max_abs(&cpu, &dev) < 1e-4, "{cpu:?} vs {dev:?}");
}
