//! `philo bench prefill|decode|train|serve|attention`: the arguments and the printed report; the
//! measurements are `philo::bench` and `philo::bench_http`.

use std::path::{Path, PathBuf};

use candle_core::DType;
use clap::Args;
use philo::device::{default_dtype, parse_dtype, DeviceChoice};
use philo::pipeline::Pipeline;

use crate::{SpeculativeArgs, WeightArgs};

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
pub struct BenchArgs {
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
    /// kernels: the same launched one by one; layers: the graph with the decoder layers of
    /// steps of up to 16 rows in one persistent kernel; candle: the general forward).
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
    /// Serve --http: an adapter (its served name) that every second request names. Decode: a
    /// PEFT adapter folder every sequence runs with, unmerged, as serve runs adapter requests.
    #[arg(long)]
    adapter: Option<String>,
    /// Serve --http: the server's API key.
    #[arg(long = "api_key", alias = "api-key", requires = "http")]
    api_key: Option<String>,
    /// Serve --http: request i asks for --new_tokens × (1/2 + (i mod 8)/7) tokens, so that
    /// streams finish apart and new requests join the decoding batch one by one (as in real
    /// traffic; equal lengths finish in waves).
    #[arg(long = "varied_lengths", alias = "varied-lengths", requires = "http")]
    varied_lengths: bool,
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
            varied_lengths: args.varied_lengths,
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
    println!("{}", serde_json::to_string_pretty(results)?);
    write_json(json, results)
}

/// Writes `results` as JSON to `json` when given.
fn write_json(
    json: Option<&std::path::Path>,
    results: &impl serde::Serialize,
) -> anyhow::Result<()> {
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(results)?;
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
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
        let mut results = Vec::new();
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
            results.push(r);
        }
        return write_json(args.json.as_deref(), &results);
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
    // The adapter is read, or --adapter refused, before the model loads (which takes a while).
    let adapter = match (&args.adapter, &args.task) {
        (Some(dir), BenchTask::Decode) => Some(philo_model::Adapter::load(Path::new(dir))?),
        (Some(_), _) => anyhow::bail!(
            "--adapter goes with `bench decode` (a folder) and `bench serve --http` (a served name)"
        ),
        (None, _) => None,
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
    if args.speculation.speculative.is_some()
        && !matches!(args.task, BenchTask::Decode | BenchTask::Serve)
    {
        anyhow::bail!("--speculative goes with `bench decode` and `bench serve`");
    }
    // The draft model of --speculative draft, in the model's format, device and dtype.
    let draft = args.speculation.draft(|dir| {
        let weights = philo::pipeline::WeightOptions {
            quant: load_quant,
            merge_adapter: false,
        };
        Ok(Pipeline::load(dir, None, weights, dtype, &device)?.model)
    })?;
    if args.speculation.speculative.is_some() && matches!(args.task, BenchTask::Decode) {
        let r = philo::bench::speculative_decode(
            &model,
            draft.as_ref(),
            args.seq.unwrap_or(128),
            args.new_tokens,
            args.speculation.num_speculative_tokens,
            args.engine == philo::bench::DecodeEngine::Layers,
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
            .map(|c| format!("k={} {:.3}×", c.k, c.relative))
            .collect();
        println!("verify step against a plain step: {}", curve.join(", "));
        println!("{}", serde_json::to_string(&r)?);
        write_json(args.json.as_deref(), &r)?;
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
                    adapter.as_ref(),
                )?,
                BenchTask::Serve => philo::bench::serve(
                    &model,
                    batch,
                    args.seq.unwrap_or(128),
                    args.new_tokens,
                    args.engine,
                    args.speculation.serve_speculation()?.0,
                    draft.as_ref(),
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
