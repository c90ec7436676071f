//! The fused training ops against candle's own ops (whose gradients the model's tests check
//! by finite differences): values and gradients on the CPU (the row functions of the
//! written-out CPU pass against candle's autograd); with `--features cuda` on a
//! machine with a GPU, the device against the CPU.

use basin_kernels::ops::cross_entropy::cross_entropy_rows;
use basin_kernels::ops::linear::linear;
use basin_kernels::ops::softmax::scaled_masked_softmax;
use basin_kernels::ops::{rms_norm, rope, swiglu};
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

/// ∂Σ(w ⊙ y)/∂v for each of `vars`, with y = f(vars): a weighted sum reaches every output.
fn value_and_grads(vars: &[&Var], y: Tensor, seed: u32) -> (Vec<f32>, Vec<Vec<f32>>) {
    let w = Tensor::from_vec(values(y.elem_count(), seed, 1.0), y.shape(), y.device()).unwrap();
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|v| host(grads.get(v.as_tensor()).unwrap()))
        .collect();
    (host(&y), g)
}

fn var(shape: &[usize], seed: u32, scale: f32) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(values(n, seed, scale), shape, &Device::Cpu).unwrap())
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs(got, want);
    assert!(d < tol, "{what}: max difference {d}");
}

/// The weights of Σ(w ⊙ y) in [`value_and_grads`]: the output gradient a row op's backward
/// gets when it is checked against candle's autograd.
fn out_grad(n: usize, seed: u32) -> Vec<f32> {
    values(n, seed, 1.0)
}

#[test]
fn cpu_linear_matches_candles_matmul_and_passes_no_gradient() {
    let (x, w) = (var(&[37, 24], 14, 2.0), var(&[53, 24], 15, 1.0));
    let y = linear(&x, &w).unwrap();
    let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
    assert_close("y", &host(&y), &host(&plain), 1e-5);
    // An inference op: nothing of the graph reaches x or w through it.
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_none() && grads.get(w.as_tensor()).is_none());
    assert!(
        linear(&x, &var(&[53, 23], 17, 1.0)).is_err(),
        "inner sizes differ"
    );
}

#[test]
fn rms_norm_rows_match_candles_ops_and_their_gradient() {
    // 70 rows: more than one task of ROWS_PER_TASK, and a partial last one.
    let (x, w) = (var(&[2, 35, 24], 5, 3.0), var(&[24], 6, 2.0));
    let eps = 1e-5;
    let xs = x.as_tensor();
    let rms = (xs.sqr().unwrap().mean_keepdim(2).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap();
    let plain = xs
        .broadcast_div(&rms)
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap();
    let (y_ref, g_ref) = value_and_grads(&[&x, &w], plain, 7);
    let (xv, wv) = (host(xs), host(w.as_tensor()));
    let y = rms_norm::forward(&xv, &wv, eps as f32);
    let (dx, dw) = rms_norm::backward(&out_grad(xv.len(), 7), &xv, &wv, eps as f32);
    assert_close("y", &y, &y_ref, 1e-5);
    assert_close("dx", &dx, &g_ref[0], 1e-5);
    assert_close("dw", &dw, &g_ref[1], 1e-4);
}

#[test]
fn swiglu_rows_match_candles_ops_and_their_gradient() {
    let (g, u) = (var(&[3, 5, 40_000], 8, 6.0), var(&[3, 5, 40_000], 9, 2.0));
    let plain = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
    let (y_ref, d_ref) = value_and_grads(&[&g, &u], plain, 10);
    let (gv, uv) = (host(g.as_tensor()), host(u.as_tensor()));
    let n = gv.len();
    let y = swiglu::forward(&gv, &uv);
    let (dg, du) = swiglu::backward(&out_grad(n, 10), &gv, &uv);
    assert_close("y", &y, &y_ref, 1e-5);
    assert_close("dg", &dg, &d_ref[0], 1e-5);
    assert_close("du", &du, &d_ref[1], 1e-5);
}

#[test]
fn rope_rows_match_candles_ops_and_their_gradient() {
    let (b, h, t, hd) = (2, 3, 50, 8);
    let x = var(&[b, h, t, hd], 11, 2.0);
    let angles = Tensor::from_vec(
        values(b * t * hd / 2, 12, 6.0),
        (b, t, hd / 2),
        &Device::Cpu,
    )
    .unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    // x·cos + rotate_half(x)·sin with the angles repeated over both halves, as transformers.
    let xs = x.as_tensor();
    let full = |a: &Tensor| Tensor::cat(&[a, a], 2).unwrap().unsqueeze(1).unwrap();
    let (x1, x2) = (
        xs.narrow(3, 0, hd / 2).unwrap(),
        xs.narrow(3, hd / 2, hd / 2).unwrap(),
    );
    let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
    let plain = (xs.broadcast_mul(&full(&cos)).unwrap()
        + rotated.broadcast_mul(&full(&sin)).unwrap())
    .unwrap();
    let (y_ref, g_ref) = value_and_grads(&[&x], plain, 13);
    let (xv, c, s) = (host(xs), host(&cos), host(&sin));
    let dims = [b, h, t, hd];
    let y = rope::rotate(&xv, &c, &s, dims, 1.0);
    // A rotation's transpose is the rotation by the opposite angle.
    let dx = rope::rotate(&out_grad(xv.len(), 13), &c, &s, dims, -1.0);
    assert_close("y", &y, &y_ref, 1e-5);
    assert_close("dx", &dx, &g_ref[0], 1e-5);
    // candle-nn's inference RoPE agrees too.
    let nn = host(&candle_nn::rotary_emb::rope(xs, &cos, &sin).unwrap());
    assert_close("candle-nn rope", &y, &nn, 1e-5);
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
