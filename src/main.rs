//! The `philo` command: parses arguments and calls the library.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use philo::chat::ChatSession;
use philo::device::{default_dtype, parse_dtype, DeviceChoice};
use philo::pipeline::Pipeline;
use philo_generate::{GenerateOptions, SamplingParams};
use philo_text::ChatMessage;

mod cli;

#[derive(Parser)]
#[command(
    name = "philo",
    version,
    about = "Fine-tune (QLoRA) and serve Microsoft Phi-3 on one GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Chat with a model in the terminal (/system TEXT, /reset, /exit; Ctrl-C stops an answer).
    Chat(ChatArgs),
    /// Write a tiny random Phi-3 checkpoint (Hugging Face layout, real Phi-3 tokenizer) to DIR.
    #[command(name = "new-tiny")]
    NewTiny {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Fine-tune LoRA adapters (QLoRA by default) on a JSON/JSONL dataset; writes a PEFT adapter.
    Finetune(Box<FinetuneArgs>),
    /// Fold a LoRA adapter into its base model and write a Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Mean loss and perplexity of a dataset's labelled tokens (finetune's formats and masking).
    Eval(EvalArgs),
    /// Measure throughput (tokens/s, peak memory) as a table and JSON.
    Bench(BenchArgs),
    /// Serve the model (and LoRA adapters) over an OpenAI-compatible HTTP API with continuous
    /// batching.
    Serve(Box<ServeArgs>),
    /// Write a model (an adapter merged in) as a GGUF file for llama.cpp / Ollama.
    Export(cli::export::ExportArgs),
    /// Predict a job's peak GPU memory (broken down), whether it fits a GPU, the batch that
    /// does and its tokens/s, from the model's config alone.
    Plan(cli::plan::PlanArgs),
    /// The GPUs' utilisation, memory, power, temperature and clocks every second, with the
    /// memory of philo's processes (like nvidia-smi -l 1).
    Monitor(cli::monitor::MonitorArgs),
    /// The main job end to end on the embedded tiny model: write it, QLoRA fine-tune it on a sample
    /// dataset, and ask it what it learned.
    Demo {
        /// Where the tiny model, the data and the adapter are written (the model is reused).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Optimizer steps of the fine-tune.
        #[arg(long, default_value_t = philo::demo::DEMO_STEPS)]
        steps: usize,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A model folder (Hugging Face layout) or a hub id such as microsoft/Phi-3-mini-4k-instruct.
    #[arg(long)]
    model: String,
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// A PEFT LoRA adapter folder (e.g. the output of philo finetune) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    weights: WeightArgs,
}

/// How the model's projections are held (generate, chat, serve, eval, bench).
#[derive(Args)]
struct WeightArgs {
    /// none (the checkpoint's weights), int8 (per-row, W8A16), int4 (groups of 128, W4A16) or
    /// nf4 (bitsandbytes' 4-bit NormalFloat).
    #[arg(long)]
    quant: Option<philo::quant::BaseQuant>,
    /// Same as --quant nf4 (the 4-bit loading flag of the usual Phi-3 scripts).
    #[arg(long = "use_4bit", alias = "use-4bit", alias = "load_in_4bit", conflicts_with_all = ["quant", "load_in_8bit"])]
    use_4bit: bool,
    /// Same as --quant int8.
    #[arg(
        long = "load_in_8bit",
        alias = "load-in-8bit",
        conflicts_with = "quant"
    )]
    load_in_8bit: bool,
    /// With --adapter on an unquantised model, keep the adapter apart instead of folding it into
    /// the weights at load (merging costs nothing per token).
    #[arg(long = "no_merge", alias = "no-merge")]
    no_merge: bool,
}

impl WeightArgs {
    /// The chosen format, `default` when no flag names one.
    fn quant(&self, default: philo::quant::BaseQuant) -> philo::quant::BaseQuant {
        use philo::quant::BaseQuant;
        match (self.quant, self.use_4bit, self.load_in_8bit) {
            (Some(q), _, _) => q,
            (None, true, _) => BaseQuant::Nf4,
            (None, _, true) => BaseQuant::Int8,
            (None, false, false) => default,
        }
    }

    fn options(&self, default: philo::quant::BaseQuant) -> philo::pipeline::WeightOptions {
        philo::pipeline::WeightOptions {
            quant: self.quant(default),
            merge_adapter: !self.no_merge,
        }
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.9)]
    top_p: f32,
    #[arg(long = "top_k", alias = "top-k")]
    top_k: Option<usize>,
    /// Typical sampling mass (off unless given; 0.2 is the usual choice).
    #[arg(long = "typical_p", alias = "typical-p")]
    typical_p: Option<f32>,
    #[arg(long = "min_p", alias = "min-p")]
    min_p: Option<f32>,
    #[arg(long = "repetition_penalty", alias = "repetition-penalty")]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    max_new_tokens: usize,
    #[command(flatten)]
    speculation: SpeculativeArgs,
}

