//! GPU monitoring for philo through NVML, the library behind `nvidia-smi`.
//!
//! [`Monitor`] reads each GPU's utilization, memory, power, temperature, clocks and compute
//! processes into plain [`Gpu`] values; [`format_table`], [`csv_header`] and [`csv_row`] print
//! them. NVML is loaded at run time, so a binary built with this crate still runs on a machine
//! without an NVIDIA driver: [`Monitor::open`] then returns [`MonitorError::DriverNotFound`].
//!
//! ```no_run
//! # fn main() -> Result<(), philo_monitor::MonitorError> {
//! let monitor = philo_monitor::Monitor::open()?;
//! print!("{}", philo_monitor::format_table(&monitor.sample()?, false));
//! # Ok(())
//! # }
//! ```

mod format;

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde::Serialize;

pub use format::{csv_header, csv_row, format_table, utc_timestamp};

/// One GPU's state at the time it was sampled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    /// The NVML index, the same as nvidia-smi's (not necessarily CUDA's, which may reorder).
    pub index: u32,
    /// The product name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Percent of the last sample period during which a kernel was running.
    pub utilization_percent: u32,
    /// Device memory allocated, by every process and the driver.
    pub memory_used_bytes: u64,
    /// Device memory installed.
    pub memory_total_bytes: u64,
    /// Power draw; `None` where the board does not report it (the same for the other options).
    pub power_watts: Option<f64>,
    /// The power limit the driver enforces.
    pub power_limit_watts: Option<f64>,
    /// Die temperature.
    pub temperature_c: Option<u32>,
    /// Current SM clock.
    pub sm_clock_mhz: Option<u32>,
    /// Current memory clock.
    pub memory_clock_mhz: Option<u32>,
    /// Compute processes on the device; empty where the driver does not list them (e.g. no
    /// permission), so that the rest of the sample is still useful.
    pub processes: Vec<GpuProcess>,
}

/// A compute process using a GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuProcess {
    /// The process id, as the driver sees it (the host's, inside a container).
    pub pid: u32,
    /// `/proc/PID/comm`, or `?` when the process is not visible (another PID namespace) or gone.
    pub name: String,
    /// Device memory the process holds; `None` where the driver does not tell.
    pub used_bytes: Option<u64>,
}

impl GpuProcess {
    /// Whether this is one of philo's processes (the `philo` binary and its tools), which the
    /// table marks and the CSV's `philo.memory` column sums.
    pub fn is_philo(&self) -> bool {
        self.name.starts_with("philo")
    }
}

/// Why the GPUs could not be read, worded for the person running philo.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// NVML's library is not installed: no NVIDIA driver on this machine.
    #[error(
        "no NVIDIA driver found (libnvidia-ml.so could not be loaded): philo monitor needs an NVIDIA GPU and its driver"
    )]
    DriverNotFound,
    /// The driver is there but reports no GPU.
    #[error("the NVIDIA driver reports no GPU: check that `nvidia-smi` lists one (inside a container, that GPUs were passed in)")]
    NoDevice,
    /// A GPU index beyond the devices present.
    #[error("there is no GPU {index}: the driver reports {count}, numbered from 0")]
    NoSuchDevice {
        /// The index asked for.
        index: u32,
        /// How many GPUs there are.
        count: u32,
    },
    /// Any other NVML failure, naming the query that failed.
    #[error("NVML could not {query}: {error} (check that `nvidia-smi` works)")]
    Nvml {
        /// What was being read, e.g. `read the memory of GPU 0`.
        query: String,
        /// NVML's own error.
        error: NvmlError,
    },
}

/// An open NVML session; opening loads the library and initializes the driver once, sampling
/// then only queries it.
#[derive(Debug)]
pub struct Monitor {
    nvml: Nvml,
}

impl Monitor {
    /// Loads NVML and checks that there is at least one GPU.
    pub fn open() -> Result<Monitor, MonitorError> {
        let nvml = Nvml::init().map_err(|error| match error {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                MonitorError::DriverNotFound
            }
            error => MonitorError::Nvml {
                query: "initialize".to_string(),
                error,
            },
        })?;
        let monitor = Monitor { nvml };
        if monitor.device_count()? == 0 {
            return Err(MonitorError::NoDevice);
        }
        Ok(monitor)
    }

    /// Samples every GPU, in index order.
    pub fn sample(&self) -> Result<Vec<Gpu>, MonitorError> {
        (0..self.device_count()?)
            .map(|index| self.read(index))
            .collect()
    }

    /// Samples GPU `index`.
    pub fn sample_device(&self, index: u32) -> Result<Gpu, MonitorError> {
        let count = self.device_count()?;
        if index >= count {
            return Err(MonitorError::NoSuchDevice { index, count });
        }
        self.read(index)
    }

    fn device_count(&self) -> Result<u32, MonitorError> {
        self.nvml
            .device_count()
            .map_err(failed(|| "count the GPUs".to_string()))
    }

    fn read(&self, index: u32) -> Result<Gpu, MonitorError> {
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(failed(|| format!("open GPU {index}")))?;
        let name = device
            .name()
            .map_err(failed(|| format!("read the name of GPU {index}")))?;
        let utilization = device
            .utilization_rates()
            .map_err(failed(|| format!("read the utilization of GPU {index}")))?;
        let memory = device
            .memory_info()
            .map_err(failed(|| format!("read the memory of GPU {index}")))?;
        let processes = device
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|process| GpuProcess {
                pid: process.pid,
                name: process_name(process.pid),
                used_bytes: match process.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Some(bytes),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
        // NVML reports power in milliwatts.
        let watts = |milliwatts: u32| f64::from(milliwatts) / 1000.0;
        Ok(Gpu {
            index,
            name,
            utilization_percent: utilization.gpu,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
            power_watts: device.power_usage().ok().map(watts),
            power_limit_watts: device.enforced_power_limit().ok().map(watts),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            sm_clock_mhz: device.clock_info(Clock::SM).ok(),
            memory_clock_mhz: device.clock_info(Clock::Memory).ok(),
            processes,
        })
    }
}

/// Wraps an NVML error with the query it came from; `query` is only formatted on failure.
fn failed(query: impl FnOnce() -> String) -> impl FnOnce(NvmlError) -> MonitorError {
    |error| MonitorError::Nvml {
        query: query(),
        error,
    }
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_succeeds_or_says_there_is_no_driver() {
        match Monitor::open() {
            Ok(monitor) => assert!(!monitor.sample().unwrap().is_empty()),
            Err(error @ MonitorError::DriverNotFound) => assert_eq!(
                error.to_string(),
                "no NVIDIA driver found (libnvidia-ml.so could not be loaded): philo monitor needs an NVIDIA GPU and its driver"
            ),
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            MonitorError::NoSuchDevice { index: 3, count: 2 }.to_string(),
            "there is no GPU 3: the driver reports 2, numbered from 0"
        );
        assert_eq!(
            MonitorError::Nvml {
                query: "read the memory of GPU 0".to_string(),
                error: NvmlError::GpuLost,
            }
            .to_string(),
            "NVML could not read the memory of GPU 0: device fell off the bus or has otherwise become inacessible (check that `nvidia-smi` works)"
        );
    }

    #[test]
    fn process_names_come_from_proc() {
        // The test binary's name, which comm truncates to 15 bytes.
        assert!(process_name(std::process::id()).starts_with("philo_monitor"));
        assert_eq!(process_name(u32::MAX), "?");
    }
}
