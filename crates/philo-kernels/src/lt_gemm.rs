//! The decode step's many-row projections, `y [m, n] = x [m, k] · W [n, k]ᵀ`, on cuBLASLt with
//! the fastest of its heuristic's candidates for each shape, timed ahead ([`LtGemm::tune`], as
//! the decode step does for every row count it may run) or at the shape's first call.
//! `cublasGemmEx`'s own choice at these skinny shapes leaves bandwidth unused (H200, CUDA
//! graphs, µs: 9 rows qkv 18.6 against the best candidate's 15.6, o_proj 9.9 against 8.1, down
//! 18.1 against 16.1; 64 rows down 19.3 against 17.0), and which candidate wins differs by
//! shape. The reference is [`crate::gemm::reference`].

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use candle_core::cuda_backend::cudarc::driver::{
    result as driver, CudaSlice, CudaStream, DevicePtr,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Result};

/// Workspace the candidates may use (cuBLASLt's recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;
/// Candidates asked of the heuristic.
const CANDIDATES: usize = 8;
/// Timed calls per candidate, each after the L2 is flushed: a step reads every weight once,
/// from DRAM, so a candidate is judged on cold weights.
const TIMED_CALLS: usize = 2;

/// One GEMM shape: rows, outputs, inputs, and whether the output is f32 (else the inputs' dtype).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    out_f32: bool,
}

/// A shape's descriptors and the algorithm chosen for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    w: sys::cublasLtMatrixLayout_t,
    x: sys::cublasLtMatrixLayout_t,
    y: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `LtGemm::plan` (null where it stopped early), destroyed once here.
        unsafe {
            for layout in [self.w, self.x, self.y] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// cuBLASLt GEMMs on one stream, with a plan per shape.
pub(crate) struct LtGemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    dtype: DType,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Shape, Plan>>,
}

// SAFETY: the handle and descriptors are only used under the plans' lock or by `&self` calls
// that cuBLASLt allows from any thread (one stream's work, ordered by the caller).
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once here, after the plans.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

/// cuBLASLt's errors as candle's.
trait LtErr<T> {
    fn lt(self) -> Result<T>;
}

impl<T> LtErr<T> for std::result::Result<T, result::CublasError> {
    fn lt(self) -> Result<T> {
        self.map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))
    }
}

fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        other => candle_core::bail!("cuBLASLt GEMM: inputs of {other:?} are not taken"),
    })
}

