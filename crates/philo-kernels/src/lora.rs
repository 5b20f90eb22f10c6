//! LoRA's rank-r products with the adapter's dropout inside them: the dropped-out input is never
//! written, and its mask (the one [`crate::dropout::dropout`] draws for the same seed and shape)
//! is regenerated wherever it is needed. `dropout` is `Some((seed, p))` with p in (0, 1), or
//! None for no dropout.
//!
//! - [`down`]: down = dropout(x)·Aᵀ, `[rows, r]`
//! - [`accumulate_grad_a`]: gA += d_downᵀ·dropout(x), gA `[r, in]` f32
//! - [`up_through_dropout`]: dx = dropout-mask(d_down·A), the gradient through the dropout
//! - [`add_up_through_dropout`]: the same added onto dx in place
//!
//! On CUDA (bf16/f16, the input width a multiple of 128 and r one of 16, 32, 64, 128) each is
//! one kernel; otherwise they compose [`crate::dropout`] with matrix products, which is also
//! their reference.

use candle_core::{DType, Result, Tensor};

use crate::dropout::{dropout, dropout_in_place};
use crate::gemm::accumulate_at_b;

/// A dropout mask: its seed and probability.
pub type Dropout = Option<(u64, f32)>;

/// down = dropout(x)·Aᵀ for x `[rows, in]` and A `[r, in]`, in x's dtype.
pub fn down(x: &Tensor, a: &Tensor, mask: Dropout) -> Result<Tensor> {
    // Every element is written below.
    let out = unsafe { Tensor::empty((x.dim(0)?, a.dim(0)?), x.dtype(), x.device())? };
    down_into(x, a, mask, &out, 0)?;
    Ok(out)
}

