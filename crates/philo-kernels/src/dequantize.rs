//! INT8 and INT4 weights ([`philo_quant::device`]) dequantised into the compute dtype: on CUDA
//! by one kernel pass (`cuda/dequantize.cu`), elsewhere (and for shapes the kernel does not
//! take) by the weights' own tensor operations. Both round code × scale once to the dtype, as
//! the host references (`Int8Tensor::dequantize`, `Int4Tensor::dequantize`) do. This is the
//! dense copy that a matmul of many rows on a quantised base (a prefill, a serving step past
//! the GEMV's rows) multiplies by; the tensor operations it replaces make six f32 passes over
//! the matrix.

use candle_core::{DType, Result, Tensor};
use philo_quant::device::{Int4Weight, Int8Weight};

fn quant_err(e: philo_quant::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The dense `[rows, cols]` matrix of `w` in `dtype`.
pub fn int8(w: &Int8Weight, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(t) = device::int8(w, dtype)? {
        return Ok(t);
    }
    w.dequantize(dtype).map_err(quant_err)
}

/// The dense `[rows, cols]` matrix of `w` in `dtype`.
pub fn int4(w: &Int4Weight, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(t) = device::int4(w, dtype)? {
        return Ok(t);
    }
    w.dequantize(dtype).map_err(quant_err)
}

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::launch::*;

    /// Whether the kernel takes a `[rows, cols]` matrix stored in `t` (u8) into `dtype`: on
    /// CUDA, into f32, bf16 or f16, rows of whole 8-element runs, the storage 8-byte aligned
    /// where it starts.
    fn takes(t: &Tensor, cols: usize, dtype: DType) -> bool {
        t.device().is_cuda()
            && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && cols.is_multiple_of(8)
            && t.is_contiguous()
            && t.layout().start_offset().is_multiple_of(8)
    }

    pub fn int8(w: &Int8Weight, dtype: DType) -> Result<Option<Tensor>> {
        let (rows, cols) = w.shape();
        if !takes(w.codes(), cols, dtype) || !w.absmax().is_contiguous() {
            return Ok(None);
        }
        let dev = device(w.codes())?;
        let n8 = rows * cols / 8;
        let (cs, cl) = w.codes().storage_and_layout();
        let (ss, sl) = w.absmax().storage_and_layout();
        with_float_type!(dtype, T, {
            let codes = contiguous::<u8>(cuda(&cs)?, cl)?;
            let absmax = contiguous::<f32>(cuda(&ss)?, sl)?;
            let out = unsafe { dev.alloc::<T>(rows * cols)? };
            let f = typed_function(&dev, &DEQUANTIZE, "int8_dequantize", dtype)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let cols = cols as i32;
            b.arg(&codes).arg(&absmax).arg(&out).arg(&n8).arg(&cols);
            unsafe { b.launch(elementwise_config(n8)) }.w()?;
            Ok(Some(tensor(out, &dev, (rows, cols as usize))))
        })
    }

    pub fn int4(w: &Int4Weight, dtype: DType) -> Result<Option<Tensor>> {
        let (rows, cols) = w.shape();
        let group = w.group();
        if !takes(w.packed(), cols, dtype)
            || !group.is_multiple_of(8)
            || !cols.is_multiple_of(group)
            || !w.scales().is_contiguous()
        {
            return Ok(None);
        }
        let dev = device(w.packed())?;
        let n8 = rows * cols / 8;
        let (ps, pl) = w.packed().storage_and_layout();
        let (ss, sl) = w.scales().storage_and_layout();
        with_float_type!(dtype, T, {
            let packed = contiguous::<u8>(cuda(&ps)?, pl)?;
            let scales = contiguous::<f32>(cuda(&ss)?, sl)?;
            let out = unsafe { dev.alloc::<T>(rows * cols)? };
            let f = typed_function(&dev, &DEQUANTIZE, "int4_dequantize", dtype)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (cols, group) = (cols as i32, group as i32);
            b.arg(&packed)
                .arg(&scales)
                .arg(&out)
                .arg(&n8)
                .arg(&cols)
                .arg(&group);
            unsafe { b.launch(elementwise_config(n8)) }.w()?;
            Ok(Some(tensor(out, &dev, (rows, cols as usize))))
        })
    }
}
