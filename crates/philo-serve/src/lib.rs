//! `philo serve`: an OpenAI-compatible HTTP server in front of one scheduler loop that owns the
//! model, batches sequences continuously over a paged KV cache and serves several LoRA adapters
//! in one batch.

pub mod block_allocator;
pub mod constraint;
pub mod draft;
pub mod engine;
pub mod http;
pub mod request;
pub mod scheduler;
pub mod step_profile;
