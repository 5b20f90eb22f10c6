//! `philo bench`: throughput of prefill and decode, on a checkpoint or a random model of the
//! Phi-3-mini shape built in memory (speed does not depend on the weight values).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use philo_model::memory::peak_memory_gib;
use philo_model::tiny::device_random_weights;
use philo_model::{Phi3, Phi3Config};
use serde::Serialize;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub task: String,
    pub device: String,
    pub dtype: String,
    pub layers: usize,
    pub batch: usize,
    pub seq: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Peak memory of the process (CPU: resident set; GPU: device memory in use), GiB.
    pub peak_memory_gib: Option<f64>,
    /// Decode: host time per step spent issuing the forward (before waiting for its result), ms.
    /// Close to the whole step time means the host, not the GPU, sets the pace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ms_per_step: Option<f64>,
    /// Decode: which step ran (`graph`, `kernels` or `candle`, see [`DecodeEngine`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Serve: the paged KV pool the engine ran with (every stream's blocks), GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_pool_gib: Option<f64>,
}

/// How `bench decode` runs a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeEngine {
    /// philo's decode kernels captured in one CUDA graph per step (what generate runs).
    Graph,
    /// The same kernels launched one by one (what the graph saves).
    Kernels,
    /// The graph with the decoder layers of a step of up to 16 rows in one persistent kernel
    /// (`bench decode` of few sequences and the verify steps' cost curve, `bench serve`'s steps
    /// of few rows; dense, INT8, INT4 or NF4 weights; else as `graph`).
    Layers,
    /// The general forward through candle with a growing KV cache.
    Candle,
}

