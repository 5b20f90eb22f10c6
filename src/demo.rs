//! `philo demo`: the main job end to end on the embedded tiny model — write it, fine-tune it
//! (QLoRA) on the sample dataset, and ask the result what it learned.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use philo_generate::{GenerateOptions, SamplingParams};
use philo_text::ChatMessage;

use crate::finetune::{finetune, FinetuneOptions};
use crate::pipeline::Pipeline;
use crate::quant::BaseQuant;

const TOY_DATASET: &str = include_str!("../examples/toy_dataset.jsonl");
const TOY_EVAL: &str = include_str!("../examples/toy_eval.jsonl");

/// Optimizer steps of the demo's fine-tune: enough for the tiny model to answer right (about a
/// minute on two CPU cores).
pub const DEMO_STEPS: usize = 300;

/// Runs the demo in `dir` with `steps` optimizer steps (the tiny model is reused when present).
pub fn demo(dir: &Path, steps: usize, stop: &AtomicBool) -> anyhow::Result<()> {
    let model_dir = dir.join("tiny-model");
    if !model_dir.join("config.json").exists() {
        crate::tiny::write_tiny_model(&model_dir, 0)?;
        println!(
            "1. wrote the tiny default model (random weights) to {}",
            model_dir.display()
        );
    } else {
        println!("1. using the tiny model in {}", model_dir.display());
    }
    let (train, eval) = (dir.join("toy_dataset.jsonl"), dir.join("toy_eval.jsonl"));
    std::fs::write(&train, TOY_DATASET)?;
    std::fs::write(&eval, TOY_EVAL)?;
    let adapter_dir = dir.join("adapter");
    let mut trainer = FinetuneOptions::default_trainer(adapter_dir.clone());
    trainer.lr = 4e-3;
    trainer.max_steps = Some(steps);
    trainer.warmup_steps = 10;
    trainer.logging_steps = 50;
    trainer.eval_steps = Some(50);
    let _ = std::fs::remove_file(adapter_dir.join("metrics.jsonl"));
    let options = FinetuneOptions {
        base_model: model_dir.to_string_lossy().to_string(),
        dataset: train,
        output_dir: adapter_dir.clone(),
        format: None,
        max_seq_length: 256,
        train_on_prompt: false,
        packing: false,
        eval_split: 0.0,
        eval_dataset: Some(eval),
        batch_size: philo_plan::BatchChoice::Fixed(8),
        effective_batch_size: None,
        uncheckpointed_layers: philo_plan::LayerChoice::Fixed(0),
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: philo_model::adapter::TARGET_MODULES
            .iter()
            .map(|m| m.to_string())
            .collect(),
        use_rslora: false,
        quant: BaseQuant::Nf4,
        double_quant: true,
        trainer,
        resume: None,
        dtype: DType::F32,
        device: Device::Cpu,
        rank: None,
    };
    println!("2. QLoRA fine-tune (NF4 base, r 16) on the sample dataset: animals and their sounds");
    let summary = finetune(&options, stop)?;
    if summary.interrupted {
        return Ok(());
    }
    println!("3. the fine-tuned model answers (greedy):");
    let pipeline = Pipeline::load(
        &model_dir.to_string_lossy(),
        Some(&adapter_dir),
        crate::pipeline::WeightOptions::default(),
        DType::F32,
        &Device::Cpu,
    )?;
    let generate = GenerateOptions {
        max_new_tokens: 24,
        stop_tokens: pipeline.stop_tokens.clone(),
        sampling: SamplingParams::greedy(),
        speculative_tokens: None,
        draft: None,
    };
    for question in [
        "What does the cow say?",
        "Which noise does a cat make?",
        "What sound does a duck make?",
    ] {
        let prompt = pipeline.encode_chat(&[ChatMessage::user(question)])?;
        let (generation, answer) =
            pipeline.stream(prompt, &generate, |_| ControlFlow::Continue(()))?;
        println!(
            "   user: {question}\n   assistant: {answer}   [{:.0} tok/s]",
            generation.decode_tokens_per_second()
        );
    }
    println!(
        "next: philo chat --model {} --adapter {}",
        model_dir.display(),
        adapter_dir.display()
    );
    Ok(())
}
