//! `philo eval`: mean loss and perplexity of a dataset's labelled tokens under a model (with an
//! adapter, on a quantised base), with the formats and masking of `philo finetune`.

use std::path::PathBuf;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use philo_train::data::{load_dataset, DataFormat, DataOptions, RowDataset};
use philo_train::eval::{evaluate, EvalResult};

use crate::pipeline::{Pipeline, WeightOptions};

/// Everything `philo eval` takes.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub weights: WeightOptions,
    pub dataset: PathBuf,
    pub format: Option<DataFormat>,
    pub max_seq_length: usize,
    pub train_on_prompt: bool,
    pub batch_size: usize,
    pub device: Device,
    pub dtype: DType,
}

/// Loads the model and the data, and evaluates with a progress bar over the rows.
pub fn run(options: &EvalOptions) -> anyhow::Result<EvalResult> {
    let pipeline = Pipeline::load(
        &options.model,
        options.adapter.as_deref(),
        options.weights,
        options.dtype,
        &options.device,
    )?;
    let data_options = DataOptions {
        format: options.format,
        max_seq_length: options.max_seq_length,
        train_on_prompt: options.train_on_prompt,
        packing: false,
    };
    let data = load_dataset(
        &options.dataset,
        &pipeline.tokenizer,
        &pipeline.template,
        &data_options,
    )?;
    eprintln!("{}: {}", options.dataset.display(), data.stats);
    let rows = RowDataset::from_options(data.examples, &data_options, data.eos_id);
    let bar = ProgressBar::new(rows.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} rows [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    let result = evaluate(&pipeline.model, &rows, options.batch_size, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    result.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no labelled token to evaluate (--train_on_prompt counts the prompts too)",
            options.dataset.display()
        )
    })
}
