//! Weight quantisation for philo.
//!
//! * [`Nf4Tensor`]: NF4 weights bit-compatible with bitsandbytes
//!   `quantize_4bit(W, blocksize=64, quant_type="nf4")`, with optional double quantisation of
//!   the block scales ([`Absmax::Double`]); the frozen base weights of QLoRA.
//! * [`dequantize_matmul`]: `x · Wᵀ` with an NF4 weight, dequantised into the compute dtype.
//! * [`dynamic_code`] / [`quantize_dynamic`]: bitsandbytes' signed dynamic 8-bit code, used
//!   for double quantisation.
//! * [`Int8Tensor`]: symmetric per-row INT8 weights.
//! * [`Int4Tensor`]: symmetric INT4 weights with one scale per group of input columns.

mod absmax;
pub mod device;
mod dynamic8;
mod error;
mod int4;
mod int8;
mod matmul;
mod nf4;

pub use absmax::{Absmax, DOUBLE_QUANT_BLOCK_SIZE};
pub use dynamic8::{dynamic_code, quantize_dynamic, DYNAMIC_CODE_LEN};
pub use error::{QuantError, Result};
pub use int4::{Int4Tensor, INT4_GROUP};
pub use int8::Int8Tensor;
pub use matmul::dequantize_matmul;
pub use nf4::{nf4_index, Nf4Tensor, NF4_BLOCK_SIZE, NF4_CODE};
