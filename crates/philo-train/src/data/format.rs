//! Dataset formats and their detection.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use super::DataError;

/// The shape of the records in a dataset file.
///
/// Every format but [`DataFormat::Text`] becomes a conversation that is
/// rendered with the model's chat template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`
    /// (the OpenAI / Hugging Face chat format).
    Messages,
    /// `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}`;
    /// `human` becomes `user` and `gpt` becomes `assistant` (`user` and
    /// `assistant` are accepted as well).
    ShareGpt,
    /// `{"instruction": "...", "input": "...", "output": "..."}` with `input`
    /// optional: the user turn is the instruction, followed by a blank line and
    /// the input when the input is not empty (or only whitespace); the
    /// assistant turn is the output.
    Alpaca,
    /// `{"prompt": "...", "completion": "..."}`: a user turn and an assistant turn.
    PromptCompletion,
    /// `{"text": "..."}`: raw text, no chat template; the loss covers every token.
    Text,
}

impl DataFormat {
    /// All formats, in the order [`DataFormat::detect`] tries them.
    pub const ALL: [DataFormat; 5] = [
        DataFormat::Messages,
        DataFormat::ShareGpt,
        DataFormat::Alpaca,
        DataFormat::PromptCompletion,
        DataFormat::Text,
    ];

    /// The name used on the command line and in messages (`messages`,
    /// `sharegpt`, `alpaca`, `prompt_completion`, `text`).
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Messages => "messages",
            DataFormat::ShareGpt => "sharegpt",
            DataFormat::Alpaca => "alpaca",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::Text => "text",
        }
    }

    /// A description of the fields a record of this format needs.
    pub fn expected_fields(self) -> &'static str {
        match self {
            DataFormat::Messages => {
                "a \"messages\" list of {\"role\", \"content\"} objects with roles system, user or assistant"
            }
            DataFormat::ShareGpt => {
                "a \"conversations\" list of {\"from\", \"value\"} objects with from system, human or gpt"
            }
            DataFormat::Alpaca => {
                "string fields \"instruction\" and \"output\" (and optionally \"input\")"
            }
            DataFormat::PromptCompletion => "string fields \"prompt\" and \"completion\"",
            DataFormat::Text => "a string field \"text\"",
        }
    }

    /// The format whose key(s) the record has, trying [`DataFormat::ALL`] in
    /// order: `messages`, `conversations`, `instruction` + `output`, `prompt` +
    /// `completion`, `text`.
    pub fn detect(record: &Map<String, Value>) -> Option<DataFormat> {
        let has = |key: &str| record.contains_key(key);
        DataFormat::ALL.into_iter().find(|format| match format {
            DataFormat::Messages => has("messages"),
            DataFormat::ShareGpt => has("conversations"),
            DataFormat::Alpaca => has("instruction") && has("output"),
            DataFormat::PromptCompletion => has("prompt") && has("completion"),
            DataFormat::Text => has("text"),
        })
    }

    /// One line listing every format with its fields, for error messages.
    pub(crate) fn all_expected() -> String {
        DataFormat::ALL
            .iter()
            .map(|f| format!("{} ({})", f.name(), f.expected_fields()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataFormat {
    type Err = DataError;

    /// Parses a format name: `messages`, `sharegpt`, `alpaca`,
    /// `prompt_completion` or `text` (case-insensitive; `-` may stand for `_`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized = s.trim().to_ascii_lowercase().replace('-', "_");
        DataFormat::ALL
            .into_iter()
            .find(|f| f.name() == normalized)
            .ok_or_else(|| DataError::UnknownFormatName {
                name: s.to_string(),
            })
    }
}
