//! `philo monitor`: the arguments; the work is `philo::monitor`.

use clap::Args;

#[derive(Args)]
pub struct MonitorArgs {
    /// Seconds between samples.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many samples (default: until Ctrl-C).
    #[arg(long)]
    count: Option<usize>,
    /// One CSV row per GPU and sample (nvidia-smi --query-gpu columns, plus philo's memory).
    #[arg(long)]
    csv: bool,
}

pub fn run(args: MonitorArgs) -> anyhow::Result<()> {
    philo::monitor::run(&philo::monitor::MonitorOptions {
        interval_seconds: args.interval,
        count: args.count,
        csv: args.csv,
    })
}
