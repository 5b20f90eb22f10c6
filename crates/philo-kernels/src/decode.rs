//! The kernels of the graph-captured decode step (`cuda/decode.cu`), launched on raw device
//! addresses so that one captured CUDA graph can replay a whole step: the buffers they read and
//! write are allocated once by the caller, which keeps them alive while a graph uses them.
//!
//! The fused GEMV multiplies a few input rows by a weight in any of philo's formats (dense,
//! INT8, INT4, NF4), applying the layer's RMSNorm or SwiGLU to its input on the way in and the
//! residual add on the way out; [`gemv_reference`] is its plain CPU counterpart.

use candle_core::DType;
#[cfg(feature = "cuda")]
use candle_core::Result;

/// Most input rows (sequences decoded together, or one sequence's verify rows) one launch
/// takes, where their staged input fits in shared memory (see `DecodeKernels::gemv_rows`).
pub const MAX_ROWS: usize = 8;

/// What the GEMV does to its input before the product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GemvInput {
    /// x as it is, `[m, k]`.
    Plain,
    /// RMSNorm(x) · weight (the `k` norm weights at `weight`), `[m, k]`.
    RmsNorm { weight: u64, eps: f32 },
    /// silu(gate) · up of x `[m, 2k]` laid out [gate | up].
    SwiGlu,
}

/// A weight `[n, k]` on the device, by format (addresses of its buffers, which must outlive
/// every launch that reads them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GemvWeight {
    /// In the compute dtype.
    Dense { w: u64 },
    /// u8 codes + 128 and f32 absmax per row: w = (code − 128) · absmax / 127.
    Int8 { codes: u64, absmax: u64 },
    /// Packed codes + 8 (even element low) and f32 scales per (row, group of `group`).
    Int4 {
        packed: u64,
        scales: u64,
        group: usize,
    },
    /// bitsandbytes NF4 (first element high), one scale per 64 weights.
    Nf4 { packed: u64, scales: Nf4BlockScales },
}

/// NF4 block scales: plain f32, or double-quantised (scale = code[q] · absmax2[block /
/// block2] + offset).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nf4BlockScales {
    Plain {
        absmax: u64,
    },
    Double {
        quantized: u64,
        code: u64,
        absmax2: u64,
        offset: f32,
        block2: usize,
    },
}

/// Where the GEMV writes `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GemvOutput {
    /// In the compute dtype.
    Store(u64),
    /// Added in place to the compute-dtype residual stream at this address (`x + y`).
    AddTo(u64),
    /// f32, rounded through the compute dtype (logits).
    F32(u64),
    /// W is the MLP's `[gate | up]` (n = 2·half rows): SwiGLU(gate, up), `[m, half]` in the
    /// compute dtype, rounded as storing gate and up and then staging them with
    /// [`GemvInput::SwiGlu`] would. The tensor-core GEMV only (see
    /// [`DecodeKernels::takes_swiglu_output`]).
    SwiGlu(u64),
}

/// One fused GEMV: `out = input(x) · Wᵀ` for `m ≤ MAX_ROWS` rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemv {
    pub x: u64,
    pub input: GemvInput,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub weight: GemvWeight,
    pub output: GemvOutput,
}

/// The GEMV kernels' format names (`gemv_fused_{name}_…`), in [`GemvWeight::format`] order.
#[cfg(feature = "cuda")]
const FORMATS: [&str; 4] = ["dense", "int8", "int4", "nf4"];

#[cfg(feature = "cuda")]
impl GemvInput {
    /// The kernels' (mode, norm weights, eps) for this transform (`InputMode` in decode.cu).
    fn kernel_args(&self) -> (i32, u64, f32) {
        match *self {
            GemvInput::Plain => (0, 0, 0.0),
            GemvInput::RmsNorm { weight, eps } => (1, weight, eps),
            GemvInput::SwiGlu => (2, 0, 0.0),
        }
    }
}

/// A weight's buffers as the kernels take them (zero where the format has none): the weights
/// (or packed codes), the f32 scales (INT8 absmax, INT4 group scales, plain NF4 absmax), INT4's
/// group, and double-quantised NF4's 8-bit scale codes, their code book, second-level absmax,
/// offset and second-level block.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct WeightArgs {
    pub w: u64,
    pub s: u64,
    pub group: usize,
    pub q2: u64,
    pub code2: u64,
    pub absmax2: u64,
    pub offset2: f32,
    pub block2: usize,
}

impl GemvWeight {
    /// The weight's buffers as the kernels take them.
    pub(crate) fn kernel_args(&self) -> WeightArgs {
        let none = WeightArgs::default();
        match *self {
            GemvWeight::Dense { w } => WeightArgs { w, ..none },
            GemvWeight::Int8 { codes, absmax } => WeightArgs {
                w: codes,
                s: absmax,
                ..none
            },
            GemvWeight::Int4 {
                packed,
                scales,
                group,
            } => WeightArgs {
                w: packed,
                s: scales,
                group,
                ..none
            },
            GemvWeight::Nf4 { packed, scales } => match scales {
                Nf4BlockScales::Plain { absmax } => WeightArgs {
                    w: packed,
                    s: absmax,
                    ..none
                },
                Nf4BlockScales::Double {
                    quantized,
                    code,
                    absmax2,
                    offset,
                    block2,
                } => WeightArgs {
                    w: packed,
                    q2: quantized,
                    code2: code,
                    absmax2,
                    offset2: offset,
                    block2,
                    ..none
                },
            },
        }
    }
}

#[cfg(feature = "cuda")]
impl GemvWeight {
    /// Index of the weight's format in [`FORMATS`].
    fn format(&self) -> usize {
        match self {
            GemvWeight::Dense { .. } => 0,
            GemvWeight::Int8 { .. } => 1,
            GemvWeight::Int4 { .. } => 2,
            GemvWeight::Nf4 { .. } => 3,
        }
    }

    /// Bytes one row of `k` weights takes (without scales).
    fn row_bytes(&self, k: usize, dtype: DType) -> usize {
        match self {
            GemvWeight::Dense { .. } => k * dtype.size_in_bytes(),
            GemvWeight::Int8 { .. } => k,
            GemvWeight::Int4 { .. } | GemvWeight::Nf4 { .. } => k / 2,
        }
    }
}

#[cfg(feature = "cuda")]
/// Threads that share one group of output rows: enough that each walks at most 4 of the row's
/// 16-byte chunks (so short rows still spread over many blocks), between one warp and a block.
fn threads_per_group(row_bytes: usize) -> usize {
    let chunks = row_bytes / 16;
    let mut tpg = 32;
    while tpg < 256 && chunks > 4 * tpg {
        tpg *= 2;
    }
    tpg
}

/// Plain reference of [`Gemv`] in f32: `x` `[m, k]` (`[m, 2k]` for SwiGLU), `norm` the RMSNorm
/// weights and eps, `w` the dequantised `[n, k]`, `residual` `[m, n]` when the output is added.
/// Intermediates are rounded to `dtype` where the kernels round them.
pub fn gemv_reference(
    x: &[f32],
    input: GemvInput,
    norm: Option<&[f32]>,
    w: &[f32],
    k: usize,
    residual: Option<&[f32]>,
    dtype: DType,
) -> Vec<f32> {
    let round = |v: f32| round_to(v, dtype);
    let n = w.len() / k;
    let rows = transform_reference(x, input, norm, k, dtype);
    let mut out = Vec::with_capacity(rows.len() * n);
    for (r, row) in rows.iter().enumerate() {
        for (j, wr) in w.chunks(k).enumerate() {
            let y = round(row.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>());
            out.push(match residual {
                Some(res) => round(res[r * n + j] + y),
                None => y,
            });
        }
    }
    out
}