/// Speculative decoding's flags (generate, chat, bench decode).
#[derive(Args)]
struct SpeculativeArgs {
    /// Speculative decoding: `ngram` proposes the tokens that followed the latest earlier
    /// occurrence of the last few tokens (prompt lookup), `draft` what --draft_model decodes
    /// greedily ahead; the output is unchanged. On the GPU the decode graph verifies the
    /// proposals (up to 8 a step) in one multi-row step.
    #[arg(long, value_enum)]
    speculative: Option<Speculative>,
    /// The draft model of `--speculative draft`: a smaller checkpoint (folder or hub id) with the
    /// model's tokenizer, loaded with the same --quant, device and dtype.
    #[arg(long = "draft_model", alias = "draft-model")]
    draft_model: Option<String>,
    /// Most tokens proposed a step (fewer while few are accepted).
    #[arg(
        long = "num_speculative_tokens",
        alias = "num-speculative-tokens",
        default_value_t = 5
    )]
    num_speculative_tokens: usize,
}

impl SpeculativeArgs {
    /// The engine's speculation (serve, bench serve): prompt lookup only.
    fn serve_tokens(&self) -> anyhow::Result<Option<usize>> {
        match self.speculative {
            None if self.draft_model.is_some() => {
                anyhow::bail!("--draft_model is the draft of `--speculative draft`; add that flag or drop --draft_model")
            }
            None => Ok(None),
            Some(Speculative::Ngram) => Ok(Some(self.num_speculative_tokens)),
            Some(Speculative::Draft) => anyhow::bail!(
                "the server speculates by prompt lookup (--speculative ngram); a draft model runs in generate, chat and bench decode"
            ),
        }
    }

    /// The draft model `--speculative draft` names, loaded by `load`; None for prompt lookup or
    /// no speculation. A draft without that flag, or the flag without a draft, is an error.
    fn draft(
        &self,
        load: impl FnOnce(&str) -> anyhow::Result<philo_model::Phi3>,
    ) -> anyhow::Result<Option<philo_model::Phi3>> {
        match (self.speculative, &self.draft_model) {
            (Some(Speculative::Draft), Some(dir)) => Ok(Some(load(dir)?)),
            (Some(Speculative::Draft), None) => {
                anyhow::bail!("--speculative draft needs --draft_model DIR (a smaller checkpoint with the model's tokenizer)")
            }
            (_, Some(_)) => {
                anyhow::bail!("--draft_model is the draft of `--speculative draft`; add that flag or drop --draft_model")
            }
            _ => Ok(None),
        }
    }
}

/// Where speculative decoding's proposals come from.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Speculative {
    /// Prompt lookup: n-gram matches in the prompt and the output so far.
    Ngram,
    /// A draft model (--draft_model) decoding greedily ahead.
    Draft,
}

