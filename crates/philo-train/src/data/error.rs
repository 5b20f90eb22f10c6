//! The error type of the data pipeline.

use std::path::PathBuf;

use super::DataFormat;

/// Everything that can go wrong while loading, tokenising and batching data.
///
/// Messages name the file and record involved and say what to fix, so they can
/// be shown to a user as they are. Causes are part of the message (not chained
/// as `source`), so error reporters print each of them once.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset file could not be read.
    #[error("cannot read dataset {path}: {cause}; check that the path is right and that the file is readable UTF-8 text")]
    Read {
        /// The dataset file.
        path: PathBuf,
        /// The underlying I/O error.
        cause: std::io::Error,
    },

    /// A line of a JSONL file is not valid JSON.
    #[error("{file}:{line}:{column}: not valid JSON: {message}; every non-blank line of a JSONL dataset must be one complete JSON object (a file holding a single JSON document must be a [...] array of records)")]
    JsonLine {
        /// The dataset file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// 1-based column within the line.
        column: usize,
        /// What the JSON parser reported.
        message: String,
    },

    /// A file starting with `[` is not a valid JSON array.
    #[error("{file}:{line}:{column}: not a valid JSON array of records: {message}; fix the JSON at line {line}, column {column} (or write the dataset as JSONL, one object per line)")]
    JsonArray {
        /// The dataset file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the JSON parser reported.
        message: String,
    },

    /// A record is valid JSON but not a usable record.
    #[error("{record}: {problem}")]
    InvalidRecord {
        /// Which record: `file:line` for JSONL, `file record N` (1-based) for arrays.
        record: String,
        /// What is wrong and how to fix it.
        problem: String,
    },

    /// A record lacks the fields of its format (or has them with the wrong type).
    #[error("{record}: {problem}; a record in the {format} format needs {expected}")]
    MissingFields {
        /// Which record: `file:line` for JSONL, `file record N` (1-based) for arrays.
        record: String,
        /// The format the file is read in.
        format: DataFormat,
        /// Which field is missing or wrong.
        problem: String,
        /// The fields the format expects.
        expected: &'static str,
    },

    /// The dataset holds no records.
    #[error("{file}: the dataset is empty (no records); add records, one JSON object per line (JSONL) or as a JSON array")]
    Empty {
        /// The dataset file (or the name given to [`super::parse_records`]).
        file: String,
    },

    /// No format was forced and the first record's keys match none.
    #[error("{file}: cannot tell the dataset format from the first record ({record}), whose keys are [{keys}]; use one of: {expected}; or name the format with --format")]
    UnknownFormat {
        /// The dataset file.
        file: String,
        /// The first record.
        record: String,
        /// The keys it has.
        keys: String,
        /// The formats and their keys.
        expected: String,
    },

    /// A format name (e.g. from `--format`) is not one philo knows.
    #[error("unknown dataset format {name:?}; expected one of messages, sharegpt, alpaca, prompt_completion, text")]
    UnknownFormatName {
        /// The name given.
        name: String,
    },

    /// The chat template failed on a record's conversation.
    #[error("{record}: cannot render the conversation with the chat template: {cause}")]
    Template {
        /// Which record.
        record: String,
        /// What the template reported.
        cause: philo_text::TextError,
    },

    /// The tokenizer failed on a record's text.
    #[error("{record}: cannot tokenise the record: {message}; check that the tokenizer.json matches the model")]
    Tokenize {
        /// Which record.
        record: String,
        /// What the tokenizer reported.
        message: String,
    },

    /// The chat template renders conversations in a way whose assistant turns
    /// cannot be located in the rendered text.
    #[error("{record}: cannot find the assistant replies in the text the chat template renders ({detail}); train with --train_on_prompt or use a template that renders each turn the same way whatever follows it")]
    AssistantSpans {
        /// Which record.
        record: String,
        /// What did not line up.
        detail: String,
    },

    /// The tokenizer has no id for the template's end-of-text token.
    #[error("the tokenizer has no token {token:?} (the chat template's eos_token), which the text format appends to each sample; check that tokenizer.json and tokenizer_config.json belong to the same model")]
    MissingEosToken {
        /// The eos token text.
        token: String,
    },

    /// Every sample was dropped for having no labelled token.
    #[error("no training sample left: every one of the {records} records is longer than max_seq_length ({max_seq_length} tokens) before its first token that the loss covers, or has no assistant turn ({truncated} truncated, {skipped} skipped); raise --max_seq_length, or add assistant replies to the data")]
    NoSamples {
        /// Records given.
        records: usize,
        /// The limit used.
        max_seq_length: usize,
        /// How many were truncated.
        truncated: usize,
        /// How many were skipped (all of them).
        skipped: usize,
    },

    /// An option has a value the pipeline cannot work with.
    #[error("invalid data option: {0}")]
    InvalidOption(String),

    /// A [`super::BatchPlan`] was made for a different number of rows than the
    /// dataset it is used with.
    #[error("the batch plan covers {plan} rows but the dataset has {dataset}; make the BatchPlan from RowDataset::len() (packing changes the number of rows)")]
    PlanMismatch {
        /// Rows the plan was made for.
        plan: usize,
        /// Rows in the dataset.
        dataset: usize,
    },
}
