//! The one error type of `philo-text`.

use std::path::PathBuf;

/// Everything that can go wrong on the text side of philo.
///
/// Messages name the file (and field) involved and say what to do next, so
/// they can be shown to a user as they are.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file (tokenizer.json, tokenizer_config.json) could not be read.
    #[error("cannot read {path}: {cause}; check that the path is right and the file is readable (re-download the model files if it is missing)")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error (shown in the message, so not a chained `source`).
        cause: std::io::Error,
    },

    /// A tokenizer.json was read but is not a tokenizer `tokenizers` understands.
    #[error("cannot parse tokenizer {path}: {message}; make sure it is a Hugging Face tokenizer.json (not tokenizer.model or tokenizer_config.json) and that it is not truncated — re-download it if in doubt")]
    TokenizerParse {
        /// The tokenizer.json that failed to parse.
        path: PathBuf,
        /// What the parser reported.
        message: String,
    },

    /// The tokenizer failed to turn text into ids.
    #[error("cannot encode text with the tokenizer: {message}; check that the text is valid and the tokenizer.json matches the model")]
    Encode {
        /// What the tokenizer reported.
        message: String,
    },

    /// The tokenizer failed to turn ids into text.
    #[error("cannot decode token ids with the tokenizer: {message}; check that the ids come from a model that uses this tokenizer.json")]
    Decode {
        /// What the tokenizer reported.
        message: String,
    },

    /// A tokenizer_config.json is not valid JSON (or not a JSON object).
    #[error("cannot parse {path}: {message}; make sure it is the model's tokenizer_config.json and is valid JSON")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A field of tokenizer_config.json has a shape we do not understand.
    #[error("{path} field {field}: {message}")]
    ConfigField {
        /// The config file.
        path: PathBuf,
        /// The field, e.g. `chat_template` or `bos_token`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A chat template is not valid Jinja.
    #[error("chat template from {origin} does not compile: {message}; fix the template, or remove it to fall back to philo's built-in Phi-3 template")]
    TemplateCompile {
        /// Where the template came from, e.g. `tokenizer_config.json field chat_template`.
        origin: String,
        /// The Jinja error, with line information.
        message: String,
    },

    /// The chat template itself rejected the conversation via `raise_exception(...)`.
    #[error("chat template from {origin} rejected the conversation: {message}; change the messages (roles, order, system prompt) to what this model's template accepts")]
    TemplateRaised {
        /// Where the template came from.
        origin: String,
        /// The message the template passed to `raise_exception`.
        message: String,
    },

    /// Rendering a chat template failed for another reason.
    #[error("cannot render chat template from {origin}: {message}; the template may use a Jinja feature philo does not support — fix the template or remove it to use the built-in Phi-3 template")]
    TemplateRender {
        /// Where the template came from.
        origin: String,
        /// The Jinja error, with line information.
        message: String,
    },
}
