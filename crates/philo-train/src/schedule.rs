//! Learning-rate schedules as transformers defines them: linear warmup from 0, then cosine,
//! linear decay to 0, or constant. Step `t` is the number of optimizer steps already taken, so
//! with warmup the first update uses lr 0, exactly like transformers' Trainer.

use std::str::FromStr;

/// The shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(ScheduleKind::Cosine),
            "linear" => Ok(ScheduleKind::Linear),
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            _ => Err(format!(
                "unknown lr scheduler `{s}`: use cosine, linear or constant"
            )),
        }
    }
}

/// Peak learning rate, warmup and total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Learning rate for the update after `step` updates.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.peak_lr * factor.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        let s = schedule(ScheduleKind::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_halves_at_the_middle_and_ends_at_zero() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
        assert!(s.lr(200).abs() < 1e-12);
    }

    #[test]
    fn linear_and_constant() {
        let s = schedule(ScheduleKind::Linear);
        assert!((s.lr(35) - 0.75).abs() < 1e-12);
        let s = schedule(ScheduleKind::Constant);
        assert_eq!(s.lr(100), 1.0);
        assert!("nope".parse::<ScheduleKind>().is_err());
    }
}
