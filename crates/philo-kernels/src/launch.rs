//! Loading philo's PTX modules and launching their kernels on candle's CUDA stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// One compiled `.cu` file.
pub(crate) struct Module {
    name: &'static str,
    /// nvcc's fat binary: machine code for the build's GPU generation and its PTX (empty for a
    /// Hopper-only file in a build for another generation).
    fatbin: &'static [u8],
}

macro_rules! module {
    ($const:ident, $file:literal) => {
        pub(crate) const $const: Module = Module {
            name: $file,
            fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".fatbin")),
        };
    };
}
module!(RMS_NORM, "rms_norm");
module!(ROPE, "rope");
module!(SWIGLU, "swiglu");
module!(NF4, "nf4");
module!(FLASH_ATTENTION, "flash_attention");
module!(CROSS_ENTROPY, "cross_entropy");
module!(DROPOUT, "dropout");
module!(GEMV, "gemv");
module!(PAGED_ATTENTION, "paged_attention");
module!(DECODE, "decode");
module!(DECODE_LAYERS, "decode_layers");
module!(DEQUANTIZE, "dequantize");
module!(LORA, "lora");
module!(ADAMW, "adamw");
module!(ROWS, "rows");
module!(SAMPLING, "sampling");
module!(FLASH_ATTENTION_SM90, "flash_attention_sm90");

/// Whether the Hopper-only kernels (wgmma, `*_sm90.cu`) run on `dev`: built for sm_90a, and the
/// device is compute capability 9.0.
pub(crate) fn hopper_kernels(dev: &CudaDevice) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    if FLASH_ATTENTION_SM90.fatbin.is_empty() {
        return Ok(false);
    }
    let stream = dev.cuda_stream();
    let context = stream.context();
    let major = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    Ok((major, minor) == (9, 0))
}

type FunctionCache = HashMap<(DeviceId, String), CudaFunction>;
type ModuleCache = HashMap<(DeviceId, &'static str), Arc<CudaModule>>;

/// The kernel `name` of `module`, loaded once per device.
pub(crate) fn function(dev: &CudaDevice, module: &Module, name: &str) -> Result<CudaFunction> {
    static FUNCTIONS: OnceLock<Mutex<FunctionCache>> = OnceLock::new();
    static MODULES: OnceLock<Mutex<ModuleCache>> = OnceLock::new();
    let key = (dev.id(), name.to_string());
    let functions = FUNCTIONS.get_or_init(Default::default);
    if let Some(f) = functions.lock().unwrap().get(&key) {
        return Ok(f.clone());
    }
    let modules = MODULES.get_or_init(Default::default);
    let loaded = {
        let mut modules = modules.lock().unwrap();
        match modules.get(&(dev.id(), module.name)) {
            Some(m) => m.clone(),
            None => {
                let m = dev
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_binary(module.fatbin.to_vec()))
                    .w()?;
                modules.insert((dev.id(), module.name), m.clone());
                m
            }
        }
    };
    let f = loaded.load_function(name).w()?;
    functions.lock().unwrap().insert(key, f.clone());
    Ok(f)
}

/// The kernel `{base}_{f32|bf16|f16}` of `module` for `dtype`.
pub(crate) fn typed_function(
    dev: &CudaDevice,
    module: &Module,
    base: &str,
    dtype: DType,
) -> Result<CudaFunction> {
    function(dev, module, &format!("{base}_{}", suffix(dtype)?))
}

/// Kernel-name suffix of a float dtype.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("philo's kernels take f32, bf16 or f16, not {other:?}"),
    })
}

/// The CUDA storage behind a tensor's storage guard.
pub(crate) fn cuda(storage: &Storage) -> Result<&CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// The elements of a contiguous tensor, as a view starting at its offset.
pub(crate) fn contiguous<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("philo kernel: the input must be contiguous"),
    }
}

/// Wraps a freshly written device buffer as a tensor (no autograd history).
pub(crate) fn tensor<T: CudaDType, S: Into<Shape>>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: S,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The CUDA device of a tensor.
pub(crate) fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// Grid size for grid-stride loops over `n` items with 256-thread blocks.
pub(crate) fn grid_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65_535 * 16) as u32
}

/// Launches `f` over `n` items (grid-stride, 256 threads per block).
pub(crate) fn elementwise_config(
    n: usize,
) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (grid_for(n), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device address of a tensor's first element. Kernels run on the device's one stream, so no
/// event bookkeeping is needed.
pub(crate) fn address(t: &Tensor) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    storage_address(cuda(&s)?, l.start_offset())
}

/// The device address of a storage's element at `offset` (float or integer dtypes), for custom
/// ops that receive storages rather than tensors.
pub(crate) fn storage_address(s: &CudaStorage, offset: usize) -> Result<u64> {
    use candle_core::backend::BackendStorage;
    let stream = s.device().cuda_stream();
    with_float_or_int!(s.dtype(), T, {
        let view = s.as_cuda_slice::<T>()?.slice(offset..);
        let (ptr, _sync) = view.device_ptr(&stream);
        Ok(ptr)
    })
}

/// One block of 256 threads per row, for kernels whose threads walk a row.
pub(crate) fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
pub(crate) use candle_core::cuda_backend::WrapErr;

/// Runs `$body` with `$T` bound to the Rust type of a float dtype.
macro_rules! with_float_type {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => candle_core::bail!("philo's kernels take f32, bf16 or f16, not {other:?}"),
        }
    };
}
pub(crate) use with_float_type;

/// Like [`with_float_type`], also for the integer dtypes kernels take as indices.
macro_rules! with_float_or_int {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            candle_core::DType::U8 => {
                type $T = u8;
                $body
            }
            candle_core::DType::U32 => {
                type $T = u32;
                $body
            }
            candle_core::DType::I64 => {
                type $T = i64;
                $body
            }
            other => $crate::launch::with_float_type!(other, $T, $body),
        }
    };
}
pub(crate) use candle_core::cuda_backend::cudarc::driver::DevicePtr;
pub(crate) use with_float_or_int;

/// Allows `f` `bytes` of dynamic shared memory (beyond the default 48 KiB) and returns them.
pub(crate) fn dynamic_smem(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: usize,
) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    Ok(bytes as u32)
}

/// Shared memory one block may take on `dev` when its kernel opts in (static and dynamic
/// together).
pub(crate) fn block_smem_limit(dev: &CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    Ok(dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()? as usize)
}

/// The static shared memory of `f`'s blocks.
pub(crate) fn static_smem(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    Ok(
        f.get_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .w()? as usize,
    )
}

/// The device's streaming multiprocessors.
pub(crate) fn multiprocessors(dev: &CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    Ok(dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize)
}

/// How many blocks of `threads` threads and `smem` bytes of dynamic shared memory running `f`
/// the whole device holds at once: one wave of blocks.
pub(crate) fn resident_blocks(
    dev: &CudaDevice,
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    threads: u32,
    smem: usize,
) -> Result<usize> {
    dynamic_smem(f, smem)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
        .w()?;
    Ok(per_sm.max(1) as usize * multiprocessors(dev)?)
}
