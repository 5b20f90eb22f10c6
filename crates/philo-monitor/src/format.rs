//! Printing samples: an nvidia-smi-like table for people, CSV for logs and spreadsheets.

use std::fmt::Display;

use crate::Gpu;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;
/// What nvidia-smi writes for a value the GPU does not report, so that the same tools read both.
const NOT_AVAILABLE: &str = "[N/A]";

/// One line per GPU (utilization, memory used / total, power draw / limit, temperature, SM and
/// memory clocks), each followed by one line per compute process on it; philo's processes are
/// marked `[philo]`, and with `philo_only` they are the only ones listed.
pub fn format_table(samples: &[Gpu], philo_only: bool) -> String {
    let mut table = row([
        "GPU",
        "NAME",
        "UTIL",
        "MEMORY GiB",
        "POWER W",
        "TEMP",
        "SM MHz",
        "MEM MHz",
    ]);
    for gpu in samples {
        let memory = format!(
            "{:.1} / {:.1}",
            gpu.memory_used_bytes as f64 / GIB,
            gpu.memory_total_bytes as f64 / GIB
        );
        let power = match (gpu.power_watts, gpu.power_limit_watts) {
            (None, None) => "-".to_string(),
            (draw, limit) => {
                let watts = |w: Option<f64>| w.map_or("-".to_string(), |w| format!("{w:.0}"));
                format!("{} / {}", watts(draw), watts(limit))
            }
        };
        table.push_str(&row([
            &gpu.index.to_string(),
            &gpu.name,
            &format!("{}%", gpu.utilization_percent),
            &memory,
            &power,
            &gpu.temperature_c
                .map_or("-".to_string(), |t| format!("{t}C")),
            &or_dash(gpu.sm_clock_mhz),
            &or_dash(gpu.memory_clock_mhz),
        ]));
        for process in &gpu.processes {
            if philo_only && !process.is_philo() {
                continue;
            }
            let used = process
                .used_bytes
                .map_or("-".to_string(), |b| format!("{:.1} GiB", b as f64 / GIB));
            let mark = if process.is_philo() { "  [philo]" } else { "" };
            let line = format!(
                "     pid {:<8} {:<16} {:>10}{mark}",
                process.pid, process.name, used
            );
            table.push_str(line.trim_end());
            table.push('\n');
        }
    }
    table
}

/// A table line with its columns aligned, without trailing spaces.
fn row([index, name, util, memory, power, temp, sm, mem]: [&str; 8]) -> String {
    let line = format!(
        "{index:<4} {name:<24} {util:>4} {memory:>15} {power:>11} {temp:>5} {sm:>7} {mem:>7}"
    );
    format!("{}\n", line.trim_end())
}

fn or_dash(value: Option<u32>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

/// The CSV header matching [`csv_row`]: nvidia-smi's `--query-gpu` column names with their units,
/// plus `philo.memory`.
pub fn csv_header() -> &'static str {
    "timestamp, index, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], \
     power.draw [W], temperature.gpu, clocks.sm [MHz], clocks.mem [MHz], philo.memory [MiB]"
}

/// One CSV line (no newline) for `gpu` sampled at `timestamp`, in nvidia-smi's `csv,nounits`
/// style: values separated by `, `, `[N/A]` where the GPU does not report one. `philo.memory`
/// sums the memory of philo's processes, to tell philo's share from the rest.
pub fn csv_row(timestamp: &str, gpu: &Gpu) -> String {
    let philo_bytes: u64 = gpu
        .processes
        .iter()
        .filter(|process| process.is_philo())
        .filter_map(|process| process.used_bytes)
        .sum();
    format!(
        "{timestamp}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}",
        gpu.index,
        gpu.name,
        gpu.utilization_percent,
        gpu.memory_used_bytes / MIB,
        gpu.memory_total_bytes / MIB,
        or_na(gpu.power_watts.map(|w| format!("{w:.2}"))),
        or_na(gpu.temperature_c),
        or_na(gpu.sm_clock_mhz),
        or_na(gpu.memory_clock_mhz),
        philo_bytes / MIB,
    )
}

fn or_na(value: Option<impl Display>) -> String {
    value.map_or(NOT_AVAILABLE.to_string(), |v| v.to_string())
}

