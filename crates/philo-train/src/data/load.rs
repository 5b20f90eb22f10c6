//! Reading dataset files into [`Record`]s.

use std::path::Path;

use philo_text::ChatMessage;
use serde_json::{Map, Value};

use super::{DataError, DataFormat};

/// One record of a dataset, in a format-independent shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the record came from, for messages: `file:line` for JSONL,
    /// `file record N` (1-based) for a JSON array.
    pub origin: String,
    /// What the record holds.
    pub content: RecordContent,
}

/// What a [`Record`] holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordContent {
    /// A conversation, rendered with the chat template. Roles are `system`,
    /// `user` or `assistant`.
    Conversation(Vec<ChatMessage>),
    /// Raw text, tokenised as is and followed by the end-of-text token.
    Text(String),
}

/// Reads a dataset file: a JSON array of records (the file's first
/// non-whitespace character is `[`) or JSONL (one JSON object per line; blank
/// lines are skipped).
///
/// The format is `format` when given, else detected from the first record's
/// keys with [`DataFormat::detect`]; every record must then have that format's
/// fields. Errors name the file and the line (JSONL) or record number (arrays).
pub fn load_records(path: &Path, format: Option<DataFormat>) -> Result<Vec<Record>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|cause| DataError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    parse_records(&text, &path.display().to_string(), format)
}

/// Parses the text of a dataset file as [`load_records`] does; `file` is only
/// used to name records in [`Record::origin`] and in errors.
pub fn parse_records(
    text: &str,
    file: &str,
    format: Option<DataFormat>,
) -> Result<Vec<Record>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let values = if text.trim_start().starts_with('[') {
        parse_array(text, file)?
    } else {
        parse_jsonl(text, file)?
    };

    let Some((first_origin, first)) = values.first() else {
        return Err(DataError::Empty {
            file: file.to_string(),
        });
    };
    let first = as_object(first, first_origin)?;
    let format = match format {
        Some(format) => format,
        None => DataFormat::detect(first).ok_or_else(|| DataError::UnknownFormat {
            file: file.to_string(),
            record: first_origin.clone(),
            keys: first
                .keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            expected: DataFormat::all_expected(),
        })?,
    };

    values
        .iter()
        .map(|(origin, value)| {
            let object = as_object(value, origin)?;
            Ok(Record {
                origin: origin.clone(),
                content: convert(object, format, origin)?,
            })
        })
        .collect()
}

/// The records of a JSON array file, each with its origin.
fn parse_array(text: &str, file: &str) -> Result<Vec<(String, Value)>, DataError> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| DataError::JsonArray {
        file: file.to_string(),
        line: e.line(),
        column: e.column(),
        message: serde_message(&e),
    })?;
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("{file} record {}", i + 1), v))
        .collect())
}

/// The records of a JSONL file, each with its origin.
fn parse_jsonl(text: &str, file: &str) -> Result<Vec<(String, Value)>, DataError> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::JsonLine {
            file: file.to_string(),
            line: i + 1,
            column: e.column(),
            message: serde_message(&e),
        })?;
        records.push((format!("{file}:{}", i + 1), value));
    }
    Ok(records)
}

/// serde_json's message without its " at line L column C" suffix (we report
/// the position ourselves).
fn serde_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_string()
}

