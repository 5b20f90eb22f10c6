//! The GPU's utilisation and memory while training, read through NVML for the progress bar and
//! metrics.jsonl (absent on the CPU or without an NVIDIA driver).

use candle_core::{Device, DeviceLocation};
use philo_monitor::Monitor;
use serde::{Deserialize, Serialize};

/// One reading of the training GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    /// Share of the last sample period in which a kernel ran, %.
    pub utilization_percent: u32,
    /// Device memory in use by every process, GiB.
    pub memory_used_gib: f64,
    pub memory_total_gib: f64,
}

/// Reads the GPU a model runs on.
pub struct GpuProbe {
    monitor: Monitor,
    index: u32,
}

impl GpuProbe {
    /// A probe of `device`'s GPU; None on the CPU or when NVML cannot be opened.
    pub fn for_device(device: &Device) -> Option<Self> {
        let DeviceLocation::Cuda { gpu_id } = device.location() else {
            return None;
        };
        let monitor = Monitor::open().ok()?;
        Some(GpuProbe {
            monitor,
            index: nvml_index(
                gpu_id,
                std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
            ),
        })
    }

    /// The GPU now; None if NVML fails (training goes on without it).
    pub fn read(&self) -> Option<GpuReading> {
        let gpu = self.monitor.sample_device(self.index).ok()?;
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        Some(GpuReading {
            utilization_percent: gpu.utilization_percent,
            memory_used_gib: gib(gpu.memory_used_bytes),
            memory_total_gib: gib(gpu.memory_total_bytes),
        })
    }
}

/// NVML numbers every GPU; CUDA only those CUDA_VISIBLE_DEVICES lists, in its order. A list
/// of UUIDs or an unparsable entry falls back to the CUDA ordinal.
fn nvml_index(cuda_ordinal: usize, visible: Option<&str>) -> u32 {
    visible
        .and_then(|list| list.split(',').nth(cuda_ordinal))
        .and_then(|entry| entry.trim().parse().ok())
        .unwrap_or(cuda_ordinal as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_renumbers() {
        assert_eq!(nvml_index(0, None), 0);
        assert_eq!(nvml_index(1, Some("3,5")), 5);
        assert_eq!(nvml_index(0, Some("GPU-8f2c")), 0);
        assert_eq!(nvml_index(2, Some("3,5")), 2);
    }

    #[test]
    fn no_probe_on_the_cpu() {
        assert!(GpuProbe::for_device(&Device::Cpu).is_none());
    }
}
