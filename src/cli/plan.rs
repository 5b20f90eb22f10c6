//! `philo plan finetune|serve|generate`: the arguments; the work is `philo::plan` and
//! `philo-plan`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use philo::device::parse_dtype;
use philo::quant::BaseQuant;

use crate::cli::serve::ServeShapeArgs;
use crate::TrainShapeArgs;

#[derive(Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    job: PlanJob,
}

#[derive(Subcommand)]
enum PlanJob {
    /// A fine-tune with finetune's flags (`philo plan finetune --gpu rtx4090 --batch_size 12 ...`).
    Finetune(FinetunePlanArgs),
    /// `philo serve` with its flags: the KV cache that fits and the streams it holds.
    Serve(ServePlanArgs),
    /// One generation: its peak memory and decode speed.
    Generate(GeneratePlanArgs),
}

/// What every plan takes: the model's shape, the GPU and where the JSON goes.
#[derive(Args)]
struct Target {
    /// A model folder or hub id (only config.json is read); default: Phi-3-mini-4k.
    #[arg(long, alias = "base_model", alias = "base-model")]
    model: Option<String>,
    /// A config.json instead of --model.
    #[arg(long, conflicts_with = "model")]
    config: Option<PathBuf>,
    /// rtx4090, rtx3090, l4, t4, a10, a100-40, a100-80, h100, h200 or
    /// custom:24GiB,1008GB/s,165TFLOPs (default: this machine's GPU).
    #[arg(long)]
    gpu: Option<String>,
    /// Also write the plan as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct FinetunePlanArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    shape: TrainShapeArgs,
    /// Finetune's flags that do not change memory or speed are accepted, so that a finetune
    /// command line can be planned by inserting `plan`.
    #[arg(long, hide = true)]
    dataset: Option<PathBuf>,
    #[arg(long = "lora_alpha", alias = "lora-alpha", hide = true)]
    lora_alpha: Option<f64>,
    #[arg(long, alias = "learning_rate", hide = true)]
    lr: Option<f64>,
    #[arg(long = "output_dir", alias = "output-dir", hide = true)]
    output_dir: Option<PathBuf>,
    /// Host memory (GiB) the pinned gradient checkpoints may take when choosing the largest
    /// batch (default: not limited; finetune --batch_size auto uses what the machine has free).
    #[arg(long = "host_memory_gib", alias = "host-memory-gib")]
    host_memory_gib: Option<f64>,
}

/// How generation and serving hold the model.
#[derive(Args)]
struct InferenceWeights {
    /// none, int8, int4 or nf4.
    #[arg(long, default_value = "none")]
    quant: BaseQuant,
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<candle_core::DType>,
}

impl InferenceWeights {
    fn base(&self) -> philo_plan::BaseFormat {
        philo::plan::base_format(self.quant, true)
    }

    fn dtype_bytes(&self) -> usize {
        dtype_bytes(self.dtype)
    }
}

#[derive(Args)]
struct ServePlanArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    weights: InferenceWeights,
    #[command(flatten)]
    server: ServeShapeArgs,
    /// Tokens a stream holds, prompt and answer.
    #[arg(long, default_value_t = 2048)]
    context: usize,
}

#[derive(Args)]
struct GeneratePlanArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    weights: InferenceWeights,
    #[arg(long = "prompt_tokens", alias = "prompt-tokens", default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    max_new_tokens: usize,
}

/// Bytes of the compute dtype (plans assume bf16 unless told).
fn dtype_bytes(dtype: Option<candle_core::DType>) -> usize {
    dtype.map_or(2, |d| d.size_in_bytes())
}

impl Target {
    fn resolve(&self) -> anyhow::Result<(philo_plan::ModelShape, philo_plan::GpuSpec)> {
        let shape = philo::plan::model_shape(self.model.as_deref(), self.config.as_deref())?;
        Ok((shape, philo::plan::gpu_spec(self.gpu.as_deref())?))
    }

    /// Prints `report` and writes `plan` to `--json` when given.
    fn emit(&self, report: String, plan: &impl serde::Serialize) -> anyhow::Result<()> {
        print!("{report}");
        if let Some(path) = &self.json {
            philo::plan::write_json(path, &serde_json::to_string_pretty(plan)?)?;
        }
        Ok(())
    }
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    match args.job {
        PlanJob::Finetune(a) => {
            let (shape, gpu) = a.target.resolve()?;
            let s = &a.shape;
            let setup = philo_plan::TrainSetup {
                batch: 1,
                seq: s.max_seq_length,
                rank: s.lora_r,
                targets: s.target_modules.clone(),
                base: philo::plan::base_format(s.quant, !s.no_double_quant),
                dtype_bytes: dtype_bytes(s.dtype),
                checkpointing: !s.no_gradient_checkpointing,
                offload: !s.no_gradient_offload,
                uncheckpointed_layers: 0,
                dropout: s.lora_dropout > 0.0,
            };
            let choices = philo_plan::SizeChoices {
                batch: s.batch_size,
                accumulation: s.gradient_accumulation_steps,
                effective: s.effective_batch_size,
                layers: s.uncheckpointed_layers,
            };
            let plan = philo_plan::plan_finetune(
                &shape,
                &setup,
                choices,
                &gpu,
                philo::plan::plan_limits(&gpu, a.host_memory_gib),
            )?;
            a.target.emit(philo::plan::finetune_report(&plan), &plan)
        }
        PlanJob::Serve(a) => {
            let (shape, gpu) = a.target.resolve()?;
            let setup = philo_plan::ServeSetup {
                base: a.weights.base(),
                dtype_bytes: a.weights.dtype_bytes(),
                max_batch: a.server.max_batch,
                max_batch_tokens: a.server.max_batch_tokens,
                block_size: a.server.block_size,
                kv_cache_gib: a.server.kv_cache_gib,
                gpu_memory_utilization: a.server.gpu_memory_utilization,
                context: a.context,
            };
            let plan = philo_plan::plan_serve(&shape, &setup, &gpu);
            a.target.emit(philo::plan::serve_report(&plan), &plan)
        }
        PlanJob::Generate(a) => {
            let (shape, gpu) = a.target.resolve()?;
            let plan = philo_plan::plan_generate(
                &shape,
                a.weights.base(),
                a.weights.dtype_bytes(),
                a.prompt_tokens,
                a.max_new_tokens,
                &gpu,
            );
            a.target.emit(philo::plan::generate_report(&plan), &plan)
        }
    }
}