impl SamplingArgs {
    fn options(&self, stop_tokens: Vec<u32>) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            stop_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: Some(self.top_p),
                typical_p: self.typical_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                ..SamplingParams::default()
            },
            speculative_tokens: self
                .speculation
                .speculative
                .map(|_| self.speculation.num_speculative_tokens),
            draft: None,
        }
    }

    /// The options, with the draft model loaded when `--speculative draft` asks for one.
    fn options_for(
        &self,
        model: &ModelArgs,
        pipeline: &Pipeline,
    ) -> anyhow::Result<GenerateOptions> {
        let mut options = self.options(pipeline.stop_tokens.clone());
        let draft = self.speculation.draft(|dir| {
            let device = model.device.open()?;
            let dtype = model.dtype.unwrap_or_else(|| default_dtype(&device));
            let weights = model.weights.options(philo::quant::BaseQuant::None);
            Ok(Pipeline::load(dir, None, weights, dtype, &device)?.model)
        })?;
        options.draft = draft.map(Arc::new);
        Ok(options)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system prompt for the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct FinetuneArgs {
    /// The base model: a folder or a hub id (microsoft/Phi-3-mini-4k-instruct).
    #[arg(long = "base_model", alias = "base-model")]
    base_model: String,
    /// Training data: a JSON array or JSONL of messages, alpaca, prompt/completion or text records.
    #[arg(long)]
    dataset: PathBuf,
    /// Where the adapter, checkpoints and metrics.jsonl go.
    #[arg(
        long = "output_dir",
        alias = "output-dir",
        default_value = "philo-output"
    )]
    output_dir: PathBuf,
    /// messages, sharegpt, alpaca, prompt_completion or text (detected when absent).
    #[arg(long)]
    format: Option<philo_train::data::DataFormat>,
    #[command(flatten)]
    shape: TrainShapeArgs,
    #[arg(long = "lora_alpha", alias = "lora-alpha", default_value_t = 16.0)]
    lora_alpha: f64,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    #[arg(long = "use_rslora", alias = "use-rslora")]
    use_rslora: bool,
    #[arg(
        long,
        alias = "learning_rate",
        alias = "learning-rate",
        default_value_t = 2e-4
    )]
    lr: f64,
    #[arg(
        long,
        alias = "num_train_epochs",
        alias = "num-train-epochs",
        default_value_t = 1
    )]
    epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long = "max_steps", alias = "max-steps")]
    max_steps: Option<usize>,
    /// cosine, linear or constant.
    #[arg(
        long = "lr_scheduler",
        alias = "lr-scheduler",
        alias = "lr_scheduler_type",
        default_value = "cosine"
    )]
    lr_scheduler: philo_train::schedule::ScheduleKind,
    #[arg(long = "warmup_steps", alias = "warmup-steps", default_value_t = 0)]
    warmup_steps: usize,
    /// Warmup as a fraction of all steps (used when larger than --warmup_steps gives).
    #[arg(long = "warmup_ratio", alias = "warmup-ratio", default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Clip the global gradient norm (0 turns clipping off).
    #[arg(long = "max_grad_norm", alias = "max-grad-norm", default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long = "weight_decay", alias = "weight-decay", default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long = "logging_steps", alias = "logging-steps", default_value_t = 10)]
    logging_steps: usize,
    #[arg(long = "save_steps", alias = "save-steps")]
    save_steps: Option<usize>,
    #[arg(long = "eval_steps", alias = "eval-steps")]
    eval_steps: Option<usize>,
    /// Hold out this fraction of the data for evaluation.
    #[arg(long = "eval_split", alias = "eval-split", default_value_t = 0.0)]
    eval_split: f64,
    /// Evaluate on this file instead of a split of the training data.
    #[arg(long = "eval_dataset", alias = "eval-dataset")]
    eval_dataset: Option<PathBuf>,
    /// Compute the loss on prompt tokens too, not only on the assistant's.
    #[arg(long = "train_on_prompt", alias = "train-on-prompt")]
    train_on_prompt: bool,
    /// Pack short samples into rows of max_seq_length (attention stays within each sample).
    #[arg(long)]
    packing: bool,
    /// Continue from a checkpoint folder, or `latest` for the newest in --output_dir.
    #[arg(long)]
    resume: Option<String>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

/// The flags of a fine-tune that set its memory and speed (`finetune` and `plan finetune`).
#[derive(Args)]
pub struct TrainShapeArgs {
    /// Rows per micro-batch, or auto: the largest that fits the GPU's free memory with 10 %
    /// headroom (philo plan's prediction).
    #[arg(
        long = "batch_size",
        alias = "batch-size",
        alias = "per_device_train_batch_size",
        default_value = "4"
    )]
    pub batch_size: philo_plan::BatchChoice,
    #[arg(
        long = "gradient_accumulation_steps",
        alias = "gradient-accumulation-steps",
        default_value_t = 1
    )]
    pub gradient_accumulation_steps: usize,
    /// Rows per optimizer step; with it the gradient accumulation follows from the batch size
    /// (default: batch size x gradient accumulation).
    #[arg(long = "effective_batch_size", alias = "effective-batch-size")]
    pub effective_batch_size: Option<usize>,
    #[arg(long = "lora_r", alias = "lora-r", default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long = "lora_dropout", alias = "lora-dropout", default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Comma-separated modules to adapt.
    #[arg(
        long = "target_modules",
        alias = "target-modules",
        alias = "lora_target_modules",
        value_delimiter = ',',
        default_value = "qkv_proj,o_proj,gate_up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    #[arg(
        long = "max_seq_length",
        alias = "max-seq-length",
        default_value_t = 2048
    )]
    pub max_seq_length: usize,
    /// nf4 (QLoRA, default) or none (LoRA on the dense base).
    #[arg(long, default_value = "nf4")]
    pub quant: philo::quant::BaseQuant,
    /// Leave the NF4 block scales in f32 (default: quantised to 8 bits, as QLoRA does).
    #[arg(long = "no_double_quant", alias = "no-double-quant")]
    pub no_double_quant: bool,
    /// Keep every activation instead of recomputing layers in the backward pass (more memory).
    #[arg(
        long = "no_gradient_checkpointing",
        alias = "no-gradient-checkpointing"
    )]
    pub no_gradient_checkpointing: bool,
    /// Keep the gradient checkpoints on the GPU instead of in pinned host memory (faster only
    /// where host copies are slow; costs one layer input of GPU memory per layer).
    #[arg(long = "no_gradient_offload", alias = "no-gradient-offload")]
    pub no_gradient_offload: bool,
    /// With gradient checkpointing, the last N decoder layers keep their state and are not
    /// recomputed in the backward: faster, at about 1.6 GiB a layer per 24,576 tokens of
    /// micro-batch; auto: as many as fit the GPU's free memory with 10 % headroom beside the
    /// micro-batch (philo plan's prediction).
    #[arg(
        long = "uncheckpointed_layers",
        alias = "uncheckpointed-layers",
        default_value = "0"
    )]
    pub uncheckpointed_layers: philo_plan::LayerChoice,
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
}

