//! Symmetric per-row INT8 weight quantisation (absmax per row, like bitsandbytes'
//! `int8_vectorwise_quant` without outlier handling): a simpler 8-bit alternative to NF4.

use candle_core::{DType, Device, Tensor};

use crate::error::{check_weights, Result};

/// `1 / 127` as bitsandbytes writes it when dequantising row-wise INT8.
const INV_127: f32 = 1.0 / 127.0;

/// A weight matrix stored as one `i8` per weight plus one f32 absmax per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Tensor {
    data: Vec<i8>,
    row_absmax: Vec<f32>,
    shape: (usize, usize),
}

impl Int8Tensor {
    /// Quantises a row-major `rows × cols` matrix: each weight becomes
    /// `round(w × (127 / absmax(row)))` (ties to even, as `torch.round`), in -127..=127.
    /// An all-zero row stores zeros (bitsandbytes would compute 0 × ∞). Errors on a wrong slice
    /// length, an empty shape or a non-finite weight.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let n = check_weights(weights, rows, cols)?;
        let mut data = Vec::with_capacity(n);
        let mut row_absmax = Vec::with_capacity(rows);
        for row in weights.chunks(cols) {
            let absmax = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            row_absmax.push(absmax);
            if absmax == 0.0 {
                data.extend(std::iter::repeat_n(0i8, cols));
                continue;
            }
            let scale = 127.0 / absmax;
            // |w × scale| ≤ 127 up to rounding, so the clamp only guards the cast.
            data.extend(
                row.iter()
                    .map(|&w| (w * scale).round_ties_even().clamp(-127.0, 127.0) as i8),
            );
        }
        Ok(Int8Tensor {
            data,
            row_absmax,
            shape: (rows, cols),
        })
    }

    /// The quantised weights, row-major.
    pub fn data(&self) -> &[i8] {
        &self.data
    }

    /// The absmax of every row.
    pub fn row_absmax(&self) -> &[f32] {
        &self.row_absmax
    }

    /// `(rows, cols)` of the original matrix.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// Dequantised weights, row-major: `q × absmax × (1/127)` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let cols = self.shape.1;
        self.data
            .chunks(cols)
            .zip(&self.row_absmax)
            .flat_map(|(row, &absmax)| row.iter().map(move |&q| f32::from(q) * absmax * INV_127))
            .collect()
    }

    /// The dequantised matrix as a `[rows, cols]` candle tensor of `dtype` (f32, bf16, f16 or
    /// f64) on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        crate::int4::values_to_tensor(self.dequantize(), self.shape, dtype, device)
    }
}
