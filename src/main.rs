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
    Bench(cli::bench::BenchArgs),
    /// Serve the model (and LoRA adapters) over an OpenAI-compatible HTTP API with continuous
    /// batching.
    Serve(Box<cli::serve::ServeArgs>),
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
    /// OpenAI's: subtracts this times a token's count in the context from its logit.
    #[arg(
        long = "frequency_penalty",
        alias = "frequency-penalty",
        default_value_t = 0.0
    )]
    frequency_penalty: f32,
    /// OpenAI's: subtracts this from the logit of every token the context holds.
    #[arg(
        long = "presence_penalty",
        alias = "presence-penalty",
        default_value_t = 0.0
    )]
    presence_penalty: f32,
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

/// Speculative decoding's flags (generate, chat, serve, bench decode and serve).
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
    /// The engine's speculation (serve, bench serve): the most tokens proposed a step (None:
    /// off) and the draft model's folder or hub id (None: prompt lookup).
    fn serve_speculation(&self) -> anyhow::Result<(Option<usize>, Option<String>)> {
        let draft = self.draft(|dir| Ok(dir.to_string()))?;
        let tokens = self.speculative.map(|_| self.num_speculative_tokens);
        Ok((tokens, draft))
    }

    /// The draft model `--speculative draft` names, loaded by `load`; None for prompt lookup or
    /// no speculation. A draft without that flag, or the flag without a draft, is an error.
    fn draft<T>(&self, load: impl FnOnce(&str) -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
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
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
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
    /// Data-parallel fine-tuning on this many GPUs of this node: one process per GPU, each
    /// with --batch_size rows a micro-batch (the optimizer step sees gpus × nnodes × batch ×
    /// accumulation rows). Needs a build with `--features cuda,nccl`.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// Nodes of a multi-node run (start the same command on each, with its --node_rank).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's place among the --nnodes (0 on the node at --master_addr).
    #[arg(long = "node_rank", alias = "node-rank", default_value_t = 0)]
    node_rank: usize,
    /// Node 0's address, where the ranks meet.
    #[arg(
        long = "master_addr",
        alias = "master-addr",
        default_value = "127.0.0.1"
    )]
    master_addr: String,
    /// The port on --master_addr where rank 0 hands out NCCL's id.
    #[arg(long = "master_port", alias = "master-port", default_value_t = 29500)]
    master_port: u16,
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
    let rank = philo::launch::RankEnv::from_env()?;
    let launch = philo::launch::Launch {
        gpus: args.gpus,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    if rank.is_none() && launch.world_size() != 1 {
        // The launcher: this command again, once per GPU, each as one rank. The ranks see
        // Ctrl-C too and stop after their step; this process waits for them (a second Ctrl-C
        // quits it).
        let pressed = AtomicBool::new(false);
        ctrlc::set_handler(move || {
            if pressed.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        })?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return launch.run(&std::env::current_exe()?, &args);
    }
    let device = match &rank {
        Some(env) => philo::device::open_cuda(env.local_rank)?,
        None => args.device.open()?,
    };
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
        rank,
    };
    let lead = options.rank.as_ref().is_none_or(|env| env.rank == 0);
    let stop = stop_training_on_ctrl_c(lead)?;
    let summary = philo::finetune::finetune(&options, &stop)?;
    if !lead {
        return Ok(());
    }
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
    let stop = stop_training_on_ctrl_c(true)?;
    philo::demo::demo(&dir, steps, &stop)
}

/// A flag the first Ctrl-C sets, so training saves a checkpoint and stops after the current
/// step (said on stderr when `say`: one rank speaks for a multi-GPU run); a second Ctrl-C quits
/// at once.
fn stop_training_on_ctrl_c(say: bool) -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        if say {
            eprintln!(
                "\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)"
            );
        }
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
        Command::Bench(args) => cli::bench::run(args),
        Command::Eval(args) => eval(args),
        Command::Serve(args) => cli::serve::run(*args),
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