#[derive(Args)]
struct EvalArgs {
    /// A model folder or hub id.
    #[arg(long)]
    model: String,
    /// A PEFT LoRA adapter folder to evaluate on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    weights: WeightArgs,
    /// A JSON array or JSONL file in any format finetune reads.
    #[arg(long)]
    dataset: PathBuf,
    /// messages, sharegpt, alpaca, prompt_completion or text (detected when absent).
    #[arg(long)]
    format: Option<philo_train::data::DataFormat>,
    #[arg(
        long = "max_seq_length",
        alias = "max-seq-length",
        default_value_t = 2048
    )]
    max_seq_length: usize,
    /// Count the prompt tokens too, not only the assistant's.
    #[arg(long = "train_on_prompt", alias = "train-on-prompt")]
    train_on_prompt: bool,
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 4)]
    batch_size: usize,
    /// Also write {"loss", "perplexity", "tokens"} to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
}

#[derive(Args)]
struct MergeArgs {
    #[arg(long = "base_model", alias = "base-model")]
    base_model: String,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_parser = parse_dtype, default_value = "bf16")]
    dtype: DType,
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch_size must be at least 1");
    let device = args.device.open()?;
    let options = philo::eval::EvalOptions {
        dtype: args.dtype.unwrap_or_else(|| default_dtype(&device)),
        device,
        model: args.model,
        adapter: args.adapter,
        weights: args.weights.options(philo::quant::BaseQuant::None),
        dataset: args.dataset,
        format: args.format,
        max_seq_length: args.max_seq_length,
        train_on_prompt: args.train_on_prompt,
        batch_size: args.batch_size,
    };
    let result = philo::eval::run(&options)?;
    println!(
        "loss {:.4}, perplexity {:.4} over {} tokens",
        result.loss, result.perplexity, result.tokens
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn finetune(args: FinetuneArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let dtype = args.shape.dtype.unwrap_or_else(|| default_dtype(&device));
    let mut trainer = philo::finetune::FinetuneOptions::default_trainer(args.output_dir.clone());
    trainer.gradient_accumulation_steps = args.shape.gradient_accumulation_steps;
    trainer.epochs = args.epochs;
    trainer.max_steps = args.max_steps;
    trainer.lr = args.lr;
    trainer.schedule = args.lr_scheduler;
    trainer.warmup_steps = args.warmup_steps;
    trainer.warmup_ratio = args.warmup_ratio;
    trainer.max_grad_norm = (args.max_grad_norm > 0.0).then_some(args.max_grad_norm);
    trainer.adamw.weight_decay = args.weight_decay;
    trainer.seed = args.seed;
    trainer.logging_steps = args.logging_steps;
    trainer.save_steps = args.save_steps;
    trainer.eval_steps = args
        .eval_steps
        .or((args.eval_split > 0.0 || args.eval_dataset.is_some()).then_some(args.logging_steps));
    trainer.gradient_checkpointing = !args.shape.no_gradient_checkpointing;
    trainer.gradient_offload = !args.shape.no_gradient_offload;
    let resume = match args.resume.as_deref() {
        None => None,
        Some("latest") => Some(
            philo_train::trainer::Trainer::latest_checkpoint(&args.output_dir).ok_or_else(
                || {
                    anyhow::anyhow!(
                        "--resume latest: no checkpoint-N folder in {}",
                        args.output_dir.display()
                    )
                },
            )?,
        ),
        Some(path) => Some(PathBuf::from(path)),
    };
    let options = philo::finetune::FinetuneOptions {
        base_model: args.base_model,
        dataset: args.dataset,
        output_dir: args.output_dir.clone(),
        format: args.format,
        max_seq_length: args.shape.max_seq_length,
        train_on_prompt: args.train_on_prompt,
        packing: args.packing,
        eval_split: args.eval_split,
        eval_dataset: args.eval_dataset,
        batch_size: args.shape.batch_size,
        effective_batch_size: args.shape.effective_batch_size,
        uncheckpointed_layers: args.shape.uncheckpointed_layers,
        lora_r: args.shape.lora_r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.shape.lora_dropout,
        target_modules: args.shape.target_modules,
        use_rslora: args.use_rslora,
        quant: args.shape.quant,
        double_quant: !args.shape.no_double_quant,
        trainer,
        resume,
        dtype,
        device,
    };
    let stop = stop_training_on_ctrl_c()?;
    let summary = philo::finetune::finetune(&options, &stop)?;
    let eval = summary
        .final_eval_loss
        .map_or(String::new(), |e| format!(", eval loss {e:.4}"));
    if summary.interrupted {
        println!(
            "stopped at step {}; resume with --resume latest",
            summary.steps
        );
    } else {
        println!(
            "done: {} steps, loss {:.4}{eval}; adapter in {}",
            summary.steps,
            summary.final_loss.unwrap_or(f64::NAN),
            args.output_dir.display()
        );
    }
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// A model folder (Hugging Face layout) or a hub id such as microsoft/Phi-3-mini-4k-instruct.
    #[arg(long)]
    model: String,
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// A LoRA adapter served as its own model: NAME=DIR (a PEFT folder); repeatable. Clients pick
    /// it with "model": "NAME"; more can be loaded later with POST /v1/adapters.
    #[arg(long = "adapter", value_parser = philo::serve::parse_adapter)]
    adapters: Vec<(String, PathBuf)>,
    #[command(flatten)]
    weights: WeightArgs,
    /// Address to listen on; 127.0.0.1 keeps the server local. Use 0.0.0.0 to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (also read from PHILO_API_KEY).
    #[arg(long = "api-key", env = "PHILO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients send for the base model (default: the model folder's name, or the
    /// hub id).
    #[arg(long = "served-model-name")]
    served_model_name: Option<String>,
    /// Requests allowed to wait for a place in the batch; beyond it clients get 429.
    #[arg(long = "max-queue", default_value_t = 256)]
    max_queue: usize,
    /// Run every step through the general forward, op by op (as vLLM's --enforce-eager): no
    /// decode kernels or CUDA graphs, for comparing or working around them.
    #[arg(long = "enforce_eager", alias = "enforce-eager")]
    enforce_eager: bool,
    /// Speculative decoding by prompt lookup (`--speculative ngram`): while at most 4
    /// sequences decode, each step also verifies up to --num_speculative_tokens tokens per
    /// sequence copied from its prompt and output; the output is unchanged.
    #[command(flatten)]
    speculation: SpeculativeArgs,
    #[command(flatten)]
    shape: ServeShapeArgs,
}

/// The flags of a server that set its memory (`serve` and `plan serve`).
#[derive(Args)]
pub struct ServeShapeArgs {
    /// Most sequences decoded together.
    #[arg(long = "max-batch", default_value_t = 128)]
    pub max_batch: usize,
    /// Most tokens one step computes (decode tokens plus prompt chunks): long prompts are
    /// prefilled in chunks of this size so running streams keep flowing.
    #[arg(long = "max-batch-tokens", default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long = "block-size", default_value_t = 16)]
    pub block_size: usize,
    /// Memory for the paged KV cache in GiB (default: on a GPU what --gpu_memory_utilization
    /// leaves after the weights; 1 on the CPU).
    #[arg(long = "kv-cache-gib", alias = "kv_cache_gib")]
    pub kv_cache_gib: Option<f64>,
    /// The share of the GPU's memory the server may fill (weights, workspace and KV cache), as
    /// vLLM's --gpu-memory-utilization.
    #[arg(
        long = "gpu_memory_utilization",
        alias = "gpu-memory-utilization",
        default_value_t = 0.9
    )]
    pub gpu_memory_utilization: f64,
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shape.max_batch > 0 && args.shape.max_batch_tokens > 0 && args.shape.block_size > 0,
        "--max-batch, --max-batch-tokens and --block-size must be at least 1"
    );
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    let options = philo::serve::ServeOptions {
        model: args.model,
        served_model_name: args.served_model_name,
        adapters: args.adapters,
        addr: std::net::SocketAddr::new(args.host, args.port),
        api_key: args.api_key,
        max_running: args.shape.max_batch,
        max_tokens_per_step: args.shape.max_batch_tokens,
        max_queue: args.max_queue,
        block_size: args.shape.block_size,
        kv_cache_gib: args.shape.kv_cache_gib,
        gpu_memory_utilization: args.shape.gpu_memory_utilization,
        quant: args.weights.quant(philo::quant::BaseQuant::None),
        enforce_eager: args.enforce_eager,
        speculative_tokens: args.speculation.serve_tokens()?,
    };
    philo::serve::run(options, dtype, &device)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchTask {
    Prefill,
    Decode,
    /// LoRA/QLoRA optimizer steps (gradient checkpointing, all four projection types).
    Train,
    /// Concurrent streams (--batch) through the serving engine: continuous batching, paged KV cache.
    Serve,
    /// Flash attention forward and backward alone (causal, the model's heads and head_dim):
    /// milliseconds and TFLOP/s.
    Attention,
}

