//! The fine-tuning loop: micro-batches from the prefetcher, gradient accumulation, clipping,
//! AdamW with a schedule, logging to metrics.jsonl, evaluation, checkpoints and resume. In a
//! data-parallel run (`Trainer::new_rank`) a window is `world_size` × the accumulation steps of
//! micro-batches, rank r training on those at r, r + world_size, …; rank 0 alone logs,
//! evaluates and writes checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use philo_model::adapter::{save_adapter, write_atomic, AdapterConfig};
use philo_model::memory::peak_memory_gib;
use philo_model::{DropoutSeed, Phi3, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig};
use crate::backward::{MicroBatch, PassOptions, StepContext};
use crate::comm::{Communicator, SingleProcess};
use crate::data::{Batch, BatchPlan, BatchPosition, PrefetchLimit, Prefetcher, RowDataset};
use crate::error::{Result, TrainError};
use crate::gpu_reading::{GpuProbe, GpuReading};
use crate::lora_params::LoraParams;
use crate::loss::count_targets;
use crate::schedule::{Schedule, ScheduleKind};
use crate::step::{train_step, StepConfig, WindowBatch};

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub output_dir: PathBuf,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub epochs: usize,
    /// Overrides `epochs` when set.
    pub max_steps: Option<usize>,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps; the larger of this and `warmup_steps` applies.
    pub warmup_ratio: f64,
    pub max_grad_norm: Option<f64>,
    pub adamw: AdamWConfig,
    pub seed: u64,
    pub logging_steps: usize,
    pub eval_steps: Option<usize>,
    pub save_steps: Option<usize>,
    pub gradient_checkpointing: bool,
    /// With checkpointing on a GPU, keep the checkpoints in pinned host memory.
    pub gradient_offload: bool,
    /// With checkpointing, the last this many decoder layers keep their activations and are
    /// not recomputed (see [`PassOptions::uncheckpointed_layers`]).
    pub uncheckpointed_layers: usize,
}

/// What one logged optimizer step measured; also a line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
    pub peak_memory_gib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// f16 training: the loss scale after this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    /// f16 training: the gradients overflowed and the adapter was not updated.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub skipped: bool,
    /// The GPU at this step (NVML; absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu: Option<GpuReading>,
}

/// Progress reports of a run, for a progress bar or a log.
pub enum TrainEvent<'a> {
    Started {
        total_steps: usize,
        start_step: usize,
        trainable: usize,
    },
    /// A logged step (see `logging_steps`).
    Step(&'a StepMetrics),
    /// Every optimizer step, logged or not, with the GPU's state.
    Progress {
        step: usize,
        gpu: Option<GpuReading>,
    },
    Saved {
        step: usize,
        dir: &'a Path,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub interrupted: bool,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub history: Vec<StepMetrics>,
}

/// State saved with each checkpoint beside the adapter and optimizer files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    position: BatchPosition,
    seed: u64,
    total_steps: usize,
    batch_size: usize,
    gradient_accumulation_steps: usize,
    /// Ranks of the run (checkpoints written before data parallelism: 1).
    #[serde(default = "one_rank")]
    world_size: usize,
    elapsed_seconds: f64,
}

fn one_rank() -> usize {
    1
}

/// A fine-tune of the LoRA adapters on `model`.
pub struct Trainer {
    model: Phi3,
    params: LoraParams,
    optimizer: AdamW,
    adapter_config: AdapterConfig,
    train: Arc<RowDataset>,
    eval: Option<Arc<RowDataset>>,
    plan: BatchPlan,
    config: TrainerConfig,
    schedule: Schedule,
    step: usize,
    position: BatchPosition,
    elapsed_before: f64,
    /// The newest checkpoint written or resumed from, named when a run must stop.
    last_checkpoint: Option<PathBuf>,
    comm: Box<dyn Communicator>,
}

impl Trainer {
    /// Puts fresh adapters (`adapter_config`) on `model` and prepares the run.
    pub fn new(
        model: Phi3,
        adapter_config: AdapterConfig,
        train: RowDataset,
        eval: Option<RowDataset>,
        config: TrainerConfig,
    ) -> Result<Self> {
        Self::new_rank(
            model,
            adapter_config,
            train,
            eval,
            config,
            Box::new(SingleProcess),
        )
    }