/// The rows of `x` (`[m, k]`, `[m, 2k]` for SwiGLU) through the GEMV's input transform, as the
/// decode kernels round it in `dtype` (`norm`: the RMSNorm weights).
pub fn transform_reference(
    x: &[f32],
    input: GemvInput,
    norm: Option<&[f32]>,
    k: usize,
    dtype: DType,
) -> Vec<Vec<f32>> {
    let round = |v: f32| round_to(v, dtype);
    match input {
        GemvInput::Plain => x.chunks(k).map(<[f32]>::to_vec).collect(),
        GemvInput::RmsNorm { eps, .. } => {
            let g = norm.expect("RmsNorm needs its weights");
            x.chunks(k)
                .map(|row| {
                    let ms = row.iter().map(|v| v * v).sum::<f32>() / k as f32;
                    let inv = 1.0 / (ms + eps).sqrt();
                    row.iter()
                        .zip(g)
                        .map(|(v, g)| round(g * round(v * inv)))
                        .collect()
                })
                .collect()
        }
        GemvInput::SwiGlu => x
            .chunks(2 * k)
            .map(|row| swiglu_reference(row, dtype))
            .collect(),
    }
}

/// SwiGLU of one `[gate | up]` row as the decode kernels round it in `dtype`: silu(gate)
/// rounded, times up, rounded (the GEMV's SwiGLU input, and its SwiGLU output applied to the
/// rounded `[gate | up]` it would otherwise store).
pub fn swiglu_reference(row: &[f32], dtype: DType) -> Vec<f32> {
    let round = |v: f32| round_to(v, dtype);
    let (gate, up) = row.split_at(row.len() / 2);
    gate.iter()
        .zip(up)
        .map(|(g, u)| round(round(g / (1.0 + (-g).exp())) * u))
        .collect()
}

/// The host's view of a RoPE + KV write (see [`RopeKv`]): cos/sin `[positions, rotary_dim / 2]`,
/// short and long; per row its long-table flag, length (with the new token) and block table
/// `[m, max_blocks]`.
pub struct RopeKvHost<'a> {
    pub cos_short: &'a [f32],
    pub sin_short: &'a [f32],
    pub cos_long: &'a [f32],
    pub sin_long: &'a [f32],
    pub long_rows: &'a [u32],
    pub lens: &'a [u32],
    pub tables: &'a [u32],
    pub max_blocks: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub block_size: usize,
}

/// What `rope_write_kv` writes for the stored rows `qkv` `[m, (h + 2·kvh)·d]`, rounded in
/// `dtype` as the kernel rounds: each q and k element rotated at the row's position `lens[b] − 1`
/// (products rounded, then their sum), q into `q` `[h, m, d]`, k and v into the caches
/// `[blocks, kvh, block_size, d]` at that position's slot.
pub fn rope_kv_reference(
    qkv: &[f32],
    a: &RopeKvHost,
    dtype: DType,
    q: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    let round = |v: f32| round_to(v, dtype);
    let (h, kvh, d, half) = (a.heads, a.kv_heads, a.head_dim, a.rotary_dim / 2);
    let width = (h + 2 * kvh) * d;
    let m = qkv.len() / width;
    for (b, row) in qkv.chunks(width).enumerate() {
        let pos = a.lens[b] as usize - 1;
        let (cos, sin) = match a.long_rows[b] != 0 {
            true => (a.cos_long, a.sin_long),
            false => (a.cos_short, a.sin_short),
        };
        let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        let block = a.tables[b * a.max_blocks + pos / a.block_size] as usize;
        for head in 0..h + 2 * kvh {
            let x = &row[head * d..][..d];
            for j in 0..d {
                let v = if head >= h + kvh || j >= 2 * half {
                    x[j]
                } else if j < half {
                    round(x[j] * cs[j]) + round(-x[j + half] * sn[j])
                } else {
                    let i = j - half;
                    round(x[j] * cs[i]) + round(x[i] * sn[i])
                };
                let v = round(v);
                if head < h {
                    q[(head * m + b) * d + j] = v;
                } else {
                    let is_k = head < h + kvh;
                    let kh = head - h - if is_k { 0 } else { kvh };
                    let cache = if is_k { &mut *k_cache } else { &mut *v_cache };
                    cache[((block * kvh + kh) * a.block_size + pos % a.block_size) * d + j] = v;
                }
            }
        }
    }
}

