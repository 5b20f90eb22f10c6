//! Symmetric INT4 weights in groups along the input dimension (W4A16, as GPTQ/AWQ-style
//! inference uses them, without zero points): each group of `group` consecutive weights of a
//! row shares one f32 scale, absmax / 7, and each weight is round(w / scale) in -8..=7.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{check_weights, QuantError, Result};

/// The default group length along the input dimension.
pub const INT4_GROUP: usize = 128;

/// A weight matrix stored as 4-bit codes (two a byte, the even element in the low nibble,
/// offset by 8) plus one f32 scale per (row, group).
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Tensor {
    packed: Vec<u8>,
    scales: Vec<f32>,
    shape: (usize, usize),
    group: usize,
}

impl Int4Tensor {
    /// Quantises a row-major `rows × cols` matrix in groups of `group` columns (the last group
    /// of a row may be shorter). Ties round to even, as `torch.round`; an all-zero group
    /// stores zeros. Errors on a wrong slice length, an empty shape, group 0 or a non-finite
    /// weight.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize, group: usize) -> Result<Self> {
        let n = check_weights(weights, rows, cols)?;
        if group == 0 {
            return Err(QuantError::InvalidBlockSize { block_size: group });
        }
        let groups = cols.div_ceil(group);
        let mut codes = Vec::with_capacity(n);
        let mut scales = Vec::with_capacity(rows * groups);
        for row in weights.chunks(cols) {
            for part in row.chunks(group) {
                let absmax = part.iter().fold(0f32, |m, w| m.max(w.abs()));
                let scale = absmax / 7.0;
                scales.push(scale);
                codes.extend(part.iter().map(|&w| {
                    let q = if scale == 0.0 {
                        0.0
                    } else {
                        (w / scale).round_ties_even().clamp(-8.0, 7.0)
                    };
                    (q as i8 + 8) as u8
                }));
            }
        }
        let packed = codes
            .chunks(2)
            .map(|pair| pair[0] | (pair.get(1).copied().unwrap_or(8) << 4))
            .collect();
        Ok(Int4Tensor {
            packed,
            scales,
            shape: (rows, cols),
            group,
        })
    }

    /// The packed codes: element 2k in the low nibble of byte k, 2k + 1 in the high one, each
    /// stored as code + 8.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// One scale per (row, group), row-major.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `(rows, cols)` of the original matrix.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// Columns per group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The signed code of element `e` (row-major), in -8..=7.
    pub fn code(&self, e: usize) -> i8 {
        let byte = self.packed[e / 2];
        let nibble = if e.is_multiple_of(2) {
            byte & 15
        } else {
            byte >> 4
        };
        nibble as i8 - 8
    }

    /// Dequantised weights, row-major: code × scale in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = self.shape;
        let groups = cols.div_ceil(self.group);
        (0..rows * cols)
            .map(|e| {
                let (r, c) = (e / cols, e % cols);
                f32::from(self.code(e)) * self.scales[r * groups + c / self.group]
            })
            .collect()
    }

    /// The dequantised matrix as a `[rows, cols]` tensor of `dtype` (f32, bf16, f16 or f64).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        values_to_tensor(self.dequantize(), self.shape, dtype, device)
    }
}

/// Row-major f32 values as a tensor of `dtype` on `device`.
pub(crate) fn values_to_tensor(
    values: Vec<f32>,
    shape: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => Tensor::from_vec(values, shape, device)?,
        DType::BF16 => Tensor::from_vec(
            values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::F16 => Tensor::from_vec(
            values.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::F64 => Tensor::from_vec(
            values.into_iter().map(f64::from).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        other => return Err(QuantError::UnsupportedDType { dtype: other }),
    })
}
