//! The optimizer, in one place: the learning-rate schedule, gradient clipping, AdamW's
//! per-step constants and the EMA's schedule and feedback. [`step`] turns the run's config
//! and a step number into the one [`Step`] that the CPU loop and the CUDA kernel both take
//! unchanged ([`basin_kernels::optim::adamw`]); [`crate::state`] applies it.

use basin_kernels::optim::adamw::{AdamWParams, Step};
use basin_lm::artifacts::TrainConfig;

/// The learning rate at optimizer step `t` (1-based) of `total`: linear warm-up, then
/// constant, linear or cosine down to `min_lr_ratio`·lr.
pub fn lr_at(config: &TrainConfig, t: usize, total: usize) -> f64 {
    if t <= config.warmup_steps {
        return config.lr * t as f64 / config.warmup_steps.max(1) as f64;
    }
    let span = total.saturating_sub(config.warmup_steps).max(1) as f64;
    let progress = ((t - config.warmup_steps) as f64 / span).min(1.0);
    let floor = config.lr * config.min_lr_ratio;
    match config.schedule.as_str() {
        "linear" => floor + (config.lr - floor) * (1.0 - progress),
        "cosine" => {
            floor + (config.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        _ => config.lr,
    }
}

/// The factor every gradient is multiplied by: clip / ‖g‖ when the norm is over the clip
/// (and clipping is on), else 1.
pub fn clip_factor(config: &TrainConfig, grad_norm: f64) -> f32 {
    if config.grad_clip > 0.0 && grad_norm > config.grad_clip {
        (config.grad_clip / grad_norm) as f32
    } else {
        1.0
    }
}

/// Whether step `t` blends θ̄ with θ: from `ema.start` on, every `ema.every` steps.
pub fn ema_due(config: &TrainConfig, t: usize) -> bool {
    let e = &config.ema;
    e.enabled && t > e.start && (t - e.start).is_multiple_of(e.every)
}

/// Whether step `t` copies θ̄ into θ afterwards (Lookahead-style feedback).
pub fn feedback_due(config: &TrainConfig, t: usize) -> bool {
    let e = &config.ema;
    e.enabled && e.feedback_every > 0 && t.is_multiple_of(e.feedback_every)
}

/// Optimizer step `t` (1-based) of `total`, after gradients of norm `grad_norm`.
pub fn step(config: &TrainConfig, t: usize, total: usize, grad_norm: f64) -> Step {
    let adamw = AdamWParams {
        lr: lr_at(config, t, total),
        beta1: config.beta1,
        beta2: config.beta2,
        eps: config.eps,
        weight_decay: config.weight_decay,
    };
    let s = Step::new(&adamw, t as u64).with_grad_scale(clip_factor(config, grad_norm));
    if ema_due(config, t) {
        s.with_ema(config.ema.beta as f32)
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_by_hand() {
        let c = TrainConfig {
            lr: 1e-3,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
            schedule: "linear".into(),
            ..TrainConfig::default()
        };
        // Warm-up 1/2, 2/2; then linear from lr (progress 0) to 0.1·lr (progress 1) over 8 steps.
        assert_eq!(lr_at(&c, 1, 10), 5e-4);
        assert_eq!(lr_at(&c, 2, 10), 1e-3);
        assert!((lr_at(&c, 6, 10) - (1e-4 + 9e-4 * 0.5)).abs() < 1e-15);
        assert!((lr_at(&c, 10, 10) - 1e-4).abs() < 1e-15);
        let cosine = TrainConfig {
            schedule: "cosine".into(),
            ..c.clone()
        };
        assert!(
            (lr_at(&cosine, 6, 10) - (1e-4 + 9e-4 * 0.5)).abs() < 1e-15,
            "cos(π/2) = 0"
        );
        let constant = TrainConfig {
            schedule: "constant".into(),
            ..c
        };
        assert_eq!(lr_at(&constant, 9, 10), 1e-3);
    }

    #[test]
    fn one_step_struct_carries_clipping_and_the_ema_when_due() {
        let mut c = TrainConfig {
            lr: 1e-3,
            grad_clip: 1.0,
            ..TrainConfig::default()
        };
        c.ema.enabled = true;
        c.ema.beta = 0.75;
        c.ema.start = 2;
        c.ema.every = 2;
        c.ema.feedback_every = 3;
        assert_eq!(clip_factor(&c, 4.0), 0.25);
        assert_eq!(clip_factor(&c, 0.5), 1.0);
        let s = step(&c, 4, 10, 4.0);
        assert_eq!((s.lr, s.grad_scale, s.ema_weight), (1e-3, 0.25, 0.25));
        assert_eq!(
            s,
            Step::new(
                &AdamWParams {
                    lr: 1e-3,
                    ..AdamWParams::default()
                },
                4
            )
            .with_grad_scale(0.25)
            .with_ema(0.75)
        );
        // From start = 2 on, every 2 steps: 4, 6, ...; never at or before the start.
        let due: Vec<usize> = (1..=7).filter(|&t| ema_due(&c, t)).collect();
        assert_eq!(due, [4, 6]);
        assert!(!step(&c, 5, 10, 0.5).blends_ema());
        let fb: Vec<usize> = (1..=7).filter(|&t| feedback_due(&c, t)).collect();
        assert_eq!(fb, [3, 6]);
        c.ema.enabled = false;
        assert!(!ema_due(&c, 4) && !feedback_due(&c, 6));
    }
}
