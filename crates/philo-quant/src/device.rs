//! INT8 and INT4 weights held as tensors on any device (the GPU included) and dequantised with
//! plain tensor operations into the compute dtype, exactly as the host references compute them
//! (code × scale in f32, then one rounding). The portable path for prefill and serving batches;
//! decoding kernels that read the codes directly can replace `dequantize` without changing it.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::{Int4Tensor, Int8Tensor};

/// Per-row symmetric INT8 on a device: codes + 128 as u8 `[rows, cols]`, absmax / 127 per row.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    codes: Tensor,
    /// `[rows, 1]` f32.
    scales: Tensor,
}

impl Int8Weight {
    pub fn from_host(q: &Int8Tensor, device: &Device) -> Result<Self> {
        let (rows, cols) = q.shape();
        let codes: Vec<u8> = q.data().iter().map(|&c| (c as i16 + 128) as u8).collect();
        // The reference multiplies by absmax, then by 1/127: keep both factors apart.
        let scales: Vec<f32> = q.row_absmax().to_vec();
        Ok(Int8Weight {
            codes: Tensor::from_vec(codes, (rows, cols), device)?,
            scales: Tensor::from_vec(scales, (rows, 1), device)?,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        let d = self.codes.dims();
        (d[0], d[1])
    }

    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes the weight holds on its device.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.scales.elem_count()
    }

    /// The codes + 128, u8 `[rows, cols]` (for kernels that read them directly).
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// Each row's absmax, f32 `[rows, 1]`: a weight is (code − 128) · absmax / 127.
    pub fn absmax(&self) -> &Tensor {
        &self.scales
    }

    /// The dense `[rows, cols]` matrix in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let codes = (self.codes.to_dtype(DType::F32)? - 128.0)?;
        let values = codes
            .broadcast_mul(&self.scales)?
            .affine(1.0 / 127.0, 0.0)?;
        Ok(values.to_dtype(dtype)?)
    }
}

/// Grouped symmetric INT4 on a device: the packed bytes `[rows · cols / 2]` and f32 scales
/// `[rows, groups]`.
#[derive(Debug, Clone)]
pub struct Int4Weight {
    packed: Tensor,
    scales: Tensor,
    shape: (usize, usize),
    group: usize,
}

impl Int4Weight {
    /// Uploads `q`; rows must hold whole groups and an even number of columns (true of every
    /// Phi-3 projection with groups of 128), so that each row's bytes and scales stand alone.
    pub fn from_host(q: &Int4Tensor, device: &Device) -> Result<Option<Self>> {
        let (rows, cols) = q.shape();
        if !cols.is_multiple_of(q.group()) || !cols.is_multiple_of(2) {
            return Ok(None);
        }
        Ok(Some(Int4Weight {
            packed: Tensor::from_vec(q.packed().to_vec(), (rows, cols / 2), device)?,
            scales: Tensor::from_vec(q.scales().to_vec(), (rows, cols / q.group()), device)?,
            shape: (rows, cols),
            group: q.group(),
        }))
    }

    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Bytes the weight holds on its device.
    pub fn bytes(&self) -> usize {
        self.packed.elem_count() + 4 * self.scales.elem_count()
    }

    /// Two codes + 8 a byte, the even element in the low nibble, u8 `[rows, cols / 2]`.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// One f32 scale per (row, group), `[rows, groups]`.
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// Columns per scale.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The dense `[rows, cols]` matrix in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let (rows, cols) = self.shape;
        let bytes = self.packed.to_dtype(DType::F32)?;
        // Nibbles by arithmetic (exact in f32): high = floor(b / 16), low = b − 16·high.
        let high = (bytes.clone() / 16.0)?.floor()?;
        let low = (bytes - (&high * 16.0)?)?;
        let codes = (Tensor::stack(&[low, high], D::Minus1)?.reshape((rows, cols))? - 8.0)?;
        let groups = cols / self.group;
        let values = codes
            .reshape((rows, groups, self.group))?
            .broadcast_mul(&self.scales.unsqueeze(D::Minus1)?)?
            .reshape((rows, cols))?;
        Ok(values.to_dtype(dtype)?)
    }
}