/// `unix_seconds` as `YYYY/MM/DD HH:MM:SS` in UTC, nvidia-smi's timestamp format (to the second).
pub fn utc_timestamp(unix_seconds: u64) -> String {
    let (days, seconds) = (unix_seconds / 86_400, unix_seconds % 86_400);
    // Howard Hinnant's civil_from_days, in a calendar whose years start on March 1st so that
    // the leap day is the last day of the year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    format!(
        "{year:04}/{month:02}/{day:02} {:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GpuProcess;

    fn busy() -> Gpu {
        Gpu {
            index: 0,
            name: "NVIDIA H200".to_string(),
            utilization_percent: 87,
            memory_used_bytes: 62_000 * MIB,
            memory_total_bytes: 143_771 * MIB,
            power_watts: Some(512.3),
            power_limit_watts: Some(700.0),
            temperature_c: Some(54),
            sm_clock_mhz: Some(1980),
            memory_clock_mhz: Some(3201),
            processes: vec![
                GpuProcess {
                    pid: 4242,
                    name: "philo".to_string(),
                    used_bytes: Some(61_440 * MIB),
                },
                GpuProcess {
                    pid: 777,
                    name: "python3".to_string(),
                    used_bytes: Some(1024 * MIB),
                },
                GpuProcess {
                    pid: 4243,
                    name: "philo-bench".to_string(),
                    used_bytes: None,
                },
            ],
        }
    }

    /// A GPU that reports nothing optional (as some boards and vGPUs do).
    fn bare() -> Gpu {
        Gpu {
            index: 1,
            name: "NVIDIA H200".to_string(),
            utilization_percent: 0,
            memory_used_bytes: 558 * MIB,
            memory_total_bytes: 143_771 * MIB,
            power_watts: None,
            power_limit_watts: None,
            temperature_c: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            processes: Vec::new(),
        }
    }

    #[test]
    fn table_lists_gpus_and_their_processes() {
        assert_eq!(
            format_table(&[busy(), bare()], false),
            "\
GPU  NAME                     UTIL      MEMORY GiB     POWER W  TEMP  SM MHz MEM MHz
0    NVIDIA H200               87%    60.5 / 140.4   512 / 700   54C    1980    3201
     pid 4242     philo              60.0 GiB  [philo]
     pid 777      python3             1.0 GiB
     pid 4243     philo-bench               -  [philo]
1    NVIDIA H200                0%     0.5 / 140.4           -     -       -       -
"
        );
    }

    #[test]
    fn table_can_show_philo_processes_only() {
        let mut gpu = busy();
        gpu.power_limit_watts = None;
        assert_eq!(
            format_table(&[gpu], true),
            "\
GPU  NAME                     UTIL      MEMORY GiB     POWER W  TEMP  SM MHz MEM MHz
0    NVIDIA H200               87%    60.5 / 140.4     512 / -   54C    1980    3201
     pid 4242     philo              60.0 GiB  [philo]
     pid 4243     philo-bench               -  [philo]
"
        );
    }

    #[test]
    fn csv_has_nvidia_smi_columns_and_philo_memory() {
        assert_eq!(
            csv_header(),
            "timestamp, index, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], \
             power.draw [W], temperature.gpu, clocks.sm [MHz], clocks.mem [MHz], philo.memory [MiB]"
        );
        let columns = csv_header().split(", ").count();
        let busy = csv_row("2024/02/29 12:34:56", &busy());
        assert_eq!(
            busy,
            "2024/02/29 12:34:56, 0, NVIDIA H200, 87, 62000, 143771, 512.30, 54, 1980, 3201, 61440"
        );
        let bare = csv_row("2024/02/29 12:34:56", &bare());
        assert_eq!(
            bare,
            "2024/02/29 12:34:56, 1, NVIDIA H200, 0, 558, 143771, [N/A], [N/A], [N/A], [N/A], 0"
        );
        assert_eq!(busy.split(", ").count(), columns);
        assert_eq!(bare.split(", ").count(), columns);
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970/01/01 00:00:00");
        assert_eq!(utc_timestamp(951_782_400), "2000/02/29 00:00:00");
        assert_eq!(utc_timestamp(1_709_210_096), "2024/02/29 12:34:56");
        assert_eq!(utc_timestamp(4_102_444_799), "2099/12/31 23:59:59");
    }
}