#[derive(Args)]
struct BenchArgs {
    task: BenchTask,
    /// A model folder or hub id; omit and pass --random for a random Phi-3-mini-shaped model.
    #[arg(long, conflicts_with = "random")]
    model: Option<String>,
    /// Build a random model of the Phi-3-mini shape (hidden 3072, 32 layers, vocab 32064) in memory.
    #[arg(long)]
    random: bool,
    /// With --random: keep only this many decoder layers (the CPU cannot hold all 32 in f32 quickly).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Sequences per batch; repeat the flag for several runs (e.g. --batch 1 --batch 26).
    #[arg(long, default_value = "1")]
    batch: Vec<usize>,
    /// Prefill: tokens per sequence. Decode and serve: prompt length.
    #[arg(long)]
    seq: Option<usize>,
    /// Decode and serve: new tokens per sequence.
    #[arg(long = "new_tokens", alias = "new-tokens", default_value_t = 128)]
    new_tokens: usize,
    /// Train: LoRA rank.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Train: LoRA alpha (default 2 × rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// The base's format (train: nf4 unless given; the others: none).
    #[command(flatten)]
    weights: WeightArgs,
    /// Train: timed optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Train: keep the gradient checkpoints on the GPU instead of in pinned host memory.
    #[arg(long = "no_gradient_offload", alias = "no-gradient-offload")]
    no_gradient_offload: bool,
    /// Train: the last N decoder layers are not checkpointed (they keep their activations).
    #[arg(
        long = "uncheckpointed_layers",
        alias = "uncheckpointed-layers",
        default_value_t = 0
    )]
    uncheckpointed_layers: usize,
    /// Train: LoRA dropout probability (finetune's default).
    #[arg(long = "lora_dropout", alias = "lora-dropout", default_value_t = 0.05)]
    lora_dropout: f32,
    /// Decode and serve: how a decode step runs (graph: philo's kernels in one CUDA graph;
    /// kernels: the same launched one by one; candle: the general forward).
    #[arg(long, value_enum, default_value = "graph")]
    engine: philo::bench::DecodeEngine,
    /// Decode with --speculative: batch 1, greedy, against plain decoding on the same prompt (a
    /// run of consecutive ids twice): acceptance, tokens per verify step, tok/s of both, and
    /// the verify step's cost for 1 to 8 proposals.
    #[command(flatten)]
    speculation: SpeculativeArgs,
    /// Serve: load a running server at this base URL (e.g. http://127.0.0.1:8000/v1) over
    /// HTTP instead of the engine in-process: --batch streamed chat completions at a time,
    /// sampled (--temperature, --top_p), prompts of about --seq tokens, --new_tokens each.
    #[arg(long)]
    http: Option<String>,
    /// Serve --http: requests in all per --batch value (default 4 × the streams).
    #[arg(long, requires = "http")]
    requests: Option<usize>,
    /// Serve --http: the base model's id (default: the field is left out).
    #[arg(long = "served_model", alias = "served-model", requires = "http")]
    served_model: Option<String>,
    /// Serve --http: an adapter that every second request names.
    #[arg(long, requires = "http")]
    adapter: Option<String>,
    /// Serve --http: the server's API key.
    #[arg(long = "api_key", alias = "api-key", requires = "http")]
    api_key: Option<String>,
    /// Serve --http: sampling temperature.
    #[arg(long, default_value_t = 0.7, requires = "http")]
    temperature: f32,
    /// Serve --http: nucleus sampling mass.
    #[arg(
        long = "top_p",
        alias = "top-p",
        default_value_t = 0.9,
        requires = "http"
    )]
    top_p: f32,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `bench serve --http`: loads a running server, one run per --batch value.
