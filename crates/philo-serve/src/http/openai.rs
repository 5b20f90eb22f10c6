//! The OpenAI wire format: the request and response bodies of the routes, with their OpenAPI
//! schemas.
//!
//! Field names, `object` values and nullability follow OpenAI's API so its clients work
//! unchanged. Unknown request fields are ignored (clients send fields philo has no use for). The
//! ranges in the schemas are exactly the ones the routes enforce, so a request that is valid by
//! the OpenAPI document is accepted and an invalid one gets a 400.
//!
//! Structs nested in requests carry a flattened `_unknown: IgnoredAny` field. It drops unknown
//! fields like serde does anyway, but a struct with a flattened field is read from JSON objects
//! only: derived structs otherwise also take an array of their field values (`[null]` for
//! `stream_options`), which the schema rightly calls invalid. Top-level bodies are checked to be
//! objects before parsing (see `json.rs`) and do without it.
//!
//! The two generation requests are each split in two parts, the endpoint's own fields and the
//! shared [`GenerationParams`], which are read from the same JSON object one after the other (see
//! `json.rs`): serde's `flatten` would merge them into one type but loses the field path in its
//! errors, and the error should name the field the client got wrong.

use serde::de::{Error as _, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use utoipa::openapi::schema::{
    AllOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::request;

/// The most `stop` strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// The longest `stop` string, in characters. Matching holds back up to this much text and scans
/// it at every token, so the bound keeps a request from making that scan expensive.
pub const MAX_STOP_CHARS: usize = 200;

/// Who speaks in a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name as chat templates expect it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: Role,
    pub content: MessageContent,
    /// Swallows unknown fields (see the module docs).
    #[serde(flatten)]
    #[schema(ignore)]
    pub _unknown: IgnoredAny,
}

/// The text of a message: a string, or a list of text parts that are joined.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "a string or a list of {\"type\": \"text\", \"text\": \"...\"} parts (philo serves a text-only model)"
)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The message's text, parts joined without separator (as OpenAI does).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|part| match part.kind {
                    PartKind::Text => part.text.as_str(),
                })
                .collect(),
        }
    }
}

/// One part of a message's content; only text parts exist for a text-only model.
///
/// A struct rather than an internally tagged enum: serde's tagged enums also take the variant's
/// index as tag (`"type": 0`), which the schema rightly calls invalid.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub text: String,
    /// Swallows unknown fields (see the module docs).
    #[serde(flatten)]
    #[schema(ignore)]
    pub _unknown: IgnoredAny,
}

/// What a content part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    Text,
}

/// `stop`: one string or a list of strings; generation ends before the first occurrence of any.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of at most 4 strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings, as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(text) => vec![text],
            Stop::Many(texts) => texts,
        }
    }
}

impl PartialSchema for Stop {
    fn schema() -> RefOr<Schema> {
        // An empty stop string would end every generation before its first character.
        OneOfBuilder::new()
            .item(stop_string())
            .item(
                ArrayBuilder::new()
                    .items(stop_string())
                    .max_items(Some(MAX_STOP_STRINGS)),
            )
            .description(Some(
                "Up to 4 strings of up to 200 characters; the output ends before the first one it contains (which is not returned).",
            ))
            .into()
    }
}

impl ToSchema for Stop {}

fn non_empty_string() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
}

fn stop_string() -> ObjectBuilder {
    non_empty_string().max_length(Some(MAX_STOP_CHARS))
}

/// `stream_options`: extras of a streamed response.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk before `data: [DONE]` with the token counts and empty `choices`.
    pub include_usage: Option<bool>,
    /// Swallows unknown fields (see the module docs).
    #[serde(flatten)]
    #[schema(ignore)]
    pub _unknown: IgnoredAny,
}

