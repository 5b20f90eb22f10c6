//! Peak memory, for the reports of benchmarks and training runs.

use candle_core::Device;

/// Peak memory of this process in GiB: on the CPU the resident-set high-water mark; None where
/// it cannot be read.
pub fn peak_memory_gib(device: &Device) -> Option<f64> {
    if !device.is_cpu() {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}
