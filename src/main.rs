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
    /// Measure throughput (tokens/s, peak memory) as a table and JSON.
    Bench(BenchArgs),
    /// Run philo's main job end to end on the embedded tiny model.
    Demo {
        /// Where the tiny model is written (reused if present).
        #[arg(long)]
        dir: Option<PathBuf>,
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
        }
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchTask {
    Prefill,
    Decode,
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
    /// Prefill: tokens per sequence. Decode: prompt length.
    #[arg(long)]
    seq: Option<usize>,
    /// Decode: new tokens per sequence.
    #[arg(long = "new_tokens", alias = "new-tokens", default_value_t = 128)]
    new_tokens: usize,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    let model = match (&args.model, args.random) {
        (Some(spec), _) => Pipeline::load(spec, dtype, &device)?.model,
        (None, true) => {
            eprintln!("building a random Phi-3-mini-shaped model ...");
            philo::bench::random_model(
                &philo_model::Phi3Config::phi3_mini_4k(),
                args.layers,
                dtype,
                &device,
            )?
        }
        (None, false) => anyhow::bail!("philo bench needs --model DIR or --random"),
    };
    let mut results = Vec::new();
    for &batch in &args.batch {
        results.push(match args.task {
            BenchTask::Prefill => {
                philo::bench::prefill(&model, batch, args.seq.unwrap_or(2048), 2)?
            }
            BenchTask::Decode => {
                philo::bench::decode(&model, batch, args.seq.unwrap_or(128), args.new_tokens)?
            }
        });
    }
    print!("{}", philo::bench::table(&results));
    let json = serde_json::to_string_pretty(&results)?;
    println!("{json}");
    if let Some(path) = args.json {
        std::fs::write(&path, json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn load(args: &ModelArgs) -> anyhow::Result<Pipeline> {
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    Pipeline::load(&args.model, dtype, &device)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let pipeline = load(&args.model)?;
    let prompt = if args.chat {
        pipeline.encode_chat(&[ChatMessage::user(&args.prompt)])?
    } else {
        pipeline.encode_prompt(&args.prompt)?
    };
    let options = args.sampling.options(pipeline.stop_tokens.clone());
    let mut stdout = std::io::stdout().lock();
    let (generation, _) = pipeline.stream(prompt, &options, |piece| {
        match write!(stdout, "{piece}").and_then(|_| stdout.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    writeln!(stdout)?;
    eprintln!(
        "[{} prompt tokens, {} new tokens, prefill {:.0} ms, {:.1} tok/s]",
        generation.prompt_tokens,
        generation.tokens.len(),
        generation.prefill.as_secs_f64() * 1e3,
        generation.decode_tokens_per_second()
    );
    Ok(())
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let pipeline = load(&args.model)?;
    let options = args.sampling.options(pipeline.stop_tokens.clone());
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

fn demo(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("philo-demo-tiny"));
    if !dir.join("config.json").exists() {
        philo::tiny::write_tiny_model(&dir, 0)?;
        println!("wrote the tiny default model to {}", dir.display());
    }
    let pipeline = Pipeline::load(
        &dir.to_string_lossy(),
        DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let question = "What is the capital of France?";
    println!("user: {question}\nassistant (random weights, so expect noise):");
    let prompt = pipeline.encode_chat(&[ChatMessage::user(question)])?;
    let options = GenerateOptions {
        max_new_tokens: 32,
        stop_tokens: pipeline.stop_tokens.clone(),
        sampling: SamplingParams {
            seed: Some(0),
            ..SamplingParams::default()
        },
    };
    let (generation, _) = pipeline.stream(prompt, &options, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        ControlFlow::Continue(())
    })?;
    println!(
        "\n[{} prompt tokens, {} new tokens, {:.1} tok/s on the CPU]",
        generation.prompt_tokens,
        generation.tokens.len(),
        generation.decode_tokens_per_second()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::NewTiny { dir, seed } => philo::tiny::write_tiny_model(&dir, seed)
            .map(|()| println!("wrote a tiny random Phi-3 model to {}", dir.display())),
        Command::Bench(args) => bench(args),
        Command::Demo { dir } => demo(dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