fn as_object<'a>(value: &'a Value, origin: &str) -> Result<&'a Map<String, Value>, DataError> {
    value.as_object().ok_or_else(|| DataError::InvalidRecord {
        record: origin.to_string(),
        problem: format!(
            "expected a JSON object (e.g. {{\"messages\": [...]}}), found {}",
            json_kind(value)
        ),
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Turns one JSON object into the record content of `format`.
fn convert(
    object: &Map<String, Value>,
    format: DataFormat,
    origin: &str,
) -> Result<RecordContent, DataError> {
    let missing = |problem: String| DataError::MissingFields {
        record: origin.to_string(),
        format,
        problem,
        expected: format.expected_fields(),
    };
    let string_field = |key: &str| -> Result<String, DataError> {
        match object.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(missing(format!(
                "field {key:?} is {}, not a string",
                json_kind(other)
            ))),
            None => Err(missing(format!(
                "field {key:?} is missing (the record has {})",
                describe_keys(object)
            ))),
        }
    };

    match format {
        DataFormat::Messages => {
            let messages = turn_list(object, "messages", origin, &missing)?;
            let mut conversation = Vec::with_capacity(messages.len());
            for (i, message) in messages.iter().enumerate() {
                let role = turn_string(message, "role", i, &missing)?;
                let content = turn_string(message, "content", i, &missing)?;
                if !matches!(role.as_str(), "system" | "user" | "assistant") {
                    return Err(DataError::InvalidRecord {
                        record: origin.to_string(),
                        problem: format!(
                            "message {} has role {role:?}; the roles are system, user and assistant",
                            i + 1
                        ),
                    });
                }
                conversation.push(ChatMessage::new(role, content));
            }
            Ok(RecordContent::Conversation(conversation))
        }
        DataFormat::ShareGpt => {
            let turns = turn_list(object, "conversations", origin, &missing)?;
            let mut conversation = Vec::with_capacity(turns.len());
            for (i, turn) in turns.iter().enumerate() {
                let from = turn_string(turn, "from", i, &missing)?;
                let value = turn_string(turn, "value", i, &missing)?;
                let role = match from.as_str() {
                    "system" => "system",
                    "human" | "user" => "user",
                    "gpt" | "assistant" => "assistant",
                    _ => {
                        return Err(DataError::InvalidRecord {
                            record: origin.to_string(),
                            problem: format!(
                                "turn {} has from {from:?}; philo knows system, human (user) and gpt (assistant)",
                                i + 1
                            ),
                        })
                    }
                };
                conversation.push(ChatMessage::new(role, value));
            }
            Ok(RecordContent::Conversation(conversation))
        }
        DataFormat::Alpaca => {
            let instruction = string_field("instruction")?;
            let input = match object.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(_) => string_field("input")?,
            };
            let output = string_field("output")?;
            let user = if input.trim().is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            Ok(RecordContent::Conversation(vec![
                ChatMessage::user(user),
                ChatMessage::assistant(output),
            ]))
        }
        DataFormat::PromptCompletion => {
            let prompt = string_field("prompt")?;
            let completion = string_field("completion")?;
            Ok(RecordContent::Conversation(vec![
                ChatMessage::user(prompt),
                ChatMessage::assistant(completion),
            ]))
        }
        DataFormat::Text => Ok(RecordContent::Text(string_field("text")?)),
    }
}

/// The non-empty list of turn objects under `key`.
fn turn_list<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    origin: &str,
    missing: &dyn Fn(String) -> DataError,
) -> Result<&'a Vec<Value>, DataError> {
    match object.get(key) {
        Some(Value::Array(turns)) if turns.is_empty() => Err(DataError::InvalidRecord {
            record: origin.to_string(),
            problem: format!(
                "{key:?} is an empty list; give at least one turn or remove the record"
            ),
        }),
        Some(Value::Array(turns)) => Ok(turns),
        Some(other) => Err(missing(format!(
            "field {key:?} is {}, not a list",
            json_kind(other)
        ))),
        None => Err(missing(format!(
            "field {key:?} is missing (the record has {})",
            describe_keys(object)
        ))),
    }
}

/// String field `key` of turn number `index` (0-based; reported 1-based).
fn turn_string(
    turn: &Value,
    key: &str,
    index: usize,
    missing: &dyn Fn(String) -> DataError,
) -> Result<String, DataError> {
    let Some(object) = turn.as_object() else {
        return Err(missing(format!(
            "turn {} is {}, not an object",
            index + 1,
            json_kind(turn)
        )));
    };
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(missing(format!(
            "turn {} field {key:?} is {}, not a string",
            index + 1,
            json_kind(other)
        ))),
        None => Err(missing(format!(
            "turn {} has no field {key:?} (it has {})",
            index + 1,
            describe_keys(object)
        ))),
    }
}

fn describe_keys(object: &Map<String, Value>) -> String {
    if object.is_empty() {
        "no fields".to_string()
    } else {
        let keys: Vec<String> = object.keys().map(|k| format!("{k:?}")).collect();
        format!("fields {}", keys.join(", "))
    }
}
