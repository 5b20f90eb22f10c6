//! Matrix products written into an existing tensor, c = alpha·op(a)·op(b) + beta·c: what the
//! training layer needs to add a LoRA product onto the base projection (beta = 1, folded into
//! the base GEMM's epilogue instead of a separate add), and to sum LoRA weight gradients in f32
//! over row chunks and micro-batches. On CUDA one cuBLAS `GemmEx` (f32 accumulation; c in f32
//! or in the inputs' dtype); on the CPU candle's matmul.

use candle_core::{DType, Result, Tensor};

/// The plain reference on row-major f32 data: c `[m, n]` ← alpha·op(a)·op(b) + beta·c, where
/// op(a) is `[m, k]` (a stored `[k, m]` when `trans_a`) and op(b) is `[k, n]` (b stored
/// `[n, k]` when `trans_b`).
#[allow(clippy::too_many_arguments)]
pub fn reference(
    c: &[f32],
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let at = |i: usize, l: usize| if trans_a { a[l * m + i] } else { a[i * k + l] };
    let bt = |l: usize, j: usize| if trans_b { b[j * k + l] } else { b[l * n + j] };
    (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            let dot: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            alpha * dot + if beta == 0.0 { 0.0 } else { beta * c[e] }
        })
        .collect()
}

/// c ← alpha·op(a)·op(b) + beta·c in place (see [`reference`] for the layouts). `c` is
/// contiguous, f32 or the inputs' dtype; `a` and `b` are 2-D with a contiguous last dim (rows
/// may be strided). With beta = 0, c's previous values are not read.
pub fn gemm_into(
    c: &Tensor,
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    alpha: f64,
    beta: f64,
) -> Result<()> {
    let (m, n) = c.dims2()?;
    let (ar, ac) = a.dims2()?;
    let (br, bc) = b.dims2()?;
    let (am, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (bk, bn) = if trans_b { (bc, br) } else { (br, bc) };
    if am != m || bn != n || bk != k {
        candle_core::bail!(
            "gemm_into: c {:?}, a {:?}{}, b {:?}{} do not fit",
            c.dims(),
            a.dims(),
            if trans_a { "ᵀ" } else { "" },
            b.dims(),
            if trans_b { "ᵀ" } else { "" }
        );
    }
    if a.dtype() != b.dtype() || !(c.dtype() == DType::F32 || c.dtype() == a.dtype()) {
        candle_core::bail!(
            "gemm_into: a {:?}, b {:?}, c {:?}: a and b share a dtype, c is f32 or that dtype",
            a.dtype(),
            b.dtype(),
            c.dtype()
        );
    }
    if !c.is_contiguous() {
        candle_core::bail!("gemm_into: c must be contiguous");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if c.device().is_cuda() {
        return c.inplace_op3(
            a,
            b,
            &cuda::Gemm {
                trans_a,
                trans_b,
                alpha: alpha as f32,
                beta: beta as f32,
            },
        );
    }
    let compute = c.dtype();
    let op = |t: &Tensor, trans: bool| -> Result<Tensor> {
        let t = t.to_dtype(compute)?;
        if trans {
            t.t()
        } else {
            Ok(t)
        }
    };
    let product = (op(a, trans_a)?.matmul(&op(b, trans_b)?)? * alpha)?;
    let value = if beta == 0.0 {
        product
    } else {
        (product + (c * beta)?)?
    };
    c.slice_set(&value, 0, 0)
}

/// `acc` `[m, n]` (f32) += alpha · aᵀ · b for `a` `[k, m]`, `b` `[k, n]`: a LoRA weight
/// gradient summed over rows.
pub fn accumulate_at_b(acc: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
    if acc.dtype() != DType::F32 {
        candle_core::bail!("accumulate_at_b: the accumulator must be f32");
    }
    gemm_into(acc, a, true, b, false, alpha, 1.0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::launch::*;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, InplaceOp3, Layout};

    pub(super) struct Gemm {
        pub trans_a: bool,
        pub trans_b: bool,
        pub alpha: f32,
        pub beta: f32,
    }

    /// c `[m, n]` ← alpha·op(a)·op(b) + beta·c on device addresses, row-major as [`reference`]
    /// lays them out; `lda`/`ldb` are the row strides of a and b as stored.
    struct RawGemm {
        pub trans_a: bool,
        pub trans_b: bool,
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub a: u64,
        pub lda: usize,
        pub b: u64,
        pub ldb: usize,
        pub c: u64,
        pub in_dtype: DType,
        pub out_dtype: DType,
        pub alpha: f32,
        pub beta: f32,
    }

    /// One cuBLAS `GemmEx` (f32 accumulation) on `dev`'s handle and stream.
    ///
    /// # Safety
    /// The addresses are live device buffers holding the shapes and strides `g` names.
    unsafe fn raw_gemm(dev: &CudaDevice, g: &RawGemm) -> Result<()> {
        let blas = dev.cublas_handle();
        let (in_type, out_type) = (data_type(g.in_dtype)?, data_type(g.out_dtype)?);
        // Column-major view: cᵀ [n, m] = op(b)ᵀ [n, k] · op(a)ᵀ [k, m].
        result::gemm_ex(
            *blas.handle(),
            op(g.trans_b),
            op(g.trans_a),
            g.n as i32,
            g.m as i32,
            g.k as i32,
            (&g.alpha) as *const f32 as *const _,
            g.b as *const _,
            in_type,
            g.ldb as i32,
            g.a as *const _,
            in_type,
            g.lda as i32,
            (&g.beta) as *const f32 as *const _,
            g.c as *mut _,
            out_type,
            g.n as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .w()
    }

    /// Row stride of a 2-D layout whose last dim is contiguous.
    fn row_stride(l: &Layout, what: &str) -> Result<usize> {
        let st = l.stride();
        let (rows, cols) = l.shape().dims2()?;
        if cols > 1 && st[1] != 1 {
            candle_core::bail!("gemm_into: {what} needs a contiguous last dim");
        }
        Ok(if rows > 1 { st[0] } else { cols.max(1) })
    }

    fn data_type(dtype: DType) -> Result<sys::cudaDataType_t> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            other => candle_core::bail!("gemm_into takes float tensors, not {other:?}"),
        })
    }

    fn op(trans: bool) -> sys::cublasOperation_t {
        if trans {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    }

    impl InplaceOp3 for Gemm {
        fn name(&self) -> &'static str {
            "philo-gemm-into"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            candle_core::bail!("gemm_into's custom op runs on CUDA")
        }

        fn cuda_fwd(
            &self,
            c: &mut CudaStorage,
            cl: &Layout,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<()> {
            let (m, n) = cl.shape().dims2()?;
            let (ar, ac) = al.shape().dims2()?;
            let k = if self.trans_a { ar } else { ac };
            let (lda, ldb) = (row_stride(al, "a")?, row_stride(bl, "b")?);
            let gemm = RawGemm {
                trans_a: self.trans_a,
                trans_b: self.trans_b,
                m,
                n,
                k,
                a: storage_address(a, al.start_offset())?,
                lda,
                b: storage_address(b, bl.start_offset())?,
                ldb,
                c: storage_address(c, cl.start_offset())?,
                in_dtype: a.dtype(),
                out_dtype: c.dtype(),
                alpha: self.alpha,
                beta: self.beta,
            };
            // SAFETY: the addresses are the storages' own, of the layouts checked above.
            unsafe { raw_gemm(c.device(), &gemm) }
        }
    }
}
