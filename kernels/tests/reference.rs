//! The CPU references against candle_nn's AdamW, and the fused step against the two
//! separate ones.

use basin_kernels::optim::adamw::{adamw_ema_step, adamw_step, AdamWParams, Step};
use basin_kernels::optim::ema::ema_blend;
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.731 + seed as f32 * 1.37).sin() * 0.5)
        .collect()
}

#[test]
fn adamw_matches_candle_nn_over_several_steps() {
    let n = 4099;
    let p = AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let var = Var::from_tensor(&Tensor::from_vec(values(n, 0), n, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![var.clone()],
        ParamsAdamW {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        },
    )
    .unwrap();
    let (mut theta, mut m, mut v) = (values(n, 0), vec![0f32; n], vec![0f32; n]);
    let mut worst = 0f32;
    for step in 1..=5u64 {
        // A loss whose gradient is g = (θ · c) for a fixed vector c: sum(θ² · c) / 2.
        let c = Tensor::from_vec(values(n, step as u32), n, &Device::Cpu).unwrap();
        let loss = (var.as_tensor().sqr().unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        opt.step(&grads).unwrap();
        adamw_step(&mut theta, &g, &mut m, &mut v, &Step::new(&p, step));
        let want = var.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in theta.iter().zip(&want) {
            worst = worst.max((a - b).abs() / b.abs().max(1e-3));
        }
    }
    eprintln!("max relative difference to candle_nn AdamW after 5 steps: {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn fused_step_equals_adamw_then_ema_bitwise() {
    let n = 3 * 65536 + 5;
    let p = AdamWParams {
        lr: 3e-4,
        weight_decay: 0.01,
        ..Default::default()
    };
    let g = values(n, 9);
    let (mut t1, mut m1, mut v1, mut s1) = (
        values(n, 1),
        values(n, 2),
        values(n, 3).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        values(n, 4),
    );
    let (mut t2, mut m2, mut v2, mut s2) = (t1.clone(), m1.clone(), v1.clone(), s1.clone());
    let s = Step::new(&p, 7);
    adamw_step(&mut t1, &g, &mut m1, &mut v1, &s);
    ema_blend(&mut s1, &t1, 0.999);
    adamw_ema_step(&mut t2, &g, &mut m2, &mut v2, &mut s2, &s.with_ema(0.999));
    assert_eq!((t1, m1, v1, s1), (t2, m2, v2, s2));
}

#[test]
fn zero_learning_rate_changes_no_weight() {
    let p = AdamWParams {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut t = values(100, 1);
    let before = t.clone();
    let (mut m, mut v) = (vec![0f32; 100], vec![0f32; 100]);
    adamw_step(
        &mut t,
        &values(100, 2),
        &mut m,
        &mut v,
        &Step::new(&AdamWParams { lr: 0.0, ..p }, 1),
    );
    assert_eq!(t, before);
    assert!(m.iter().any(|&x| x != 0.0), "the moments still move");
}