    /// [`Trainer::new`] for one rank of a data-parallel run: every rank is given the same
    /// model, data and config (the adapters start equal, from the seed), and `comm` joins it
    /// to the others.
    pub fn new_rank(
        mut model: Phi3,
        adapter_config: AdapterConfig,
        train: RowDataset,
        eval: Option<RowDataset>,
        config: TrainerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config(
                "batch_size and gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        let params = LoraParams::init(&mut model, &adapter_config, config.seed)?;
        let optimizer = AdamW::new(config.adamw, &params)?;
        let plan = BatchPlan::new(train.len(), config.batch_size, config.seed)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let steps_per_epoch = plan
            .batches_per_epoch()
            .div_ceil(config.gradient_accumulation_steps * comm.world_size());
        let total_steps = config
            .max_steps
            .unwrap_or(steps_per_epoch * config.epochs)
            .max(1);
        let schedule = Schedule {
            kind: config.schedule,
            peak_lr: config.lr,
            warmup_steps: config
                .warmup_steps
                .max((config.warmup_ratio * total_steps as f64).ceil() as usize),
            total_steps,
        };
        Ok(Trainer {
            model,
            params,
            optimizer,
            adapter_config,
            train: Arc::new(train),
            eval: eval.filter(|e| !e.is_empty()).map(Arc::new),
            plan,
            config,
            schedule,
            step: 0,
            position: BatchPosition::default(),
            elapsed_before: 0.0,
            last_checkpoint: None,
            comm,
        })
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// The model with its trained adapters.
    pub fn into_model(self) -> Phi3 {
        self.model
    }

    /// Restores adapter, optimizer, step and data position from a checkpoint folder written by
    /// this trainer. The dropout masks and the data order derive from the seed and the step, so
    /// the continued run repeats the uninterrupted one.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::File {
            path: state_path.clone(),
            message: format!("{e}; --resume needs a checkpoint folder written by philo finetune"),
        })?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::File {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
        let saved = (
            state.seed,
            state.total_steps,
            state.batch_size,
            state.gradient_accumulation_steps,
            state.world_size,
        );
        let now = (
            self.config.seed,
            self.schedule.total_steps,
            self.config.batch_size,
            self.config.gradient_accumulation_steps,
            self.comm.world_size(),
        );
        if saved != now {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint was trained with seed {}, {} total steps, batch size {}, accumulation {}, {} rank(s); this run has {}, {}, {}, {}, {}; resume with the same settings",
                state_path.display(),
                saved.0, saved.1, saved.2, saved.3, saved.4, now.0, now.1, now.2, now.3, now.4
            )));
        }
        let weights = dir.join("adapter_model.safetensors");
        let store = SafetensorsStore::open_files(std::slice::from_ref(&weights))?;
        for param in &self.params.params {
            let t = store.load(
                &param.name,
                param.var.dims(),
                candle_core::DType::F32,
                param.var.device(),
            )?;
            param.var.set(&t)?;
        }
        self.optimizer
            .load(&dir.join("optimizer.safetensors"), &self.params)?;
        self.step = state.step;
        self.position = state.position;
        self.elapsed_before = state.elapsed_seconds;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// The newest `checkpoint-N` folder in `output_dir`, if any.
    pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
        let entries = std::fs::read_dir(output_dir).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path()
                    .join("trainer_state.json")
                    .is_file()
                    .then(|| (step, e.path()))
            })
            .max_by_key(|(step, _)| *step)
            .map(|(_, path)| path)
    }

    /// Trains until the last step or until `stop` is set (then a checkpoint is saved and the
    /// run ends cleanly). A loss that is not finite stops the run with an error and keeps the
    /// last good checkpoint.
    /// In a data-parallel run every rank calls it; `stop` on any rank stops them all at the
    /// same step, and only rank 0 writes files and reports events.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(TrainEvent),
    ) -> Result<TrainSummary> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let lead = rank == 0;
        let mut on_event = |event: TrainEvent| {
            if lead {
                on_event(event)
            }
        };
        let metrics_path = self.config.output_dir.join("metrics.jsonl");
        let mut metrics = if lead {
            std::fs::create_dir_all(&self.config.output_dir).map_err(|e| TrainError::File {
                path: self.config.output_dir.clone(),
                message: e.to_string(),
            })?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| TrainError::File {
                    path: metrics_path.clone(),
                    message: e.to_string(),
                })?;
            Some(file)
        } else {
            None
        };
        let total = self.schedule.total_steps;
        let accum = self.config.gradient_accumulation_steps;
        // Micro-batches of one optimizer step, over all ranks.
        let window_batches = accum * world;
        on_event(TrainEvent::Started {
            total_steps: total,
            start_step: self.step,
            trainable: self.params.count(),
        });
        let remaining = (total.saturating_sub(self.step)) * window_batches;
        let mut batches = Prefetcher::spawn(
            Arc::clone(&self.train),
            self.plan,
            self.position,
            PrefetchLimit::Batches(remaining),
            4,
        )
        .map_err(|e| TrainError::Config(e.to_string()))?;
        let started = Instant::now();
        let start_step = self.step;
        let mut history = Vec::new();
        let mut tokens_since_log = 0usize;
        let mut log_clock = Instant::now();
        let mut interrupted = false;
        let mut last_loss = None;
        let mut last_eval = None;
        let mut step_context = StepContext::new(self.model.device(), self.model.dtype());
        let probe = GpuProbe::for_device(self.model.device());
        while self.step < total {
            let mut stopping = [f64::from(u8::from(stop.load(Ordering::SeqCst)))];
            self.comm.all_reduce_sum(&mut stopping)?;
            if stopping[0] > 0.0 {
                interrupted = true;
                break;
            }
            let micro: Vec<(BatchPosition, Batch)> =
                batches.by_ref().take(window_batches).collect();
            let Some((last_position, _)) = micro.last() else {
                break;
            };
            let next_position = self.plan.next_position(*last_position);
            let mut window = Vec::with_capacity(micro.len());
            for (i, (_, batch)) in micro.iter().enumerate() {
                if count_targets(&batch.labels) == 0 {
                    continue;
                }
                // Every rank counts the whole window: the logged rate is the run's.
                tokens_since_log += batch.batch_size() * batch.seq_len();
                if i % world != rank {
                    continue;
                }
                let tensors = batch.to_tensors(self.model.device())?;
                // Seeded by the micro-batch's place in the whole window, so a run's dropout
                // masks do not depend on how many ranks share it.
                let seed = self.config.seed
                    ^ ((self.step * window_batches + i) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                window.push(WindowBatch {
                    batch: MicroBatch {
                        input_ids: tensors.input_ids,
                        segments: Some(tensors.segment_ids),
                        labels: batch.labels.clone(),
                    },
                    dropout: DropoutSeed(seed),
                });
            }
            let lr = self.schedule.lr(self.step);
            let step_config = StepConfig {
                lr,
                max_grad_norm: self.config.max_grad_norm,
                pass: PassOptions {
                    checkpointing: self.config.gradient_checkpointing,
                    offload: self.config.gradient_offload,
                    uncheckpointed_layers: self.config.uncheckpointed_layers,
                },
            };
            let outcome = match train_step(
                &self.model,
                &self.params,
                &mut self.optimizer,
                &window,
                step_config,
                &mut step_context,
                self.comm.as_ref(),
            ) {
                Ok(Some(outcome)) => outcome,
                // A window without labelled tokens: nothing to learn, the data moves on.
                Ok(None) => {
                    self.position = next_position;
                    self.step += 1;
                    continue;
                }
                Err(TrainError::Diverged(what)) => return Err(self.diverged(&what)),
                Err(e) => return Err(e),
            };
            let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
            self.step += 1;
            let gpu = probe.as_ref().and_then(GpuProbe::read);
            on_event(TrainEvent::Progress {
                step: self.step,
                gpu,
            });
            self.position = next_position;
            last_loss = Some(loss);

            let eval_loss = match (self.config.eval_steps, &self.eval) {
                (Some(every), Some(_))
                    if lead && (self.step.is_multiple_of(every) || self.step == total) =>
                {
                    let value = self.evaluate()?;
                    last_eval = value;
                    value
                }
                _ => None,
            };
            if self.step.is_multiple_of(self.config.logging_steps.max(1))
                || self.step == total
                || eval_loss.is_some()
            {
                let elapsed = started.elapsed().as_secs_f64();
                let done = (self.step - start_step) as f64;
                let entry = StepMetrics {
                    step: self.step,
                    epoch: (self.step * window_batches) as f64
                        / self.plan.batches_per_epoch() as f64,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_second: tokens_since_log as f64
                        / log_clock.elapsed().as_secs_f64().max(1e-9),
                    elapsed_seconds: self.elapsed_before + elapsed,
                    eta_seconds: elapsed / done * (total - self.step) as f64,
                    peak_memory_gib: peak_memory_gib(self.model.device()),
                    eval_loss,
                    loss_scale: step_context.scaler.as_ref().map(|s| s.scale),
                    skipped: outcome.skipped,
                    gpu,
                };
                if let Some(metrics) = &mut metrics {
                    writeln!(
                        metrics,
                        "{}",
                        serde_json::to_string(&entry).expect("metrics serialise")
                    )
                    .map_err(|e| TrainError::File {
                        path: metrics_path.clone(),
                        message: e.to_string(),
                    })?;
                }
                on_event(TrainEvent::Step(&entry));
                history.push(entry);
                tokens_since_log = 0;
                log_clock = Instant::now();
            }
            if let Some(every) = self.config.save_steps {
                if self.step.is_multiple_of(every) && self.step < total {
                    let dir = self.save_checkpoint(started.elapsed().as_secs_f64())?;
                    on_event(TrainEvent::Saved {
                        step: self.step,
                        dir: &dir,
                    });
                }
            }
        }
        drop(batches);
        if interrupted {
            let dir = self.save_checkpoint(started.elapsed().as_secs_f64())?;
            on_event(TrainEvent::Saved {
                step: self.step,
                dir: &dir,
            });
        } else {
            if lead {
                save_adapter(
                    &self.config.output_dir,
                    &self.adapter_config,
                    &mut self.model,
                )?;
            }
            on_event(TrainEvent::Saved {
                step: self.step,
                dir: &self.config.output_dir,
            });
        }
        Ok(TrainSummary {
            steps: self.step,
            interrupted,
            final_loss: last_loss,
            final_eval_loss: last_eval,
            history,
        })
    }

    /// Mean loss over the eval rows (labelled tokens weighted equally).
    pub fn evaluate(&self) -> Result<Option<f64>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        Ok(
            crate::eval::evaluate(&self.model, eval, self.config.batch_size, |_| {})?
                .map(|r| r.loss),
        )
    }

    /// The newest checkpoint written or resumed from.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// The error of a run whose numbers stopped being finite at the coming step; the adapter is
    /// not updated, and the newest checkpoint is named.
    fn diverged(&self, what: &str) -> TrainError {
        let kept = match &self.last_checkpoint {
            Some(dir) => format!("the last checkpoint, {}, is intact", dir.display()),
            None => "no checkpoint was saved yet (use --save_steps)".to_string(),
        };
        TrainError::Diverged(format!(
            "{what} at step {}: training stopped and {kept}. Lower --lr or check the data",
            self.step + 1
        ))
    }

    /// Writes `checkpoint-{step}` (adapter, optimizer, state) through a temporary folder and a
    /// rename, so an interrupted save never leaves a half checkpoint.
    /// Other ranks than 0 only note the folder rank 0 writes.
    fn save_checkpoint(&mut self, elapsed: f64) -> Result<PathBuf> {
        let out = &self.config.output_dir;
        let final_dir = out.join(format!("checkpoint-{}", self.step));
        if self.comm.rank() != 0 {
            self.last_checkpoint = Some(final_dir.clone());
            return Ok(final_dir);
        }
        let tmp = out.join(format!(".checkpoint-{}.tmp", self.step));
        let _ = std::fs::remove_dir_all(&tmp);
        save_adapter(&tmp, &self.adapter_config, &mut self.model)?;
        self.optimizer
            .save(&tmp.join("optimizer.safetensors"), &self.params)?;
        let state = TrainerState {
            step: self.step,
            position: self.position,
            seed: self.config.seed,
            total_steps: self.schedule.total_steps,
            batch_size: self.config.batch_size,
            gradient_accumulation_steps: self.config.gradient_accumulation_steps,
            world_size: self.comm.world_size(),
            elapsed_seconds: self.elapsed_before + elapsed,
        };
        write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&state)
                .expect("state serialises")
                .as_bytes(),
        )?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::File {
            path: final_dir.clone(),
            message: e.to_string(),
        })?;
        self.last_checkpoint = Some(final_dir.clone());
        Ok(final_dir)
    }
}