/// A random model of `config` with only `layers` decoder layers (all when None).
pub fn random_model(
    config: &Phi3Config,
    layers: Option<usize>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Phi3> {
    let mut config = config.clone();
    if let Some(layers) = layers {
        config.num_hidden_layers = layers;
    }
    let weights = device_random_weights(&config, dtype, device)?;
    Ok(Phi3::load(&config, &weights, dtype, device)?)
}

fn synchronize(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

fn random_prompt(
    batch: usize,
    len: usize,
    vocab: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| ((i * 7919 + 13) % (vocab - 100)) as u32 + 100)
        .collect();
    Ok(Tensor::from_vec(ids, (batch, len), device)?)
}

fn describe(model: &Phi3) -> (String, String, usize) {
    let device = if model.device().is_cuda() {
        "cuda"
    } else {
        "cpu"
    };
    (
        device.into(),
        format!("{:?}", model.dtype()).to_lowercase(),
        model.config().num_hidden_layers,
    )
}

/// Prefill of `batch` × `seq` tokens (logits of the last position only), best of `repeats`.
pub fn prefill(
    model: &Phi3,
    batch: usize,
    seq: usize,
    repeats: usize,
) -> anyhow::Result<BenchResult> {
    let input = random_prompt(batch, seq, model.config().vocab_size, model.device())?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) + 1 {
        synchronize(model.device())?;
        let start = Instant::now();
        let logits = model.forward_last(&input, None, None)?;
        let _ = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    let (device, dtype, layers) = describe(model);
    let tokens = batch * seq;
    Ok(BenchResult {
        task: "prefill".into(),
        device,
        dtype,
        layers,
        batch,
        seq,
        tokens,
        seconds: best,
        tokens_per_second: tokens as f64 / best,
        peak_memory_gib: peak_memory_gib(model.device()),
        host_ms_per_step: None,
        kv_pool_gib: None,
        engine: None,
    })
}

/// Greedy decoding of `new_tokens` per sequence after a `prompt_len` prefill, `batch` sequences,
/// on `engine` (the graph engines fall back to candle where the model or batch does not fit
/// them; the result names the engine that ran); with `adapter`, every sequence runs with it
/// unmerged, as `philo serve` runs requests that name one (decode kernels only).
pub fn decode(
    model: &Phi3,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    engine: DecodeEngine,
    adapter: Option<&philo_model::Adapter>,
) -> anyhow::Result<BenchResult> {
    if engine != DecodeEngine::Candle {
        let capture = engine != DecodeEngine::Kernels;
        let capacity = prompt_len + new_tokens + 1;
        // The persistent kernel where it takes the batch (with 9-16 sequences on a quantised
        // base, the only graph that does), else the launch-per-kernel graph.
        let graph = match engine == DecodeEngine::Layers && adapter.is_none() {
            true => philo_model::DecodeGraph::with_persistent_layers(model, batch, capacity, true)?,
            false => philo_model::DecodeGraph::new(model, batch, capacity, capture)?,
        };
        if let Some(mut graph) = graph {
            if let Some(adapter) = adapter {
                graph.set_adapter(model, adapter)?;
            }
            let ran = match engine {
                DecodeEngine::Layers if !graph.persistent_layers() => DecodeEngine::Graph,
                other => other,
            };
            return decode_graph(model, graph, batch, prompt_len, new_tokens, ran);
        }
    }
    anyhow::ensure!(
        adapter.is_none(),
        "bench decode --adapter runs on the decode kernels (--engine graph or kernels, a CUDA GPU, bf16/f16)"
    );
    let device = model.device();
    let prompt = random_prompt(batch, prompt_len, model.config().vocab_size, device)?;
    let mut cache = model.new_cache();
    let logits = model.forward_last(&prompt, None, Some(&mut cache))?;
    let mut next = logits.argmax(D::Minus1)?.unsqueeze(1)?;
    synchronize(device)?;
    let start = Instant::now();
    let mut issuing = 0f64;
    for _ in 0..new_tokens {
        let issue = Instant::now();
        let logits = model.forward_last(&next, None, Some(&mut cache))?;
        let argmax = logits.argmax(D::Minus1)?;
        issuing += issue.elapsed().as_secs_f64();
        // Reading the ids back each step is what a real generation loop does.
        let ids = argmax.to_vec1::<u32>()?;
        next = Tensor::from_vec(ids, (batch, 1), device)?;
    }
    synchronize(device)?;
    let seconds = start.elapsed().as_secs_f64();
    let steps = DecodeSteps {
        batch,
        prompt_len,
        new_tokens,
        seconds,
        issuing,
    };
    Ok(steps.result(model, "candle"))
}

/// What `bench decode --speculative` measured: plain greedy decoding and the same with
/// speculation, on one prompt, batch 1.
#[derive(Debug, Clone, Serialize)]
pub struct SpeculativeDecode {
    /// `ngram` or `draft`.
    pub proposer: String,
    pub max_tokens: usize,
    pub plain_tokens_per_second: f64,
    pub tokens_per_second: f64,
    pub proposed: usize,
    pub accepted: usize,
    pub verify_steps: usize,
    /// New tokens per verify step (accepted proposals plus the model's own token).
    pub tokens_per_verify_step: f64,
    /// Whether the speculative output was the plain one, token for token. In f32 it must be; in
    /// bf16/f16 the verify step's batched kernels round differently from a single-token step,
    /// which on near-tied logits (random weights) can pick another token.
    pub same_output: bool,
    /// The first generated token where the two outputs differ.
    pub first_difference: Option<usize>,
    /// The cost of a verify step by proposal length (k = 0 is a plain step).
    pub verify_cost: Vec<VerifyCost>,
}

/// One verify step's time: a forward over the last token and `k` proposals.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyCost {
    pub k: usize,
    pub ms: f64,
    /// Relative to a plain one-token step.
    pub relative: f64,
}

