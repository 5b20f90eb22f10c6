//! `philo finetune`: load the base model and the data, train LoRA adapters, save a PEFT adapter.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};

use crate::quant::BaseQuant;
use indicatif::{ProgressBar, ProgressStyle};
use philo_model::adapter::AdapterConfig;
use philo_model::{ModelFiles, Phi3, Phi3Config, SafetensorsStore};
use philo_plan::{BatchChoice, LayerChoice};
use philo_train::adamw::AdamWConfig;
use philo_train::data::{load_dataset, split_eval, DataFormat, DataOptions, RowDataset};
use philo_train::schedule::ScheduleKind;
use philo_train::trainer::{TrainEvent, TrainSummary, Trainer, TrainerConfig};

/// Everything `philo finetune` takes.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub base_model: String,
    pub dataset: PathBuf,
    pub output_dir: PathBuf,
    pub format: Option<DataFormat>,
    pub max_seq_length: usize,
    pub train_on_prompt: bool,
    pub packing: bool,
    pub eval_split: f64,
    pub eval_dataset: Option<PathBuf>,
    /// Rows per micro-batch, or auto (sized from free GPU memory); replaces the trainer's.
    pub batch_size: BatchChoice,
    /// Rows per optimizer step: sets the gradient accumulation when given.
    pub effective_batch_size: Option<usize>,
    /// Layers kept whole instead of recomputed, or auto (sized from free GPU memory);
    /// replaces the trainer's.
    pub uncheckpointed_layers: LayerChoice,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub quant: BaseQuant,
    /// Quantise the NF4 block scales too (bitsandbytes' double quantisation).
    pub double_quant: bool,
    pub trainer: TrainerConfig,
    /// Resume from this checkpoint folder.
    pub resume: Option<PathBuf>,
    pub dtype: DType,
    pub device: Device,
    /// This process's rank in a multi-GPU run (`finetune --gpus N` starts one per GPU).
    pub rank: Option<crate::launch::RankEnv>,
}

impl FinetuneOptions {
    /// Defaults of the training loop for `output_dir` (the CLI overrides what the user gives).
    pub fn default_trainer(output_dir: PathBuf) -> TrainerConfig {
        TrainerConfig {
            output_dir,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            epochs: 1,
            max_steps: None,
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: Some(1.0),
            adamw: AdamWConfig::default(),
            seed: 42,
            logging_steps: 10,
            eval_steps: None,
            save_steps: None,
            gradient_checkpointing: true,
            gradient_offload: true,
            uncheckpointed_layers: 0,
        }
    }
}

