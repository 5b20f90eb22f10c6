//! `philo plan`: the memory and speed of a fine-tune, a generation or a server on a GPU,
//! predicted from the model's config (no weights are read) by `philo-plan`, as a report and
//! as JSON; and `--batch_size auto` for `philo finetune`.

use std::path::Path;

use anyhow::Context;
use philo_model::{ModelFiles, Phi3Config};
use philo_plan::{
    BaseFormat, BatchChoice, FinetunePlan, GeneratePlan, GpuSpec, LayerChoice, MemoryLimits,
    ModelShape, ServePlan,
};

use crate::quant::BaseQuant;

/// The base format a plan computes with.
pub fn base_format(quant: BaseQuant, double_quant: bool) -> BaseFormat {
    match quant {
        BaseQuant::None => BaseFormat::Dense,
        BaseQuant::Int8 => BaseFormat::Int8,
        BaseQuant::Int4 => BaseFormat::Int4,
        BaseQuant::Nf4 => BaseFormat::Nf4 { double_quant },
    }
}

/// The shape of `--model` (a folder or hub id: only its config.json is read or downloaded) or
/// of `--config FILE`; Phi-3-mini-4k when neither is given.
pub fn model_shape(model: Option<&str>, config: Option<&Path>) -> anyhow::Result<ModelShape> {
    let config = match (model, config) {
        (Some(_), Some(_)) => anyhow::bail!("give --model or --config, not both"),
        (Some(spec), None) => Phi3Config::from_file(&ModelFiles::resolve_config(spec)?)?,
        (None, Some(path)) => Phi3Config::from_file(path)?,
        (None, None) => Phi3Config::phi3_mini_4k(),
    };
    Ok(ModelShape::from_config(&config))
}

/// `--gpu`: a preset or custom spec; without it, this machine's first GPU when NVML names one
/// philo knows (with the memory the driver reports).
pub fn gpu_spec(spec: Option<&str>) -> anyhow::Result<GpuSpec> {
    if let Some(spec) = spec {
        return Ok(GpuSpec::parse(spec)?);
    }
    let no_gpu = || {
        format!(
            "no --gpu given and no known GPU here: pass --gpu with one of {} or custom:24GiB,1008GB/s,165TFLOPs",
            GpuSpec::preset_names().join(", ")
        )
    };
    let gpu = philo_monitor::Monitor::open()
        .and_then(|monitor| monitor.sample_device(0))
        .map_err(|_| anyhow::anyhow!(no_gpu()))?;
    let preset = preset_of(&gpu.name)
        .with_context(|| format!("{} is not a preset GPU: {}", gpu.name, no_gpu()))?;
    let mut spec = GpuSpec::parse(preset)?;
    spec.memory_bytes = gpu.memory_total_bytes;
    Ok(spec)
}

/// The preset of an NVML device name ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB").
fn preset_of(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase().replace([' ', '-', '_'], "");
    let has = |s: &str| n.contains(s);
    Some(match () {
        _ if has("rtx4090") => "rtx4090",
        _ if has("rtx3090") => "rtx3090",
        _ if has("h200") => "h200",
        _ if has("h100") => "h100",
        _ if has("a100") && has("80g") => "a100-80",
        _ if has("a100") => "a100-40",
        _ if has("a10") => "a10",
        _ if has("l4") && !has("l40") => "l4",
        _ if has("t4") => "t4",
        _ => return None,
    })
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes)
}

/// The fit line of a report: what the process will hold on the GPU against its memory.
fn verdict(fits: bool, peak_gib: f64, device_gib: f64, gpu_gib: f64) -> String {
    let parts = format!(
        "{} of tensors at the peak, {} with the allocator's reserve and the CUDA context",
        gib(peak_gib),
        gib(device_gib)
    );
    if fits {
        format!(
            "fits: {parts}, of {}; {} to spare",
            gib(gpu_gib),
            gib(gpu_gib - device_gib)
        )
    } else {
        format!("does NOT fit: {parts}; the GPU has {}", gib(gpu_gib))
    }
}