fn bench_http(args: &BenchArgs, base_url: &str) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for &streams in &args.batch {
        let options = philo::bench_http::HttpBench {
            base_url: base_url.to_string(),
            model: args.served_model.clone(),
            adapter: args.adapter.clone(),
            api_key: args.api_key.clone(),
            streams,
            requests: args.requests.unwrap_or(4 * streams),
            prompt_words: args.seq.unwrap_or(128) * 3 / 4,
            max_tokens: args.new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
        };
        results.push(philo::bench_http::run(&options)?);
    }
    report(
        &philo::bench_http::table(&results),
        &results,
        args.json.as_deref(),
    )
}

/// Prints a bench's table and its results as JSON, and writes the JSON to `json` when given.
fn report(
    table: &str,
    results: &impl serde::Serialize,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    print!("{table}");
    let text = serde_json::to_string_pretty(results)?;
    println!("{text}");
    if let Some(path) = json {
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.http {
        if !matches!(args.task, BenchTask::Serve) {
            anyhow::bail!("--http loads a running server: it goes with `bench serve`");
        }
        return bench_http(&args, url);
    }
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    if let BenchTask::Attention = args.task {
        let config = philo_model::Phi3Config::phi3_mini_4k();
        for &batch in &args.batch {
            let r = philo::bench::attention(
                &config,
                batch,
                args.seq.unwrap_or(2048),
                dtype,
                &device,
                10,
            )?;
            println!(
                "attention b{} h{} s{} d{}: forward {:.2} ms ({:.0} TFLOP/s), backward {:.2} ms ({:.0} TFLOP/s)",
                r.batch, r.heads, r.seq, r.head_dim, r.forward_ms, r.forward_tflops, r.backward_ms, r.backward_tflops
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    use philo::quant::BaseQuant;
    let quant = args.weights.quant(match args.task {
        BenchTask::Train => BaseQuant::Nf4,
        _ => BaseQuant::None,
    });
    // Training quantises its own base (after its memory measurement starts).
    let load_quant = match args.task {
        BenchTask::Train => BaseQuant::None,
        _ => quant,
    };
    let model = match (&args.model, args.random) {
        (Some(spec), _) => {
            let weights = philo::pipeline::WeightOptions {
                quant: load_quant,
                merge_adapter: false,
            };
            Pipeline::load(spec, None, weights, dtype, &device)?.model
        }
        (None, true) => {
            eprintln!("building a random Phi-3-mini-shaped model ...");
            let mut model = philo::bench::random_model(
                &philo_model::Phi3Config::phi3_mini_4k(),
                args.layers,
                dtype,
                &device,
            )?;
            model.quantize(load_quant.format(true))?;
            model
        }
        (None, false) => anyhow::bail!("philo bench needs --model DIR or --random"),
    };
    if args.speculation.speculative.is_some() && !matches!(args.task, BenchTask::Serve) {
        if !matches!(args.task, BenchTask::Decode) {
            anyhow::bail!("--speculative goes with `bench decode` and `bench serve`");
        }
        let draft = args.speculation.draft(|dir| {
            let weights = philo::pipeline::WeightOptions {
                quant: load_quant,
                merge_adapter: false,
            };
            Ok(Pipeline::load(dir, None, weights, dtype, &device)?.model)
        })?;
        let r = philo::bench::speculative_decode(
            &model,
            draft.as_ref(),
            args.seq.unwrap_or(128),
            args.new_tokens,
            args.speculation.num_speculative_tokens,
        )?;
        println!(
            "speculative decode ({}, k ≤ {}): {:.1} tok/s against {:.1} plain ({:.2}×); {} of {} proposed tokens accepted, {:.2} tokens per verify step over {} steps; output {}",
            r.proposer,
            r.max_tokens,
            r.tokens_per_second,
            r.plain_tokens_per_second,
            r.tokens_per_second / r.plain_tokens_per_second,
            r.accepted,
            r.proposed,
            r.tokens_per_verify_step,
            r.verify_steps,
            match r.first_difference {
                None => "identical".to_string(),
                Some(i) => format!(
                    "differs from token {i} ({:?}: the verify step's batched kernels round differently from a single-token step; f32 must match)",
                    model.dtype()
                ),
            }
        );
        let curve: Vec<String> = r
            .verify_cost
            .iter()
            .map(|c| format!("k={} {:.2}×", c.k, c.relative))
            .collect();
        println!("verify step against a plain step: {}", curve.join(", "));
        println!("{}", serde_json::to_string(&r)?);
        anyhow::ensure!(
            r.same_output || model.dtype() != DType::F32,
            "speculation changed the f32 greedy output"
        );
        return Ok(());
    }
    let mut results = Vec::new();
    if let BenchTask::Train = args.task {
        let [batch] = args.batch[..] else {
            anyhow::bail!("philo bench train takes one --batch (each run needs a fresh model)");
        };
        let options = philo::bench::TrainBench {
            batch,
            seq: args.seq.unwrap_or(2048),
            rank: args.rank,
            alpha: args.alpha.unwrap_or(2.0 * args.rank as f64),
            quant,
            steps: args.steps,
            warmup: 1,
            offload: !args.no_gradient_offload,
            lora_dropout: args.lora_dropout,
            uncheckpointed_layers: args.uncheckpointed_layers,
        };
        results.push(philo::bench::train(model, &options)?);
    } else {
        for &batch in &args.batch {
            results.push(match args.task {
                BenchTask::Train | BenchTask::Attention => unreachable!("handled above"),
                BenchTask::Prefill => {
                    philo::bench::prefill(&model, batch, args.seq.unwrap_or(2048), 2)?
                }
                BenchTask::Decode => philo::bench::decode(
                    &model,
                    batch,
                    args.seq.unwrap_or(128),
                    args.new_tokens,
                    args.engine,
                )?,
                BenchTask::Serve => philo::bench::serve(
                    &model,
                    batch,
                    args.seq.unwrap_or(128),
                    args.new_tokens,
                    args.engine,
                    args.speculation.serve_tokens()?,
                )?,
            });
        }
    }
    report(
        &philo::bench::table(&results),
        &results,
        args.json.as_deref(),
    )
}

fn load(args: &ModelArgs) -> anyhow::Result<Pipeline> {
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    let weights = args.weights.options(philo::quant::BaseQuant::None);
    Pipeline::load(
        &args.model,
        args.adapter.as_deref(),
        weights,
        dtype,
        &device,
    )
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let pipeline = load(&args.model)?;
    let prompt = if args.chat {
        pipeline.encode_chat(&[ChatMessage::user(&args.prompt)])?
    } else {
        pipeline.encode_prompt(&args.prompt)?
    };
    let options = args.sampling.options_for(&args.model, &pipeline)?;
    let mut stdout = std::io::stdout().lock();
    let (generation, _) = pipeline.stream(prompt, &options, |piece| {
        match write!(stdout, "{piece}").and_then(|_| stdout.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    writeln!(stdout)?;
    let (proposed, accepted) = generation.speculated;
    let speculation = if proposed > 0 {
        format!(", {accepted} of {proposed} speculated tokens accepted")
    } else {
        String::new()
    };
    eprintln!(
        "[{} prompt tokens, {} new tokens, prefill {:.0} ms, {:.1} tok/s{speculation}]",
        generation.prompt_tokens,
        generation.tokens.len(),
        generation.prefill.as_secs_f64() * 1e3,
        generation.decode_tokens_per_second()
    );
    Ok(())
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let pipeline = load(&args.model)?;
    let options = args.sampling.options_for(&args.model, &pipeline)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (cancel.clone(), generating.clone());
        // Ctrl-C stops the answer being written; at the prompt it quits.
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                println!();
                std::process::exit(0);
            }
        })?;
    }
    let mut session = ChatSession::new(&pipeline, options, args.system);
    session.run(
        std::io::stdin().lock(),
        &mut std::io::stdout(),
        &cancel,
        &generating,
    )
}

fn demo(dir: Option<PathBuf>, steps: usize) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("philo-demo"));
    let stop = stop_training_on_ctrl_c()?;
    philo::demo::demo(&dir, steps, &stop)
}

/// A flag the first Ctrl-C sets, so training saves a checkpoint and stops after the current
/// step; a second Ctrl-C quits at once.
fn stop_training_on_ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)");
    })?;
    Ok(stop)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::NewTiny { dir, seed } => philo::tiny::write_tiny_model(&dir, seed)
            .map(|()| println!("wrote a tiny random Phi-3 model to {}", dir.display())),
        Command::Finetune(args) => finetune(*args),
        Command::Merge(args) => {
            philo::merge::merge(&args.base_model, &args.adapter, &args.output, args.dtype)
                .map(|()| println!("wrote the merged model to {}", args.output.display()))
        }
        Command::Bench(args) => bench(args),
        Command::Eval(args) => eval(args),
        Command::Serve(args) => serve(*args),
        Command::Export(args) => cli::export::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Monitor(args) => cli::monitor::run(args),
        Command::Demo { dir, steps } => demo(dir, steps),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
