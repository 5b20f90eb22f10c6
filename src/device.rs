//! Choosing where and in which precision the model runs.

use candle_core::{DType, Device};

/// `--device`: where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when this build has it and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(format!("unknown device `{s}`: use auto, cpu or cuda")),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. Asking for CUDA in a build without it is an error that says how to get it.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(single_stream(
                Device::cuda_if_available(0).unwrap_or(Device::Cpu),
            )),
            DeviceChoice::Cuda => open_cuda(0),
        }
    }
}

/// CUDA device `ordinal` (a data-parallel rank's GPU is its LOCAL_RANK).
pub fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("--device cuda: this philo was built without CUDA; rebuild with `cargo build --release --features cuda` (see README)");
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        // candle's message carries a backtrace after its first line.
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default();
        match cuda_device_count() {
            Some(n) if ordinal >= n => anyhow::anyhow!(
                "there is no CUDA device {ordinal}: this machine has {n} (`nvidia-smi -L` lists them)"
            ),
            _ => anyhow::anyhow!("cannot open CUDA device {ordinal}: {first}"),
        }
    })?;
    Ok(single_stream(device))
}

/// The CUDA devices this machine has; None when philo was built without CUDA or the driver
/// cannot tell.
pub fn cuda_device_count() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().ok().map(|n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// philo runs all its GPU work on candle's one stream, so the per-buffer CUDA events that guard
/// multi-stream use are pure overhead (several µs per kernel launch): they are turned off before
/// any tensor exists.
fn single_stream(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: every tensor of this process is created and used on this device's one stream.
        unsafe { d.disable_event_tracking() };
    }
    device
}

/// `--dtype`: the compute precision; None picks f32 on the CPU and bf16 on a GPU.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(format!("unknown dtype `{s}`: use f32, bf16 or f16")),
    }
}

/// The dtype to compute in on `device` when the user named none.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}