impl LtGemm {
    /// A handle and workspace on `stream` for inputs of `dtype` (bf16 or f16).
    pub(crate) fn new(stream: Arc<CudaStream>, dtype: DType) -> Result<Self> {
        data_type(dtype)?;
        // The workspace first: nothing to free if its allocation fails.
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE).w()?;
        let handle = result::create_handle().lt()?;
        Ok(Self {
            handle,
            stream,
            dtype,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `y [m, n] ← x [m, k] · W [n, k]ᵀ + beta·y` (rows contiguous; y f32 when `out_f32`, else
    /// the inputs' dtype; beta 0 or 1). A shape's first call outside a graph capture times the
    /// candidates (see [`LtGemm::fastest`]) and keeps the fastest; inside a capture an untimed
    /// shape takes the heuristic's first.
    ///
    /// # Safety
    /// The addresses are live device buffers of the sizes named, used on this stream.
    pub(crate) unsafe fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        x: u64,
        w: u64,
        y: u64,
        out_f32: bool,
        beta: f32,
    ) -> Result<()> {
        let shape = Shape { m, n, k, out_f32 };
        if let Some(plan) = self.plans()?.get(&shape) {
            return self.run(plan, x, w, y, beta);
        }
        if self.stream.capture_status().w()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            // Untimed: run it, but time the shape at its next call outside a capture.
            let plan = self.plan(shape, (x, w, y), beta, false)?;
            return self.run(&plan, x, w, y, beta);
        }
        self.tune((m, n, k), x, w, y, out_f32, beta)?;
        self.run(&self.plans()?[&shape], x, w, y, beta)
    }

    /// Times the candidates of a shape ahead of its first [`LtGemm::gemm`], which then runs
    /// the fastest at once; nothing where the shape has its plan. `y` is written where beta
    /// is 0 (see [`LtGemm::fastest`]).
    ///
    /// # Safety
    /// As [`LtGemm::gemm`].
    pub(crate) unsafe fn tune(
        &self,
        (m, n, k): (usize, usize, usize),
        x: u64,
        w: u64,
        y: u64,
        out_f32: bool,
        beta: f32,
    ) -> Result<()> {
        let shape = Shape { m, n, k, out_f32 };
        let mut plans = self.plans()?;
        if let Entry::Vacant(e) = plans.entry(shape) {
            e.insert(self.plan(shape, (x, w, y), beta, true)?);
        }
        Ok(())
    }

    fn plans(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Shape, Plan>>> {
        self.plans
            .lock()
            .map_err(|_| candle_core::Error::Msg("cuBLASLt GEMM: plan lock poisoned".into()))
    }

    unsafe fn run(&self, p: &Plan, x: u64, w: u64, y: u64, beta: f32) -> Result<()> {
        let alpha = 1f32;
        let (workspace, _sync) = self.workspace.device_ptr(&self.stream);
        // Column-major: yᵀ [n, m] = Aᵀ · B with A = W seen as [k, n] and B = x seen as [k, m].
        result::matmul(
            self.handle,
            p.desc,
            (&alpha) as *const f32 as *const c_void,
            (&beta) as *const f32 as *const c_void,
            w as *const c_void,
            p.w,
            x as *const c_void,
            p.x,
            y as *const c_void,
            p.y,
            y as *mut c_void,
            p.y,
            &p.algo,
            workspace as *mut c_void,
            WORKSPACE,
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .lt()
    }

    /// The descriptors of `s` and its algorithm: the fastest candidate when `time`, else the
    /// heuristic's first.
    unsafe fn plan(
        &self,
        s: Shape,
        (x, w, y): (u64, u64, u64),
        beta: f32,
        time: bool,
    ) -> Result<Plan> {
        let in_type = data_type(self.dtype)?;
        let out_type = data_type(if s.out_f32 { DType::F32 } else { self.dtype })?;
        // Filled in one by one: on an error, Drop destroys what was made.
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            algo: std::mem::zeroed(),
        };
        plan.desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .lt()?;
        plan.w = result::create_matrix_layout(in_type, s.k as u64, s.n as u64, s.k as i64).lt()?;
        plan.x = result::create_matrix_layout(in_type, s.k as u64, s.m as u64, s.k as i64).lt()?;
        plan.y = result::create_matrix_layout(out_type, s.n as u64, s.m as u64, s.n as i64).lt()?;
        let desc = plan.desc;
        let (t, n) = (
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
        );
        for (attr, op) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                t,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                n,
            ),
        ] {
            result::set_matmul_desc_attribute(
                desc,
                attr,
                (&op) as *const _ as *const c_void,
                std::mem::size_of_val(&op),
            )
            .lt()?;
        }
        let pref = result::create_matmul_pref().lt()?;
        let bytes = WORKSPACE as u64;
        let found = result::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes) as *const u64 as *const c_void,
            8,
        )
        .and_then(|()| {
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
                std::mem::zeroed();
            let mut count = 0;
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                plan.w,
                plan.x,
                plan.y,
                plan.y,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            )
            .result()?;
            Ok(results
                .into_iter()
                .take(count.max(0) as usize)
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect::<Vec<_>>())
        });
        let _ = result::destroy_matmul_pref(pref);
        let candidates = found.lt()?;
        let Some(first) = candidates.first() else {
            candle_core::bail!(
                "cuBLASLt has no algorithm for a {}×{}×{} GEMM",
                s.m,
                s.n,
                s.k
            );
        };
        plan.algo = *first;
        if time && candidates.len() > 1 {
            plan.algo = self.fastest(&mut plan, &candidates, s, x, w, y, beta)?;
        }
        Ok(plan)
    }

    /// The candidate with the shortest time: its best of [`TIMED_CALLS`] calls, each after the
    /// workspace is overwritten (32 MiB through the L2, which evicts most of the weights a
    /// previous call left there). The calls write `y` when beta is 0 (the real call overwrites
    /// it next), else scratch output, so that the residual in `y` is left as it was. One
    /// synchronisation for all.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fastest(
        &self,
        plan: &mut Plan,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        s: Shape,
        x: u64,
        w: u64,
        y: u64,
        beta: f32,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let out_bytes = s.m
            * s.n
            * if s.out_f32 {
                4
            } else {
                self.dtype.size_in_bytes()
            };
        let scratch = match beta {
            0.0 => None,
            _ => Some(self.stream.alloc_zeros::<u8>(out_bytes).w()?),
        };
        let out = match &scratch {
            Some(buffer) => buffer.device_ptr(&self.stream).0,
            None => y,
        };
        let (workspace, _sync) = self.workspace.device_ptr(&self.stream);
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        // Per candidate, its calls' (start, end) events; none where a call failed (a candidate
        // that fails at run time is passed over).
        let mut events = Vec::with_capacity(candidates.len());
        for &algo in candidates {
            plan.algo = algo;
            let mut calls = Vec::with_capacity(TIMED_CALLS);
            for _ in 0..TIMED_CALLS {
                driver::memset_d8_async(workspace, 0, WORKSPACE, self.stream.cu_stream()).w()?;
                let start = self.stream.record_event(timing).w()?;
                if self.run(plan, x, w, out, 0.0).is_err() {
                    calls.clear();
                    break;
                }
                calls.push((start, self.stream.record_event(timing).w()?));
            }
            events.push(calls);
        }
        self.stream.synchronize().w()?;
        let mut best = (f32::INFINITY, candidates[0]);
        for (&algo, calls) in candidates.iter().zip(&events) {
            for (start, end) in calls {
                let ms = start.elapsed_ms(end).w()?;
                if ms < best.0 {
                    best = (ms, algo);
                }
            }
        }
        Ok(best.1)
    }
}