/// `v` stored in `dtype` and read back.
fn round_to(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

#[cfg(feature = "cuda")]
pub use device::DecodeKernels;
#[cfg(feature = "cuda")]
pub(crate) use device::{int, Arg};

#[cfg(feature = "cuda")]
impl GemvWeight {
    /// A dense `[n, k]` weight in the compute dtype (contiguous).
    pub fn dense(w: &candle_core::Tensor) -> Result<Self> {
        Ok(GemvWeight::Dense { w: address(w)? })
    }

    /// An INT8 weight on the device.
    pub fn int8(w: &philo_quant::device::Int8Weight) -> Result<Self> {
        Ok(GemvWeight::Int8 {
            codes: address(w.codes())?,
            absmax: address(w.absmax())?,
        })
    }

    /// An INT4 weight on the device.
    pub fn int4(w: &philo_quant::device::Int4Weight) -> Result<Self> {
        Ok(GemvWeight::Int4 {
            packed: address(w.packed())?,
            scales: address(w.scales())?,
            group: w.group(),
        })
    }

    /// An NF4 weight on the device, with plain or double-quantised scales.
    pub fn nf4(w: &crate::nf4::Nf4Weight) -> Result<Self> {
        use crate::nf4::Nf4Scales;
        let scales = match &w.scales {
            Nf4Scales::Plain(absmax) => Nf4BlockScales::Plain {
                absmax: address(absmax)?,
            },
            Nf4Scales::Double {
                quantized,
                code,
                absmax2,
                offset,
                block_size,
            } => Nf4BlockScales::Double {
                quantized: address(quantized)?,
                code: address(code)?,
                absmax2: address(absmax2)?,
                offset: *offset,
                block2: *block_size,
            },
        };
        Ok(GemvWeight::Nf4 {
            packed: address(&w.packed)?,
            scales,
        })
    }
}

/// Device address of a CUDA tensor's first element, for the launches above.
#[cfg(feature = "cuda")]
pub fn address(t: &candle_core::Tensor) -> Result<u64> {
    crate::launch::address(t)
}

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::launch::*;
    use crate::paged_attention::decode_kernel_name;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaFunction, DriverError};
    use candle_core::CudaDevice;

    /// One kernel parameter.
    #[derive(Clone, Copy)]
    pub(crate) enum Arg {
        Ptr(u64),
        I32(i32),
        F32(f32),
    }

    /// A size or count as the kernels' `int` (saturating: a window of usize::MAX means none).
    pub(crate) fn int(v: usize) -> Arg {
        Arg::I32(v.min(i32::MAX as usize) as i32)
    }

    /// The tensor-core GEMV of one weight format (`gemv_tc_*` in decode.cu).
    struct TensorCoreGemv {
        f: CudaFunction,
        /// Dynamic shared memory a block may take (the GPU's opt-in limit less the static).
        dynamic_smem: usize,
        /// Weights per 16-byte chunk; k must be a multiple of 32 of them (one 512-byte tile).
        chunk_weights: usize,
        /// Bytes of one warp's tile in shared memory (as `tc_tile_bytes`).
        tile_bytes: usize,
        /// Tiles each warp keeps in flight: measured on the H200 (3 for dense and INT4, 2 for
        /// INT8); fewer where the GPU's shared memory does not hold them.
        stages: usize,
    }

    /// How one tensor-core GEMV launches.
    struct TensorCorePlan<'a> {
        gemv: &'a TensorCoreGemv,
        stages: usize,
        blocks: usize,
        smem: usize,
    }

    /// Threads of a tensor-core GEMV block (8 warps).
    const TC_THREADS: usize = 256;

    /// A second stream of the device's context with the two events that fork work onto it and
    /// join it back: in a capture, a branch of the graph. Raw driver handles, so that cudarc
    /// (and candle through it) stays in its one-stream mode, without event tracking on every
    /// buffer.
    struct SideStream {
        stream: sys::CUstream,
        fork: sys::CUevent,
        done: sys::CUevent,
    }

    // SAFETY: driver handles, usable from any thread with the context bound (every call binds it).
    unsafe impl Send for SideStream {}
    unsafe impl Sync for SideStream {}

    impl SideStream {
        fn new(dev: &CudaDevice) -> Result<Self> {
            dev.cuda_stream().context().bind_to_thread().w()?;
            let no_timing = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
            Ok(SideStream {
                stream: result::stream::create(result::stream::StreamKind::NonBlocking).w()?,
                fork: result::event::create(no_timing).w()?,
                done: result::event::create(no_timing).w()?,
            })
        }

        /// The side stream waits for what `main` has queued so far.
        fn fork_from(&self, main: sys::CUstream) -> std::result::Result<(), DriverError> {
            // SAFETY: live handles of one context.
            unsafe {
                result::event::record(self.fork, main)?;
                result::stream::wait_event(
                    self.stream,
                    self.fork,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
        }

        /// Marks the end of what the side stream has queued so far.
        fn record_done(&self) -> std::result::Result<(), DriverError> {
            // SAFETY: live handles of one context.
            unsafe { result::event::record(self.done, self.stream) }
        }

        /// `main` waits for the side stream's work up to [`SideStream::record_done`].
        fn join_into(&self, main: sys::CUstream) -> std::result::Result<(), DriverError> {
            // SAFETY: live handles of one context.
            unsafe {
                result::stream::wait_event(
                    main,
                    self.done,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
        }
    }

    impl Drop for SideStream {
        fn drop(&mut self) {
            // SAFETY: handles created in `new`, destroyed once; the driver defers the stream's
            // destruction until its work is done.
            unsafe {
                let _ = result::event::destroy(self.fork);
                let _ = result::event::destroy(self.done);
                let _ = result::stream::destroy(self.stream);
            }
        }
    }

    /// A GEMM output's address, whether it is f32, and beta (1 adds to the residual stream).
    fn gemm_output(output: GemvOutput) -> Result<(u64, bool, f32)> {
        Ok(match output {
            GemvOutput::Store(p) => (p, false, 0.0),
            GemvOutput::AddTo(p) => (p, false, 1.0),
            GemvOutput::F32(p) => (p, true, 0.0),
            GemvOutput::SwiGlu(_) => {
                candle_core::bail!("gemm: the SwiGLU output is the tensor-core GEMV's only")
            }
        })
    }

    /// The decode kernels of one compute dtype, loaded once.
    pub struct DecodeKernels {
        dev: CudaDevice,
        dtype: DType,
        /// Streaming multiprocessors: the GEMV's grid is what fits on them at once.
        sms: usize,
        /// Whether kernels launch with programmatic dependent launch (compute capability 9+):
        /// each may start, and load its weights, while the previous one finishes.
        pdl: bool,
        /// By format ([`FORMATS`]), then accumulator rows (1, 2, 4, 8).
        gemv: Vec<[CudaFunction; 4]>,
        /// Dynamic shared memory the FMA GEMV may take for its staged input rows.
        gemv_smem: usize,
        /// The tensor-core GEMV by format (dense, INT8, INT4, NF4), with its tile stages: the one-row
        /// instance, then the several-row one.
        tc: Vec<[TensorCoreGemv; 2]>,
        embed: CudaFunction,
        transform: CudaFunction,
        widen: CudaFunction,
        lora_shrink: CudaFunction,
        /// The second product by columns a warp writes: 16, 64.
        lora_expand: [CudaFunction; 2],
        /// Where the LoRA shrink runs beside the base projection.
        side: SideStream,
        rope_kv: CudaFunction,
        /// By head dimension: 64, 96, 128, any other.
        attention: [CudaFunction; 4],
        /// The tensor-core kernel by head dimension: 64, 96, 128, with its dynamic shared
        /// memory and how many of its blocks a multiprocessor holds; None where a block's
        /// shared memory is more than the GPU gives one (the tiled kernel runs instead).
        attention_tc: [Option<(CudaFunction, u32, usize)>; 3],
        /// The same with the shallow ring ([`AttentionKernel::TensorCoreShallow`]).
        attention_tc_shallow: [Option<(CudaFunction, u32, usize)>; 3],
        argmax: CudaFunction,
        sample: CudaFunction,
        adjust: CudaFunction,
        /// The many-row projections' GEMMs (past the GEMV's rows).
        lt: crate::lt_gemm::LtGemm,
    }

    impl DecodeKernels {
        pub fn load(dev: &CudaDevice, dtype: DType) -> Result<Self> {
            let suffix = suffix(dtype)?;
            if dtype == DType::F32 {
                candle_core::bail!("the decode kernels run bf16 or f16");
            }
            use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
            let smem_limit = block_smem_limit(dev)?;
            // The FMA GEMV's static shared memory (its reduction and NF4 table) is under 2 KiB.
            let gemv_smem = smem_limit.saturating_sub(2048);
            let mut gemv = Vec::new();
            for format in FORMATS {
                let load = |m: usize| -> Result<CudaFunction> {
                    let f = function(dev, &DECODE, &format!("gemv_fused_{format}_{suffix}_m{m}"))?;
                    dynamic_smem(&f, gemv_smem)?;
                    Ok(f)
                };
                gemv.push([load(1)?, load(2)?, load(4)?, load(8)?]);
            }
            let mut tc = Vec::new();
            for (format, chunk_weights, tile_bytes, stages) in [
                ("dense", 16 / dtype.size_in_bytes(), 8 * 512, 3),
                ("int8", 16, 8 * 512, 2),
                ("int4", 32, 8 * 512 + 256, 3),
                ("nf4", 32, 8 * 512 + 512, 3),
            ] {
                // One instance for one row, one for several (see decode.cu).
                let load = |rows: &str| -> Result<TensorCoreGemv> {
                    let f = function(dev, &DECODE, &format!("gemv_tc_{format}_{suffix}{rows}"))?;
                    // What the block may take beyond its static shared memory.
                    let dynamic = smem_limit.saturating_sub(static_smem(&f)?);
                    dynamic_smem(&f, dynamic)?;
                    Ok(TensorCoreGemv {
                        f,
                        dynamic_smem: dynamic,
                        chunk_weights,
                        tile_bytes,
                        stages,
                    })
                };
                tc.push([load("")?, load("_rows")?]);
            }
            let sms = multiprocessors(dev)?;
            // The tensor-core kernel's rings of stages (TcShape in paged_attention.cu): 4 warps,
            // each `ring` stages of 16 keys and 16 values, rows padded by 16 bytes: 104 KiB for
            // head dim 96 with the deep ring, which an H100/H200 gives a block (227 KiB) and an
            // RTX 4090 (99 KiB) does not; 52 KiB with the shallow one.
            let tc_attention =
                |d: usize, shallow: bool| -> Result<Option<(CudaFunction, u32, usize)>> {
                    let ring = match (shallow, d <= 96) {
                        (true, _) => 2,
                        (false, true) => 4,
                        (false, false) => 3,
                    };
                    let row = d + 16 / dtype.size_in_bytes();
                    let bytes = 4 * ring * 2 * 16 * row * dtype.size_in_bytes();
                    // The kernel's static shared memory (the split's flag) is a few bytes.
                    if bytes + 64 > smem_limit {
                        return Ok(None);
                    }
                    let f = function(
                        dev,
                        &PAGED_ATTENTION,
                        &format!(
                            "{}_tc{}",
                            decode_kernel_name(dtype, d)?,
                            if shallow { "_shallow" } else { "" }
                        ),
                    )?;
                    let smem = dynamic_smem(&f, bytes)?;
                    let blocks = f
                        .occupancy_max_active_blocks_per_multiprocessor(128, bytes, None)
                        .w()? as usize;
                    Ok(Some((f, smem, blocks.max(1))))
                };
            let major = dev
                .cuda_stream()
                .context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .w()?;
            Ok(DecodeKernels {
                dev: dev.clone(),
                dtype,
                sms,
                pdl: major >= 9,
                gemv,
                gemv_smem,
                tc,
                embed: function(dev, &DECODE, &format!("embed_rows_{suffix}"))?,
                transform: function(dev, &DECODE, &format!("transform_rows_{suffix}"))?,
                widen: function(dev, &DECODE, &format!("widen_rows_{suffix}"))?,
                lora_shrink: function(dev, &DECODE, &format!("lora_shrink_{suffix}"))?,
                lora_expand: [
                    function(dev, &DECODE, &format!("lora_expand_{suffix}"))?,
                    function(dev, &DECODE, &format!("lora_expand_wide_{suffix}"))?,
                ],
                side: SideStream::new(dev)?,
                rope_kv: function(dev, &DECODE, &format!("rope_write_kv_{suffix}"))?,
                attention: [
                    function(dev, &PAGED_ATTENTION, &decode_kernel_name(dtype, 64)?)?,
                    function(dev, &PAGED_ATTENTION, &decode_kernel_name(dtype, 96)?)?,
                    function(dev, &PAGED_ATTENTION, &decode_kernel_name(dtype, 128)?)?,
                    function(dev, &PAGED_ATTENTION, &decode_kernel_name(dtype, 0)?)?,
                ],
                attention_tc: [
                    tc_attention(64, false)?,
                    tc_attention(96, false)?,
                    tc_attention(128, false)?,
                ],
                attention_tc_shallow: [
                    tc_attention(64, true)?,
                    tc_attention(96, true)?,
                    tc_attention(128, true)?,
                ],
                argmax: function(dev, &DECODE, "argmax_rows")?,
                sample: function(dev, &SAMPLING, "sample_rows")?,
                adjust: function(dev, &SAMPLING, "adjust_logits")?,
                lt: crate::lt_gemm::LtGemm::new(dev.cuda_stream(), dtype)?,
            })
        }

        /// Launches one fused GEMV (see [`Gemv`]).
        pub fn gemv(&self, g: &Gemv) -> Result<()> {
            let row_bytes = g.weight.row_bytes(g.k, self.dtype);
            let chunk_weights = 16 * g.k / row_bytes;
            let smem = self.staged_bytes(g.m, g.k);
            // The staging holds at most 4 16-byte vectors of a row per thread (see decode.cu).
            if g.m == 0
                || g.m > MAX_ROWS
                || !g.k.is_multiple_of(chunk_weights)
                || !g.k.is_multiple_of(8)
                || g.k > 4 * 8 * 256
            {
                candle_core::bail!(
                    "gemv: {} rows of {} inputs do not fit the {} kernel",
                    g.m,
                    g.k,
                    FORMATS[g.weight.format()]
                );
            }
            if smem > self.gemv_smem {
                candle_core::bail!("gemv: {} rows of {} inputs exceed shared memory", g.m, g.k);
            }
            let f = &self.gemv[g.weight.format()][match g.m {
                1 => 0,
                2 => 1,
                3 | 4 => 2,
                _ => 3,
            }];
            let (mode, norm, eps) = g.input.kernel_args();
            let WeightArgs {
                w,
                s,
                group,
                q2,
                code2,
                absmax2,
                offset2,
                block2,
            } = g.weight.kernel_args();
            let (out, out_f32, residual, glu) = match g.output {
                GemvOutput::Store(p) => (p, 0u64, 0u64, 0),
                GemvOutput::AddTo(p) => (p, 0, p, 0),
                GemvOutput::F32(p) => (0, p, 0, 0),
                GemvOutput::SwiGlu(p) => (p, 0, 0, 1),
            };
            use Arg::*;
            // The two kernels' leading parameters.
            let common = [
                Ptr(g.x),
                Ptr(norm),
                F32(eps),
                I32(mode),
                I32(g.m as i32),
                I32(g.n as i32),
                I32(g.k as i32),
                Ptr(w),
                Ptr(s),
            ];
            if let Some(plan) = self.tensor_core_plan(g, group)? {
                let tail = [
                    I32(plan.stages as i32),
                    Ptr(out),
                    Ptr(out_f32),
                    Ptr(residual),
                    I32(glu),
                    Ptr(q2),
                    Ptr(code2),
                    Ptr(absmax2),
                    F32(offset2),
                    I32(block2 as i32),
                ];
                return self.launch(
                    &plan.gemv.f,
                    (plan.blocks as u32, 1, 1),
                    TC_THREADS as u32,
                    plan.smem as u32,
                    &[&common[..], &tail].concat(),
                );
            }
            if glu == 1 {
                candle_core::bail!(
                    "gemv: the SwiGLU output needs the tensor-core GEMV ({} weights, n {}, k {})",
                    FORMATS[g.weight.format()],
                    g.n,
                    g.k
                );
            }
            let tpg = threads_per_group(row_bytes);
            let rows_per_block = 4 * (256 / tpg);
            let resident = f
                .occupancy_max_active_blocks_per_multiprocessor(256, smem, None)
                .w()?
                .max(1) as usize;
            let blocks = g.n.div_ceil(rows_per_block).min(self.sms * resident);
            let tail = [
                I32(group as i32),
                Ptr(q2),
                Ptr(code2),
                Ptr(absmax2),
                F32(offset2),
                I32(block2 as i32),
                I32(tpg as i32),
                Ptr(out),
                Ptr(out_f32),
                Ptr(residual),
            ];
            let args = [&common[..], &tail].concat();
            self.launch(f, (blocks as u32, 1, 1), 256, smem as u32, &args)
        }

        /// The tensor-core GEMV for `g` with its stages, grid and shared memory, or None where
        /// it does not apply (INT4 groups other than 128, NF4 second-level blocks not a multiple
        /// of 16, k not a whole number of 512-byte tiles, or tiles that do not fit in shared
        /// memory): then the FMA kernel runs.
        fn tensor_core_plan(
            &self,
            g: &Gemv,
            int4_group: usize,
        ) -> Result<Option<TensorCorePlan<'_>>> {
            let format = g.weight.format();
            let Some(tc) = self
                .tc
                .get(format)
                .map(|one_or_rows| &one_or_rows[usize::from(g.m > 1)])
            else {
                return Ok(None);
            };
            let glu = matches!(g.output, GemvOutput::SwiGlu(_));
            // A tile's 16 NF4 blocks share one second-level scale (see decode_common.cuh).
            let nf4_block2 = match g.weight {
                GemvWeight::Nf4 {
                    scales: Nf4BlockScales::Double { block2, .. },
                    ..
                } => block2,
                _ => 16,
            };
            if !g.k.is_multiple_of(32 * tc.chunk_weights)
                || (matches!(g.weight, GemvWeight::Int4 { .. }) && int4_group != 128)
                || !nf4_block2.is_multiple_of(16)
                || (glu && !g.n.is_multiple_of(16))
            {
                return Ok(None);
            }
            // With the SwiGLU output a block owns groups of the gate half and as many of the
            // up half (see decode.cu).
            let (groups, owned) = match glu {
                true => (g.n / 16, 2),
                false => (g.n.div_ceil(8), 1),
            };
            let warps = TC_THREADS / 32;
            let input = self.staged_bytes(g.m, g.k);
            let row_sums = |per: usize| owned * per * 8 * MAX_ROWS * 4;
            // Two resident blocks per multiprocessor before more stages: with one, the next
            // kernel's blocks cannot start (and prefetch) until this one's leave, which cost
            // a verify step of 3-8 rows about 10 % per row on the H200.
            let mut best: Option<(usize, TensorCorePlan)> = None;
            for stages in (2..=tc.stages).rev() {
                let base = warps * stages * tc.tile_bytes + input;
                if base + row_sums(1) > tc.dynamic_smem {
                    continue;
                }
                // Blocks own whole groups of 8 rows: as few per block as the resident blocks
                // allow, and the fewest blocks that give each that many.
                let mut resident = usize::MAX;
                let mut smem = base + row_sums(1);
                loop {
                    let fits =
                        tc.f.occupancy_max_active_blocks_per_multiprocessor(
                            TC_THREADS as u32,
                            smem,
                            None,
                        )
                        .w()?
                        .max(1) as usize;
                    if fits >= resident {
                        break;
                    }
                    resident = fits;
                    let per = groups.div_ceil(self.sms * resident);
                    smem = base + row_sums(per);
                }
                if smem > tc.dynamic_smem {
                    continue;
                }
                let per = groups.div_ceil(self.sms * resident);
                let plan = TensorCorePlan {
                    gemv: tc,
                    stages,
                    blocks: groups.div_ceil(per),
                    smem,
                };
                if best.as_ref().is_none_or(|(r, _)| resident.min(2) > *r) {
                    best = Some((resident.min(2), plan));
                }
            }
            Ok(best.map(|(_, plan)| plan))
        }

        /// Whether [`DecodeKernels::gemv`] takes `g` with a [`GemvOutput::SwiGlu`] output: on
        /// the tensor-core GEMV (dense, INT8, INT4 in groups of 128, NF4; k a whole number of
        /// its tiles, and the staged rows fit beside its tiles) with n a multiple of 16.
        pub fn takes_swiglu_output(&self, g: &Gemv) -> Result<bool> {
            let group = match g.weight {
                GemvWeight::Int4 { group, .. } => group,
                _ => 0,
            };
            let g = Gemv {
                output: GemvOutput::SwiGlu(0),
                ..*g
            };
            Ok(self.tensor_core_plan(&g, group)?.is_some())
        }

        /// Most rows one GEMV takes with inputs of `k` (up to [`MAX_ROWS`]): as many as the
        /// staged input fits in shared memory (8 rows of 8,192 in bf16 take 128 KiB; an RTX
        /// 4090's blocks hold 99 KiB).
        pub fn gemv_rows(&self, k: usize) -> usize {
            (self.gemv_smem / self.staged_bytes(1, k)).min(MAX_ROWS)
        }

        /// Shared memory of `m` staged input rows of `k`: each row padded by 8 elements
        /// (`XPAD` in decode.cu), so that rows start in different banks.
        fn staged_bytes(&self, m: usize, k: usize) -> usize {
            m * (k + 8) * self.dtype.size_in_bytes()
        }

        /// Streaming multiprocessors of the GPU.
        pub fn multiprocessors(&self) -> usize {
            self.sms
        }

        /// Blocks of the tensor-core attention kernel one multiprocessor holds at once (by its
        /// shared memory), for a head dimension and cache block size it takes: the deep ring's,
        /// or the shallow one's where a block gets too little shared memory for the deep (an RTX
        /// 4090); None for other shapes and where neither fits.
        pub fn tensor_core_attention_blocks(
            &self,
            head_dim: usize,
            block_size: usize,
        ) -> Option<usize> {
            let index = compiled_head_dim(head_dim)?;
            let (_, _, blocks) = self.attention_tc[index]
                .as_ref()
                .or(self.attention_tc_shallow[index].as_ref())?;
            block_size.is_multiple_of(16).then_some(*blocks)
        }

        /// The tensor-core attention kernel for a grid of `blocks` (rows × heads × splits): the
        /// deep ring up to one wave of it, the shallow ring past that (or where the deep does
        /// not fit the GPU). For a head dimension [`DecodeKernels::tensor_core_attention_blocks`]
        /// takes.
        pub fn tensor_core_attention_kernel(
            &self,
            head_dim: usize,
            blocks: usize,
        ) -> AttentionKernel {
            let Some(index) = compiled_head_dim(head_dim) else {
                return AttentionKernel::Tiled;
            };
            let deep = self.attention_tc[index].as_ref().map(|(_, _, b)| *b);
            let shallow = self.attention_tc_shallow[index].is_some();
            AttentionKernel::for_grid(deep, shallow, self.sms, blocks)
        }

        /// Whether [`DecodeKernels::attention`] runs `kernel` for this head dimension and cache
        /// block size on this GPU.
        pub fn runs_attention(
            &self,
            kernel: AttentionKernel,
            head_dim: usize,
            block_size: usize,
        ) -> bool {
            let tc = match kernel {
                AttentionKernel::Tiled => return true,
                AttentionKernel::TensorCore => &self.attention_tc,
                AttentionKernel::TensorCoreShallow => &self.attention_tc_shallow,
            };
            block_size.is_multiple_of(16)
                && compiled_head_dim(head_dim).is_some_and(|i| tc[i].is_some())
        }

        /// `out` `[m, k]` = `input(x)`, the GEMV's input transform on its own (RMSNorm, SwiGLU
        /// of `x` `[m, 2k]`, or a copy): what a GEMM takes when more rows than [`MAX_ROWS`]
        /// decode together. `k` as the GEMV allows (a multiple of 8, at most 8,192).
        pub fn transform_rows(
            &self,
            x: u64,
            input: GemvInput,
            m: usize,
            k: usize,
            out: u64,
        ) -> Result<()> {
            if !k.is_multiple_of(8) || k > 4 * 8 * 256 {
                candle_core::bail!("transform_rows: rows of {k} do not fit the kernel");
            }
            let (mode, norm, eps) = input.kernel_args();
            use Arg::*;
            let args = [Ptr(x), Ptr(norm), F32(eps), I32(mode), int(k), Ptr(out)];
            self.launch(&self.transform, (m as u32, 1, 1), 256, 0, &args)
        }

        /// The first product of the batched LoRA of one projection (see [`BatchedLora`]): `t`
        /// += x·Aᵀ per row with an adapter, and `t_next` zeroed. `beside`: on a side stream,
        /// beside what the device's stream runs until [`DecodeKernels::lora_expand`] (the base
        /// projection of the same input), which must not touch t, t_next or write x; else on
        /// the device's stream (when profiling, so that its events time it).
        pub fn lora_shrink(&self, l: &BatchedLora, beside: bool) -> Result<()> {
            // The expand reads t in slices of 32 ranks, and the kernels' rows in 16-byte words.
            if !l.max_rank.is_multiple_of(32) || !l.k.is_multiple_of(8) || l.t == l.t_next {
                candle_core::bail!(
                    "lora: max_rank {} (a multiple of 32), k {} (a multiple of 8) and two t buffers do not fit the kernels",
                    l.max_rank,
                    l.k
                );
            }
            if l.m == 0 || l.k == 0 {
                return Ok(());
            }
            use Arg::*;
            let (mode, norm, eps) = l.input.kernel_args();
            let args = [
                Ptr(l.x),
                Ptr(norm),
                F32(eps),
                I32(mode),
                int(l.m),
                int(l.k),
                Ptr(l.adapter_rows),
                Ptr(l.entries),
                Ptr(l.t),
                Ptr(l.t_next),
                int(l.max_rank),
            ];
            // Tiles of 16 rows by slices of 256 inputs (LORA_ROWS, LORA_SHRINK_BLOCK_K).
            let grid = (l.m.div_ceil(16) as u32, l.k.div_ceil(256) as u32, 1);
            if !beside {
                return self.launch(&self.lora_shrink, grid, 128, 0, &args);
            }
            let main = self.dev.cuda_stream().cu_stream();
            self.side.fork_from(main).w()?;
            self.launch_on(self.side.stream, &self.lora_shrink, grid, 128, 0, &args)?;
            self.side.record_done().w()
        }

        /// The second product (see [`BatchedLora`]): `y` += T(t)·(scale·B)ᵀ in place for the
        /// rows with an adapter, after [`DecodeKernels::lora_shrink`] (`joined`: the device's
        /// stream first waits for the side stream's, for a shrink that ran beside).
        pub fn lora_expand(&self, l: &BatchedLora, joined: bool) -> Result<()> {
            // No rows: the shrink forked nothing to join.
            if l.m == 0 || l.k == 0 {
                return Ok(());
            }
            if joined {
                self.side
                    .join_into(self.dev.cuda_stream().cu_stream())
                    .w()?;
            }
            if l.n == 0 {
                return Ok(());
            }
            use Arg::*;
            let args = [
                Ptr(l.t),
                int(l.max_rank),
                Ptr(l.adapter_rows),
                Ptr(l.entries),
                Ptr(l.y),
                int(l.n),
                int(l.m),
            ];
            // Blocks of 4 warps' columns by tiles of 16 rows: 64 columns a warp where that still
            // gives a block per multiprocessor (fewer warps read each tile of t), else 16.
            let tiles = l.m.div_ceil(16);
            let wide = l.n.div_ceil(256) * tiles >= self.sms;
            let columns = if wide { 256 } else { 64 };
            let grid = (l.n.div_ceil(columns) as u32, tiles as u32, 1);
            self.launch(&self.lora_expand[usize::from(wide)], grid, 128, 0, &args)
        }

        /// Both products of the batched LoRA of one projection, the first on the side stream.
        pub fn lora(&self, l: &BatchedLora) -> Result<()> {
            self.lora_shrink(l, true)?;
            self.lora_expand(l, true)
        }

        /// Zeroes `bytes` bytes at `at` on the step's stream (a memset node in a captured graph).
        pub fn zero(&self, at: u64, bytes: usize) -> Result<()> {
            let stream = self.dev.cuda_stream();
            stream.context().bind_to_thread().w()?;
            // SAFETY: the caller's live device buffer of at least `bytes` bytes.
            unsafe { result::memset_d8_async(at, 0, bytes, stream.cu_stream()) }.w()
        }

        /// `out[i]` = `x[i]` as f32 for `n` elements of the compute dtype.
        pub fn widen(&self, x: u64, out: u64, n: usize) -> Result<()> {
            use Arg::*;
            let blocks = n.div_ceil(256).min(4 * self.sms).max(1);
            self.launch(
                &self.widen,
                (blocks as u32, 1, 1),
                256,
                0,
                &[Ptr(x), Ptr(out), int(n)],
            )
        }

        /// `out = a · Wᵀ` for `a` `[m, k]` and a dense weight `[n, k]` in the compute dtype, on
        /// cuBLASLt with the fastest algorithm for the shape, timed ahead
        /// ([`DecodeKernels::tune_gemm`]) or at its first call (f32 accumulation): stored,
        /// added to the residual stream (beta = 1, rounded once), or written as f32.
        pub fn gemm(
            &self,
            a: u64,
            m: usize,
            n: usize,
            k: usize,
            w: u64,
            output: GemvOutput,
        ) -> Result<()> {
            let (c, out_f32, beta) = gemm_output(output)?;
            // SAFETY: the caller's live device buffers of the sizes named, on this stream.
            unsafe { self.lt.gemm((m, n, k), a, w, c, out_f32, beta) }
        }

        /// Times the algorithms of [`DecodeKernels::gemm`]'s shape ahead of its first call, so
        /// that no step pays for the timing (stored and f32 outputs are written; an AddTo
        /// output is left as it was).
        pub fn tune_gemm(
            &self,
            a: u64,
            m: usize,
            n: usize,
            k: usize,
            w: u64,
            output: GemvOutput,
        ) -> Result<()> {
            let (c, out_f32, beta) = gemm_output(output)?;
            // SAFETY: the caller's live device buffers of the sizes named, on this stream.
            unsafe { self.lt.tune((m, n, k), a, w, c, out_f32, beta) }
        }

        /// `x[b] = table[tokens[b]]` for `m` rows of `hidden`.
        pub fn embed(
            &self,
            table: u64,
            tokens: u64,
            x: u64,
            m: usize,
            hidden: usize,
        ) -> Result<()> {
            use Arg::*;
            let args = [Ptr(table), Ptr(tokens), Ptr(x), I32(hidden as i32)];
            self.launch(&self.embed, (m as u32, 1, 1), 256, 0, &args)
        }

        /// Rotates each row's q and k at position `lens[b] − 1` and writes k, v into the paged
        /// caches (see `cuda/decode.cu`).
        pub fn rope_write_kv(&self, a: &RopeKv) -> Result<()> {
            use Arg::*;
            let args = [
                Ptr(a.qkv),
                Ptr(a.cos_short),
                Ptr(a.sin_short),
                Ptr(a.cos_long),
                Ptr(a.sin_long),
                Ptr(a.long_rows),
                Ptr(a.lens),
                Ptr(a.tables),
                int(a.max_blocks),
                Ptr(a.q_out),
                Ptr(a.k_cache),
                Ptr(a.v_cache),
                int(a.m),
                int(a.heads),
                int(a.kv_heads),
                int(a.head_dim),
                int(a.rotary_dim),
                int(a.block_size),
            ];
            let grid = (a.m as u32, (a.heads + 2 * a.kv_heads) as u32, 1);
            let block = a.head_dim.next_multiple_of(32) as u32;
            self.launch(&self.rope_kv, grid, block, 0, &args)
        }

        /// Paged decode attention with the keys split over `splits` blocks per (row, head);
        /// `partial` holds `m·heads·splits·(head_dim + 2)` f32 and `counters` `m·heads` u32
        /// zeros (left zero after each launch). The tensor-core kernel takes head dims 64, 96
        /// and 128 (others run the tiled kernel) and cache blocks of a multiple of 16 positions.
        pub fn attention(&self, a: &Attention) -> Result<()> {
            let index = compiled_head_dim(a.head_dim).unwrap_or(3);
            let (f, smem) = match (a.kernel, index) {
                (_, 3) | (AttentionKernel::Tiled, _) => (&self.attention[index], 0),
                (AttentionKernel::TensorCore | AttentionKernel::TensorCoreShallow, _) => {
                    if !a.block_size.is_multiple_of(16) {
                        candle_core::bail!(
                            "tensor-core decode attention: cache blocks of {} positions (needs a multiple of 16)",
                            a.block_size
                        );
                    }
                    let kernels = match a.kernel {
                        AttentionKernel::TensorCoreShallow => &self.attention_tc_shallow,
                        _ => &self.attention_tc,
                    };
                    let Some((f, smem, _)) = &kernels[index] else {
                        candle_core::bail!(
                            "tensor-core decode attention: this GPU gives a block too little shared memory for head dim {}",
                            a.head_dim
                        );
                    };
                    (f, *smem)
                }
            };
            use Arg::*;
            let args = [
                Ptr(a.q),
                Ptr(a.k_cache),
                Ptr(a.v_cache),
                Ptr(a.tables),
                Ptr(a.lens),
                Ptr(a.out),
                int(a.m),
                int(a.heads),
                int(a.kv_heads),
                int(a.head_dim),
                int(a.block_size),
                int(a.max_blocks),
                int(a.window),
                int(a.splits),
                Ptr(a.partial),
                Ptr(a.counters),
            ];
            let grid = (a.m as u32, a.heads as u32, a.splits as u32);
            self.launch(f, grid, 128, smem, &args)
        }

        /// `out[b] = argmax(logits[b])` (u32; lowest id on ties, NaN ignored) for `m` rows of
        /// `vocab` f32.
        pub fn argmax(&self, logits: u64, vocab: usize, out: u64, m: usize) -> Result<()> {
            use Arg::*;
            let args = [Ptr(logits), I32(vocab as i32), Ptr(out)];
            self.launch(&self.argmax, (m as u32, 1, 1), 1024, 0, &args)
        }

        /// `out[b]` = the token drawn from `logits` row b (f32, `vocab` ≤
        /// [`crate::sampling::MAX_VOCAB`]) with the settings of row b in `params`
        /// ([`crate::sampling::RowSampling::write`] with `stride`), for `m` rows.
        pub fn sample(
            &self,
            logits: u64,
            vocab: usize,
            params: u64,
            stride: usize,
            out: u64,
            m: usize,
        ) -> Result<()> {
            if vocab > crate::sampling::MAX_VOCAB || m > stride {
                candle_core::bail!("sample: {m} rows of {vocab} logits do not fit the kernel");
            }
            use Arg::*;
            let args = [Ptr(logits), int(vocab), Ptr(params), int(stride), Ptr(out)];
            self.launch(&self.sample, (m as u32, 1, 1), 1024, 0, &args)
        }

        /// Applies the logit adjustments at `entries` (`crate::sampling::LogitAdjustment::words`,
        /// as many as the u32 at `count` says, at most `max_entries`) to the f32 logits in place:
        /// the logit bias and penalties of the rows [`DecodeKernels::sample`] draws from next.
        pub fn adjust(
            &self,
            logits: u64,
            entries: u64,
            count: u64,
            max_entries: usize,
        ) -> Result<()> {
            use Arg::*;
            // Enough threads for every entry, up to a few blocks per multiprocessor (the
            // kernel strides over the rest).
            let blocks = max_entries.div_ceil(256).clamp(1, 4 * self.sms);
            let args = [Ptr(logits), Ptr(entries), Ptr(count)];
            self.launch(&self.adjust, (blocks as u32, 1, 1), 256, 0, &args)
        }

        /// Launches `f` on the device's stream, with programmatic dependent launch where the
        /// GPU has it (cudarc's builder cannot set launch attributes, hence the driver call).
        pub(crate) fn launch(
            &self,
            f: &CudaFunction,
            grid: (u32, u32, u32),
            block: u32,
            smem: u32,
            args: &[Arg],
        ) -> Result<()> {
            self.launch_on(
                self.dev.cuda_stream().cu_stream(),
                f,
                grid,
                block,
                smem,
                args,
            )
        }

        /// [`DecodeKernels::launch`] on `stream` (the device's or the side stream).
        fn launch_on(
            &self,
            on: candle_core::cuda_backend::cudarc::driver::sys::CUstream,
            f: &CudaFunction,
            grid: (u32, u32, u32),
            block: u32,
            smem: u32,
            args: &[Arg],
        ) -> Result<()> {
            // Each parameter in an 8-byte slot (the driver reads the parameter's own size).
            let mut slots: Vec<u64> = args
                .iter()
                .map(|a| match *a {
                    Arg::Ptr(p) => p,
                    Arg::I32(v) => v as u32 as u64,
                    Arg::F32(v) => v.to_bits() as u64,
                })
                .collect();
            let mut params: Vec<*mut std::ffi::c_void> = slots
                .iter_mut()
                .map(|s| s as *mut u64 as *mut std::ffi::c_void)
                .collect();
            let stream = self.dev.cuda_stream();
            stream.context().bind_to_thread().w()?;
            // SAFETY: a plain-old-data union, zero is a valid value of every member.
            let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.programmaticStreamSerializationAllowed = 1;
            let mut attribute = sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value,
            };
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: on,
                attrs: if self.pdl {
                    &mut attribute
                } else {
                    std::ptr::null_mut()
                },
                numAttrs: self.pdl as u32,
            };
            // SAFETY: `params` points at one slot per kernel parameter, in order, alive for the
            // call; the addresses inside are the caller's live device buffers.
            unsafe {
                sys::cuLaunchKernelEx(
                    &config,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .w()
        }
    }
}

/// Arguments of [`DecodeKernels::lora`]: each of the `m` rows names an adapter in
/// `adapter_rows` (u32 index into `entries`, `u32::MAX` for none); `entries` holds per adapter
/// the addresses of A `[rank, k]` and scale·B `[n, rank]` (compute dtype, contiguous) and the
/// rank, three u64 each (see [`lora_entry`]); `x` `[m, k]` before `input`, `y` `[m, n]` (added to
/// in place);
/// `t` f32 `[m, max_rank]` scratch, zero on entry (the first product adds into it), and
/// `t_next` another, which the call zeroes for the next projection's `t` (so that a step of
/// several needs one memset, before its first). `max_rank` a multiple of 32, at least every
/// entry's rank.
#[derive(Debug, Clone, Copy)]
pub struct BatchedLora {
    pub x: u64,
    /// The projection's input transform, applied to `x` by the first product (`x` then
    /// `[m, 2k]` for SwiGLU).
    pub input: GemvInput,
    pub y: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub adapter_rows: u64,
    pub entries: u64,
    pub t: u64,
    pub t_next: u64,
    pub max_rank: usize,
}

/// The three u64 words of one adapter's entry in [`BatchedLora::entries`]: A, scale·B, rank (an
/// adapter that leaves the projection alone has rank 0).
pub fn lora_entry(a: u64, scaled_b: u64, rank: usize) -> [u64; 3] {
    [a, scaled_b, rank as u64]
}

/// Plain reference of [`DecodeKernels::lora`] for one row in f32: `y + x·Aᵀ·(scale·B)ᵀ`, with
/// x·Aᵀ and the product rounded to `dtype` as the kernels round them.
pub fn lora_reference(
    x: &[f32],
    a: &[f32],
    scaled_b: &[f32],
    rank: usize,
    y: &[f32],
    dtype: DType,
) -> Vec<f32> {
    let round = |v: f32| round_to(v, dtype);
    let k = x.len();
    let t: Vec<f32> = (0..rank)
        .map(|r| round((0..k).map(|i| x[i] * a[r * k + i]).sum()))
        .collect();
    y.iter()
        .enumerate()
        .map(|(j, &yj)| {
            let delta: f32 = (0..rank).map(|r| t[r] * scaled_b[j * rank + r]).sum();
            round(yj + round(delta))
        })
        .collect()
}

/// Arguments of [`DecodeKernels::rope_write_kv`]: `qkv` `[m, (h + 2·kvh)·d]`, cos/sin tables
/// `[positions, rd/2]` (short and long LongRoPE factors; the same for plain RoPE), `long_rows`
/// `[m]` u32 (non-zero: the row rotates with the long ones), `lens` `[m]` u32 (length with the new token),
/// `tables` `[m, max_blocks]` u32, `q_out` `[h, m, d]`, caches `[blocks, kvh, bs, d]`.
#[derive(Debug, Clone, Copy)]
pub struct RopeKv {
    pub qkv: u64,
    pub cos_short: u64,
    pub sin_short: u64,
    pub cos_long: u64,
    pub sin_long: u64,
    pub long_rows: u64,
    pub lens: u64,
    pub tables: u64,
    pub max_blocks: usize,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub m: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub block_size: usize,
}

/// The index of `head_dim` among the head dims the attention kernels are compiled for (64, 96,
/// 128), as their tables hold them.
#[cfg(feature = "cuda")]
fn compiled_head_dim(head_dim: usize) -> Option<usize> {
    [64, 96, 128].iter().position(|&d| d == head_dim)
}

/// Which paged decode attention kernel runs (paged_attention.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Any head dimension: tiles of 128 keys, one thread a key, block-wide softmax.
    Tiled,
    /// Head dimensions 64, 96, 128: each warp streams its own stages of 16 keys, scores and
    /// weighted sums on the tensor cores.
    TensorCore,
    /// The same with a ring of 2 stages a warp instead of 3-4: half the shared memory, twice the
    /// blocks a multiprocessor holds (for grids past one wave of [`AttentionKernel::TensorCore`]).
    TensorCoreShallow,
}

impl AttentionKernel {
    /// The tensor-core kernel for a grid of `blocks` on `sms` multiprocessors: the deep ring
    /// (`deep`: its blocks per multiprocessor, None where it does not fit the GPU) up to one
    /// wave of it, the shallow ring (where it fits: `shallow`) past that or without the deep
    /// one; the tiled kernel where neither fits.
    pub fn for_grid(deep: Option<usize>, shallow: bool, sms: usize, blocks: usize) -> Self {
        match (deep, shallow) {
            (Some(deep), true) if blocks > deep * sms => AttentionKernel::TensorCoreShallow,
            (Some(_), _) => AttentionKernel::TensorCore,
            (None, true) => AttentionKernel::TensorCoreShallow,
            (None, false) => AttentionKernel::Tiled,
        }
    }
}

/// Arguments of [`DecodeKernels::attention`]: `q` `[h, m, d]`, out `[m, h, d]`, the rest as
/// `paged_attention::paged_decode_attention` takes them, plus the split workspace.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub tables: u64,
    pub lens: u64,
    pub out: u64,
    pub m: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub max_blocks: usize,
    pub window: usize,
    pub splits: usize,
    pub kernel: AttentionKernel,
    pub partial: u64,
    pub counters: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_applies_norm_then_product_then_residual() {
        // x = [3, 4]: mean square 12.5, so the normed row is x / sqrt(12.5) · g.
        let x = [3.0, 4.0];
        let g = [1.0, 2.0];
        let w = [1.0, 0.0, 0.0, 1.0];
        let input = GemvInput::RmsNorm {
            weight: 0,
            eps: 0.0,
        };
        let out = gemv_reference(&x, input, Some(&g), &w, 2, Some(&[1.0, 1.0]), DType::F32);
        let s = 12.5f32.sqrt();
        assert!((out[0] - (1.0 + 3.0 / s)).abs() < 1e-6);
        assert!((out[1] - (1.0 + 8.0 / s)).abs() < 1e-6);
    }

    #[test]
    fn reference_swiglu_gates_the_up_half() {
        let x = [0.0, 2.0, 5.0, 7.0]; // gate [0, 2], up [5, 7]
        let w = [1.0, 1.0];
        let out = gemv_reference(&x, GemvInput::SwiGlu, None, &w, 2, None, DType::F32);
        let silu2 = 2.0 / (1.0 + (-2.0f32).exp());
        assert!((out[0] - 7.0 * silu2).abs() < 1e-5);
    }

    #[test]
    fn the_shallow_ring_takes_grids_past_one_deep_wave() {
        use AttentionKernel::*;
        // H200: 132 multiprocessors, two deep blocks each. One sequence's verify step of 8
        // proposals (9 rows × 32 heads) is past one wave; 8 rows are not.
        assert_eq!(
            AttentionKernel::for_grid(Some(2), true, 132, 8 * 32),
            TensorCore
        );
        assert_eq!(
            AttentionKernel::for_grid(Some(2), true, 132, 9 * 32),
            TensorCoreShallow
        );
        assert_eq!(
            AttentionKernel::for_grid(Some(2), false, 132, 9 * 32),
            TensorCore
        );
        // RTX 4090: the deep ring does not fit a block's shared memory.
        assert_eq!(
            AttentionKernel::for_grid(None, true, 128, 32),
            TensorCoreShallow
        );
        assert_eq!(AttentionKernel::for_grid(None, false, 128, 32), Tiled);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn groups_shrink_with_the_row() {
        assert_eq!(threads_per_group(3072 / 2 / 16 * 16), 32); // int4, 96 chunks
        assert_eq!(threads_per_group(3072 * 2), 128); // bf16, 384 chunks
        assert_eq!(threads_per_group(8192 * 2), 256); // bf16, 1024 chunks
    }
}
