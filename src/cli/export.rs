//! `philo export`: the arguments; the work is `philo::export`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// llama.cpp's format (also Ollama's).
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A model folder (Hugging Face layout) or hub id.
    #[arg(long, alias = "base_model", alias = "base-model")]
    model: String,
    /// A PEFT LoRA adapter (e.g. philo finetune's output) merged into the weights first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "gguf")]
    format: ExportFormat,
    /// f32, f16, bf16, q8_0, q4_0 or q4_k_m.
    #[arg(long, default_value = "q4_k_m")]
    quant: philo_gguf::ExportType,
    /// The file to write (must not exist yet).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let ExportFormat::Gguf = args.format;
    let start = std::time::Instant::now();
    let summary = philo::export::export(&philo::export::ExportOptions {
        model: args.model,
        adapter: args.adapter,
        quant: args.quant,
        output: args.output.clone(),
    })?;
    let types: Vec<String> = summary
        .types
        .iter()
        .map(|(name, count)| format!("{count} {name}"))
        .collect();
    println!(
        "wrote {} ({} tensors: {}; {:.2} GiB) in {:.1} s",
        args.output.display(),
        summary.tensors,
        types.join(", "),
        summary.bytes as f64 / (1u64 << 30) as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
