//! Learning rate by step: linear warmup (detectron2's `WarmupParamScheduler`)
//! times a multistep or cosine decay.

use crate::config::{LrSchedule, TrainConfig};

/// Learning rate at `step` (0-based) of a run of `total_steps`.
///
/// Warmup: the factor rises linearly from `warmup_factor` at step 0 to 1 at
/// `warmup_steps`. Multistep: `lr * gamma^k`, `k` the number of `lr_steps`
/// already reached. Cosine: `lr * (1 + cos(pi * step / total)) / 2`.
pub(super) fn learning_rate(cfg: &TrainConfig, step: usize, total_steps: usize) -> f64 {
    let decayed = match cfg.schedule {
        LrSchedule::Multistep => {
            let reached = cfg.lr_steps.iter().filter(|&&s| step >= s).count();
            cfg.lr * cfg.lr_gamma.powi(reached as i32)
        }
        LrSchedule::Cosine => {
            let progress = step as f64 / total_steps.max(1) as f64;
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    };
    decayed * warmup_factor(cfg, step)
}

fn warmup_factor(cfg: &TrainConfig, step: usize) -> f64 {
    if step >= cfg.warmup_steps {
        return 1.0;
    }
    let alpha = step as f64 / cfg.warmup_steps as f64;
    cfg.warmup_factor * (1.0 - alpha) + alpha
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_1x_schedule() {
        let cfg = TrainConfig {
            lr: 0.01,
            warmup_steps: 1000,
            warmup_factor: 0.001,
            lr_steps: vec![60_000, 80_000],
            lr_gamma: 0.1,
            schedule: LrSchedule::Multistep,
            ..TrainConfig::default()
        };
        let lr = |s| learning_rate(&cfg, s, 90_000);
        assert!((lr(0) - 1e-5).abs() < 1e-12);
        assert!((lr(500) - 0.01 * (0.001 * 0.5 + 0.5)).abs() < 1e-12);
        assert_eq!(lr(1000), 0.01);
        assert_eq!(lr(59_999), 0.01);
        assert!((lr(60_000) - 0.001).abs() < 1e-12);
        assert!((lr(80_000) - 0.0001).abs() < 1e-12);
    }

    #[test]
    fn cosine_decays_to_zero() {
        let cfg = TrainConfig { lr: 0.02, warmup_steps: 0, schedule: LrSchedule::Cosine, ..TrainConfig::default() };
        assert_eq!(learning_rate(&cfg, 0, 100), 0.02);
        assert!((learning_rate(&cfg, 50, 100) - 0.01).abs() < 1e-12);
        assert!(learning_rate(&cfg, 100, 100).abs() < 1e-12);
    }
}