/// [`down`] written into columns `col .. col + r` of `dst` (contiguous `[rows, ≥ col + r]`, x's
/// dtype). x's rows may be strided (its last dim contiguous): x can be the first columns of
/// `dst` itself, which then holds [x | down] for one GEMM against [W | scale·B].
pub fn down_into(x: &Tensor, a: &Tensor, mask: Dropout, dst: &Tensor, col: usize) -> Result<()> {
    let r = a.dim(0)?;
    if !dst.is_contiguous() || dst.dim(0)? != x.dim(0)? || dst.dim(1)? < col + r {
        candle_core::bail!(
            "lora::down_into: dst {:?} cannot take [{}, {r}] at column {col}",
            dst.dims(),
            x.dim(0)?
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(kernel) = cuda::Kernel::new(x, r, x.dim(0)?, x.dim(1)?)? {
        return kernel.down(x, a, mask, dst, col);
    }
    // Contiguous: candle's CUDA matmul takes no strided rows.
    let input = match mask {
        Some((seed, p)) => dropout(&x.contiguous()?, seed, p)?,
        None => x.contiguous()?,
    };
    let product = input.matmul(&a.t()?)?.to_dtype(dst.dtype())?;
    dst.slice_set(&product, 1, col)
}

/// grad_a `[r, in]` (f32) += d_downᵀ·dropout(x) for d_down `[rows, r]` and x `[rows, in]` (the
/// rows of both may be strided).
pub fn accumulate_grad_a(
    grad_a: &Tensor,
    d_down: &Tensor,
    x: &Tensor,
    mask: Dropout,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(kernel) = cuda::Kernel::new(x, d_down.dim(1)?, x.dim(0)?, x.dim(1)?)? {
        return kernel.grad_a(grad_a, d_down, x, mask);
    }
    let input = match mask {
        Some((seed, p)) => dropout(&x.contiguous()?, seed, p)?,
        None => x.clone(),
    };
    accumulate_at_b(grad_a, &d_down.contiguous()?, &input, 1.0)
}

/// dx `[rows, in]` = d_down·A with the dropout's mask and scale applied (what the gradient of
/// dropout(x)·Aᵀ with respect to x is), for d_down `[rows, r]` and A `[r, in]`.
pub fn up_through_dropout(d_down: &Tensor, a: &Tensor, mask: Dropout) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(kernel) = cuda::Kernel::new(d_down, d_down.dim(1)?, d_down.dim(0)?, a.dim(1)?)? {
        let dx =
            unsafe { Tensor::empty((d_down.dim(0)?, a.dim(1)?), d_down.dtype(), d_down.device())? };
        kernel.up(d_down, a, mask, &dx, false)?;
        return Ok(dx);
    }
    let dx = d_down.contiguous()?.matmul(a)?;
    if let Some((seed, p)) = mask {
        dropout_in_place(&dx, seed, p)?;
    }
    Ok(dx)
}

/// [`up_through_dropout`] added onto the first `in` columns of `dst` (contiguous `[rows, ≥ in]`,
/// d_down's dtype) in place; d_down's rows may be strided (it can be the last columns of `dst`,
/// next to dx, as one GEMM against [W | scale·B] writes them).
pub fn add_up_through_dropout(
    d_down: &Tensor,
    a: &Tensor,
    mask: Dropout,
    dst: &Tensor,
) -> Result<()> {
    let (rows, width) = (d_down.dim(0)?, a.dim(1)?);
    if !dst.is_contiguous() || dst.dim(0)? != rows || dst.dim(1)? < width {
        candle_core::bail!(
            "lora::add_up_through_dropout: dst {:?} cannot take [{rows}, {width}]",
            dst.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(kernel) = cuda::Kernel::new(d_down, d_down.dim(1)?, rows, width)? {
        return kernel.up(d_down, a, mask, dst, true);
    }
    let sum = (dst.narrow(1, 0, width)? + up_through_dropout(d_down, a, mask)?)?;
    dst.slice_set(&sum, 1, 0)
}

/// Whether the kernels take this dtype and rank (the width is checked per call).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_shape(dtype: DType, rank: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && [16, 32, 64, 128].contains(&rank)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::launch::*;

    /// The kernels for one call: device, dtype suffix, rank, rows and input width.
    pub(super) struct Kernel {
        dev: candle_core::CudaDevice,
        name: &'static str,
        rank: usize,
        rows: usize,
        width: usize,
    }

    /// `(seed, p)` as the kernels take them (p = 0: no dropout).
    fn mask_args(mask: Dropout) -> (u64, f32) {
        mask.unwrap_or((0, 0.0))
    }

    impl Kernel {
        /// The kernels for rank `rank` over `rows` rows of width `width` in `t`'s dtype and
        /// device, or None when they do not apply.
        pub(super) fn new(
            t: &Tensor,
            rank: usize,
            rows: usize,
            width: usize,
        ) -> Result<Option<Kernel>> {
            if !t.device().is_cuda()
                || !kernel_shape(t.dtype(), rank)
                || !width.is_multiple_of(128)
                || rows == 0
            {
                return Ok(None);
            }
            Ok(Some(Kernel {
                dev: device(t)?,
                name: suffix(t.dtype())?,
                rank,
                rows,
                width,
            }))
        }

        fn function(
            &self,
            op: &str,
        ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
            function(
                &self.dev,
                &LORA,
                &format!("lora_{op}_{}_r{}", self.name, self.rank),
            )
        }

        /// Contiguous copies where needed, and a check that `t` is `dims`.
        fn operand(t: &Tensor, dims: (usize, usize), what: &str) -> Result<Tensor> {
            if t.dims2()? != dims {
                candle_core::bail!("lora kernels: {what} is {:?}, expected {dims:?}", t.dims());
            }
            t.contiguous()
        }

        /// `t` checked to be `dims`, with its row stride: rows may be strided as long as each
        /// row is contiguous and starts 16 bytes after the previous one's multiple (a copy
        /// otherwise).
        fn strided_operand(
            t: &Tensor,
            dims: (usize, usize),
            what: &str,
        ) -> Result<(Tensor, usize)> {
            if t.dims2()? != dims {
                candle_core::bail!("lora kernels: {what} is {:?}, expected {dims:?}", t.dims());
            }
            let l = t.layout();
            let (stride, offset) = (l.stride(), l.start_offset());
            let elem = t.dtype().size_in_bytes();
            if stride[1] == 1
                && stride[0] >= dims.1
                && (stride[0] * elem).is_multiple_of(16)
                && (offset * elem).is_multiple_of(16)
            {
                return Ok((t.clone(), stride[0]));
            }
            Ok((t.contiguous()?, dims.1))
        }

        /// Launches kernel `op` on 128-thread blocks over `grid` with `smem` bytes of shared
        /// memory and the arguments every LoRA kernel shares: two inputs and an output, rows and
        /// width, then `extra` (row strides, down's columns per split, grad_a's rows per
        /// block), then the mask.
        fn launch(
            &self,
            op: &str,
            grid: (u32, u32, u32),
            smem: usize,
            [first, second, out]: [&Tensor; 3],
            extra: &[i32],
            mask: Dropout,
        ) -> Result<()> {
            let f = self.function(op)?;
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: (128, 1, 1),
                shared_mem_bytes: dynamic_smem(&f, smem)?,
            };
            let (ap, bp, op_) = (address(first)?, address(second)?, address(out)?);
            let (seed, p) = mask_args(mask);
            let (rows, width) = (self.rows as i32, self.width as i32);
            let stream = self.dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&ap).arg(&bp).arg(&op_).arg(&rows).arg(&width);
            for e in extra {
                l.arg(e);
            }
            l.arg(&seed).arg(&p);
            unsafe { l.launch(cfg) }.w()?;
            Ok(())
        }

        pub(super) fn down(
            &self,
            x: &Tensor,
            a: &Tensor,
            mask: Dropout,
            dst: &Tensor,
            col: usize,
        ) -> Result<()> {
            let (r, rows, k) = (self.rank, self.rows, self.width);
            let (x, ldx) = Self::strided_operand(x, (rows, k), "x")?;
            let a = Self::operand(a, (r, k), "A")?;
            if dst.dtype() != x.dtype() {
                candle_core::bail!(
                    "lora::down_into: dst is {:?}, x {:?}",
                    dst.dtype(),
                    x.dtype()
                );
            }
            let ld_out = dst.dim(1)?;
            let out = dst.narrow(1, col, r)?;
            let smem = 3 * (64 + r) * (64 + 8) * 2;
            // 64-row blocks, and the input's columns split when rows are few, so that the
            // blocks fill the machine in one wave (a second, partial wave cost a third of the
            // time at 8,192 rows), each over at least 4 tiles of 64 columns.
            let row_blocks = rows.div_ceil(64);
            let tiles = k / 64;
            let resident = resident_blocks(&self.dev, &self.function("down")?, 128, smem)?;
            let splits = (resident / row_blocks).clamp(1, (tiles / 4).max(1));
            let split_len = tiles.div_ceil(splits) * 64;
            let splits = k.div_ceil(split_len);
            let grid = (row_blocks as u32, splits as u32, 1);
            let strides = [ldx as i32, ld_out as i32, split_len as i32];
            if splits == 1 {
                return self.launch("down", grid, smem, [&x, &a, &out], &strides, mask);
            }
            let partial = unsafe { Tensor::empty((splits, rows, r), DType::F32, x.device())? };
            self.launch("down", grid, smem, [&x, &a, &partial], &strides, mask)?;
            let f = function(&self.dev, &LORA, &format!("lora_down_sum_{}", self.name))?;
            let (pp, dp) = (address(&partial)?, address(&out)?);
            let args = [rows as i32, r as i32, ld_out as i32, splits as i32];
            let keep = mask.map_or(1.0, |(_, p)| 1.0 / (1.0 - p));
            let stream = self.dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&pp).arg(&dp);
            for a in &args {
                l.arg(a);
            }
            l.arg(&keep);
            unsafe { l.launch(elementwise_config(rows * r)) }.w()?;
            Ok(())
        }

        pub(super) fn grad_a(
            &self,
            grad_a: &Tensor,
            d_down: &Tensor,
            x: &Tensor,
            mask: Dropout,
        ) -> Result<()> {
            let (r, rows, k) = (self.rank, self.rows, self.width);
            if grad_a.dtype() != DType::F32 || grad_a.dims2()? != (r, k) || !grad_a.is_contiguous()
            {
                candle_core::bail!(
                    "lora kernels: the A gradient must be a contiguous f32 [{r}, {k}], not {:?} {:?}",
                    grad_a.dtype(),
                    grad_a.dims()
                );
            }
            let (x, ldx) = Self::strided_operand(x, (rows, k), "x")?;
            let (dd, ldd) = Self::strided_operand(d_down, (rows, r), "d_down")?;
            // Column tiles of 64 times row splits: about four blocks an SM, each at least 256
            // rows (32-row steps).
            let columns = k / 64;
            let sms = multiprocessors(&self.dev)?;
            let splits = (4 * sms).div_ceil(columns).clamp(1, rows.div_ceil(256));
            let per_block = rows.div_ceil(splits).div_ceil(32) * 32;
            let splits = rows.div_ceil(per_block);
            let grid = (columns as u32, splits as u32, 1);
            let smem = 3 * 32 * ((64 + 8) + (r + 8)) * 2;
            let tensors = [&x, &dd, grad_a];
            let extra = [ldx as i32, ldd as i32, per_block as i32];
            self.launch("grad_a", grid, smem, tensors, &extra, mask)
        }

        /// dx = the product through the mask into the first columns of `dst` (contiguous
        /// `[rows, ≥ width]`), or added onto them when `accumulate`.
        pub(super) fn up(
            &self,
            d_down: &Tensor,
            a: &Tensor,
            mask: Dropout,
            dst: &Tensor,
            accumulate: bool,
        ) -> Result<()> {
            let (r, rows, k) = (self.rank, self.rows, self.width);
            let (dd, ldd) = Self::strided_operand(d_down, (rows, r), "d_down")?;
            let a = Self::operand(a, (r, k), "A")?;
            if dst.dtype() != dd.dtype() || !dst.dim(1)?.is_multiple_of(2) {
                // Pairs of columns are stored as one 4-byte word.
                candle_core::bail!(
                    "lora::up: dst {:?} {:?} needs d_down's dtype and an even row length",
                    dst.dims(),
                    dst.dtype()
                );
            }
            let grid = ((k / 128) as u32, rows.div_ceil(64) as u32, 1);
            // The operand tiles, then (in the same memory) the f32 result tile.
            let smem = ((64 * (r + 8) + r * (128 + 8)) * 2).max(64 * (128 + 4) * 4);
            let extra = [ldd as i32, dst.dim(1)? as i32, accumulate as i32];
            self.launch("up", grid, smem, [&dd, &a, dst], &extra, mask)
        }
    }
}
