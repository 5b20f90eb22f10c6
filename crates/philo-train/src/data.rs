//! Training data for `philo finetune`: loading, tokenising, packing, batching
//! and prefetching.
//!
//! The pipeline, front to back:
//!
//! 1. [`load_records`] reads a dataset file — a JSON array of records or JSONL
//!    (one JSON object per line, blank lines skipped) — in one of the
//!    [`DataFormat`]s (detected from the first record's keys, or forced) and
//!    turns every record into a [`Record`]: a conversation of
//!    [`philo_text::ChatMessage`]s or a raw text.
//! 2. [`tokenize_records`] renders conversations with the model's chat template,
//!    tokenises them and labels the tokens the loss should cover (by default the
//!    assistant replies and their `<|end|>`; every token with
//!    [`DataOptions::train_on_prompt`]). Samples longer than
//!    [`DataOptions::max_seq_length`] are truncated, keeping the start; the
//!    result is a [`TokenizedDataset`] of [`Example`]s plus [`DataStats`].
//!    [`load_dataset`] does steps 1 and 2 in one call.
//! 3. [`split_eval`] optionally holds out a deterministic evaluation split.
//! 4. [`RowDataset`] turns examples into rows — one example per row, or with
//!    [`DataOptions::packing`] several short examples concatenated into one row
//!    of at most `max_seq_length` tokens, each with its own segment id.
//! 5. [`BatchPlan`] decides which rows go into which batch, shuffled per epoch
//!    and reproducible from a seed, so a resumed run continues at a
//!    [`BatchPosition`]. [`RowDataset::batch`] builds a padded [`Batch`].
//! 6. [`Prefetcher`] builds the batches of a plan on a background thread.
//!
//! Labels are aligned with `input_ids` (not shifted): position `t` holds the id
//! of token `t` when the loss covers it and [`IGNORE_INDEX`] (-100) otherwise.
//! The loss shifts them itself (logits at `t` predict the label at `t + 1`), as
//! in Hugging Face `transformers`.
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use philo_text::{ChatTemplate, Tokenizer};
//! use philo_train::data::{
//!     load_dataset, BatchPlan, BatchPosition, DataOptions, PrefetchLimit, Prefetcher, RowDataset,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new("models/Phi-3-mini-4k-instruct");
//! let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
//! let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
//! let options = DataOptions { max_seq_length: 512, packing: true, ..DataOptions::default() };
//!
//! let data = load_dataset(Path::new("examples/toy_dataset.jsonl"), &tokenizer, &template, &options)?;
//! println!("{}", data.stats);
//! let rows = Arc::new(RowDataset::from_options(data.examples, &options, data.eos_id));
//! let plan = BatchPlan::new(rows.len(), 8, 42)?;
//! let batches = Prefetcher::spawn(rows, plan, BatchPosition::START, PrefetchLimit::Epochs(3), 4)?;
//! for (position, batch) in batches {
//!     println!("epoch {} batch {}: {} x {}", position.epoch, position.index, batch.batch_size(), batch.seq_len());
//! }
//! # Ok(())
//! # }
//! ```

mod batch;
mod error;
mod format;
mod load;
mod prefetch;
mod tokenize;

pub use batch::{split_eval, Batch, BatchPlan, BatchPosition, BatchTensors, Row, RowDataset};
pub use error::DataError;
pub use format::DataFormat;
pub use load::{load_records, parse_records, Record, RecordContent};
pub use prefetch::{PrefetchLimit, Prefetcher};
pub use tokenize::{
    load_dataset, tokenize_records, DataOptions, DataStats, Example, TokenizedDataset,
};

/// The label of a position the loss ignores (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;
