//! `PHILO_PROFILE=1`: where the engine loop's wall time goes, phase by phase (taking commands,
//! scheduling, launching the step, waiting for it and sampling, handing tokens out), printed to
//! stderr every [`StepProfile::EVERY`] steps.

use std::time::{Duration, Instant};

/// Wall time per phase of the engine loop since the last report.
pub struct StepProfile {
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
    steps: u64,
    rows: u64,
}

impl StepProfile {
    /// Steps between two reports.
    pub const EVERY: u64 = 256;

    /// A profile when `PHILO_PROFILE=1` is set, else None.
    pub fn from_env() -> Option<Self> {
        (std::env::var("PHILO_PROFILE").as_deref() == Ok("1")).then(|| StepProfile {
            last: Instant::now(),
            phases: Vec::new(),
            steps: 0,
            rows: 0,
        })
    }

    /// Attributes the time since the previous lap to `phase`.
    pub fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        let spent = now - self.last;
        self.last = now;
        match self.phases.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += spent,
            None => self.phases.push((phase, spent)),
        }
    }

    /// Counts a step of `rows` sequences; reports (and starts over) every [`Self::EVERY`],
    /// with `extra` (how the decode step's runs went) at the end of the line.
    pub fn step_done(&mut self, rows: usize, extra: impl FnOnce() -> String) {
        self.steps += 1;
        self.rows += rows as u64;
        if self.steps < Self::EVERY {
            return;
        }
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / self.steps as f64;
        let total: Duration = self.phases.iter().map(|(_, d)| *d).sum();
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|(name, d)| format!("{name} {:.2}", per_step(*d)))
            .collect();
        eprintln!(
            "[profile] engine: {} steps of {:.1} sequences, {:.2} ms a step: {} (ms a step); {}",
            self.steps,
            self.rows as f64 / self.steps as f64,
            per_step(total),
            phases.join(", "),
            extra()
        );
        self.phases.clear();
        self.steps = 0;
        self.rows = 0;
    }
}
