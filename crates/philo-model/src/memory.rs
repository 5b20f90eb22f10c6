//! Peak memory, for the reports of benchmarks and training runs.

use candle_core::Device;

/// Peak memory of this process in GiB: on the CPU the resident-set high-water mark; on CUDA the
/// high-water mark of device memory in use by tensors (the stream-ordered pool's
/// `USED_MEM_HIGH`, the counterpart of torch's `max_memory_allocated`). None where it cannot be
/// read.
pub fn peak_memory_gib(device: &Device) -> Option<f64> {
    match device {
        Device::Cpu => {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / (1024.0 * 1024.0))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_pool_attribute(
            d,
            candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )
        .map(|bytes| bytes as f64 / (1u64 << 30) as f64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Free and total memory of `device` in bytes, as the driver reports them (CUDA only: None
/// elsewhere or when the driver cannot say).
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        d.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = result::mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Keeps the memory that tensors free in `device`'s stream-ordered pool rather than handing it
/// back to the driver at every synchronisation (the pool's default release threshold is 0): a
/// training step frees and allocates the same large buffers layer after layer, and mapping them
/// anew after each synchronisation costs time. The pool then stays at its high-water mark, as
/// PyTorch's caching allocator does; the peak that `peak_memory_gib` reports (memory in use by
/// tensors) is unchanged. CUDA only; a no-op elsewhere or when the driver refuses.
pub fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        set_cuda_pool_attribute(
            d,
            candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        );
    }
    let _ = device;
}

/// Starts a new peak-memory measurement on `device` (CUDA only; a no-op elsewhere).
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        set_cuda_pool_attribute(
            d,
            candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        );
    }
    let _ = device;
}

/// Sets a u64 attribute of the device's default memory pool; a refusal by the driver is ignored
/// (both callers are optimisations or measurements, never needed for correctness).
#[cfg(feature = "cuda")]
fn set_cuda_pool_attribute(
    d: &candle_core::CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    value: u64,
) {
    use candle_core::cuda_backend::cudarc::driver::result;
    let ctx = d.cuda_stream().context().clone();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut value = value;
    // SAFETY: the pool is the device's default pool; the value is a u64 as the attribute needs.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let _ = result::mem_pool::set_attribute(
                pool,
                attr,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_pool_attribute(
    d: &candle_core::CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut value = 0u64;
    // SAFETY: the pool is the device's default pool; the value is a u64 as the attribute needs.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).ok()?;
        result::mem_pool::get_attribute(
            pool,
            attr,
            &mut value as *mut u64 as *mut std::ffi::c_void,
        )
        .ok()?;
    }
    Some(value)
}
