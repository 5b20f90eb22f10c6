//! NF4 ("4-bit NormalFloat") weight matrices, bit-compatible with bitsandbytes
//! `quantize_4bit(W, blocksize=64, quant_type="nf4")` (optionally with
//! `compress_statistics=True`, i.e. double quantisation).
//!
//! Layout (bitsandbytes'): the matrix is flattened row-major and cut into blocks of
//! `block_size` consecutive elements (the last block may be shorter); each block keeps its
//! largest magnitude (absmax, f32); each element is multiplied by the f32 reciprocal of its
//! block's absmax and mapped to one of the 16 [`NF4_CODE`] values; two 4-bit indices share a
//! byte, the first (even) element in the high nibble. An odd element count leaves the last low
//! nibble as the index of 0.0.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::absmax::Absmax;
use crate::error::{check_weights, element_count, QuantError, Result};

/// The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`): quantiles of a standard normal
/// scaled to [-1, 1], with an exact zero at index 7.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// Default NF4 block size (weights per absmax), as QLoRA and bitsandbytes use it.
pub const NF4_BLOCK_SIZE: usize = 64;

/// Index of the NF4 code value 0.0, used for the padding nibble of an odd element count.
const NF4_ZERO_INDEX: u8 = 7;

/// Decision thresholds between neighbouring NF4 values: their midpoints, rounded to f32.
/// These equal the constants of bitsandbytes' `dQuantizeNF4` decision tree, which computes the
/// index as "x > threshold" at each node.
fn nf4_thresholds() -> [f32; 15] {
    std::array::from_fn(|k| (NF4_CODE[k] + NF4_CODE[k + 1]) * 0.5)
}

/// NF4 index (0..16) of a scaled value `x` by bitsandbytes' rule: the number of thresholds
/// (midpoints between neighbouring code values) that `x` is strictly greater than. A value
/// exactly on a midpoint takes the lower code; values outside [-1, 1] clamp to the ends; NaN
/// (what an all-zero block produces, 0 × ∞) maps to index 0, as in bitsandbytes.
pub fn nf4_index(x: f32) -> u8 {
    nf4_index_with(&nf4_thresholds(), x)
}

#[inline]
fn nf4_index_with(thresholds: &[f32; 15], x: f32) -> u8 {
    // Counting comparisons is the decision tree flattened: the thresholds are ascending, so
    // "x > t" holds for a prefix of them. No branches, so it vectorises.
    thresholds.iter().map(|&t| u8::from(x > t)).sum()
}

/// A weight matrix stored as NF4: packed 4-bit indices plus per-block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    packed: Vec<u8>,
    absmax: Absmax,
    shape: (usize, usize),
    block_size: usize,
}