/// The time of a forward over 1 + k tokens after `prompt_len` cached ones, k = 0..=max_k, where
/// speculation verifies: the decode graph's multi-row step where the model has one (as many
/// k as it takes; its layers in the persistent kernel when `persistent`, up to the rows it
/// takes), else the general path; each the mean of 8 after a warm-up.
pub fn verify_cost_curve(
    model: &Phi3,
    prompt_len: usize,
    max_k: usize,
    persistent: bool,
) -> anyhow::Result<Vec<VerifyCost>> {
    let device = model.device();
    let vocab = model.config().vocab_size;
    if let Some(mut graph) = philo_model::DecodeGraph::new(model, 1, prompt_len + max_k + 2, true)?
    {
        graph.set_persistent_layers(persistent);
        let prompt: Vec<u32> = (0..prompt_len.max(1))
            .map(|i| (i * 7919 % vocab) as u32)
            .collect();
        graph.prefill(model, 0, &prompt, false)?;
        let cached = prompt.len();
        return cost_curve(max_k.min(graph.verify_rows() - 1), |k| {
            let ids: Vec<u32> = (0..=k).map(|i| (i * 31 + 7) as u32).collect();
            let start = Instant::now();
            graph.verify(0, &ids)?;
            graph.tokens()?;
            let seconds = start.elapsed().as_secs_f64();
            graph.rewind(0, cached)?;
            Ok(seconds)
        });
    }
    let prompt = random_prompt(1, prompt_len.max(1), vocab, device)?;
    let mut cache = model.new_cache();
    model.forward_last(&prompt, None, Some(&mut cache))?;
    let cached = cache.seq_len();
    cost_curve(max_k, |k| {
        let ids = random_prompt(1, k + 1, vocab, device)?;
        let start = Instant::now();
        let logits = model.forward(&ids, None, Some(&mut cache))?;
        logits
            .to_dtype(candle_core::DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let seconds = start.elapsed().as_secs_f64();
        cache.truncate(cached)?;
        Ok(seconds)
    })
}

/// The cost of `verify(k)` (seconds of one verify step of k proposals) for k = 0..=max_k: the
/// mean of 8 after two warm-ups (the decode step runs a row count's first step launch by launch
/// and captures its graph on the second), relative to k = 0.
fn cost_curve(
    max_k: usize,
    mut verify: impl FnMut(usize) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<VerifyCost>> {
    let mut curve: Vec<VerifyCost> = Vec::with_capacity(max_k + 1);
    for k in 0..=max_k {
        verify(k)?;
        verify(k)?;
        let reps = 8;
        let mut total = 0.0;
        for _ in 0..reps {
            total += verify(k)?;
        }
        let ms = total * 1e3 / reps as f64;
        let relative = curve.first().map_or(1.0, |plain| ms / plain.ms);
        curve.push(VerifyCost { k, ms, relative });
    }
    Ok(curve)
}

/// Greedy decoding of `new_tokens` after a `prompt_len`-token prompt (a run of consecutive ids
/// from 1,024, twice, so prompt lookup finds matches; `scripts/write_random_phi3.py
/// --copy_cycle 64` writes a model that repeats it), plain and speculating with `draft` (a
/// model with the same vocabulary) or by prompt lookup, proposing at most `max_tokens` a step;
/// both on the decode graph where the model has one, its layers (and the verify steps' cost
/// curve) in the persistent kernel when `persistent`.
pub fn speculative_decode(
    model: &Phi3,
    draft: Option<&Phi3>,
    prompt_len: usize,
    new_tokens: usize,
    max_tokens: usize,
    persistent: bool,
) -> anyhow::Result<SpeculativeDecode> {
    use philo_generate::{SamplingParams, TokenStream};
    let vocab = model.config().vocab_size;
    let half = (prompt_len / 2).max(1);
    let piece: Vec<u32> = (0..half).map(|i| ((1024 + i) % vocab) as u32).collect();
    let prompt = [piece.clone(), piece].concat();
    let run = |speculate: bool| -> anyhow::Result<(Vec<u32>, f64, TokenStream<'_>)> {
        let mut stream = TokenStream::new(model, prompt.clone(), SamplingParams::greedy())?;
        if speculate {
            stream = match draft {
                Some(draft) => stream.with_draft(draft, max_tokens)?,
                None => stream.with_speculation(max_tokens),
            };
        }
        let mut stream = match persistent {
            true => stream.use_persistent_decode_graph(new_tokens + 1)?,
            false => stream.use_decode_graph(new_tokens + 1)?,
        };
        // The first token (the prefill) is not timed.
        let mut out = vec![stream.next_token()?];
        synchronize(model.device())?;
        let start = Instant::now();
        for _ in 1..new_tokens.max(2) {
            out.push(stream.next_token()?);
        }
        let rate = (out.len() - 1) as f64 / start.elapsed().as_secs_f64();
        Ok((out, rate, stream))
    };
    // Each path once untimed first: a fresh process's first steps pay one-time costs (the driver
    // compiling PTX, cuBLAS choosing kernels for each row count) that would land on whichever
    // path ran first (on a fresh H200, plain decoding measured 176 tok/s first, 216 warm).
    run(false)?;
    run(true)?;
    let (plain, plain_rate, _) = run(false)?;
    let (fast, rate, stream) = run(true)?;
    let (proposed, accepted) = stream.speculation_counts();
    let verify_steps = stream.verify_steps();
    let first_difference = plain
        .iter()
        .zip(&fast)
        .position(|(a, b)| a != b)
        .or_else(|| (plain.len() != fast.len()).then(|| plain.len().min(fast.len())));
    Ok(SpeculativeDecode {
        proposer: if draft.is_some() { "draft" } else { "ngram" }.into(),
        max_tokens,
        plain_tokens_per_second: plain_rate,
        tokens_per_second: rate,
        proposed,
        accepted,
        verify_steps,
        tokens_per_verify_step: (accepted + verify_steps) as f64 / verify_steps.max(1) as f64,
        same_output: first_difference.is_none(),
        first_difference,
        verify_cost: verify_cost_curve(model, prompt.len(), 8, persistent)?,
    })
}

/// What a decode run measured, for its [`BenchResult`].
struct DecodeSteps {
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    seconds: f64,
    /// Host time spent issuing the steps.
    issuing: f64,
}

impl DecodeSteps {
    fn result(&self, model: &Phi3, engine: &str) -> BenchResult {
        let (device, dtype, layers) = describe(model);
        let tokens = self.batch * self.new_tokens;
        BenchResult {
            task: "decode".into(),
            device,
            dtype,
            layers,
            batch: self.batch,
            seq: self.prompt_len,
            tokens,
            seconds: self.seconds,
            tokens_per_second: tokens as f64 / self.seconds,
            peak_memory_gib: peak_memory_gib(model.device()),
            host_ms_per_step: Some(self.issuing * 1e3 / self.new_tokens.max(1) as f64),
            kv_pool_gib: None,
            engine: Some(engine.into()),
        }
    }
}

/// [`decode`] on a [`philo_model::DecodeGraph`]: the greedy ids come back each step, as in a
/// generation loop; a step that crosses LongRoPE's switch recomputes the sequences, as
/// generate does.
fn decode_graph(
    model: &Phi3,
    mut graph: philo_model::DecodeGraph,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    engine: DecodeEngine,
) -> anyhow::Result<BenchResult> {
    let prompt = random_prompt(batch, prompt_len, model.config().vocab_size, &Device::Cpu)?;
    let mut seqs = prompt.to_vec2::<u32>()?;
    let rotary = model.rotary();
    let prefill_all = |graph: &mut philo_model::DecodeGraph, seqs: &[Vec<u32>]| {
        seqs.iter()
            .enumerate()
            .map(|(row, ids)| {
                let long = rotary.uses_long_factors(ids.len() - 1);
                let logits = graph.prefill(model, row, ids, long)?;
                Ok(philo_generate::sampling::argmax(&logits))
            })
            .collect::<anyhow::Result<Vec<u32>>>()
    };
    let mut next = prefill_all(&mut graph, &seqs)?;
    synchronize(model.device())?;
    let start = Instant::now();
    let mut issuing = 0f64;
    for _ in 0..new_tokens {
        for (ids, &t) in seqs.iter_mut().zip(&next) {
            ids.push(t);
        }
        let last = seqs[0].len() - 1;
        if rotary.switches_between(last - 1, last) {
            next = prefill_all(&mut graph, &seqs)?;
            continue;
        }
        let issue = Instant::now();
        graph.step(&next)?;
        issuing += issue.elapsed().as_secs_f64();
        next = graph.tokens()?;
    }
    synchronize(model.device())?;
    let seconds = start.elapsed().as_secs_f64();
    philo_kernels::profile::report(&format!("{new_tokens} decode steps"))?;
    let steps = DecodeSteps {
        batch,
        prompt_len,
        new_tokens,
        seconds,
        issuing,
    };
    Ok(steps.result(model, &format!("{engine:?}").to_lowercase()))
}

/// A fixed-width table of results.
pub fn table(results: &[BenchResult]) -> String {
    let mut out = format!(
        "{:<8} {:<5} {:<5} {:>6} {:>6} {:>6} {:>10} {:>12} {:>9}  {}\n",
        "task",
        "dev",
        "dtype",
        "layers",
        "batch",
        "seq",
        "seconds",
        "tokens/s",
        "peak GiB",
        "engine"
    );
    for r in results {
        let peak = r
            .peak_memory_gib
            .map_or("-".to_string(), |g| format!("{g:.2}"));
        out.push_str(&format!(
            "{:<8} {:<5} {:<5} {:>6} {:>6} {:>6} {:>10.3} {:>12.1} {:>9}  {}\n",
            r.task,
            r.device,
            r.dtype,
            r.layers,
            r.batch,
            r.seq,
            r.seconds,
            r.tokens_per_second,
            peak,
            r.engine.as_deref().unwrap_or("")
        ));
    }
    out
}

/// What `philo bench train` measures: LoRA or QLoRA optimizer steps on random tokens.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    pub alpha: f64,
    /// NF4 base (QLoRA, double-quantised scales) or the dense compute dtype (LoRA).
    pub quant: crate::quant::BaseQuant,
    /// Timed optimizer steps, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// Keep the gradient checkpoints in pinned host memory (GPU).
    pub offload: bool,
    /// LoRA dropout probability (finetune's default 0.05; Unsloth's recipe uses 0).
    pub lora_dropout: f32,
    /// Decoder layers at the end that keep their activations instead of being recomputed.
    pub uncheckpointed_layers: usize,
}

/// Tokens/s of LoRA training with gradient checkpointing on all four projection types, one
/// micro-batch per optimizer step, as `philo finetune` runs it. Peak memory is measured from
/// after quantisation (a real load quantises layer by layer, so the dense copy never coexists).
pub fn train(mut model: Phi3, options: &TrainBench) -> anyhow::Result<BenchResult> {
    use philo_model::adapter::{AdapterConfig, TARGET_MODULES};
    use philo_train::adamw::{AdamW, AdamWConfig};
    use philo_train::backward::{MicroBatch, PassOptions, StepContext};
    use philo_train::lora_params::LoraParams;
    use philo_train::step::{train_step, StepConfig, WindowBatch};

    let device = model.device().clone();
    model.quantize(options.quant.format(true))?;
    synchronize(&device)?;
    philo_model::memory::reset_peak_memory(&device);
    let config = AdapterConfig::new(
        options.rank,
        options.alpha,
        options.lora_dropout,
        TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        false,
    );
    let params = LoraParams::init(&mut model, &config, 0)?;
    let mut optimizer = AdamW::new(AdamWConfig::default(), &params)?;
    let (b, s) = (options.batch, options.seq);
    let input_ids = random_prompt(b, s, model.config().vocab_size, &device)?;
    let labels: Vec<Vec<i64>> = input_ids
        .to_vec2::<u32>()?
        .into_iter()
        .map(|row| row.into_iter().map(i64::from).collect())
        .collect();
    let window = |i: usize| {
        [WindowBatch {
            batch: MicroBatch {
                input_ids: input_ids.clone(),
                segments: None,
                labels: labels.clone(),
            },
            dropout: philo_model::DropoutSeed(i as u64),
        }]
    };
    let config = StepConfig {
        lr: 2e-4,
        max_grad_norm: Some(1.0),
        pass: PassOptions {
            checkpointing: true,
            offload: options.offload,
            uncheckpointed_layers: options.uncheckpointed_layers,
        },
    };
    let mut context = StepContext::new(&device, model.dtype());
    let mut step = |i: usize| -> anyhow::Result<()> {
        train_step(
            &model,
            &params,
            &mut optimizer,
            &window(i),
            config,
            &mut context,
            &philo_train::comm::SingleProcess,
        )?;
        Ok(())
    };
    for i in 0..options.warmup {
        step(i)?;
    }
    synchronize(&device)?;
    let start = Instant::now();
    for i in 0..options.steps.max(1) {
        step(options.warmup + i)?;
    }
    synchronize(&device)?;
    let seconds = start.elapsed().as_secs_f64();
    let (device_name, dtype, layers) = describe(&model);
    let tokens = b * s * options.steps.max(1);
    Ok(BenchResult {
        task: format!(
            "train-{}",
            match options.quant {
                crate::quant::BaseQuant::Nf4 => "qlora".to_string(),
                crate::quant::BaseQuant::None => "lora".to_string(),
                other => format!("lora-{}", other.name()),
            }
        ),
        device: device_name,
        dtype,
        layers,
        batch: b,
        seq: s,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        peak_memory_gib: peak_memory_gib(&device),
        host_ms_per_step: None,
        kv_pool_gib: None,
        engine: None,
    })
}

/// `streams` concurrent requests through the serving engine (continuous batching over the paged
/// KV cache), each a `prompt_len`-token prompt and exactly `new_tokens` greedy tokens: aggregate
/// generated tokens per second from the first submission to the last token. `engine` picks how
/// the decode-only steps run (the graph; the same kernels launched one by one; candle's forward);
/// `speculative_tokens` turns on the engine's speculation: with `draft`'s proposals, else prompt
/// lookup.
pub fn serve(
    model: &Phi3,
    streams: usize,
    prompt_len: usize,
    new_tokens: usize,
    decode: DecodeEngine,
    speculative_tokens: Option<usize>,
    draft: Option<&Phi3>,
) -> anyhow::Result<BenchResult> {
    use philo_serve::engine::{DecodePath, EngineConfig, EngineHandle};
    use philo_serve::request::{Backend, GenerationEvent, GenerationRequest};
    let block_size = 16;
    let per_stream = (prompt_len + new_tokens).div_ceil(block_size);
    // Every stream's blocks, and the one the warm-up request takes.
    let num_blocks = streams * per_stream + 1;
    let kv_gib = (num_blocks
        * philo_model::PagedKvCache::bytes_per_block(model.config(), block_size, model.dtype()))
        as f64
        / (1u64 << 30) as f64;
    let config = EngineConfig {
        model_id: "bench".into(),
        max_running: streams,
        max_tokens_per_step: 4096,
        max_queue: streams,
        block_size,
        num_blocks,
        decode_path: match decode {
            DecodeEngine::Graph => DecodePath::Graph,
            DecodeEngine::Layers => DecodePath::Layers,
            DecodeEngine::Kernels => DecodePath::Kernels,
            DecodeEngine::Candle => DecodePath::Eager,
        },
        speculative_tokens,
    };
    let vocab = model.config().vocab_size;
    let drafts = match draft {
        Some(draft) if speculative_tokens.is_some() => Some(philo_serve::draft::DraftPool::new(
            draft.clone(),
            philo_serve::draft::STATES,
            prompt_len + new_tokens + 1,
            vocab,
        )?),
        _ => None,
    };
    let engine = EngineHandle::start_with_draft(model.clone(), config, Vec::new(), drafts)?;
    let request = |i: usize| GenerationRequest {
        model: "bench".into(),
        // Distinct prompts, so no prefix blocks are shared.
        prompt: (0..prompt_len)
            .map(|j| ((i * 104_729 + j * 7919 + 13) % (vocab - 100)) as u32 + 100)
            .collect(),
        max_tokens: new_tokens,
        sampling: philo_generate::SamplingParams::greedy(),
        stop_token_ids: Vec::new(),
        constraint: None,
    };
    // One warm-up request (kernel loading, allocator growth) outside the measurement.
    let mut warm = engine.submit(request(streams))?;
    while !matches!(
        warm.blocking_recv(),
        None | Some(GenerationEvent::Finished(_) | GenerationEvent::Failed(_))
    ) {}
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(streams);
    for i in 0..streams {
        receivers.push(engine.submit(request(i))?);
    }
    let mut tokens = 0;
    for mut rx in receivers {
        while let Some(event) = rx.blocking_recv() {
            match event {
                GenerationEvent::Token(_) => tokens += 1,
                GenerationEvent::Failed(e) => anyhow::bail!("bench serve: a request failed: {e}"),
                GenerationEvent::Finished(_) => break,
                GenerationEvent::Started { .. } => {}
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    engine.shutdown();
    engine.join();
    anyhow::ensure!(
        tokens == streams * new_tokens,
        "bench serve: expected {} tokens, got {tokens}",
        streams * new_tokens
    );
    let (device, dtype, layers) = describe(model);
    let run = match speculative_tokens {
        None => format!(
            "{}, {} of {} steps general",
            format!("{decode:?}").to_lowercase(),
            stats.general_steps_total,
            stats.steps_total
        ),
        Some(k) => format!(
            "{} + {} k≤{k}: {} of {} proposed accepted",
            format!("{decode:?}").to_lowercase(),
            if draft.is_some() { "draft" } else { "ngram" },
            stats.spec_accepted_tokens_total,
            stats.spec_proposed_tokens_total
        ),
    };
    Ok(BenchResult {
        task: "serve".into(),
        device,
        dtype,
        layers,
        batch: streams,
        seq: prompt_len,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        peak_memory_gib: peak_memory_gib(model.device()),
        host_ms_per_step: None,
        kv_pool_gib: Some(kv_gib),
        engine: Some(format!(
            "{run}, KV pool {num_blocks} blocks of {block_size} ({kv_gib:.2} GiB)"
        )),
    })
}

/// Speed of philo's flash attention on the model's attention shape.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionBench {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Causal FLOPs (half of the full 4·b·h·s²·d forward, 2.5× that for the backward) per second.
    pub forward_tflops: f64,
    pub backward_tflops: f64,
}

/// Times flash attention forward and backward (causal, no padding) on random q/k/v
/// `[batch, heads, seq, head_dim]` of `dtype` as training runs them (the backward to the fused
/// QKV projection's gradient): the median of `repeats` runs after a warm-up.
pub fn attention(
    config: &Phi3Config,
    batch: usize,
    seq: usize,
    dtype: DType,
    device: &Device,
    repeats: usize,
) -> anyhow::Result<AttentionBench> {
    use philo_kernels::attention::{flash_backward_qkv, flash_forward, AttentionMask};
    let (h, kvh, d, rd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.rope.rotary_dim,
    );
    // What a training layer holds: rotated q, k and v of one fused projection, and the RoPE
    // tables whose rotation the backward inverts.
    let heads = Tensor::randn(0f32, 1.0, (batch, h + 2 * kvh, seq, d), device)?.to_dtype(dtype)?;
    let (q, k, v) = (
        heads.narrow(1, 0, h)?,
        heads.narrow(1, h, kvh)?,
        heads.narrow(1, h + kvh, kvh)?,
    );
    let table = || -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (batch, seq, rd / 2), device)?.to_dtype(dtype)?)
    };
    let (cos, sin) = (table()?, table()?);
    let dout = Tensor::randn(0f32, 1.0, (batch, seq, h, d), device)?.to_dtype(dtype)?;
    let mask = AttentionMask {
        window: usize::MAX,
        segments: None,
    };
    let time = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        synchronize(device)?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            f()?;
            synchronize(device)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let forward = time(&|| {
        flash_forward(&q, &k, &v, &mask)?;
        Ok(())
    })?;
    let (out, lse) = flash_forward(&q, &k, &v, &mask)?;
    // The training step's backward: to the QKV projection's gradient, RoPE inverted.
    let backward = time(&|| {
        flash_backward_qkv(
            &heads,
            kvh,
            &out,
            &lse,
            &dout,
            &mask,
            Some((&cos, &sin, rd)),
        )?;
        Ok(())
    })?;
    let flops = 2.0 * (batch * h * seq * seq * d) as f64;
    Ok(AttentionBench {
        batch,
        heads: h,
        seq,
        head_dim: d,
        forward_ms: forward * 1e3,
        backward_ms: backward * 1e3,
        forward_tflops: flops / forward / 1e12,
        backward_tflops: 2.5 * flops / backward / 1e12,
    })
}