/// The fields both generation endpoints share: the model, sampling, limits and streaming.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct GenerationParams {
    /// The base model's id or a loaded adapter's name (see GET /v1/models); the base model when
    /// absent.
    pub model: Option<String>,
    /// Sampling temperature; 0 is greedy decoding.
    #[schema(minimum = 0, maximum = 2, default = 1)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`.
    #[schema(exclusive_minimum = 0, maximum = 1, default = 1)]
    pub top_p: Option<f64>,
    /// Keep only the `top_k` most likely tokens.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub top_k: Option<u32>,
    /// Locally typical sampling mass (0.2 is the usual choice).
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub typical_p: Option<f64>,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 turns it off.
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    /// Hugging Face's repetition penalty; above 1 discourages tokens already seen.
    #[schema(minimum = 0.01, maximum = 10)]
    pub repetition_penalty: Option<f64>,
    /// Lowers a token's logit by this much per earlier occurrence.
    #[schema(minimum = -2, maximum = 2, default = 0)]
    pub frequency_penalty: Option<f64>,
    /// Lowers the logit of every token already seen by this much.
    #[schema(minimum = -2, maximum = 2, default = 0)]
    pub presence_penalty: Option<f64>,
    /// Seed of the sampler, for repeatable samples.
    #[serde(default, deserialize_with = "optional_integer")]
    pub seed: Option<i64>,
    /// Most tokens to generate; by default, as many as the context leaves after the prompt.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub max_tokens: Option<u64>,
    pub stop: Option<Stop>,
    /// Number of choices, each its own sequence (choice i samples with `seed` + i).
    #[schema(minimum = 1, maximum = 16, default = 1)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub n: Option<u32>,
    /// Answer with server-sent events, one chunk per piece of text, then `data: [DONE]`.
    #[schema(default = false)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Added to the logits of the given token ids (keys: ids as decimal strings) before
    /// sampling, each in [-100, 100]: -100 bans a token, 100 all but forces it.
    #[schema(schema_with = logit_bias_schema)]
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` (the answer is one JSON
    /// object) or `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}` (the
    /// answer is a document of that JSON Schema). Enforced token by token: the output parses
    /// unless it is cut short by `max_tokens` (finish_reason "length").
    #[schema(schema_with = response_format_schema)]
    pub response_format: Option<serde_json::Value>,
    /// Fields of OpenAI's API that philo does not implement yet. Each may be absent or hold
    /// its "off" value (empty `tools`, `tool_choice` "none"); any other value gets a 400
    /// naming it, rather than being ignored.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unsupported: Unsupported,
}

/// See [`GenerationParams::unsupported`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Unsupported {
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub best_of: Option<serde_json::Value>,
    pub suffix: Option<serde_json::Value>,
}

impl Unsupported {
    /// The first field set to something other than its off value, and why it is refused.
    pub fn first(&self) -> Option<(&'static str, &'static str)> {
        use serde_json::Value;
        let off = |v: &Option<Value>, also_off: &dyn Fn(&Value) -> bool| match v {
            None | Some(Value::Null) => true,
            Some(v) => also_off(v),
        };
        let empty = |v: &Value| v.as_array().is_some_and(Vec::is_empty);
        let none = |v: &Value| v.as_str() == Some("none");
        let one = |v: &Value| v.as_f64() == Some(1.0);
        let checks: [(&'static str, bool, &'static str); 6] = [
            (
                "tools",
                off(&self.tools, &empty),
                "tool calls are not supported: Phi-3's chat template has no tool turn",
            ),
            (
                "tool_choice",
                off(&self.tool_choice, &none),
                "tool calls are not supported: Phi-3's chat template has no tool turn",
            ),
            (
                "functions",
                off(&self.functions, &empty),
                "function calls are not supported: Phi-3's chat template has no tool turn",
            ),
            (
                "function_call",
                off(&self.function_call, &none),
                "function calls are not supported: Phi-3's chat template has no tool turn",
            ),
            (
                "best_of",
                off(&self.best_of, &one),
                "philo generates one completion per request",
            ),
            (
                "suffix",
                off(&self.suffix, &|v| v.as_str() == Some("")),
                "philo does not insert completions before a suffix",
            ),
        ];
        checks
            .into_iter()
            .find(|(_, ok, _)| !ok)
            .map(|(field, _, why)| (field, why))
    }
}

/// The fields only POST /v1/chat/completions has.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatInput {
    /// The conversation so far; the model writes the next assistant message.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub max_completion_tokens: Option<u64>,
    /// Return each output token's log-probability in `choices[].logprobs.content`.
    #[schema(default = false)]
    pub logprobs: Option<bool>,
    /// With `logprobs: true`, also return this many most likely tokens at each position.
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub top_logprobs: Option<u32>,
}

/// The most `top_logprobs` a chat request may ask for.
pub const MAX_CHAT_TOP_LOGPROBS: u32 = 20;
/// The most `logprobs` a completion request may ask for (the legacy API's limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// The body of POST /v1/chat/completions: [`ChatInput`] and [`GenerationParams`] in one object.
#[derive(Debug, Clone)]
pub struct ChatCompletionRequest {
    pub input: ChatInput,
    pub params: GenerationParams,
}

impl PartialSchema for ChatCompletionRequest {
    fn schema() -> RefOr<Schema> {
        AllOfBuilder::new()
            .item(Ref::from_schema_name(ChatInput::name()))
            .item(Ref::from_schema_name(GenerationParams::name()))
            .into()
    }
}

impl ToSchema for ChatCompletionRequest {}

/// `prompt`: one string, or a list holding one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string or a list holding one string (token-id prompts are not supported)"
)]
pub enum Prompt {
    Text(String),
    Batch(Vec<String>),
}

impl PartialSchema for Prompt {
    fn schema() -> RefOr<Schema> {
        // An empty prompt gives the model nothing to continue.
        OneOfBuilder::new()
            .item(non_empty_string())
            .item(
                ArrayBuilder::new()
                    .items(non_empty_string())
                    .min_items(Some(1))
                    .max_items(Some(1)),
            )
            .description(Some(
                "The text to continue: a string, or a list with one string (send one request per prompt).",
            ))
            .into()
    }
}

impl ToSchema for Prompt {}

/// The fields only POST /v1/completions has.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionInput {
    pub prompt: Prompt,
    /// Must be false or absent: philo does not echo the prompt.
    #[schema(schema_with = echo_schema)]
    pub echo: Option<bool>,
    /// Return the log-probability of each output token and of this many most likely tokens at
    /// each position in `choices[].logprobs` (the legacy format).
    #[schema(minimum = 0, maximum = 5)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub logprobs: Option<u32>,
}

fn response_format_schema() -> OneOfBuilder {
    let kind = |name: &str| {
        ObjectBuilder::new()
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([name])),
            )
            .required("type")
    };
    let json_schema = ObjectBuilder::new()
        .property("name", ObjectBuilder::new().schema_type(Type::String))
        .property(
            "description",
            ObjectBuilder::new().schema_type(Type::String),
        )
        .property("schema", ObjectBuilder::new().schema_type(Type::Object))
        .property("strict", ObjectBuilder::new().schema_type(Type::Boolean));
    OneOfBuilder::new()
        .item(kind("text"))
        .item(kind("json_object"))
        .item(
            kind("json_schema")
                .property("json_schema", json_schema)
                .required("json_schema"),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "The answer's format: plain text, any JSON object, or a document of a JSON Schema (enforced while sampling).",
        ))
}

fn logit_bias_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]+$")),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(-100.0))
                .maximum(Some(100.0)),
        ))
        .description(Some(
            "Token id (as a decimal string) → bias in [-100, 100] added to its logit before sampling.",
        ))
}

fn echo_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
        .enum_values(Some([json!(false), json!(null)]))
        .description(Some(
            "Must be false or absent: philo does not echo the prompt.",
        ))
}

/// The body of POST /v1/completions: [`CompletionInput`] and [`GenerationParams`] in one object.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub input: CompletionInput,
    pub params: GenerationParams,
}

impl PartialSchema for CompletionRequest {
    fn schema() -> RefOr<Schema> {
        AllOfBuilder::new()
            .item(Ref::from_schema_name(CompletionInput::name()))
            .item(Ref::from_schema_name(GenerationParams::name()))
            .into()
    }
}

impl ToSchema for CompletionRequest {}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string was reached.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl From<request::FinishReason> for FinishReason {
    fn from(reason: request::FinishReason) -> Self {
        match reason {
            request::FinishReason::Stop => FinishReason::Stop,
            request::FinishReason::Length => FinishReason::Length,
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// How the prompt tokens were served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from an earlier request with the same prefix.
    pub cached_tokens: usize,
}

/// The assistant's answer in a non-streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    #[schema(value_type = String, example = "assistant")]
    pub role: &'static str,
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// With `logprobs: true`; null otherwise.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

/// The log-probabilities of a chat choice's tokens (or of a chunk's).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatLogprobs {
    /// One entry per generated token, in order.
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token and its log-probability under the model (the log-softmax of the raw
/// logits, before temperature, penalties and filters).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// At most 0 (-9999 stands for an impossible token).
    pub logprob: f32,
    /// The token's UTF-8 bytes (a byte-fallback token's raw byte).
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// The log-probabilities of a text completion's tokens (or of a chunk's), in the legacy format.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    /// Each generated token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// For each token, the `logprobs` most likely tokens at its position: text → log-probability.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Where each token's text starts in the choice's text, in characters.
    pub text_offset: Vec<usize>,
}

/// A non-streamed answer of POST /v1/chat/completions.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and a unique suffix.
    pub id: String,
    /// Always `chat.completion`.
    #[schema(value_type = String, example = "chat.completion")]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a chat chunk adds to the message.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "assistant")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat completion chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// The log-probabilities of this chunk's tokens, with `logprobs: true`; null otherwise.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of the choice, null before.
    pub finish_reason: Option<FinishReason>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    #[schema(value_type = String, example = "chat.completion.chunk")]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Empty in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only in the last chunk before `[DONE]`, when `stream_options.include_usage` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a text completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// With `logprobs` set, those of this choice's (or this chunk's) tokens; null otherwise.
    pub logprobs: Option<CompletionLogprobs>,
    /// Null in stream chunks before the last one.
    pub finish_reason: Option<FinishReason>,
}

/// The answer of POST /v1/completions, or one server-sent event of a streamed one.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-` and a unique suffix.
    pub id: String,
    /// Always `text_completion`.
    #[schema(value_type = String, example = "text_completion")]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Empty in the usage chunk of a stream.
    pub choices: Vec<CompletionChoice>,
    /// In non-streamed answers, and in the last chunk of a stream with
    /// `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A servable model: the base model or a LoRA adapter on it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `model`.
    #[schema(value_type = String, example = "model")]
    pub object: &'static str,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// Always `philo`.
    #[schema(value_type = String, example = "philo")]
    pub owned_by: &'static str,
    /// The base model's id for an adapter, null for the base model.
    pub parent: Option<String>,
}