impl Nf4Tensor {
    /// Quantises a row-major `rows × cols` matrix with bitsandbytes' NF4 settings (blocks of
    /// 64), double-quantising the block scales when `double_quant` is set.
    ///
    /// Any element count is accepted: a count not divisible by 64 ends with a shorter block that
    /// gets its own absmax, exactly as bitsandbytes handles it. For a bf16 checkpoint pass the
    /// f32 values of the bf16 numbers (the conversion is exact), as bitsandbytes also computes
    /// in f32. Errors on a wrong slice length, an empty shape or a non-finite weight.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize, double_quant: bool) -> Result<Self> {
        Self::quantize_with_block_size(weights, rows, cols, NF4_BLOCK_SIZE, double_quant)
    }

    /// [`Nf4Tensor::quantize`] with another block size (bitsandbytes offers 64 to 4096).
    pub fn quantize_with_block_size(
        weights: &[f32],
        rows: usize,
        cols: usize,
        block_size: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let n = check_weights(weights, rows, cols)?;
        if block_size == 0 {
            return Err(QuantError::InvalidBlockSize { block_size });
        }

        let thresholds = nf4_thresholds();
        let mut absmax = Vec::with_capacity(n.div_ceil(block_size));
        // Padded with the zero index so that an odd count leaves a valid low nibble.
        let mut packed = vec![NF4_ZERO_INDEX; n.div_ceil(2)];
        for (b, block) in weights.chunks(block_size).enumerate() {
            let max = block.iter().fold(0f32, |m, w| m.max(w.abs()));
            absmax.push(max);
            // Multiply by the f32 reciprocal, not divide: bitsandbytes does, and the two round
            // differently. An all-zero block gives 0 × ∞ = NaN, which maps to index 0.
            let inverse = 1.0 / max;
            let start = b * block_size;
            for (i, &w) in block.iter().enumerate() {
                let e = start + i;
                let q = nf4_index_with(&thresholds, w * inverse);
                let byte = &mut packed[e / 2];
                *byte = if e.is_multiple_of(2) {
                    (q << 4) | (*byte & 0x0F)
                } else {
                    (*byte & 0xF0) | q
                };
            }
        }

        let absmax = if double_quant {
            Absmax::double_quantize(&absmax)?
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Tensor {
            packed,
            absmax,
            shape: (rows, cols),
            block_size,
        })
    }

    /// Quantises a 2-D candle tensor of any float dtype (converted to f32 first: exact for bf16
    /// and f16, rounded for f64) with the default block size.
    pub fn from_tensor(weights: &Tensor, double_quant: bool) -> Result<Self> {
        let (rows, cols) = weights.dims2().map_err(|_| QuantError::NotAMatrix {
            shape: weights.dims().to_vec(),
        })?;
        let values = weights
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::quantize(&values, rows, cols, double_quant)
    }

    /// Rebuilds a tensor from stored parts (for example a bitsandbytes checkpoint's `weight`,
    /// `absmax`, `nested_absmax`, `nested_quant_map` and `quant_state` entries), checking that
    /// the parts fit together: `packed` must hold `ceil(rows·cols / 2)` bytes and `absmax` one
    /// scale per block.
    pub fn from_parts(
        packed: Vec<u8>,
        absmax: Absmax,
        shape: (usize, usize),
        block_size: usize,
    ) -> Result<Self> {
        let n = element_count(shape.0, shape.1)?;
        if block_size == 0 {
            return Err(QuantError::InvalidBlockSize { block_size });
        }
        if packed.len() != n.div_ceil(2) {
            return Err(QuantError::PartLength {
                part: "packed 4-bit weights (bytes)",
                expected: n.div_ceil(2),
                actual: packed.len(),
            });
        }
        absmax.validate(n.div_ceil(block_size))?;
        Ok(Nf4Tensor {
            packed,
            absmax,
            shape,
            block_size,
        })
    }

    /// The packed 4-bit indices, `ceil(rows·cols / 2)` bytes, first element in the high nibble
    /// (bitsandbytes stores them as a `[bytes, 1]` u8 tensor).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The block scales as stored (plain or double-quantised).
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The f32 scale of every block, dequantised if double-quantised.
    pub fn absmax_values(&self) -> Vec<f32> {
        self.absmax.values()
    }

    /// `(rows, cols)` of the original matrix.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// Number of rows (output features of a linear layer).
    pub fn rows(&self) -> usize {
        self.shape.0
    }

    /// Number of columns (input features of a linear layer).
    pub fn cols(&self) -> usize {
        self.shape.1
    }

    /// Number of weights.
    pub fn elem_count(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// Weights per block scale.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether the block scales are double-quantised.
    pub fn is_double_quant(&self) -> bool {
        self.absmax.is_double()
    }

    /// The 4-bit index of every weight, unpacked (row-major), mostly for inspection and tests.
    pub fn indices(&self) -> Vec<u8> {
        (0..self.elem_count()).map(|e| self.index_at(e)).collect()
    }

    #[inline]
    fn index_at(&self, e: usize) -> u8 {
        // Even elements sit in the high nibble.
        let shift = if e.is_multiple_of(2) { 4 } else { 0 };
        (self.packed[e / 2] >> shift) & 0x0F
    }

    /// Dequantised weights, row-major, in f32: `NF4_CODE[index] * absmax[block]` computed in
    /// f32 as bitsandbytes does before casting to its output dtype.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(|v| v)
    }

    /// Dequantises straight into another element type, each value converted once from the f32
    /// product (so bf16 output rounds exactly like bitsandbytes' bf16 output).
    fn dequantize_with<T: Copy>(&self, convert: impl Fn(f32) -> T) -> Vec<T> {
        let n = self.elem_count();
        let scales = self.absmax.scales();
        let mut out = Vec::with_capacity(n);
        for (b, &scale) in scales.iter().enumerate() {
            // A block uses at most 16 distinct values: convert those once, then look them up.
            let table: [T; 16] = std::array::from_fn(|k| convert(NF4_CODE[k] * scale));
            let start = b * self.block_size;
            let end = (start + self.block_size).min(n);
            out.extend((start..end).map(|e| table[self.index_at(e) as usize]));
        }
        out
    }

    /// The dequantised matrix as a `[rows, cols]` candle tensor of `dtype` (f32, bf16, f16 or
    /// f64) on `device`. The values are built on the host, then copied to the device.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = self.shape;
        let tensor = match dtype {
            DType::F32 => Tensor::from_vec(self.dequantize(), shape, device)?,
            DType::BF16 => Tensor::from_vec(self.dequantize_with(bf16::from_f32), shape, device)?,
            DType::F16 => Tensor::from_vec(self.dequantize_with(f16::from_f32), shape, device)?,
            DType::F64 => Tensor::from_vec(self.dequantize_with(f64::from), shape, device)?,
            other => return Err(QuantError::UnsupportedDType { dtype: other }),
        };
        Ok(tensor)
    }
}
