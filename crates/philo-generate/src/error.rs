//! Errors of generation.

/// What can stop a generation early.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] philo_model::ModelError),
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    #[error(transparent)]
    Text(#[from] philo_text::TextError),
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the model's context is {context}; shorten it")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the draft model's vocabulary has {draft} tokens but the model's has {model}; a draft must share the model's tokenizer (a smaller Phi-3-family checkpoint)")]
    DraftVocabulary { model: usize, draft: usize },
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        GenerateError::Model(e.into())
    }
}

/// Result alias of the generate crate.
pub type Result<T> = std::result::Result<T, GenerateError>;