/// The text report of a fine-tune plan.
pub fn finetune_report(plan: &FinetunePlan) -> String {
    let mut out = format!(
        "fine-tune on {} ({:.1} GiB): {} base, LoRA r {}, micro-batch {}{} x {} tokens, gradient accumulation {} (effective batch {})\n",
        plan.gpu,
        plan.gpu_memory_gib,
        plan.base,
        plan.rank,
        plan.batch_size,
        if plan.auto_batch { " (auto)" } else { "" },
        plan.seq,
        plan.gradient_accumulation_steps,
        plan.effective_batch_size
    );
    if plan.auto_layers || plan.uncheckpointed_layers > 0 {
        out += &format!(
            "uncheckpointed layers: {}{} (each keeps its state instead of being recomputed)\n",
            plan.uncheckpointed_layers,
            if plan.auto_layers { " (auto)" } else { "" }
        );
    }
    if !plan.bf16 {
        out += "this GPU has no bf16: train with --dtype f16 (philo scales the loss dynamically)\n";
    }
    out += "predicted peak memory:\n";
    for (name, value) in plan.breakdown_gib.terms() {
        if value > 0.0 {
            out += &format!("  {name:<20} {value:>7.2} GiB\n");
        }
    }
    out += &format!("  {:<20} {:>7.2} GiB\n", "total", plan.peak_gib);
    out += &verdict(
        plan.fits,
        plan.peak_gib,
        plan.device_gib,
        plan.gpu_memory_gib,
    );
    out += "\n";
    if plan.host_pinned_gib > 0.0 {
        out += &format!(
            "host memory: {} pinned for the gradient checkpoints (--no_gradient_offload keeps them on the GPU instead)\n",
            gib(plan.host_pinned_gib)
        );
    }
    out += &match plan.largest_batch {
        Some(b) => format!(
            "--batch_size auto would choose {b} (the largest micro-batch within {:.0} % headroom{})\n",
            100.0 * philo_plan::HEADROOM,
            if plan.host_limited { ", host memory included" } else { "" }
        ),
        None => "not even one row fits: lower --max_seq_length or --lora_r, or use --quant nf4\n"
            .to_string(),
    };
    out += &format!(
        "speed: about {:.0} tokens/s, {:.1} s per optimizer step (fitted on an H200; other GPUs scaled by their peak FLOP/s and bandwidth)\n",
        plan.tokens_per_second, plan.seconds_per_optimizer_step
    );
    out
}

/// The text report of a generation plan.
pub fn generate_report(plan: &GeneratePlan) -> String {
    let b = &plan.breakdown_gib;
    format!(
        "generate on {} ({:.1} GiB): {} base, {} prompt + {} new tokens\npredicted peak memory:\n  weights              {:>7.2} GiB\n  KV cache             {:>7.2} GiB\n  prefill activations  {:>7.2} GiB\n  total                {:>7.2} GiB\n{}\nspeed: about {:.0} tokens/s decoding one sequence\n",
        plan.gpu,
        plan.gpu_memory_gib,
        plan.base,
        plan.prompt_tokens,
        plan.max_new_tokens,
        b.weights,
        b.kv_cache,
        b.activations,
        plan.peak_gib,
        verdict(plan.fits, plan.peak_gib, plan.device_gib, plan.gpu_memory_gib),
        plan.tokens_per_second
    )
}

/// The text report of a serving plan.
pub fn serve_report(plan: &ServePlan) -> String {
    format!(
        "serve on {} ({:.1} GiB): {} base\npredicted memory:\n  weights              {:>7.2} GiB\n  step workspace       {:>7.2} GiB\n  KV cache             {:>7.2} GiB ({} tokens: {} streams of {} tokens)\n  total                {:>7.2} GiB\n{}\nthe largest KV cache that fits: --kv-cache-gib {:.1} ({} tokens, {} streams of {} tokens)\nspeed: about {:.0} generated tokens/s with {} streams\n",
        plan.gpu,
        plan.gpu_memory_gib,
        plan.base,
        plan.weights_gib,
        plan.workspace_gib,
        plan.kv_cache_gib,
        plan.kv_tokens,
        plan.streams,
        plan.context,
        plan.peak_gib,
        verdict(plan.fits, plan.peak_gib, plan.device_gib, plan.gpu_memory_gib),
        (plan.max_kv_cache_gib * 10.0).floor() / 10.0,
        plan.max_kv_tokens,
        plan.max_kv_tokens / plan.context.max(1),
        plan.context,
        plan.tokens_per_second,
        plan.running,
    )
}

/// Writes `json` to `path`.
pub fn write_json(path: &Path, json: &str) -> anyhow::Result<()> {
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// What a plan on `gpu` may use: its memory but the CUDA context, and `host_gib` of host
/// memory for pinned checkpoints when given.
pub fn plan_limits(gpu: &GpuSpec, host_gib: Option<f64>) -> MemoryLimits {
    MemoryLimits {
        gpu_bytes: gpu.memory_bytes as f64 - philo_plan::CUDA_CONTEXT_BYTES,
        host_bytes: host_gib.map(|g| g * philo_plan::GIB),
    }
}

/// Host memory available to a new allocation (Linux `MemAvailable`), bytes.
pub fn host_available_bytes() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_names_map_to_presets() {
        assert_eq!(preset_of("NVIDIA GeForce RTX 4090"), Some("rtx4090"));
        assert_eq!(preset_of("NVIDIA H200"), Some("h200"));
        assert_eq!(preset_of("NVIDIA A100-SXM4-80GB"), Some("a100-80"));
        assert_eq!(preset_of("NVIDIA A100-PCIE-40GB"), Some("a100-40"));
        assert_eq!(preset_of("NVIDIA A10"), Some("a10"));
        assert_eq!(preset_of("NVIDIA L4"), Some("l4"));
        assert_eq!(preset_of("NVIDIA L40S"), None);
        assert_eq!(preset_of("Tesla T4"), Some("t4"));
    }
}

