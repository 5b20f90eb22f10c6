//! Rendering records with the chat template, tokenising them and labelling the
//! tokens the loss covers.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use philo_text::{common_prefix_len, ChatMessage, ChatTemplate, Tokenizer};

use super::{load_records, DataError, DataFormat, Record, RecordContent, IGNORE_INDEX};

/// How records become training examples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOptions {
    /// The format of the dataset files; `None` detects it per file from the
    /// first record's keys.
    pub format: Option<DataFormat>,
    /// The longest sample (and, with packing, the longest row) in tokens.
    /// Longer samples are truncated, keeping their start.
    pub max_seq_length: usize,
    /// Put the loss on every token (system and user turns and the template's
    /// markup too) instead of only on the assistant replies.
    pub train_on_prompt: bool,
    /// Concatenate short samples into rows of up to `max_seq_length` tokens
    /// (see [`super::RowDataset::packed`]).
    pub packing: bool,
}

impl Default for DataOptions {
    /// Detected format, 1024 tokens, loss on assistant replies, no packing.
    fn default() -> Self {
        DataOptions {
            format: None,
            max_seq_length: 1024,
            train_on_prompt: false,
            packing: false,
        }
    }
}

/// One tokenised training sample.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Example {
    /// The token ids.
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids` (not shifted): the token id where the loss
    /// covers the token, [`IGNORE_INDEX`] (-100) where it does not.
    pub labels: Vec<i64>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens the loss covers.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What tokenising a dataset did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DataStats {
    /// Records read.
    pub records: usize,
    /// Samples cut to `max_seq_length` tokens (kept ones and skipped ones).
    pub truncated: usize,
    /// Samples dropped because no token the loss covers was left (after
    /// truncation, or because the conversation has no assistant turn).
    pub skipped_no_loss: usize,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Tokens the loss covers in the kept examples.
    pub loss_tokens: usize,
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records -> {} examples, {} tokens ({} in the loss); {} truncated, {} skipped with nothing to learn",
            self.records,
            self.records - self.skipped_no_loss,
            self.tokens,
            self.loss_tokens,
            self.truncated,
            self.skipped_no_loss
        )
    }
}

/// The examples of a dataset and how they were made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedDataset {
    /// The examples, in record order (skipped records left out).
    pub examples: Vec<Example>,
    /// Counts of records, truncations, skips and tokens.
    pub stats: DataStats,
    /// The id of the chat template's eos token (`<|endoftext|>` for Phi-3),
    /// which ends `text` samples; Phi-3 also pads with it.
    pub eos_id: u32,
}

/// Reads a dataset file with [`load_records`] (in `options.format`, or
/// detected) and tokenises it with [`tokenize_records`].
pub fn load_dataset(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    options: &DataOptions,
) -> Result<TokenizedDataset, DataError> {
    let records = load_records(path, options.format)?;
    tokenize_records(&records, tokenizer, template, options)
}

/// Turns records into training examples.
///
/// - Conversations are rendered with `template` (without a generation prompt,
///   so the text ends the way the template closes a conversation) and
///   tokenised without added special tokens (the template writes any it wants).
///   Unless `options.train_on_prompt` is set, the loss covers exactly the
///   tokens the template emits for each assistant message's content plus the
///   end-of-turn marker it writes after it (`<|end|>` for Phi-3). Those spans
///   are found by rendering the conversation up to each assistant message with
///   the generation prompt (where the reply starts) and with the message (where
///   its turn ends) and mapping the character spans to tokens through the
///   tokenizer's offsets, so any template that renders each turn the same way
///   whatever follows it works.
/// - Texts are tokenised and followed by the eos token; the loss covers every
///   token.
///
/// Samples longer than `options.max_seq_length` are cut to their first
/// `max_seq_length` tokens ([`DataStats::truncated`]); samples left with no
/// token in the loss are dropped ([`DataStats::skipped_no_loss`]). When every
/// sample is dropped the result is [`DataError::NoSamples`].
pub fn tokenize_records(
    records: &[Record],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    options: &DataOptions,
) -> Result<TokenizedDataset, DataError> {
    if options.max_seq_length == 0 {
        return Err(DataError::InvalidOption(
            "max_seq_length is 0; give at least 1 (e.g. --max_seq_length 1024)".to_string(),
        ));
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            file: "the dataset".to_string(),
        });
    }
    let eos_token = template.eos_token();
    let eos_id = tokenizer
        .token_to_id(eos_token)
        .ok_or_else(|| DataError::MissingEosToken {
            token: eos_token.to_string(),
        })?;

    let mut stats = DataStats {
        records: records.len(),
        ..DataStats::default()
    };
    let mut examples = Vec::with_capacity(records.len());
    for record in records {
        let mut example = match &record.content {
            RecordContent::Text(text) => {
                let mut input_ids = encode(tokenizer, text, &record.origin)?.0;
                input_ids.push(eos_id);
                let labels = input_ids.iter().map(|&id| i64::from(id)).collect();
                Example { input_ids, labels }
            }
            RecordContent::Conversation(messages) => tokenize_conversation(
                messages,
                tokenizer,
                template,
                options.train_on_prompt,
                &record.origin,
            )?,
        };
        if example.len() > options.max_seq_length {
            example.input_ids.truncate(options.max_seq_length);
            example.labels.truncate(options.max_seq_length);
            stats.truncated += 1;
        }
        let loss_tokens = example.loss_tokens();
        if loss_tokens == 0 {
            stats.skipped_no_loss += 1;
            continue;
        }
        stats.tokens += example.len();
        stats.loss_tokens += loss_tokens;
        examples.push(example);
    }

    if examples.is_empty() {
        return Err(DataError::NoSamples {
            records: stats.records,
            max_seq_length: options.max_seq_length,
            truncated: stats.truncated,
            skipped: stats.skipped_no_loss,
        });
    }
    Ok(TokenizedDataset {
        examples,
        stats,
        eos_id,
    })
}

/// Token ids and, for each, its byte range `(start, end)` in the text.
type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// Token ids and their byte offsets in `text`.
fn encode(tokenizer: &Tokenizer, text: &str, origin: &str) -> Result<Encoded, DataError> {
    // `tokenizers::Tokenizer::encode` reports byte offsets into `text`.
    let encoding = tokenizer
        .inner()
        .encode(text, false)
        .map_err(|e| DataError::Tokenize {
            record: origin.to_string(),
            message: e.to_string(),
        })?;
    Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
}

fn tokenize_conversation(
    messages: &[ChatMessage],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    train_on_prompt: bool,
    origin: &str,
) -> Result<Example, DataError> {
    let render = |messages: &[ChatMessage], generation_prompt: bool| {
        template
            .render(messages, generation_prompt)
            .map_err(|cause| DataError::Template {
                record: origin.to_string(),
                cause,
            })
    };
    let full = render(messages, false)?;
    let (input_ids, offsets) = encode(tokenizer, &full, origin)?;
    if train_on_prompt {
        let labels = input_ids.iter().map(|&id| i64::from(id)).collect();
        return Ok(Example { input_ids, labels });
    }

    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        // Where the reply starts: after the prompt the model is given to write it.
        let prompt = render(&messages[..i], true)?;
        if !full.starts_with(&prompt) {
            return Err(DataError::AssistantSpans {
                record: origin.to_string(),
                detail: format!(
                    "the prompt rendered for assistant message {} is not a prefix of the whole conversation",
                    i + 1
                ),
            });
        }
        // Where its turn ends: the conversation through this message is the same
        // whether the template then adds a generation prompt or closes it, up to
        // the end of this turn.
        let open = render(&messages[..=i], true)?;
        let closed = render(&messages[..=i], false)?;
        let end = common_prefix_len(&open, &closed).min(common_prefix_len(&closed, &full));
        if end > prompt.len() {
            spans.push(prompt.len()..end);
        }
    }

    let labels = input_ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, end))| {
            if spans.iter().any(|span| in_span(start..end, span)) {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(Example { input_ids, labels })
}

/// Whether a token with byte range `token` belongs to `span`: most of its
/// characters lie inside (so a token that also swallows a separator, like a
/// word piece carrying the space before it, counts where its text is), or, for
/// a token with an empty range, its position does.
fn in_span(token: Range<usize>, span: &Range<usize>) -> bool {
    if token.is_empty() {
        return span.contains(&token.start);
    }
    let overlap = token
        .end
        .min(span.end)
        .saturating_sub(token.start.max(span.start));
    2 * overlap > token.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_stops_at_first_difference() {
        assert_eq!(common_prefix_len("abcd", "abxd"), 2);
        assert_eq!(common_prefix_len("abc", "abcdef"), 3);
        assert_eq!(common_prefix_len("", "abc"), 0);
        assert_eq!(common_prefix_len("héllo", "hélp"), 4);
    }

    #[test]
    fn token_span_membership_by_majority() {
        let span = 10..20;
        assert!(in_span(10..15, &span));
        assert!(in_span(9..15, &span)); // a leading separator
        assert!(!in_span(0..11, &span)); // a header that swallows one character
        assert!(!in_span(18..25, &span)); // mostly after the span
        assert!(in_span(15..15, &span));
        assert!(!in_span(20..20, &span));
    }
}
