//! The scheduler loop: one thread owns the model, the paged KV cache and the adapters, and runs
//! steps for as long as there is work. Each step the [`Scheduler`] picks the sequences and their
//! chunks; the model runs them in one batch; each sequence that reached its last token samples
//! one and sends it to its request. A request whose receiver is gone is cancelled and its blocks
//! are freed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use philo_generate::speculative::{greedy_kept, prompt_lookup, Speculation};
use philo_generate::{token_logprobs, GpuSampling, Sampler, TokenCounts};
use philo_model::{
    Adapter, DecodeRow, DecodeStep, LoraBank, PagedKvCache, Phi3, RowSampling, SeqChunk,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use crate::constraint::JsonConstraint;
use crate::draft::DraftPool;
use crate::request::{
    Backend, EngineStats, FinishReason, GenerationEvent, GenerationRequest, ModelInfo,
    SampledToken, SubmitError, UnloadError,
};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqStatus};
use crate::step_profile::StepProfile;

/// Sizes and budgets of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The id under which the base model is served.
    pub model_id: String,
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Token budget of one step (decode tokens + prompt chunk tokens).
    pub max_tokens_per_step: usize,
    /// Requests allowed to wait for a place in the batch; more get 429.
    pub max_queue: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// How steps that only decode run on a GPU.
    pub decode_path: DecodePath,
    /// Speculative decoding, proposing up to this many tokens per sequence and step (None:
    /// off): by prompt lookup, or by the draft model of [`EngineHandle::start_with_draft`]. It
    /// runs on the decode step only, and only while the step's rows (each sequence's last token
    /// and its proposals) number at most 8
    /// (`DecodeStep::MAX_GEMV_ROWS`), so up to 4 decoding sequences with (8 / sequences) − 1
    /// proposals each: there a step of 8 rows costs 1.2-1.3× one of a single row (H200), while
    /// with more sequences every extra row adds weight and KV traffic that rejected guesses
    /// waste.
    pub speculative_tokens: Option<usize>,
}

/// How the engine runs a step in which every sequence decodes one token (no prompt chunk; rows
/// of adapters the kernels hold, see `DecodeStep::set_adapters`): on a GPU with philo's decode kernels (see `philo_model::DecodeStep`), captured
/// in one CUDA graph per batch size, or as every other step runs (`Phi3::forward_paged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodePath {
    /// The decode kernels, one CUDA graph per batch size (captured on its second step; the
    /// first launches them one by one).
    #[default]
    Graph,
    /// The same kernels launched one by one (`PHILO_PROFILE=1` times each).
    Kernels,
    /// As `Graph`, with the decoder layers of steps of up to 16 rows without adapters in one
    /// persistent kernel (see `DecodeStep::set_persistent_layers`).
    Layers,
    /// The general forward op by op, as vLLM's --enforce-eager.
    Eager,
}

impl EngineConfig {
    /// Blocks that fit in `bytes` of KV cache for `model`.
    pub fn blocks_for_bytes(model: &Phi3, block_size: usize, bytes: usize) -> usize {
        bytes / PagedKvCache::bytes_per_block(model.config(), block_size, model.dtype())
    }
}

enum Command {
    Submit {
        id: u64,
        request: Box<GenerationRequest>,
        adapter: Option<usize>,
        events: UnboundedSender<GenerationEvent>,
    },
    LoadAdapter {
        name: String,
        adapter: Box<Adapter>,
        reply: oneshot::Sender<Result<ModelInfo, String>>,
    },
    /// The adapter of this bank slot is no longer served; free it once idle.
    UnloadAdapter { slot: usize },
}

/// What the handle knows about the served models: name → adapter slot (None: the base).
struct Models {
    infos: Vec<ModelInfo>,
    slots: HashMap<String, Option<usize>>,
}

/// State shared by the handle and the loop.
struct Shared {
    models: RwLock<Models>,
    stats: Mutex<EngineStats>,
    /// Requests submitted and not yet running: what the admission bound counts.
    waiting: AtomicUsize,
    shutting_down: AtomicBool,
}

