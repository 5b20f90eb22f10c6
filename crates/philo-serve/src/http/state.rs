//! What every route shares: the engine, the text side of the model, the API key and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use philo_text::{ChatTemplate, Tokenizer};

use super::error::ApiError;
use super::metrics::Metrics;
use super::openapi;
use crate::constraint::Grammars;
use crate::request::Backend;

/// What `philo serve` hands the HTTP layer.
pub struct ServerConfig {
    /// The engine the routes submit requests to.
    pub backend: Arc<dyn Backend>,
    /// The served model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, for POST /v1/chat/completions.
    pub template: ChatTemplate,
    /// Token ids that end a generation (e.g. `<|end|>`, `<|endoftext|>`); they are not part of
    /// the returned text.
    pub stop_token_ids: Vec<u32>,
    /// When set, every /v1 route requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The base model's id, as listed by GET /v1/models; requests without `model` use it.
    pub base_model: String,
}

/// The routes' shared state; cheap to clone.
#[derive(Clone)]
pub struct ServerState {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_token_ids: Vec<u32>,
    api_key: Option<String>,
    base_model: String,
    metrics: Metrics,
    /// The OpenAPI document, rendered once.
    openapi_json: String,
    shutting_down: AtomicBool,
    /// `response_format`'s grammars over the tokenizer, built on first use.
    grammars: OnceLock<Result<Grammars, String>>,
}

impl ServerState {
    /// Checks `config` and builds the state.
    pub fn new(config: ServerConfig) -> anyhow::Result<Self> {
        if config
            .api_key
            .as_deref()
            .is_some_and(|key| key.trim().is_empty())
        {
            anyhow::bail!(
                "the API key is empty, which would let any client in; pass a non-empty key or none at all"
            );
        }
        if config.base_model.is_empty() {
            anyhow::bail!("the base model id is empty; give the id clients should send as `model`");
        }
        let openapi_json =
            openapi::document(config.api_key.is_some(), config.backend.context_length())?;
        Ok(ServerState {
            shared: Arc::new(Shared {
                metrics: Metrics::new(config.backend.clone()),
                backend: config.backend,
                tokenizer: config.tokenizer,
                template: config.template,
                stop_token_ids: config.stop_token_ids,
                api_key: config.api_key,
                base_model: config.base_model,
                openapi_json,
                shutting_down: AtomicBool::new(false),
                grammars: OnceLock::new(),
            }),
        })
    }

    /// Marks the server as shutting down (GET /health answers 503 from now on) and tells the
    /// engine to stop admitting requests and finish the running ones.
    pub fn begin_shutdown(&self) {
        if !self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            self.shared.backend.shutdown();
        }
    }

    /// Whether [`ServerState::begin_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        self.shared.backend.as_ref()
    }

    pub(crate) fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub(crate) fn template(&self) -> &ChatTemplate {
        &self.shared.template
    }

    pub(crate) fn stop_token_ids(&self) -> &[u32] {
        &self.shared.stop_token_ids
    }

    /// The grammars of constrained output for the served tokenizer (a 500 when its tokens
    /// cannot be read, or no stop token ends a document).
    pub(crate) fn grammars(&self) -> Result<&Grammars, ApiError> {
        let shared = &self.shared;
        shared
            .grammars
            .get_or_init(|| {
                let eos = *shared
                    .stop_token_ids
                    .first()
                    .ok_or("no stop token is configured to end a constrained document")?;
                let json = serde_json::to_value(shared.tokenizer.inner())
                    .map_err(|e| format!("cannot read the tokenizer: {e}"))?;
                Grammars::from_tokenizer_json(&json, eos)
            })
            .as_ref()
            .map_err(|e| ApiError::internal(format!("constrained output is unavailable: {e}")))
    }

    pub(crate) fn api_key(&self) -> Option<&str> {
        self.shared.api_key.as_deref()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub(crate) fn openapi_json(&self) -> &str {
        &self.shared.openapi_json
    }

    /// The model a request names (the base model when it names none), if it is being served.
    pub(crate) fn resolve_model(&self, requested: Option<&str>) -> Result<String, ApiError> {
        let model = requested.unwrap_or(&self.shared.base_model);
        if self.backend().models().iter().any(|info| info.id == model) {
            Ok(model.to_string())
        } else {
            Err(ApiError::model_not_found(model))
        }
    }
}
