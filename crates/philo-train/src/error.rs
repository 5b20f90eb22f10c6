//! Errors of fine-tuning.

/// What can stop a fine-tune.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] philo_model::ModelError),
    #[error(transparent)]
    Text(#[from] philo_text::TextError),
    #[error("{0}")]
    Config(String),
    /// The data cannot be trained on as given (e.g. a batch without a labelled token).
    #[error("{0}")]
    Data(String),
    /// The loss or the gradient norm stopped being finite.
    #[error("{0}")]
    Diverged(String),
    /// A broken invariant of philo itself, not of the input.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(e.into())
    }
}

/// Result alias of the train crate.
pub type Result<T> = std::result::Result<T, TrainError>;