impl Shared {
    /// The statistics, locked; a thread that panicked holding them leaves them readable.
    fn stats(&self) -> std::sync::MutexGuard<'_, EngineStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The engine as seen from the HTTP layer (implements [`Backend`]).
pub struct EngineHandle {
    commands: Mutex<Sender<Command>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    config: EngineConfig,
    context: usize,
    vocab: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl EngineHandle {
    /// Starts the scheduler loop on its own thread with `model`, a KV cache of
    /// `config.num_blocks` blocks, and `adapters` (name, adapter) loaded up front.
    pub fn start(
        model: Phi3,
        config: EngineConfig,
        adapters: Vec<(String, Adapter)>,
    ) -> anyhow::Result<EngineHandle> {
        Self::start_with_draft(model, config, adapters, None)
    }

    /// [`EngineHandle::start`], speculating with `draft`'s proposals instead of prompt lookup
    /// where `config.speculative_tokens` turns speculation on.
    pub fn start_with_draft(
        model: Phi3,
        config: EngineConfig,
        adapters: Vec<(String, Adapter)>,
        draft: Option<DraftPool>,
    ) -> anyhow::Result<EngineHandle> {
        anyhow::ensure!(
            config.num_blocks > 0 && config.block_size > 0,
            "the KV cache needs at least one block of at least one token"
        );
        let cache = PagedKvCache::new(
            model.config(),
            config.num_blocks,
            config.block_size,
            model.dtype(),
            model.device(),
        )?;
        let mut bank = LoraBank::new();
        let created = now_secs();
        let mut models = Models {
            infos: vec![ModelInfo {
                id: config.model_id.clone(),
                parent: None,
                created,
            }],
            slots: HashMap::from([(config.model_id.clone(), None)]),
        };
        for (name, adapter) in &adapters {
            anyhow::ensure!(
                !models.slots.contains_key(name),
                "two models are named `{name}`; give each --adapter its own NAME"
            );
            let slot = bank
                .insert(adapter, &model)
                .map_err(|e| anyhow::anyhow!("adapter `{name}`: {e}"))?;
            models.slots.insert(name.clone(), Some(slot));
            models.infos.push(ModelInfo {
                id: name.clone(),
                parent: Some(config.model_id.clone()),
                created,
            });
        }
        // Positions beyond what the cache can hold can never be served.
        let vocab = model.config().vocab_size;
        let context = model
            .config()
            .max_position_embeddings
            .min(config.num_blocks * config.block_size);
        let shared = Arc::new(Shared {
            models: RwLock::new(models),
            stats: Mutex::new(EngineStats {
                kv_blocks_free: config.num_blocks,
                kv_block_size: config.block_size,
                ..EngineStats::default()
            }),
            waiting: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        });
        let mut decode = match config.decode_path {
            DecodePath::Eager => None,
            path => DecodeStep::new(
                &model,
                &cache,
                // Joining prompts' tokens ride along (see `rides_decode_step`); speculation's steps
                // take up to the fused GEMV's rows, however few sequences run.
                (config.max_running + DECODE_STEP_PROMPT_ROWS.min(config.max_tokens_per_step))
                    .max(DecodeStep::MAX_GEMV_ROWS),
                context,
                path != DecodePath::Kernels,
            )?,
        };
        if let Some(decode) = decode.as_mut() {
            decode.set_adapters(&bank)?;
            let layers = config.decode_path == DecodePath::Layers;
            if decode.set_persistent_layers(layers) == 0 && layers {
                eprintln!(
                    "philo serve: the persistent layers kernel does not take this model; decode steps run as a CUDA graph of one launch per kernel"
                );
            }
        }
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(SchedulerConfig {
            max_running: config.max_running,
            max_tokens_per_step: config.max_tokens_per_step,
            // The handle bounds admission; the scheduler's queue only has to hold what it lets in.
            max_queue: usize::MAX,
            num_blocks: config.num_blocks,
            block_size: config.block_size,
        });
        let engine = Engine {
            model,
            cache,
            decode,
            bank,
            unloading: Vec::new(),
            scheduler,
            sequences: HashMap::new(),
            commands: rx,
            shared: shared.clone(),
            model_id: config.model_id.clone(),
            speculative_tokens: config.speculative_tokens,
            drafts: draft.filter(|_| config.speculative_tokens.is_some()),
            profile: StepProfile::from_env(),
        };
        let thread = std::thread::Builder::new()
            .name("philo-engine".into())
            .spawn(move || engine.run())?;
        Ok(EngineHandle {
            commands: Mutex::new(tx),
            shared,
            next_id: AtomicU64::new(0),
            config,
            context,
            vocab,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits for the loop to end (after [`Backend::shutdown`] and the last sequence).
    pub fn join(&self) {
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn send(&self, command: Command) -> Result<(), SubmitError> {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(command)
            .map_err(|_| SubmitError::ShuttingDown)
    }
}

impl Backend for EngineHandle {
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let adapter = match self
            .shared
            .models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .get(&request.model)
        {
            Some(slot) => *slot,
            None => return Err(SubmitError::UnknownModel(request.model.clone())),
        };
        if request.prompt.is_empty() || request.prompt.len() + request.max_tokens > self.context {
            return Err(SubmitError::ContextOverflow {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context: self.context,
            });
        }
        let queued = self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        if queued >= self.config.max_queue {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull {
                queued,
                retry_after_secs: 1,
            });
        }
        let (events, receiver) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sent = self.send(Command::Submit {
            id,
            request: Box::new(request),
            adapter,
            events,
        });
        if sent.is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        sent.map(|_| receiver)
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.shared
            .models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .infos
            .clone()
    }

    fn context_length(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn load_adapter(
        &self,
        name: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ModelInfo, String>> + Send>>
    {
        let taken = self
            .shared
            .models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .contains_key(&name);
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(async move {
            if taken {
                return Err(format!(
                    "a model named `{name}` is already loaded; pick another name"
                ));
            }
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("`{name}` is not a usable model name: use letters, digits, '-', '_', '.' or '/'"));
            }
            // Reading the files is blocking work: keep it off the async runtime's threads.
            let adapter = tokio::task::spawn_blocking(move || Adapter::load(&dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::LoadAdapter {
                    name,
                    adapter: Box::new(adapter),
                    reply,
                })
                .map_err(|_| "the server is shutting down".to_string())?;
            answer
                .await
                .map_err(|_| "the server is shutting down".to_string())?
        })
    }

    fn unload_adapter(&self, name: &str) -> Result<(), UnloadError> {
        let slot = {
            let mut models = self
                .shared
                .models
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let slot = match models.slots.get(name) {
                None => return Err(UnloadError::NotFound(name.to_string())),
                Some(None) => return Err(UnloadError::BaseModel(name.to_string())),
                Some(Some(slot)) => *slot,
            };
            models.slots.remove(name);
            models.infos.retain(|info| info.id != name);
            slot
        };
        // New requests can no longer name it; the loop frees the weights when the running
        // ones are done. A loop that is gone has nothing left to free.
        let _ = self.send(Command::UnloadAdapter { slot });
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        let mut stats = self.shared.stats().clone();
        stats.queue_depth = self.shared.waiting.load(Ordering::SeqCst);
        stats
    }

    fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }
}

/// One live sequence on the loop's side.
struct Sequence {
    events: UnboundedSender<GenerationEvent>,
    /// The adapter's bank slot.
    adapter: Option<usize>,
    sampler: Sampler,
    /// Prompt and generated tokens, for the repetition penalties.
    tokens: Vec<u32>,
    /// How often each of `tokens` occurs: the penalties on the GPU.
    counts: TokenCounts,
    stop_token_ids: Vec<u32>,
    /// The request's `response_format` grammar, advanced token by token.
    constraint: Option<JsonConstraint>,
    long_rope: bool,
    /// Whether it has left the waiting queue (the admission bound no longer counts it).
    started: bool,
    /// The seed of its draws on the GPU (the request's, or a random one).
    gpu_seed: u64,
    /// How many tokens to propose, when the engine speculates and the request allows it (no
    /// grammar, no log-probabilities).
    speculation: Option<Speculation>,
}

impl Sequence {
    /// How the GPU picks this sequence's next token from `vocab` logits (its settings, logit
    /// bias and penalties), or None where only the host sampler can (log-probabilities, a
    /// grammar, a bias naming a token twice).
    fn gpu_sampling(&self, vocab: usize) -> Option<GpuSampling> {
        if self.constraint.is_some() {
            return None;
        }
        self.sampler.params().gpu_sampling(
            self.gpu_seed,
            self.tokens.len() as u32,
            &self.counts,
            vocab,
        )
    }
}

/// The next token of one sequence from its row of logits on the host: sampled (among the tokens
/// its grammar allows, when it has one), with the log-probabilities it asked for.
fn sample_row(s: &mut Sequence, row: &[f32]) -> Result<SampledToken, String> {
    let token = match &mut s.constraint {
        Some(constraint) => {
            let mut masked = row.to_vec();
            constraint.mask(&mut masked, &s.stop_token_ids)?;
            let token = s.sampler.sample(&masked, &s.tokens);
            if !s.stop_token_ids.contains(&token) {
                constraint.advance(token)?;
            }
            token
        }
        None => s.sampler.sample(row, &s.tokens),
    };
    let logprobs = s
        .sampler
        .params()
        .logprobs
        .map(|k| token_logprobs(row, token, k));
    Ok(SampledToken {
        id: token,
        logprobs,
    })
}

/// Where a step's f32 logits `[rows, vocab]` are.
enum StepLogits {
    /// The general forward's output.
    Tensor(Tensor),
    /// The decode step's buffers (its last run), rows of `vocab`: per sequence of the plan,
    /// whether the GPU chose its token and the row of its last token.
    Decode {
        vocab: usize,
        on_device: Vec<bool>,
        last_rows: Vec<usize>,
    },
}

impl StepLogits {
    /// Each sequence's token as the device chose it: the argmax of the forward's logits, or
    /// what the decode step sampled.
    fn device_tokens(&self, decode: Option<&DecodeStep>) -> anyhow::Result<Vec<u32>> {
        Ok(match self {
            StepLogits::Tensor(t) => t.argmax(1)?.to_vec1()?,
            StepLogits::Decode { last_rows, .. } => {
                let tokens = decoded(decode)?.tokens()?;
                last_rows.iter().map(|&r| tokens[r]).collect()
            }
        })
    }

    /// The logits of the sequences `rows` (indices into the plan) on the host.
    fn rows(&self, decode: Option<&DecodeStep>, rows: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(match self {
            StepLogits::Tensor(t) => {
                let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let index = Tensor::new(index.as_slice(), t.device())?;
                t.index_select(&index, 0)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
            }
            StepLogits::Decode {
                vocab, last_rows, ..
            } => {
                let all = decoded(decode)?.logits()?;
                rows.iter()
                    .map(|&r| all[last_rows[r] * vocab..(last_rows[r] + 1) * vocab].to_vec())
                    .collect()
            }
        })
    }
}

fn decoded(decode: Option<&DecodeStep>) -> anyhow::Result<&DecodeStep> {
    decode.ok_or_else(|| anyhow::anyhow!("the step's logits are in a decode step that is gone"))
}

/// Most prompt tokens a step's chunks add to the decode step's rows (beyond the running
/// sequences' one each).
pub const DECODE_STEP_PROMPT_ROWS: usize = 256;

/// Most positions the prompt rows of one decode step attend to, summed over the rows. Each row
/// reads its sequence's keys and values up to itself, as a decoding row does: a chunk of 128
/// tokens at the start of its sequence reads 8,256 positions (what 43 sequences decoding at 192
/// tokens read); one of 128 tokens behind a cached prefix of 2,000 reads 272,000, which flash
/// attention over the gathered chunk (the general forward) does far faster.
pub const DECODE_STEP_PROMPT_POSITIONS: usize = 1 << 15;

/// Whether a step's chunks run on the decode step: prompt chunks too (each token a row, see
/// [`DECODE_STEP_PROMPT_POSITIONS`]), so that a sequence joining the batch does not send every
/// running one through the general forward; every row's adapter held by the step.
fn rides_decode_step(decode: &DecodeStep, chunks: &[SeqChunk]) -> bool {
    let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
    let prompt_positions: usize = chunks
        .iter()
        .filter(|c| c.tokens.len() > 1)
        .map(|c| (c.past + 1..=c.past + c.tokens.len()).sum::<usize>())
        .sum();
    decode.takes(rows)
        && prompt_positions <= DECODE_STEP_PROMPT_POSITIONS
        && chunks
            .iter()
            .all(|c| c.adapter.is_none_or(|a| decode.has_adapter(a)))
}

struct Engine {
    model: Phi3,
    cache: PagedKvCache,
    /// The decode kernels over `cache`, where the model and GPU take them.
    decode: Option<DecodeStep>,
    bank: LoraBank,
    /// Bank slots of unloaded adapters that running sequences still use.
    unloading: Vec<usize>,
    scheduler: Scheduler,
    sequences: HashMap<u64, Sequence>,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    model_id: String,
    /// See [`EngineConfig::speculative_tokens`].
    speculative_tokens: Option<usize>,
    /// Where proposals come from when speculating: the draft model, or prompt lookup (None).
    drafts: Option<DraftPool>,
    /// `PHILO_PROFILE=1`: the loop's time by phase.
    profile: Option<StepProfile>,
}

impl Engine {
    fn run(mut self) {
        loop {
            let idle = self.sequences.is_empty();
            if idle && self.shared.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            // Idle: block for the next command (with a timeout, to notice a shutdown).
            if idle {
                match self
                    .commands
                    .recv_timeout(std::time::Duration::from_millis(100))
                {
                    Ok(c) => self.handle(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(c) = self.commands.try_recv() {
                self.handle(c);
            }
            self.drop_cancelled();
            self.lap("commands");
            if let Err(e) = self.step() {
                // A failed step fails the sequences it ran; the loop stays up for the others.
                eprintln!("philo serve: step failed: {e}");
            }
            self.free_unloaded();
            self.publish_stats();
            self.lap("stats");
            if let Some(profile) = self.profile.as_mut() {
                let (decode, shared) = (&self.decode, &self.shared);
                profile.step_done(self.sequences.len(), || {
                    let general = shared.stats().general_steps_total;
                    let runs = decode.as_ref().map(DecodeStep::runs).unwrap_or_default();
                    let steps = (runs.replayed + runs.launched).max(1) as f64;
                    let per_step = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps;
                    format!(
                        "since start: {general} general steps, decode step {} replayed, \
                         {} launched, {} captured, its host time {:.3} ms uploading and \
                         {:.3} ms launching a step",
                        runs.replayed,
                        runs.launched,
                        runs.captured,
                        per_step(runs.upload),
                        per_step(runs.launch)
                    )
                });
            }
        }
    }

    /// `PHILO_PROFILE=1`: the time since the last lap goes to `phase`.
    fn lap(&mut self, phase: &'static str) {
        if let Some(profile) = self.profile.as_mut() {
            profile.lap(phase);
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                id,
                request,
                adapter,
                events,
            } => match self.admit(id, *request, adapter, events.clone()) {
                Ok(sequence) => {
                    self.sequences.insert(id, sequence);
                }
                Err(reason) => {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = events.send(GenerationEvent::Failed(reason));
                }
            },
            Command::LoadAdapter {
                name,
                adapter,
                reply,
            } => {
                let result = match self.bank.insert(&adapter, &self.model) {
                    Ok(slot) => {
                        let mut models = self
                            .shared
                            .models
                            .write()
                            .unwrap_or_else(PoisonError::into_inner);
                        let models = &mut *models;
                        match models.slots.entry(name.clone()) {
                            std::collections::hash_map::Entry::Occupied(_) => {
                                self.bank.remove(slot);
                                Err(format!(
                                    "a model named `{name}` is already loaded; pick another name"
                                ))
                            }
                            std::collections::hash_map::Entry::Vacant(entry) => {
                                entry.insert(Some(slot));
                                let info = ModelInfo {
                                    id: name,
                                    parent: Some(self.model_id.clone()),
                                    created: now_secs(),
                                };
                                models.infos.push(info.clone());
                                Ok(info)
                            }
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                self.adapters_changed();
                let _ = reply.send(result);
            }
            Command::UnloadAdapter { slot } => {
                self.unloading.push(slot);
                self.free_unloaded();
            }
        }
    }

    /// Checks a submitted request and hands it to the scheduler; the error is the request's
    /// user-facing failure.
    fn admit(
        &mut self,
        id: u64,
        request: GenerationRequest,
        adapter: Option<usize>,
        events: UnboundedSender<GenerationEvent>,
    ) -> Result<Sequence, String> {
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            // Checked here so one bad request cannot fail the whole batch's step.
            return Err(format!(
                "prompt token id {bad} is outside the model's vocabulary of {vocab}: the tokenizer does not belong to this model"
            ));
        }
        let longest = request.prompt.len() + request.max_tokens;
        let long_rope = self
            .model
            .rotary()
            .uses_long_factors(longest.saturating_sub(1));
        let gpu_seed = request.sampling.seed.unwrap_or_else(rand::random);
        let speculation = self
            .speculative_tokens
            .filter(|_| request.constraint.is_none() && request.sampling.logprobs.is_none())
            .map(Speculation::new);
        let sampler = Sampler::new(request.sampling).map_err(|e| e.to_string())?;
        self.scheduler
            .add(
                id,
                request.prompt.clone(),
                request.max_tokens,
                adapter.map(|s| s as u32),
            )
            .map_err(|e| e.to_string())?;
        Ok(Sequence {
            events,
            adapter,
            sampler,
            counts: TokenCounts::new(&request.prompt),
            tokens: request.prompt,
            stop_token_ids: request.stop_token_ids,
            constraint: request.constraint,
            long_rope,
            started: false,
            gpu_seed,
            speculation,
        })
    }

    /// Frees the weights of unloaded adapters that no running sequence uses any more.
    fn free_unloaded(&mut self) {
        let sequences = &self.sequences;
        let bank = &mut self.bank;
        let before = self.unloading.len();
        self.unloading.retain(|&slot| {
            let in_use = sequences.values().any(|s| s.adapter == Some(slot));
            if !in_use {
                bank.remove(slot);
            }
            in_use
        });
        if self.unloading.len() != before {
            self.adapters_changed();
        }
    }

    /// Tells the decode kernels which adapters the bank holds now. Should that fail (a device
    /// error), every step runs the general forward from then on.
    fn adapters_changed(&mut self) {
        if let Some(decode) = self.decode.as_mut() {
            if let Err(e) = decode.set_adapters(&self.bank) {
                eprintln!("philo serve: the decode kernels stop here ({e}); steps run the general forward");
                self.decode = None;
            }
        }
    }

    /// Ends the sequences whose request has gone away (client disconnect, stop string).
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end(id, None);
        }
    }

    /// Removes a sequence, frees its blocks and sends its last event.
    fn end(&mut self, id: u64, last: Option<GenerationEvent>) {
        self.scheduler.finish(id);
        if let Some(drafts) = self.drafts.as_mut() {
            drafts.release(id);
        }
        if let Some(seq) = self.sequences.remove(&id) {
            if !seq.started {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            if let Some(event) = last {
                let _ = seq.events.send(event);
            }
        }
    }

    /// Runs one scheduled step. Whatever fails in it (the forward, sampling, a device error)
    /// ends every sequence of the step's plan with that error, so none keeps its KV blocks or
    /// its place in the waiting count.
    fn step(&mut self) -> anyhow::Result<()> {
        let mut plan = self.scheduler.schedule();
        if plan.seqs.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = plan.seqs.iter().map(|s| s.id).collect();
        let proposed = self.propose(&mut plan);
        self.lap("schedule");
        let result = if proposed.iter().any(|&k| k > 0) {
            self.run_speculative_plan(&plan, &proposed)
        } else {
            self.run_plan(&plan)
        };
        if let Err(e) = &result {
            for id in ids {
                self.end(id, Some(GenerationEvent::Failed(e.to_string())));
            }
        }
        result
    }

    /// Adds proposals (the draft model's, else prompt lookup's) to the plan's sequences where
    /// speculation runs (see [`EngineConfig::speculative_tokens`]): every sequence decodes one
    /// token on the decode step, all of them allow it, and the rows fit the fused GEMV with at
    /// least one proposal each. Returns how many tokens each sequence of the plan had proposed (all 0: a plain
    /// step).
    fn propose(&mut self, plan: &mut crate::scheduler::StepPlan) -> Vec<usize> {
        let n = plan.seqs.len();
        let mut proposed = vec![0; n];
        let (Some(max_k), Some(decode)) = (self.speculative_tokens, self.decode.as_ref()) else {
            return proposed;
        };
        let budget = (1..=DecodeStep::MAX_GEMV_ROWS)
            .rev()
            .find(|&r| decode.takes(r))
            .unwrap_or(0);
        let per_seq = budget / n;
        let eligible = per_seq >= 2
            && plan.seqs.iter().all(|c| {
                c.tokens.len() == 1
                    && c.samples
                    && c.adapter.is_none_or(|a| decode.has_adapter(a as usize))
                    && self
                        .sequences
                        .get(&c.id)
                        .is_some_and(|s| s.started && s.speculation.is_some())
            });
        if !eligible || !decode.takes(n * per_seq) {
            return proposed;
        }
        for (chunk, k) in plan.seqs.iter_mut().zip(&mut proposed) {
            let Some(seq) = self.sequences.get_mut(&chunk.id) else {
                continue;
            };
            let Some(speculation) = seq.speculation.as_mut() else {
                continue;
            };
            let length = speculation.next_length(max_k.min(per_seq - 1));
            if length == 0 {
                continue;
            }
            let proposal = match self.drafts.as_mut() {
                None => prompt_lookup(&seq.tokens, length),
                Some(drafts) => match drafts.propose(chunk.id, &seq.tokens, length) {
                    Ok(proposal) => proposal,
                    Err(e) => {
                        // A draft that fails (a device error) is dropped; the model's own
                        // output does not depend on it.
                        eprintln!("philo serve: the draft model stops here ({e}); speculation continues by prompt lookup");
                        self.drafts = None;
                        Vec::new()
                    }
                },
            };
            *k = self.scheduler.speculate(chunk, &proposal);
        }
        proposed
    }

    /// A decode step in which sequences verify proposals: each sequence's last token and its
    /// `proposed[i]` proposals are rows of one step over its blocks (every row writes its K/V
    /// before any attends). Each sequence keeps the proposals its sampler accepts in order —
    /// greedy ones compare them with the GPU's argmax, others run the sampler's
    /// accept-or-resample rule on the rows' logits, so the output is distributed as plain
    /// decoding's — then one token of its own; the scheduler drops the rest.
    fn run_speculative_plan(
        &mut self,
        plan: &crate::scheduler::StepPlan,
        proposed: &[usize],
    ) -> anyhow::Result<()> {
        let decode = self
            .decode
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("speculation without the decode step"))?;
        let vocab = self.model.config().vocab_size;
        // Whether the GPU picks each sequence's tokens, and how: greedy ones always (the argmax
        // of each row), and a sequence without proposals that the GPU samples for (with its
        // logit bias and penalties); the others' rows go to the host.
        let mut choices = Vec::with_capacity(plan.seqs.len());
        for chunk in &plan.seqs {
            let seq = self
                .sequences
                .get(&chunk.id)
                .ok_or_else(|| anyhow::anyhow!("sequence {} is gone", chunk.id))?;
            let gpu = seq
                .gpu_sampling(vocab)
                .filter(|g| decode.samples() || g.is_argmax());
            let (sampling, adjustments, device) = match (chunk.tokens.len(), gpu) {
                (1, Some(g)) => (g.row, g.adjustments, true),
                (1, None) => (RowSampling::greedy(), Vec::new(), false),
                (_, gpu) => (
                    RowSampling::greedy(),
                    Vec::new(),
                    gpu.is_some_and(|g| g.is_argmax()),
                ),
            };
            choices.push((sampling, adjustments, device, seq.long_rope));
        }
        let on_device: Vec<bool> = choices.iter().map(|c| c.2).collect();
        let mut rows = Vec::new();
        let mut first_row = Vec::with_capacity(plan.seqs.len());
        for (chunk, &(sampling, ref adjustments, _, long_rope)) in plan.seqs.iter().zip(&choices) {
            first_row.push(rows.len());
            for (i, &token) in chunk.tokens.iter().enumerate() {
                rows.push(DecodeRow {
                    token,
                    len: chunk.past + 1 + i,
                    long_rope,
                    block_table: &chunk.block_table,
                    sampling,
                    adjustments,
                    adapter: chunk.adapter.map(|a| a as usize),
                });
            }
        }
        decode.run(&rows)?;
        let device_tokens = decode.tokens()?;
        let host_logits = match on_device.iter().all(|&d| d) {
            true => None,
            false => Some(decode.logits()?),
        };
        let (mut emitted_total, mut accepted_total) = (0u64, 0u64);
        for (i, chunk) in plan.seqs.iter().enumerate() {
            let (k, row0) = (proposed[i], first_row[i]);
            let Some(seq) = self.sequences.get_mut(&chunk.id) else {
                continue;
            };
            let proposal = &chunk.tokens[1..];
            let emitted = match &host_logits {
                Some(logits) if !on_device[i] => {
                    let mut context = seq.tokens.clone();
                    let rows = logits[row0 * vocab..(row0 + k + 1) * vocab].chunks(vocab);
                    seq.sampler.verify_proposal(proposal, rows, &mut context);
                    context.split_off(seq.tokens.len())
                }
                _ => greedy_kept(proposal, &device_tokens[row0..row0 + k + 1]).to_vec(),
            };
            let kept = emitted.len() - 1;
            accepted_total += kept as u64;
            if k > 0 {
                self.scheduler.accept_speculation(chunk.id, kept);
                if let Some(speculation) = seq.speculation.as_mut() {
                    speculation.record(k, kept);
                }
            }
            emitted_total += emitted.len() as u64;
            for (j, &token) in emitted.iter().enumerate() {
                // Kept proposals are in the scheduler already; the last token is appended.
                if !self.emit(chunk.id, SampledToken::from(token), j == kept) {
                    break;
                }
            }
        }
        let proposed_total = proposed.iter().sum::<usize>() as u64;
        self.count_step(emitted_total, proposed_total, accepted_total);
        Ok(())
    }

    /// Counts a step that generated `generated` tokens, `accepted` of `proposed` speculated.
    fn count_step(&self, generated: u64, proposed: u64, accepted: u64) {
        let mut stats = self.shared.stats();
        stats.steps_total += 1;
        stats.generated_tokens_total += generated;
        stats.spec_proposed_tokens_total += proposed;
        stats.spec_accepted_tokens_total += accepted;
    }

    /// Counts a step that runs the general forward (`Phi3::forward_paged`), not the decode step.
    fn count_general_step(&self) {
        self.shared.stats().general_steps_total += 1;
    }

    fn run_plan(&mut self, plan: &crate::scheduler::StepPlan) -> anyhow::Result<()> {
        let chunks: Vec<SeqChunk> = plan
            .seqs
            .iter()
            .map(|s| SeqChunk {
                tokens: &s.tokens,
                past: s.past,
                block_table: &s.block_table,
                adapter: s.adapter.map(|a| a as usize),
                long_rope: self.sequences.get(&s.id).is_some_and(|q| q.long_rope),
            })
            .collect();
        let logits = match self.decode.as_mut() {
            Some(decode) if rides_decode_step(decode, &chunks) => {
                let vocab = self.model.config().vocab_size;
                let sampling: Vec<Option<GpuSampling>> = plan
                    .seqs
                    .iter()
                    .map(|s| {
                        let gpu = self.sequences.get(&s.id)?.gpu_sampling(vocab)?;
                        // Without GPU sampling the kernels give the argmax only.
                        (decode.samples() || gpu.is_argmax()).then_some(gpu)
                    })
                    .collect();
                // Each token of a chunk is a row at its own position (attending to the cache
                // up to itself); only a chunk's last row is sampled as the sequence asks.
                let mut rows = Vec::with_capacity(chunks.iter().map(|c| c.tokens.len()).sum());
                let mut last_rows = Vec::with_capacity(chunks.len());
                for (c, gpu) in chunks.iter().zip(&sampling) {
                    for (i, &token) in c.tokens.iter().enumerate() {
                        let last = i + 1 == c.tokens.len();
                        let (sampling, adjustments) = match gpu {
                            Some(g) if last => (g.row, g.adjustments.as_slice()),
                            _ => (RowSampling::greedy(), &[][..]),
                        };
                        rows.push(DecodeRow {
                            token,
                            len: c.past + 1 + i,
                            long_rope: c.long_rope,
                            block_table: c.block_table,
                            sampling,
                            adjustments,
                            adapter: c.adapter,
                        });
                    }
                    last_rows.push(rows.len() - 1);
                }
                if let Some(profile) = self.profile.as_mut() {
                    profile.lap("prepare");
                }
                decode.run(&rows)?;
                StepLogits::Decode {
                    vocab,
                    on_device: sampling.iter().map(Option::is_some).collect(),
                    last_rows,
                }
            }
            _ => {
                self.count_general_step();
                StepLogits::Tensor(self.model.forward_paged(
                    &chunks,
                    &mut self.cache,
                    &self.bank,
                )?)
            }
        };
        self.lap("launch");
        let rows: Vec<usize> = (0..plan.seqs.len())
            .filter(|&i| plan.seqs[i].samples)
            .collect();
        let next = self.sample(
            &logits,
            &plan.seqs.iter().map(|s| s.id).collect::<Vec<_>>(),
            &rows,
        )?;
        self.lap("wait + sample");
        self.count_step(next.len() as u64, 0, 0);
        for s in &plan.seqs {
            if let Some(seq) = self.sequences.get_mut(&s.id) {
                if !seq.started {
                    seq.started = true;
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    let cached = self.scheduler.cached_prompt_tokens(s.id).unwrap_or(0);
                    let mut stats = self.shared.stats();
                    stats.prompt_tokens_total += seq.tokens.len() as u64;
                    stats.cached_prompt_tokens_total += cached as u64;
                    drop(stats);
                    let _ = seq.events.send(GenerationEvent::Started {
                        prompt_tokens: seq.tokens.len(),
                        cached_prompt_tokens: cached,
                    });
                }
            }
        }
        for (id, token) in next {
            self.emit(id, token, true);
        }
        self.lap("emit");
        Ok(())
    }

    /// Hands sequence `id` its next token (appended to the scheduler's sequence too when
    /// `append`) and ends the sequence where the token stops it, its length is reached or its
    /// client is gone. Returns whether the sequence goes on.
    fn emit(&mut self, id: u64, token: SampledToken, append: bool) -> bool {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return false;
        };
        let token_id = token.id;
        seq.tokens.push(token_id);
        seq.counts.push(token_id);
        let status = append
            .then(|| self.scheduler.append_token(id, token_id))
            .flatten();
        let end = if seq.events.send(GenerationEvent::Token(token)).is_err() {
            Some(None)
        } else if seq.stop_token_ids.contains(&token_id) {
            Some(Some(GenerationEvent::Finished(FinishReason::Stop)))
        } else if status == Some(SeqStatus::LengthReached) {
            Some(Some(GenerationEvent::Finished(FinishReason::Length)))
        } else {
            None
        };
        match end {
            Some(last) => {
                self.end(id, last);
                false
            }
            None => true,
        }
    }

    /// The next token of each sampling row. Rows the device can choose for take its token: the
    /// decode step's (greedy or sampled on the GPU), or the forward's argmax for greedy rows
    /// without penalties, log-probabilities or a constraint. Only the other rows' logits travel
    /// to the host, where the rows that asked for log-probabilities get them from their raw
    /// logits and constrained rows sample among the tokens their grammar allows.
    fn sample(
        &mut self,
        logits: &StepLogits,
        ids: &[u64],
        rows: &[usize],
    ) -> anyhow::Result<Vec<(u64, SampledToken)>> {
        let plain_greedy = |s: &Sequence| {
            let p = s.sampler.params();
            p.is_plain_greedy() && p.logprobs.is_none() && s.constraint.is_none()
        };
        let on_device = |r: usize, s: &Sequence| match logits {
            StepLogits::Tensor(_) => plain_greedy(s),
            StepLogits::Decode { on_device, .. } => on_device[r],
        };
        let device_tokens = logits.device_tokens(self.decode.as_ref())?;
        let mut out = Vec::with_capacity(rows.len());
        let mut full_rows = Vec::new();
        for &r in rows {
            match self.sequences.get(&ids[r]) {
                Some(s) if on_device(r, s) => {
                    out.push((ids[r], SampledToken::from(device_tokens[r])))
                }
                Some(_) => full_rows.push(r),
                None => {}
            }
        }
        if !full_rows.is_empty() {
            let host = logits.rows(self.decode.as_ref(), &full_rows)?;
            // Rows sample on all cores: a sampled row (top-p sorts the vocabulary) costs
            // milliseconds, and 64 of them one after another held a step for ~100 ms.
            let mut host_rows: HashMap<u64, Vec<f32>> =
                full_rows.iter().map(|&r| ids[r]).zip(host).collect();
            let mut work: Vec<(u64, &mut Sequence, Vec<f32>)> = self
                .sequences
                .iter_mut()
                .filter_map(|(id, s)| host_rows.remove(id).map(|row| (*id, s, row)))
                .collect();
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(work.len());
            let per_thread = work.len().div_ceil(threads.max(1));
            let sampled: Vec<(u64, Result<SampledToken, String>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .chunks_mut(per_thread.max(1))
                    .map(|chunk| {
                        scope.spawn(move || {
                            chunk
                                .iter_mut()
                                .map(|(id, s, row)| (*id, sample_row(s, row)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("a sampling thread panicked"))
                    .collect()
            });
            // A grammar that fails ends its own sequence, not the step's others.
            let mut failed = Vec::new();
            for (id, result) in sampled {
                match result {
                    Ok(token) => out.push((id, token)),
                    Err(e) => failed.push((id, e)),
                }
            }
            for (id, e) in failed {
                self.end(id, Some(GenerationEvent::Failed(e)));
            }
        }
        Ok(out)
    }

    fn publish_stats(&self) {
        let mut stats = self.shared.stats();
        stats.running_sequences = self.scheduler.num_running();
        stats.kv_blocks_used = self.scheduler.blocks_used();
        stats.kv_blocks_free = self.scheduler.blocks_free();
        stats.preemptions_total = self.scheduler.preemptions();
    }
}
