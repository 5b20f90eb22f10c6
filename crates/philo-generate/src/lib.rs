//! Text generation with a Phi-3 model: sampling, incremental decoding through the KV cache, and
//! stop conditions.

pub mod error;
pub mod sampling;
pub mod speculative;
pub mod token_stream;

pub use error::{GenerateError, Result};
pub use sampling::{
    token_logprobs, GpuSampling, Sampler, SamplingParams, TokenCounts, TokenLogprobs,
};
pub use token_stream::{generate, GenerateOptions, Generation, StopReason, TokenStream};
