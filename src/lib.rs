//! philo: fine-tune (QLoRA) and serve Microsoft Phi-3 on one GPU, in Rust.
//!
//! This crate is the application layer behind the `philo` command: loading a model with its
//! tokenizer and chat template ([`pipeline::Pipeline`]), the chat session, the tiny default model,
//! the benchmarks and the `serve` command's setup.
//! The model itself lives in `philo-model`, text handling in `philo-text`, generation in
//! `philo-generate`.

pub mod bench;
pub mod bench_http;
pub mod chat;
pub mod demo;
pub mod device;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod launch;
pub mod merge;
pub mod monitor;
pub mod oom;
pub mod pipeline;
pub mod plan;
pub mod quant;
pub mod serve;
pub mod tiny;
