//! Row scatter: `dst[index[i]] = src[i]`, in place. The LM-head loss writes each chunk's
//! hidden-state gradient into the rows it came from with it (candle's `index_add` took 2.2 ms
//! a 4,096-row chunk on the H200, a full copy of the destination plus a slow add).

use candle_core::{Result, Tensor};

/// Reference on row-major values: rows `index[i]` of `dst` (rows of `cols`) become the rows
/// `i` of `src`.
pub fn reference_scatter(dst: &mut [f32], cols: usize, index: &[u32], src: &[f32]) {
    for (&row, values) in index.iter().zip(src.chunks(cols)) {
        let start = row as usize * cols;
        dst[start..start + cols].copy_from_slice(values);
    }
}

/// Writes row `i` of `src` `[n, cols]` into row `index[i]` of `dst` `[rows, cols]` (contiguous,
/// same dtype) for every i. Each index must be below `rows`; indices may repeat (the last
/// write wins, in no defined order).
pub fn scatter_rows(dst: &Tensor, index: &[u32], src: &Tensor) -> Result<()> {
    let (rows, cols) = dst.dims2()?;
    let (n, src_cols) = src.dims2()?;
    if n != index.len() || src_cols != cols || src.dtype() != dst.dtype() {
        candle_core::bail!(
            "scatter_rows: {} indices for src {:?} {:?} into dst {:?} {:?}",
            index.len(),
            src.dims(),
            src.dtype(),
            dst.dims(),
            dst.dtype()
        );
    }
    if let Some(&bad) = index.iter().find(|&&r| r as usize >= rows) {
        candle_core::bail!("scatter_rows: row index {bad} is out of range for {rows} rows");
    }
    if !dst.is_contiguous() {
        candle_core::bail!("scatter_rows: dst must be contiguous");
    }
    if n == 0 || cols == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if dst.device().is_cuda() {
        let index = Tensor::new(index, dst.device())?;
        return dst.inplace_op3(&index, &src.contiguous()?, &cuda::Scatter);
    }
    let mut values = crate::host_f32(dst)?;
    reference_scatter(&mut values, cols, index, &crate::host_f32(src)?);
    let updated = crate::from_host(values, dst.dims(), dst.dtype(), dst.device())?;
    dst.slice_set(&updated, 0, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::*;
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CudaStorage, InplaceOp3, Layout, Result};

    pub(super) struct Scatter;

    impl InplaceOp3 for Scatter {
        fn name(&self) -> &'static str {
            "philo-scatter-rows"
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
            candle_core::bail!("scatter_rows' custom op runs on CUDA")
        }

        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dl: &Layout,
            index: &CudaStorage,
            il: &Layout,
            src: &CudaStorage,
            sl: &Layout,
        ) -> Result<()> {
            let (n, cols) = sl.shape().dims2()?;
            let row_bytes = (cols * src.dtype().size_in_bytes()) as i64;
            let dev = dst.device().clone();
            let (dp, ip, sp) = (
                storage_address(dst, dl.start_offset())?,
                storage_address(index, il.start_offset())?,
                storage_address(src, sl.start_offset())?,
            );
            let f = function(&dev, &ROWS, "scatter_rows")?;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&dp).arg(&ip).arg(&sp).arg(&row_bytes);
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn scatter_writes_the_indexed_rows_and_leaves_the_others() -> Result<()> {
        let dst = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
        let src = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu)?;
        scatter_rows(&dst, &[3, 1], &src)?;
        assert_eq!(
            dst.to_vec2::<f32>()?,
            vec![
                vec![0., 0., 0.],
                vec![4., 5., 6.],
                vec![0., 0., 0.],
                vec![1., 2., 3.]
            ]
        );
        let err = scatter_rows(&dst, &[4, 0], &src).unwrap_err().to_string();
        assert!(
            err.contains("row index 4 is out of range for 4 rows"),
            "{err}"
        );
        Ok(())
    }
}
