//! LoRA / QLoRA fine-tuning of Phi-3: trainable adapters, loss and gradients (with gradient
//! checkpointing), AdamW, learning-rate schedules, data, and the trainer.

pub mod adamw;
pub mod backward;
pub mod data;
pub mod error;
pub mod eval;
pub mod gpu_reading;
pub mod lora_params;
pub mod loss;
pub mod loss_plot;
pub mod offload;
pub mod profile;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::{Result, TrainError};
