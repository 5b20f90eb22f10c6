//! LoRA / QLoRA fine-tuning of Phi-3: trainable adapters, loss and gradients (with gradient
//! checkpointing), AdamW, learning-rate schedules, data, the trainer, and how the ranks of a
//! data-parallel run combine their gradients.

pub mod adamw;
pub mod backward;
pub mod comm;
pub mod data;
pub mod error;
pub mod eval;
pub mod gpu_reading;
pub mod lora_params;
pub mod loss;
pub mod loss_plot;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod offload;
pub mod profile;
pub mod rendezvous;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::{Result, TrainError};
