//! Per-block scales (absmax values) of a 4-bit tensor: stored as f32, or double-quantised the
//! way bitsandbytes does with `compress_statistics=True` (QLoRA's "double quantisation").

use std::borrow::Cow;

use crate::dynamic8::{dequantize_blockwise, dynamic_code, quantize_blockwise, DYNAMIC_CODE_LEN};
use crate::error::{QuantError, Result};

/// Block size bitsandbytes uses for the second quantisation level (absmax values per scale).
pub const DOUBLE_QUANT_BLOCK_SIZE: usize = 256;

/// The scales of the blocks of a 4-bit tensor, one per block.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (4 bytes per 64 weights).
    Plain(Vec<f32>),
    /// Double-quantised: absmax values minus their mean (`offset`), quantised to 8-bit indices
    /// into `code` in blocks of `block_size`, each block with its own f32 scale
    /// (`state2_absmax`). Block `i`'s absmax is
    /// `code[quantized[i]] * state2_absmax[i / block_size] + offset` (about 1 byte per 64
    /// weights).
    Double {
        /// One 8-bit index into `code` per 4-bit block.
        quantized: Vec<u8>,
        /// The 256-entry 8-bit code (bitsandbytes' dynamic map unless loaded from elsewhere).
        code: Cow<'static, [f32]>,
        /// One f32 scale per `block_size` indices.
        state2_absmax: Vec<f32>,
        /// Mean of the original absmax values, subtracted before quantising.
        offset: f32,
        /// Indices per second-level block (256 in bitsandbytes).
        block_size: usize,
    },
}

impl Absmax {
    /// Double-quantise `absmax` like bitsandbytes' `quantize_4bit(..., compress_statistics=True)`:
    /// `offset = mean(absmax)`, then `absmax - offset` is quantised blockwise (256 per block)
    /// with the dynamic 8-bit code.
    pub fn double_quantize(absmax: &[f32]) -> Result<Self> {
        if absmax.is_empty() {
            return Err(QuantError::PartLength {
                part: "absmax values to double-quantise",
                expected: 1,
                actual: 0,
            });
        }
        let offset = mean_like_torch(absmax);
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let code = dynamic_code();
        let (quantized, state2_absmax) =
            quantize_blockwise(&centred, code, DOUBLE_QUANT_BLOCK_SIZE);
        Ok(Absmax::Double {
            quantized,
            code: Cow::Borrowed(code.as_slice()),
            state2_absmax,
            offset,
            block_size: DOUBLE_QUANT_BLOCK_SIZE,
        })
    }

    /// Number of blocks these scales cover.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(values) => values.len(),
            Absmax::Double { quantized, .. } => quantized.len(),
        }
    }

    /// Whether there are no scales at all (never true for a valid tensor).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the scales are double-quantised.
    pub fn is_double(&self) -> bool {
        matches!(self, Absmax::Double { .. })
    }

    /// The f32 scale of every block (dequantised if double-quantised), computed as bitsandbytes
    /// does: `code[q] * state2_absmax` rounded to f32, then `+ offset` rounded to f32.
    pub fn values(&self) -> Vec<f32> {
        self.scales().into_owned()
    }

    /// Like [`Absmax::values`], borrowing plain scales instead of copying them.
    pub(crate) fn scales(&self) -> Cow<'_, [f32]> {
        match self {
            Absmax::Plain(values) => Cow::Borrowed(values),
            Absmax::Double {
                quantized,
                code,
                state2_absmax,
                offset,
                block_size,
            } => {
                let mut values = dequantize_blockwise(quantized, state2_absmax, code, *block_size);
                for v in &mut values {
                    *v += *offset;
                }
                Cow::Owned(values)
            }
        }
    }

    /// Checks that the scales can serve `blocks` blocks, so that dequantising cannot index out
    /// of bounds.
    pub(crate) fn validate(&self, blocks: usize) -> Result<()> {
        let check = |part: &'static str, expected: usize, actual: usize| {
            if expected == actual {
                Ok(())
            } else {
                Err(QuantError::PartLength {
                    part,
                    expected,
                    actual,
                })
            }
        };
        match self {
            Absmax::Plain(values) => check("absmax (one per block)", blocks, values.len()),
            Absmax::Double {
                quantized,
                code,
                state2_absmax,
                block_size,
                ..
            } => {
                if *block_size == 0 {
                    return Err(QuantError::InvalidBlockSize {
                        block_size: *block_size,
                    });
                }
                check("quantised absmax (one per block)", blocks, quantized.len())?;
                check("8-bit absmax code", DYNAMIC_CODE_LEN, code.len())?;
                check(
                    "second-level absmax (one per 8-bit block)",
                    blocks.div_ceil(*block_size),
                    state2_absmax.len(),
                )
            }
        }
    }
}

/// Mean of `values` as `torch.mean` of an f32 CUDA tensor yields it: the sum rounded to f32,
/// times the f32 reciprocal of the count. (Dividing instead lands one ulp off for the reference
/// data.) The sum is accumulated in f64, which rounds like an exact sum in all but pathological
/// cases; PyTorch's own f32 reduction may differ by an ulp on very large tensors.
fn mean_like_torch(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
    (sum as f32) * (1.0 / values.len() as f32)
}
