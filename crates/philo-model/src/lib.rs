//! The Phi-3 model for philo: configuration, checkpoint loading, the forward pass on candle and
//! the KV cache for incremental decoding.

pub mod adapter;
pub mod checkpoint;
pub mod config;
mod contiguous_attention;
pub mod decode_graph;
pub mod decode_step;
mod decoder_layer;
pub mod error;
pub mod kv_cache;
pub mod lora_bank;
pub mod lora_linear;
pub mod memory;
pub mod paged_forward;
pub mod paged_kv_cache;
pub mod phi3;
pub mod rope;
pub mod tiny;
pub mod train_layer;
pub mod weights;

pub use adapter::{Adapter, AdapterConfig};
pub use checkpoint::ModelFiles;
pub use config::{Phi3Config, RopeConfig, RopeScaling};
pub use decode_graph::DecodeGraph;
pub use decode_step::{DecodeRow, DecodeStep, LogitAdjustment, RowSampling, StepRuns};
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use lora_bank::LoraBank;
pub use lora_linear::{BaseWeight, DropoutSeed, Lora, LoraLinear, WeightFormat};
pub use paged_forward::SeqChunk;
pub use paged_kv_cache::PagedKvCache;
pub use phi3::{LayerContext, Phi3};
pub use train_layer::{CheckpointState, LayerSaved, LayerWeights, LoraGrad, LoraGrads};
pub use weights::{SafetensorsStore, WeightSource};
