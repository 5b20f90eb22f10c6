//! Errors of the model crate. Each names the file, field or tensor involved so the user can fix it.
//! Underlying errors are part of the message (fields named `cause`, not `source`, so that a
//! printer of the error chain does not repeat them).

use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not valid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{dir}: no config.json here; point --model at a Hugging Face model folder (config.json + *.safetensors) or a hub id such as microsoft/Phi-3-mini-4k-instruct")]
    MissingConfig { dir: PathBuf },
    #[error("{path}: field `{field}`: {message}")]
    InvalidConfig {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json; philo reads safetensors checkpoints only")]
    MissingWeights { dir: PathBuf },
    #[error("{path}: not a readable safetensors file ({message}); the file may be truncated or corrupted, download it again")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {files}")]
    MissingTensor { name: String, files: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, the config asks for {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` is stored as {dtype}; philo reads f32, f16 and bf16")]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("could not fetch `{file}` of `{repo}` from the Hugging Face hub: {message}")]
    Hub {
        repo: String,
        file: String,
        message: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn invalid(path: &std::path::Path, field: &str, message: impl Into<String>) -> Self {
        ModelError::InvalidConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