/// Runs a fine-tune, reporting to a progress bar on stderr; `stop` (Ctrl-C) saves a checkpoint
/// and ends the run cleanly.
pub fn finetune(options: &FinetuneOptions, stop: &AtomicBool) -> anyhow::Result<TrainSummary> {
    // Flags first: a bad one is reported before any file is read.
    philo_train::lora_params::check_dropout(options.lora_dropout)?;
    // Rank 0 speaks for a multi-GPU run.
    let lead = options.rank.as_ref().is_none_or(|env| env.rank == 0);
    let files = ModelFiles::resolve(&options.base_model)?;
    let config = Phi3Config::from_file(&files.config())?;
    let (tokenizer, template) = crate::pipeline::load_text(&files)?;
    let data_options = DataOptions {
        format: options.format,
        max_seq_length: options.max_seq_length,
        train_on_prompt: options.train_on_prompt,
        packing: options.packing,
    };
    let train_data = load_dataset(&options.dataset, &tokenizer, &template, &data_options)?;
    if lead {
        eprintln!("{}: {}", options.dataset.display(), train_data.stats);
    }
    let pad = train_data.eos_id;
    let (train, eval) = match &options.eval_dataset {
        Some(path) => {
            let eval = load_dataset(path, &tokenizer, &template, &data_options)?;
            if lead {
                eprintln!("{}: {}", path.display(), eval.stats);
            }
            (train_data.examples, eval.examples)
        }
        None => split_eval(
            train_data.examples,
            options.eval_split,
            options.trainer.seed,
        ),
    };
    let train = RowDataset::from_options(train, &data_options, pad);
    let eval = (!eval.is_empty()).then(|| RowDataset::from_options(eval, &data_options, pad));

    let shape = philo_plan::ModelShape::from_config(&config);
    let setup = philo_plan::TrainSetup {
        batch: 1,
        seq: options.max_seq_length,
        rank: options.lora_r,
        targets: options.target_modules.clone(),
        base: crate::plan::base_format(options.quant, options.double_quant),
        dtype_bytes: options.dtype.size_in_bytes(),
        checkpointing: options.trainer.gradient_checkpointing,
        offload: options.trainer.gradient_offload,
        uncheckpointed_layers: 0,
        dropout: options.lora_dropout > 0.0,
    };
    let sizing = crate::plan::size_batch(
        &shape,
        &setup,
        options.batch_size,
        options.trainer.gradient_accumulation_steps,
        options.effective_batch_size,
        options.uncheckpointed_layers,
        &options.device,
    )?;
    if options.batch_size == BatchChoice::Auto || options.effective_batch_size.is_some() {
        eprintln!(
            "micro-batch {} x {} tokens, gradient accumulation {} (effective batch {}); predicted peak {:.1} GiB{}",
            sizing.batch,
            sizing.seq,
            sizing.accumulation,
            sizing.batch * sizing.accumulation,
            sizing.predicted_peak_gib,
            sizing
                .free_gib
                .map_or(String::new(), |g| format!(" of {g:.1} GiB free"))
        );
    }
    if options.uncheckpointed_layers == LayerChoice::Auto {
        eprintln!(
            "uncheckpointed layers: {} of {} (auto); predicted peak {:.1} GiB",
            sizing.uncheckpointed_layers, config.num_hidden_layers, sizing.predicted_peak_gib
        );
    }
    let advice = sizing.advice();
    let mut trainer_config = options.trainer.clone();
    trainer_config.batch_size = sizing.batch;
    trainer_config.gradient_accumulation_steps = sizing.accumulation;
    trainer_config.uncheckpointed_layers = sizing.uncheckpointed_layers;

    let store = SafetensorsStore::open_dir(&files.dir)?;
    let model = Phi3::load_as(
        &config,
        &store,
        options.dtype,
        &options.device,
        options.quant.format(options.double_quant),
    )
    .map_err(|e| crate::oom::explain(e, "loading the base model", &advice))?;
    let mut adapter = AdapterConfig::new(
        options.lora_r,
        options.lora_alpha,
        options.lora_dropout,
        options.target_modules.clone(),
        options.use_rslora,
    );
    adapter.base_model_name_or_path = Some(options.base_model.clone());
    let comm: Box<dyn philo_train::comm::Communicator> = match &options.rank {
        Some(env) => crate::launch::communicator(env, &options.device)?,
        None => Box::new(philo_train::comm::SingleProcess),
    };
    let mut trainer = Trainer::new_rank(model, adapter, train, eval, trainer_config, comm)
        .map_err(|e| {
            crate::oom::explain(
                e,
                "allocating the LoRA adapters and their optimizer state",
                &advice,
            )
        })?;
    if let Some(dir) = &options.resume {
        trainer.resume_from(dir)?;
        if lead {
            eprintln!("resumed from {}", dir.display());
        }
    }

    let bar = if lead {
        ProgressBar::new(trainer.total_steps() as u64)
    } else {
        ProgressBar::hidden()
    };
    // Without a terminal the bar is hidden; the step lines still go to stderr.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    // The bar's message: the last logged step's figures, then the GPU's state at every step.
    let mut logged = String::new();
    let summary = trainer.run(stop, |event| match event {
        TrainEvent::Started {
            start_step,
            trainable,
            ..
        } => {
            bar.set_position(start_step as u64);
            say(format!("training {trainable} LoRA parameters"));
        }
        TrainEvent::Progress { step, gpu } => {
            bar.set_position(step as u64);
            let gpu = gpu.map_or(String::new(), |g| {
                format!(
                    " | GPU {}% {:.1}/{:.1} GiB",
                    g.utilization_percent, g.memory_used_gib, g.memory_total_gib
                )
            });
            bar.set_message(format!("{logged}{gpu}"));
        }
        TrainEvent::Step(m) => {
            let eval = m
                .eval_loss
                .map_or(String::new(), |e| format!(" eval {e:.4}"));
            let memory = m
                .peak_memory_gib
                .map_or(String::new(), |g| format!(" peak {g:.2} GiB"));
            let gpu = m.gpu.map_or(String::new(), |g| {
                format!(
                    " GPU {}% {:.1}/{:.1} GiB",
                    g.utilization_percent, g.memory_used_gib, g.memory_total_gib
                )
            });
            logged = format!(
                "loss {:.4}{eval} lr {:.2e} grad {:.2} {:.0} tok/s{memory}",
                m.loss, m.lr, m.grad_norm, m.tokens_per_second
            );
            say(format!(
                "step {} loss {:.4}{eval} lr {:.2e} grad_norm {:.3} {:.0} tok/s{memory}{gpu}",
                m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_second
            ));
        }
        TrainEvent::Saved { step, dir } => say(format!("step {step}: saved {}", dir.display())),
    });
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            let kept = match trainer.last_checkpoint() {
                Some(dir) => format!(
                    "; the last checkpoint, {}, is intact (--resume latest continues from it)",
                    dir.display()
                ),
                None => String::new(),
            };
            bar.abandon();
            return Err(crate::oom::explain(
                e,
                "running a training step",
                &format!("{advice}{kept}"),
            ));
        }
    };
    bar.finish();
    let out = &options.trainer.output_dir;
    if !lead {
        return Ok(summary);
    }
    if let Err(e) =
        philo_train::loss_plot::write_loss_plot(&out.join("metrics.jsonl"), &out.join("loss.png"))
    {
        eprintln!("warning: no loss plot: {e}");
    }
    Ok(summary)
}