/// How a fine-tune's micro-batch was sized on its device, and what philo-plan predicts of it
/// (for the run's first line and for an out-of-memory error).
#[derive(Debug, Clone)]
pub struct BatchSizing {
    pub batch: usize,
    pub accumulation: usize,
    /// Decoder layers that keep their state instead of being recomputed.
    pub uncheckpointed_layers: usize,
    pub seq: usize,
    pub predicted_peak_gib: f64,
    /// Device memory free before the model was loaded (GPU only).
    pub free_gib: Option<f64>,
    /// The largest micro-batch that fits the free memory with the headroom.
    pub largest_fit: Option<usize>,
}

impl BatchSizing {
    /// What to do after running out of memory with this sizing.
    pub fn advice(&self) -> String {
        let free = self.free_gib.map_or(String::new(), |g| {
            format!(" of the {g:.1} GiB free at the start")
        });
        let prediction = format!(
            "philo plan predicted a peak of {:.1} GiB{free} for micro-batch {} x {} tokens",
            self.predicted_peak_gib, self.batch, self.seq
        );
        match self.largest_fit {
            Some(fit) if fit < self.batch => format!(
                "{prediction}: --batch_size {fit} fits (or --batch_size auto, which keeps the effective batch with --effective_batch_size)"
            ),
            Some(_) => format!(
                "{prediction}, which should have fit: other processes may hold GPU memory (see philo monitor); try --batch_size {}",
                (self.batch / 2).max(1)
            ),
            None => format!(
                "{prediction}: not even one row fits; lower --max_seq_length or --lora_r, or use --quant nf4"
            ),
        }
    }
}

/// The micro-batch, gradient accumulation and uncheckpointed layers of a fine-tune of `setup`
/// (its batch and layers ignored) on `device`: `batch` rows, or with [`BatchChoice::Auto`] the
/// largest that fits the free GPU memory with every layer checkpointed; with `effective` the
/// accumulation keeps that many rows per optimizer step; then `layers`, or with
/// [`LayerChoice::Auto`] as many as still fit beside that micro-batch.
pub fn size_batch(
    shape: &ModelShape,
    setup: &philo_plan::TrainSetup,
    batch: BatchChoice,
    accumulation: usize,
    effective: Option<usize>,
    layers: LayerChoice,
    device: &candle_core::Device,
) -> anyhow::Result<BatchSizing> {
    anyhow::ensure!(
        accumulation > 0,
        "--gradient_accumulation_steps must be at least 1"
    );
    if let Some(0) = effective {
        anyhow::bail!("--effective_batch_size must be at least 1");
    }
    // The libraries that load with the first kernels still have to fit.
    let free = philo_model::memory::device_memory(device)
        .map(|(free, _)| (free as f64 - philo_plan::LIBRARY_BYTES).max(0.0));
    let limits = free.map(|gpu_bytes| MemoryLimits {
        gpu_bytes,
        host_bytes: host_available_bytes(),
    });
    let setup = philo_plan::TrainSetup {
        uncheckpointed_layers: layers.before_batch(),
        ..setup.clone()
    };
    let largest_fit =
        limits.and_then(|limits| philo_plan::finetune::largest_batch(shape, &setup, limits));
    if batch == BatchChoice::Auto && free.is_none() {
        anyhow::bail!(
            "--batch_size auto sizes the batch from free GPU memory, and this run is not on a CUDA GPU: give a number"
        );
    }
    if layers == LayerChoice::Auto && free.is_none() {
        anyhow::bail!(
            "--uncheckpointed_layers auto sizes from free GPU memory, and this run is not on a CUDA GPU: give a number (0 checkpoints every layer)"
        );
    }
    let (batch, accumulation) = philo_plan::finetune::choose_batch(
        batch,
        accumulation,
        effective,
        largest_fit,
    )
    .with_context(|| {
        format!(
            "--batch_size auto: not even one row of {} tokens fits in the {:.1} GiB free; lower --max_seq_length or --lora_r, or use --quant nf4",
            setup.seq,
            free.unwrap_or(0.0) / philo_plan::GIB
        )
    })?;
    let mut planned = philo_plan::TrainSetup { batch, ..setup };
    if let Some(limits) = limits {
        planned.uncheckpointed_layers =
            philo_plan::finetune::choose_layers(shape, &planned, layers, limits);
    }
    Ok(BatchSizing {
        batch,
        accumulation,
        uncheckpointed_layers: planned.uncheckpointed_layers,
        seq: planned.seq,
        predicted_peak_gib: philo_plan::train::train_memory(shape, &planned).total()
            / philo_plan::GIB,
        free_gib: free.map(|f| f / philo_plan::GIB),
        largest_fit,
    })
}
