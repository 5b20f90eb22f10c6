//! Errors of the quantisation crate. Each message says which input is wrong and what was
//! expected, so a caller can fix the call (or the checkpoint) without reading this code.

use candle_core::DType;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, QuantError>;

/// Everything that can go wrong while quantising, rebuilding or dequantising weights.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The flat weight slice does not hold `rows * cols` values.
    #[error("weights have {actual} values, but a {rows}x{cols} matrix needs {expected}")]
    LengthMismatch {
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    /// A matrix with no rows or no columns.
    #[error("a {rows}x{cols} matrix is empty; there is nothing to quantise")]
    EmptyShape { rows: usize, cols: usize },
    /// `rows * cols` does not fit in `usize`.
    #[error("a {rows}x{cols} matrix has more elements than this machine can address")]
    ShapeOverflow { rows: usize, cols: usize },
    /// Block size 0.
    #[error("block size must be at least 1, got {block_size} (bitsandbytes uses 64 for NF4 weights and 256 for double quantisation)")]
    InvalidBlockSize { block_size: usize },
    /// NaN or infinity among the weights: the per-block scale would be meaningless.
    #[error("weight at row {row}, column {col} is {value}; only finite weights can be quantised")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// A part handed to a `from_parts` constructor has the wrong length.
    #[error("{part}: expected {expected} values, got {actual}")]
    PartLength {
        part: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A candle tensor that should be a 2-D weight matrix is not.
    #[error("expected a 2-D weight matrix, got a tensor of shape {shape:?}")]
    NotAMatrix { shape: Vec<usize> },
    /// Dequantisation into an integer (or otherwise unsupported) dtype.
    #[error("cannot dequantise into {dtype:?}; use f32, f16, bf16 or f64")]
    UnsupportedDType { dtype: DType },
    /// `x · Wᵀ` with an input whose last dimension is not W's column count.
    #[error("input of shape {shape:?} cannot be multiplied by a quantised {rows}x{cols} weight: its last dimension must be {cols}")]
    MatmulShape {
        shape: Vec<usize>,
        rows: usize,
        cols: usize,
    },
    /// An error from candle while building or multiplying tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `rows * cols`, refusing empty and overflowing shapes.
pub(crate) fn element_count(rows: usize, cols: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(QuantError::EmptyShape { rows, cols });
    }
    rows.checked_mul(cols)
        .ok_or(QuantError::ShapeOverflow { rows, cols })
}

/// Checks a row-major `rows × cols` weight slice before quantisation: a non-empty shape, the
/// right length, only finite values (the first bad one is named). Returns `rows * cols`.
pub(crate) fn check_weights(weights: &[f32], rows: usize, cols: usize) -> Result<usize> {
    let n = element_count(rows, cols)?;
    if weights.len() != n {
        return Err(QuantError::LengthMismatch {
            rows,
            cols,
            expected: n,
            actual: weights.len(),
        });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite()) {
        return Err(QuantError::NonFinite {
            row: index / cols,
            col: index % cols,
            value: weights[index],
        });
    }
    Ok(n)
}
