//! Learning-rate schedules: linear warm-up, then constant, linear or cosine decay; and the
//! [`Cadence`] of metric rows, evaluations and checkpoints.
//!
//! `lr_at(step)` takes the 0-based index of the optimizer step about to run. Warm-up
//! ramps `base_lr * (step + 1) / warmup_steps`, so the first step already moves the weights
//! and the last warm-up step runs at `base_lr`. Decay then goes from `base_lr` at
//! `step == warmup_steps` to `min_lr_ratio * base_lr` at `step == total_steps` (and stays
//! there past it).

/// Shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Final learning rate as a fraction of `base_lr` (linear and cosine).
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// Learning rate of the 0-based optimizer step `step` (the one about to run).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min = self.min_lr_ratio;
        // Fraction of the decay phase done, in [0, 1].
        let progress = || {
            let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
            ((step - self.warmup_steps) as f64 / span as f64).min(1.0)
        };
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => min + (1.0 - min) * (1.0 - progress()),
            ScheduleKind::Cosine => min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress()).cos()),
        };
        self.base_lr * factor
    }

    /// Warm-up length: explicit `steps` win; otherwise `ratio * total` rounded up (a product
    /// within 1e-9 of an integer counts as that integer, so 0.07 * 100 gives 7, not 8).
    pub fn warmup_from(ratio: f64, steps: Option<u64>, total: u64) -> u64 {
        if let Some(s) = steps {
            return s;
        }
        let x = ratio * total as f64;
        if !x.is_finite() || x <= 0.0 {
            return 0;
        }
        let r = x.round();
        if (x - r).abs() <= 1e-9 * r.max(1.0) {
            r as u64
        } else {
            x.ceil() as u64
        }
    }
}

/// "Every `every` steps and after the last one" (`every` 0: never): when the trainer writes
/// a metric row, evaluates and checkpoints. `due` takes the number of steps done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub every: u64,
    /// The run's last step.
    pub last: u64,
}

impl Cadence {
    pub fn enabled(&self) -> bool {
        self.every > 0
    }

    pub fn due(&self, step: u64) -> bool {
        self.enabled() && (step.is_multiple_of(self.every) || step == self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence_is_every_n_steps_and_the_last_one() {
        let c = Cadence { every: 4, last: 10 };
        let due: Vec<u64> = (0..=12).filter(|&s| c.due(s)).collect();
        assert_eq!(due, [0, 4, 8, 10, 12]);
        let never = Cadence { every: 0, last: 10 };
        assert!(!never.enabled() && (0..=12).all(|s| !never.due(s)));
    }

    fn sched(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0e-3,
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.1,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-15, "{a} != {b}");
    }

    #[test]
    fn warmup_starts_above_zero_and_reaches_base() {
        for kind in [ScheduleKind::Constant, ScheduleKind::Linear, ScheduleKind::Cosine] {
            let s = sched(kind);
            close(s.lr_at(0), 0.25e-3);
            close(s.lr_at(1), 0.50e-3);
            close(s.lr_at(2), 0.75e-3);
            close(s.lr_at(3), 1.00e-3);
            // first step after warm-up: no decay yet
            close(s.lr_at(4), 1.00e-3);
        }
    }

    #[test]
    fn constant_stays_at_base() {
        let s = sched(ScheduleKind::Constant);
        for step in [4, 9, 13, 14, 100] {
            close(s.lr_at(step), 1.0e-3);
        }
    }

    #[test]
    fn linear_decays_to_min_at_total() {
        let s = sched(ScheduleKind::Linear);
        // decay span = 14 - 4 = 10 steps; lr = 1e-3 * (0.1 + 0.9 * (1 - p))
        close(s.lr_at(5), 1.0e-3 * (0.1 + 0.9 * 0.9)); // p = 0.1 -> 0.91e-3
        close(s.lr_at(9), 0.55e-3); // p = 0.5
        close(s.lr_at(13), 1.0e-3 * (0.1 + 0.9 * 0.1)); // p = 0.9 -> 0.19e-3
        close(s.lr_at(14), 0.1e-3);
        close(s.lr_at(1000), 0.1e-3);
    }

    #[test]
    fn cosine_decays_to_min_at_total() {
        let s = sched(ScheduleKind::Cosine);
        // lr = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + cos(pi * p)))
        close(s.lr_at(9), 0.55e-3); // p = 0.5: cos = 0
                                    // step 7: p = 0.3, cos(0.3 pi) = 0.587785...: 1e-3 * (0.1 + 0.9 * 0.793892...)
        assert!((s.lr_at(7) - 0.814503363531613e-3).abs() < 1e-15);
        // step 12: p = 0.8, cos(0.8 pi) = -0.809017...: 1e-3 * (0.1 + 0.9 * 0.0954915...)
        assert!((s.lr_at(12) - 0.18594235253127373e-3).abs() < 1e-15);
        close(s.lr_at(14), 0.1e-3);
        close(s.lr_at(20), 0.1e-3);
        // monotone non-increasing after warm-up
        for step in 4..20 {
            assert!(s.lr_at(step + 1) <= s.lr_at(step) + 1e-18);
        }
    }

    #[test]
    fn no_warmup_and_degenerate_totals() {
        let s = LrSchedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
        };
        // total <= warm-up: the decay span counts as one step
        close(s.lr_at(0), 2.0);
        close(s.lr_at(1), 0.0);
        let s = LrSchedule { total_steps: 2, ..s };
        close(s.lr_at(0), 2.0);
        close(s.lr_at(1), 1.0);
        close(s.lr_at(2), 0.0);
        // warm-up longer than the run: ramps only
        let s = LrSchedule {
            kind: ScheduleKind::Linear,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 5,
            min_lr_ratio: 0.0,
        };
        close(s.lr_at(4), 0.5);
    }

    #[test]
    fn warmup_from_ratio_or_steps() {
        assert_eq!(LrSchedule::warmup_from(0.05, Some(7), 300), 7);
        assert_eq!(LrSchedule::warmup_from(0.05, None, 300), 15);
        assert_eq!(LrSchedule::warmup_from(0.05, None, 301), 16); // 15.05 rounds up
        assert_eq!(LrSchedule::warmup_from(0.07, None, 100), 7); // 7.000000000000001 in f64
        assert_eq!(LrSchedule::warmup_from(0.015, None, 1000), 15);
        assert_eq!(LrSchedule::warmup_from(0.001, None, 10), 1); // 0.01 rounds up to 1
        assert_eq!(LrSchedule::warmup_from(0.0, None, 1000), 0);
        assert_eq!(LrSchedule::warmup_from(0.5, Some(0), 1000), 0);
    }
}