impl From<request::ModelInfo> for Model {
    fn from(info: request::ModelInfo) -> Self {
        Model {
            id: info.id,
            object: "model",
            created: info.created,
            owned_by: "philo",
            parent: info.parent,
        }
    }
}

/// The answer of GET /v1/models.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    #[schema(value_type = String, example = "list")]
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// The answer of DELETE /v1/adapters/{name}, in the shape of OpenAI's deleted-model object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedModel {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub deleted: bool,
}

/// The body of POST /v1/adapters.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LoadAdapterRequest {
    /// The name requests use as `model`; letters, digits and `._:/-`, starting with a letter or
    /// digit.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
    )]
    pub name: String,
    /// A PEFT adapter folder (adapter_config.json and adapter_model.safetensors) on the
    /// server's file system.
    #[schema(min_length = 1)]
    pub path: String,
}

/// The answer of GET /health.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `shutting_down` (with status 503) once the server stops taking requests.
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
}

/// An error, in OpenAI's shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// What went wrong and what to do about it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code such as `model_not_found` or `context_length_exceeded`.
    #[schema(value_type = Option<String>)]
    pub code: Option<&'static str>,
}

/// Reads an optional integer field, also from a number such as `1.0`: JSON Schema counts those
/// as integers (a fuzzer sends them), and so do clients in languages without an integer type.
fn optional_integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = match (number.as_i64(), number.as_u64(), number.as_f64()) {
        (Some(n), _, _) => i128::from(n),
        (_, Some(n), _) => i128::from(n),
        // Beyond ±2^100 no field's range comes close, and the cast below stays exact.
        (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 2f64.powi(100) => f as i128,
        _ => {
            return Err(D::Error::custom(format!(
                "expected an integer, found {number}"
            )))
        }
    };
    T::try_from(whole).map(Some).map_err(|_| {
        D::Error::custom(format!(
            "{number} is out of range; /openapi.json gives each field's range"
        ))
    })
}
