//! GET /openapi.json: the OpenAPI 3.1 document of every route, with the request constraints the
//! routes enforce, so generated clients and API fuzzers (schemathesis) see the real contract.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;

use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{OpenApi, ToSchema};

use super::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatInput, ChatLogprobs,
    ChatMessage, ChatTokenLogprob, ChunkChoice, Completion, CompletionChoice, CompletionInput,
    CompletionLogprobs, ContentPart, DeletedModel, Delta, ErrorBody, ErrorResponse, FinishReason,
    GenerationParams, Health, LoadAdapterRequest, MessageContent, Model, ModelList, PartKind,
    Prompt, PromptTokensDetails, Role, Stop, StreamOptions, TopLogprob, Usage,
};
use super::state::ServerState;

/// The name of the bearer security scheme in the document.
const API_KEY_SCHEME: &str = "api_key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "philo",
        description = "OpenAI-compatible API of `philo serve`: Phi-3 with continuous batching and LoRA adapters",
    ),
    paths(
        super::chat::create_chat_completion,
        super::completions::create_completion,
        super::models::list_models,
        super::models::retrieve_model,
        super::models::load_adapter,
        super::models::unload_adapter,
        super::health::health,
        super::metrics::scrape,
        serve_document,
    ),
    components(schemas(
        ChatInput,
        GenerationParams,
        CompletionInput,
        ChatMessage,
        Role,
        MessageContent,
        ContentPart,
        PartKind,
        Stop,
        Prompt,
        StreamOptions,
        ChatCompletion,
        ChatChoice,
        ChatLogprobs,
        ChatTokenLogprob,
        TopLogprob,
        CompletionLogprobs,
        AssistantMessage,
        ChatCompletionChunk,
        ChunkChoice,
        Delta,
        Completion,
        CompletionChoice,
        FinishReason,
        Usage,
        PromptTokensDetails,
        Model,
        DeletedModel,
        ModelList,
        LoadAdapterRequest,
        Health,
        ErrorResponse,
        ErrorBody,
    ))
)]
struct ApiDoc;

/// The document as JSON, for a model with `context_length` tokens of context; with
/// `requires_api_key`, the /v1 routes declare bearer authentication.
pub fn document(requires_api_key: bool, context_length: usize) -> serde_json::Result<String> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    // The prompt takes at least one token of the context, so no larger request can fit.
    let most_tokens = context_length.saturating_sub(1);
    set_maximum(
        &mut doc,
        GenerationParams::name(),
        "max_tokens",
        most_tokens,
    );
    set_maximum(
        &mut doc,
        ChatInput::name(),
        "max_completion_tokens",
        most_tokens,
    );
    describe_events(
        &mut doc,
        "/v1/chat/completions",
        ChatCompletionChunk::name(),
    );
    describe_events(&mut doc, "/v1/completions", Completion::name());
    if requires_api_key {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                API_KEY_SCHEME,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                operation.security = Some(vec![SecurityRequirement::new(
                    API_KEY_SCHEME,
                    Vec::<String>::new(),
                )]);
            }
        }
    }
    doc.to_json()
}

/// Sets the `maximum` of the number property `property` of the component schema `schema`.
fn set_maximum(
    doc: &mut utoipa::openapi::OpenApi,
    schema: Cow<str>,
    property: &str,
    maximum: usize,
) {
    let Some(RefOr::T(Schema::Object(object))) = doc
        .components
        .as_mut()
        .and_then(|components| components.schemas.get_mut(schema.as_ref()))
    else {
        return;
    };
    if let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(property) {
        property.maximum = Some(maximum.into());
    }
}

/// Describes one server-sent event of the streamed 200 answer of `POST path`, whose data are
/// `chunk` objects.
///
/// OpenAPI 3.1 describes an event stream by the schema of one event as an object (`data`,
/// `event`, `id`, `retry`); the derive can only name a type there, so the schema is set here.
fn describe_events(doc: &mut utoipa::openapi::OpenApi, path: &str, chunk: Cow<str>) {
    let Some(RefOr::T(ok)) = doc
        .paths
        .paths
        .get_mut(path)
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.responses.responses.get_mut("200"))
    else {
        return;
    };
    let Some(content) = ok.content.get_mut("text/event-stream") else {
        return;
    };
    let data = ObjectBuilder::new().schema_type(Type::String).description(Some(format!(
        "A JSON {chunk}; an ErrorResponse if the generation failed after the answer started; `[DONE]` last"
    )));
    content.schema = Some(
        ObjectBuilder::new()
            .property("data", data)
            .required("data")
            .into(),
    );
}

/// GET /openapi.json.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document", body = Object, content_type = "application/json"))
)]
pub async fn serve_document(State(state): State<ServerState>) -> Response {
    let mut response = state.openapi_json().to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
