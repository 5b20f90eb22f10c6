//! `PHILO_PROFILE=1`: the time of each phase of a training micro-batch, printed to stderr. The
//! device is synchronised at each boundary, which costs a little speed; without the variable
//! nothing is measured.

use candle_core::Device;

use crate::error::Result;

pub struct Profiler {
    device: Option<Device>,
    last: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
}

impl Profiler {
    /// On when `PHILO_PROFILE=1`.
    pub fn from_env(device: &Device) -> Self {
        let on = std::env::var("PHILO_PROFILE").as_deref() == Ok("1");
        Profiler {
            device: on.then(|| device.clone()),
            last: std::time::Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends the phase `name` (after the device has finished its work).
    pub fn lap(&mut self, name: &'static str) -> Result<()> {
        if let Some(device) = &self.device {
            device.synchronize()?;
            let now = std::time::Instant::now();
            self.phases.push((name, (now - self.last).as_secs_f64()));
            self.last = now;
        }
        Ok(())
    }

    /// Prints the phases measured since the last report and starts over.
    pub fn report(&mut self) {
        if self.device.is_some() && !self.phases.is_empty() {
            let parts: Vec<String> = self
                .phases
                .iter()
                .map(|(p, t)| format!("{p} {t:.3} s"))
                .collect();
            eprintln!("[profile] {}", parts.join(", "));
            self.phases.clear();
        }
        self.last = std::time::Instant::now();
    }
}
