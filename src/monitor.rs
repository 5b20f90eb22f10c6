//! `philo monitor`: the GPUs' utilization, memory, power, clocks and processes, sampled through
//! NVML every interval, as a table or as CSV.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use philo_monitor::{csv_header, csv_row, format_table, utc_timestamp, Monitor};

/// What `philo monitor` was asked for.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    /// Seconds between samples.
    pub interval_seconds: f64,
    /// How many samples to print; `None` prints until the process is stopped.
    pub count: Option<usize>,
    /// CSV (a header, then one row per GPU and sample) instead of the table, for logging.
    pub csv: bool,
}

/// Prints a sample of every GPU `options.count` times, `options.interval_seconds` apart.
pub fn run(options: &MonitorOptions) -> anyhow::Result<()> {
    let interval = Duration::try_from_secs_f64(options.interval_seconds)
        .ok()
        .filter(|interval| !interval.is_zero())
        .with_context(|| {
            format!(
                "the interval must be a positive number of seconds, not {}",
                options.interval_seconds
            )
        })?;
    let monitor = Monitor::open()?;
    let mut stdout = std::io::stdout().lock();
    if options.csv {
        writeln!(stdout, "{}", csv_header())?;
    }
    let mut printed = 0;
    while options.count.is_none_or(|count| printed < count) {
        if printed > 0 {
            std::thread::sleep(interval);
        }
        let gpus = monitor.sample()?;
        let timestamp = utc_timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("the system clock is set before 1970")?
                .as_secs(),
        );
        if options.csv {
            for gpu in &gpus {
                writeln!(stdout, "{}", csv_row(&timestamp, gpu))?;
            }
        } else {
            writeln!(stdout, "{timestamp} UTC\n{}", format_table(&gpus, false))?;
        }
        // Flushed at each sample so that `philo monitor --csv > log.csv` is readable while it
        // runs and a pipe sees the samples as they come.
        stdout.flush()?;
        printed += 1;
    }
    Ok(())
}
