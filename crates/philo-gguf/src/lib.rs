//! GGUF for Phi-3: [`write_gguf`] exports a model (an adapter already merged into it) in
//! llama.cpp's `phi3` layout, f32/f16/bf16 or quantised (Q8_0, Q4_0, Q4_K_M), with its
//! tokenizer and chat template; [`GgufModel`] reads a phi3 GGUF file back for philo's engine.
//! The file format, its writer, reader and quantisers are candle's.

mod export;
mod import;
mod metadata;
pub mod names;
pub mod vocab;

pub use export::{write_gguf, ExportInput, ExportSummary, ExportType, LoadTensor};
pub use import::GgufModel;

/// Why a GGUF file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] philo_model::ModelError),
}

impl GgufError {
    fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        GgufError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, GgufError>;
