//! The HTTP layer against a scripted engine: OpenAI wire format, streaming, stop strings,
//! errors, auth, metrics, the OpenAPI document, cancellation and graceful shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use philo_serve::http::{router, serve, ServerConfig, ServerState};
use philo_serve::request::{
    Backend, EngineStats, FinishReason, GenerationEvent, GenerationRequest, ModelInfo,
    SampledToken, SubmitError, UnloadError,
};
use philo_text::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Notify;
use tower::ServiceExt;

const BASE: &str = "microsoft/Phi-3-mini-4k-instruct";
const CONTEXT: usize = 4096;
const VOCAB: usize = 32064;
const REPLY: &str = "Hello! Paris is the capital of France.";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/phi-3-early")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture_dir().join("tokenizer.json")).unwrap()
}

fn template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(&fixture_dir().join("tokenizer_config.json")).unwrap()
}

fn end_id() -> u32 {
    tokenizer().token_to_id("<|end|>").unwrap()
}

/// What the scripted engine does with the next submissions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Streams the reply's tokens, then `<|end|>`.
    Reply,
    QueueFull,
    ShuttingDown,
    /// Sends two tokens, then `Failed`.
    Fail,
}

/// What the scripted engine does and what it saw.
struct Script {
    reply: Vec<u32>,
    delay: Duration,
    mode: Mutex<Mode>,
    submitted: Mutex<Vec<GenerationRequest>>,
    adapters: Mutex<Vec<ModelInfo>>,
    /// Sequences whose sender saw the receiver dropped before the reply was complete.
    cancelled: AtomicUsize,
    cancel_seen: Notify,
    shut_down: AtomicBool,
}

/// A deterministic engine: every request gets the same reply tokens, one every `delay`.
#[derive(Clone)]
struct TestBackend(Arc<Script>);

impl std::ops::Deref for TestBackend {
    type Target = Script;

    fn deref(&self) -> &Script {
        &self.0
    }
}

impl TestBackend {
    fn new(reply_text: &str, delay: Duration) -> Self {
        let mut reply = tokenizer().encode(reply_text, false).unwrap();
        reply.push(end_id());
        TestBackend(Arc::new(Script {
            reply,
            delay,
            mode: Mutex::new(Mode::Reply),
            submitted: Mutex::new(Vec::new()),
            adapters: Mutex::new(Vec::new()),
            cancelled: AtomicUsize::new(0),
            cancel_seen: Notify::new(),
            shut_down: AtomicBool::new(false),
        }))
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn last_request(&self) -> GenerationRequest {
        self.submitted.lock().unwrap().last().cloned().unwrap()
    }

    async fn wait_for_cancel(&self) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                // Made before the check, so a notification between the two is not lost.
                let notified = self.cancel_seen.notified();
                if self.cancelled.load(Ordering::SeqCst) > 0 {
                    break;
                }
                notified.await;
            }
        })
        .await
        .expect("the engine never saw the request's receiver dropped");
    }
}

/// The scripted engine's logits when it picks `token`: `token` first, then ids 29871 (`▁`),
/// 13 (`<0x0A>`) and 450 (`▁The`) a little behind, everything else far behind.
fn fake_logits(token: u32) -> Vec<f32> {
    let mut logits = vec![-5.0; VOCAB];
    for (id, logit) in [(29871, 3.0), (13, 2.0), (450, 1.0)] {
        logits[id] = logit;
    }
    logits[token as usize] = 4.0;
    logits
}

/// Plays the engine's side of one sequence.
async fn run_sequence(
    backend: Arc<Script>,
    request: GenerationRequest,
    mode: Mode,
    tx: tokio::sync::mpsc::UnboundedSender<GenerationEvent>,
) {
    let _ = tx.send(GenerationEvent::Started {
        prompt_tokens: request.prompt.len(),
        cached_prompt_tokens: 2,
    });
    for (i, &token) in backend.reply.iter().enumerate() {
        if mode == Mode::Fail && i == 2 {
            let _ = tx.send(GenerationEvent::Failed("the GPU caught fire".into()));
            return;
        }
        if i == request.max_tokens {
            let _ = tx.send(GenerationEvent::Finished(FinishReason::Length));
            return;
        }
        tokio::select! {
            () = tx.closed() => {
                backend.cancelled.fetch_add(1, Ordering::SeqCst);
                backend.cancel_seen.notify_waiters();
                return;
            }
            () = tokio::time::sleep(backend.delay) => {}
        }
        let logprobs = request
            .sampling
            .logprobs
            .map(|k| philo_generate::token_logprobs(&fake_logits(token), token, k));
        let _ = tx.send(GenerationEvent::Token(SampledToken {
            id: token,
            logprobs,
        }));
        if request.stop_token_ids.contains(&token) {
            let _ = tx.send(GenerationEvent::Finished(FinishReason::Stop));
            return;
        }
    }
    let _ = tx.send(GenerationEvent::Finished(FinishReason::Length));
}

impl Backend for TestBackend {
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::QueueFull => {
                return Err(SubmitError::QueueFull {
                    queued: 64,
                    retry_after_secs: 3,
                })
            }
            Mode::ShuttingDown => return Err(SubmitError::ShuttingDown),
            Mode::Reply | Mode::Fail => {}
        }
        self.submitted.lock().unwrap().push(request.clone());
        let (tx, rx) = unbounded_channel();
        tokio::spawn(run_sequence(self.0.clone(), request, mode, tx));
        Ok(rx)
    }

    fn models(&self) -> Vec<ModelInfo> {
        let mut models = vec![ModelInfo {
            id: BASE.to_string(),
            parent: None,
            created: 1_700_000_000,
        }];
        models.extend(self.adapters.lock().unwrap().iter().cloned());
        models
    }

    fn context_length(&self) -> usize {
        CONTEXT
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn unload_adapter(&self, name: &str) -> Result<(), UnloadError> {
        if name == BASE {
            return Err(UnloadError::BaseModel(name.into()));
        }
        let mut adapters = self.adapters.lock().unwrap();
        let before = adapters.len();
        adapters.retain(|m| m.id != name);
        if adapters.len() == before {
            return Err(UnloadError::NotFound(name.into()));
        }
        Ok(())
    }

    fn load_adapter(
        &self,
        name: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ModelInfo, String>> + Send>>
    {
        let result = if dir.join("adapter_config.json").is_file() {
            let info = ModelInfo {
                id: name,
                parent: Some(BASE.to_string()),
                created: 1_700_000_100,
            };
            self.adapters.lock().unwrap().push(info.clone());
            Ok(info)
        } else {
            Err(format!(
                "{} has no adapter_config.json; point to a PEFT adapter folder",
                dir.display()
            ))
        };
        Box::pin(async move { result })
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            queue_depth: 1,
            running_sequences: 2,
            kv_blocks_used: 30,
            kv_blocks_free: 70,
            kv_block_size: 16,
            prompt_tokens_total: 123,
            generated_tokens_total: 45,
            ..EngineStats::default()
        }
    }

    fn shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
    }
}

fn setup_with(
    reply: &str,
    delay: Duration,
    api_key: Option<&str>,
) -> (Router, ServerState, TestBackend) {
    let backend = TestBackend::new(reply, delay);
    let state = ServerState::new(ServerConfig {
        backend: Arc::new(backend.clone()),
        tokenizer: tokenizer(),
        template: template(),
        stop_token_ids: vec![end_id(), 32000],
        api_key: api_key.map(str::to_string),
        base_model: BASE.to_string(),
    })
    .unwrap();
    (router(state.clone()), state, backend)
}

fn setup() -> (Router, TestBackend) {
    let (app, _, backend) = setup_with(REPLY, Duration::ZERO, None);
    (app, backend)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Asserts an OpenAI error object with `status`; returns it.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        let error = &body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(error["type"].is_string());
        assert!(error.get("param").is_some() && error.get("code").is_some());
        error.clone()
    }
}

async fn call(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(app: &Router, uri: &str, body: Value) -> Reply {
    call(app, json_request(uri, body.to_string())).await
}

async fn get(app: &Router, uri: &str) -> Reply {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn delete(app: &Router, uri: &str) -> Reply {
    call(app, Request::delete(uri).body(Body::empty()).unwrap()).await
}

fn json_request(uri: &str, body: String) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn expected_reply() -> String {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode(REPLY, false).unwrap();
    tokenizer.decode(&ids, true).unwrap()
}

fn hello() -> Value {
    json!([{"role": "user", "content": "What is the capital of France?"}])
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape_and_usage() {
    let (app, backend) = setup();
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"model": BASE, "messages": hello(), "temperature": 0, "seed": -3}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], BASE);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected_reply());
    assert_eq!(choice["finish_reason"], "stop");

    // The prompt is the template's rendering, tokenized without an extra BOS.
    let request = backend.last_request();
    let rendered = template()
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(
        request.prompt,
        tokenizer().encode(&rendered, false).unwrap()
    );
    assert_eq!(request.prompt.iter().filter(|&&id| id == 1).count(), 1);
    assert_eq!(request.max_tokens, CONTEXT - request.prompt.len());
    assert_eq!(request.sampling.temperature, 0.0);
    assert_eq!(request.stop_token_ids, vec![end_id(), 32000]);

    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], request.prompt.len());
    assert_eq!(usage["completion_tokens"], backend.reply.len());
    assert_eq!(
        usage["total_tokens"],
        request.prompt.len() + backend.reply.len()
    );
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 2);
}

#[tokio::test]
async fn content_parts_and_unknown_fields_are_accepted() {
    let (app, backend) = setup();
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"}
            ]}],
            "max_completion_tokens": 3.0,
            "max_tokens": 1000,
            "logit_bias": {}, "user": "ann", "parallel_tool_calls": false, "n": 1
        }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], BASE, "the base model is the default");
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "length");
    let rendered = template()
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let request = backend.last_request();
    assert_eq!(
        request.prompt,
        tokenizer().encode(&rendered, false).unwrap()
    );
    assert_eq!(request.max_tokens, 3, "max_completion_tokens wins");
}

#[tokio::test]
async fn chat_stream_sends_role_content_finish_usage_and_done() {
    let (app, _backend) = setup();
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": hello(), "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, expected_reply());
    let n = chunks.len();
    assert!(n > 4, "the text comes in several chunks");
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[..n - 2]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(
        chunks[n - 1]["usage"]["completion_tokens"],
        tokenizer().encode(REPLY, false).unwrap().len() + 1
    );
}

#[tokio::test]
async fn n_choices_are_sequences_of_their_own_seeds_and_stream_by_index() {
    let (app, backend) = setup();
    let reply_tokens = tokenizer().encode(REPLY, false).unwrap().len() + 1;
    let body = json!({"messages": hello(), "n": 3, "seed": 7, "temperature": 0.5});
    let reply = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let answer = reply.json();
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], expected_reply());
        assert_eq!(choice["finish_reason"], "stop");
    }
    // The prompt counts once, the completions add up.
    let usage = &answer["usage"];
    assert_eq!(usage["completion_tokens"], 3 * reply_tokens);
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"], prompt + 3 * reply_tokens as u64);
    let seeds: Vec<Option<u64>> = backend
        .submitted
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.sampling.seed)
        .collect();
    assert_eq!(seeds, [Some(7), Some(8), Some(9)]);

    // Streamed: every choice opens, adds up to the whole reply and finishes once; one usage
    // chunk at the end.
    for (uri, text_of) in [
        ("/v1/chat/completions", "/choices/0/delta/content"),
        ("/v1/completions", "/choices/0/text"),
    ] {
        let mut body = json!({"n": 2, "stream": true, "stream_options": {"include_usage": true}});
        if uri.ends_with("chat/completions") {
            body["messages"] = hello();
        } else {
            body["prompt"] = json!("The capital of France");
        }
        let reply = post(&app, uri, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let events = reply.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        for index in 0..2 {
            let mine: Vec<&Value> = chunks
                .iter()
                .filter(|c| c["choices"][0]["index"] == index)
                .collect();
            let text: String = mine
                .iter()
                .filter_map(|c| c.pointer(text_of).and_then(Value::as_str))
                .collect();
            assert!(text.contains("Paris"), "{uri} choice {index}: {text:?}");
            let finishes = mine
                .iter()
                .filter(|c| !c["choices"][0]["finish_reason"].is_null())
                .count();
            assert_eq!(finishes, 1, "{uri} choice {index}");
        }
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]), "{uri}");
        assert_eq!(
            usage["usage"]["completion_tokens"],
            2 * reply_tokens,
            "{uri}"
        );
    }
}

#[tokio::test]
async fn completions_answer_and_stream_text_completion_objects() {
    let (app, backend) = setup();
    let reply = post(
        &app,
        "/v1/completions",
        json!({"model": BASE, "prompt": "The capital of France is", "max_tokens": 4}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let first_four = &backend.reply[..4];
    assert_eq!(
        body["choices"][0]["text"],
        tokenizer().decode(first_four, true).unwrap()
    );
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(
        backend.last_request().prompt,
        tokenizer()
            .encode("The capital of France is", true)
            .unwrap()
    );

    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["The capital of France is"], "stream": true}),
    )
    .await;
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected_reply());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn completions_reject_echo_and_batches() {
    let (app, _backend) = setup();
    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hi", "echo": true}),
    )
    .await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "echo");
    let reply = post(&app, "/v1/completions", json!({"prompt": ["a", "b"]})).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "prompt");
    let reply = post(&app, "/v1/completions", json!({"prompt": [1, 2, 3]})).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "prompt");
    let reply = post(&app, "/v1/completions", json!({"prompt": ""})).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "prompt");
}

#[tokio::test]
async fn stop_strings_truncate_the_answer_and_cancel_the_sequence() {
    let (app, _, backend) = setup_with(REPLY, Duration::from_millis(5), None);
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": hello(), "stop": ["capital", "Berlin"]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let choice = &reply.json()["choices"][0];
    assert_eq!(choice["message"]["content"], "Hello! Paris is the ");
    assert_eq!(choice["finish_reason"], "stop");
    backend.wait_for_cancel().await;

    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Say hello", "stop": "Paris", "stream": true}),
    )
    .await;
    let text: String = reply.events()[..reply.events().len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Hello! ");
}

#[tokio::test]
async fn models_lists_the_base_and_adapters() {
    let (app, _backend) = setup();
    let adapter = tempfile::tempdir().unwrap();
    std::fs::write(adapter.path().join("adapter_config.json"), "{}").unwrap();
    let load = |name: &str, path: &Path| json!({"name": name, "path": path.to_str().unwrap()});

    let reply = post(&app, "/v1/adapters", load("sql-lora", adapter.path())).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let model = reply.json();
    assert_eq!(model["id"], "sql-lora");
    assert_eq!(model["object"], "model");
    assert_eq!(model["owned_by"], "philo");
    assert_eq!(model["parent"], BASE);

    let reply = post(&app, "/v1/adapters", load("sql-lora", adapter.path())).await;
    assert_eq!(reply.error(StatusCode::CONFLICT)["param"], "name");
    let reply = post(&app, "/v1/adapters", load(BASE, adapter.path())).await;
    reply.error(StatusCode::CONFLICT);
    let missing = adapter.path().join("missing");
    let reply = post(&app, "/v1/adapters", load("other", &missing)).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "path");
    let empty = tempfile::tempdir().unwrap();
    let reply = post(&app, "/v1/adapters", load("other", empty.path())).await;
    let error = reply.error(StatusCode::BAD_REQUEST);
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("adapter_config.json"));
    let reply = post(&app, "/v1/adapters", load("-bad name", adapter.path())).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "name");

    let reply = get(&app, "/v1/models").await;
    let list = reply.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE, "sql-lora"]);
    assert!(list["data"][0]["parent"].is_null());
    assert_eq!(list["data"][0]["created"], 1_700_000_000);

    let reply = get(&app, &format!("/v1/models/{BASE}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["id"], BASE);
    let reply = get(&app, "/v1/models/microsoft%2FPhi-3-mini-4k-instruct").await;
    assert_eq!(reply.json()["id"], BASE);
    let reply = get(&app, "/v1/models/gpt-4").await;
    assert_eq!(
        reply.error(StatusCode::NOT_FOUND)["code"],
        "model_not_found"
    );

    // The adapter is servable by name.
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "sql-lora", "messages": hello()}),
    )
    .await;
    assert_eq!(reply.json()["model"], "sql-lora");

    // Unloading: the answer is OpenAI's deleted-model object; it is gone from the list; the
    // base and unknown names are refused.
    let reply = delete(&app, "/v1/adapters/sql-lora").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"id": "sql-lora", "object": "model", "deleted": true})
    );
    let ids: Vec<String> = get(&app, "/v1/models").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [BASE]);
    let reply = delete(&app, "/v1/adapters/sql-lora").await;
    assert_eq!(
        reply.error(StatusCode::NOT_FOUND)["code"],
        "model_not_found"
    );
    let reply = delete(&app, &format!("/v1/adapters/{BASE}")).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST)["param"], "name");
}

#[tokio::test]
async fn api_key_guards_the_v1_routes_only() {
    let (app, _, _backend) = setup_with(REPLY, Duration::ZERO, Some("sk-test"));
    let reply = get(&app, "/v1/models").await;
    let error = reply.error(StatusCode::UNAUTHORIZED);
    assert_eq!(error["code"], "invalid_api_key");
    let with_key = |key: &str| {
        Request::get("/v1/models")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    call(&app, with_key("sk-wrong"))
        .await
        .error(StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, with_key("sk-test")).await.status, StatusCode::OK);
    let reply = post(&app, "/v1/chat/completions", json!({"messages": hello()})).await;
    reply.error(StatusCode::UNAUTHORIZED);
    for open in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(get(&app, open).await.status, StatusCode::OK, "{open}");
    }
    let doc = get(&app, "/openapi.json").await.json();
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    assert!(doc["paths"]["/v1/models"]["get"]["security"].is_array());
}

/// Checks one chat `logprobs.content` list: greedy (the chosen token is the top-1 entry),
/// log-probabilities at most 0, `top` alternatives sorted most likely first.
fn check_chat_logprobs(content: &[Value], top: usize) {
    for entry in content {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{entry}");
        let token = entry["token"].as_str().unwrap();
        let bytes: Vec<u8> = serde_json::from_value(entry["bytes"].clone()).unwrap();
        if token != "\u{FFFD}" {
            assert_eq!(bytes, token.as_bytes(), "{entry}");
        }
        let alternatives = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), top, "{entry}");
        let values: Vec<f64> = alternatives
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{entry}");
        assert!(values.iter().all(|&v| v <= 0.0));
        assert_eq!(alternatives[0]["token"], entry["token"], "{entry}");
        assert!((alternatives[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-6);
        assert!(alternatives.iter().all(|a| a["bytes"].is_array()));
    }
}

#[tokio::test]
async fn chat_returns_logprobs_whole_and_streamed() {
    let (app, backend) = setup();
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": hello(), "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(backend.last_request().sampling.logprobs, Some(3));
    let body = reply.json();
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len(),
        body["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    check_chat_logprobs(content, 3);
    // The tokens' texts make up the answer, then the stop token.
    let joined: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, format!("{}<|end|>", expected_reply()));
    // The scripted logits: the chosen token at 4, others at 3, 2, 1 and -5 (32060 of them).
    let norm = (4f64.exp() + 3f64.exp() + 2f64.exp() + 1f64.exp() + 32060.0 * (-5f64).exp()).ln();
    assert!((content[0]["logprob"].as_f64().unwrap() - (4.0 - norm)).abs() < 1e-4);
    assert_eq!(content[0]["top_logprobs"][2]["token"], "\n");
    assert_eq!(content[0]["top_logprobs"][2]["bytes"], json!([10]));

    // Without logprobs the field is null and the engine is not asked.
    let reply = post(&app, "/v1/chat/completions", json!({"messages": hello()})).await;
    assert!(reply.json()["choices"][0]["logprobs"].is_null());
    assert_eq!(backend.last_request().sampling.logprobs, None);

    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": hello(), "temperature": 0, "logprobs": true, "top_logprobs": 3,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let events = reply.events();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut content = Vec::new();
    let mut text = String::new();
    for chunk in &chunks[..chunks.len() - 1] {
        let choice = &chunk["choices"][0];
        let mine = choice["logprobs"]["content"].as_array().unwrap();
        let piece = choice["delta"]["content"].as_str().unwrap_or_default();
        if !piece.is_empty() {
            assert!(
                !mine.is_empty(),
                "a chunk of text carries its tokens: {chunk}"
            );
        }
        text.push_str(piece);
        content.extend(mine.iter().cloned());
    }
    assert_eq!(text, expected_reply());
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        content.len(),
        usage["completion_tokens"].as_u64().unwrap() as usize
    );
    check_chat_logprobs(&content, 3);
}

#[tokio::test]
async fn completions_return_legacy_logprobs() {
    let (app, backend) = setup();
    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": "The capital of France", "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(backend.last_request().sampling.logprobs, Some(2));
    let body = reply.json();
    let choice = &body["choices"][0];
    let logprobs = &choice["logprobs"];
    let n = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), n);
    let tops = logprobs["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), n);
    let text = choice["text"].as_str().unwrap();
    for i in 0..n {
        let token = tokens[i].as_str().unwrap();
        let logprob = logprobs["token_logprobs"][i].as_f64().unwrap();
        assert!(logprob <= 0.0);
        let top = tops[i].as_object().unwrap();
        assert_eq!(top.len(), 2);
        assert!(
            (top[token].as_f64().unwrap() - logprob).abs() < 1e-6,
            "greedy: top-1"
        );
        let offset = logprobs["text_offset"][i].as_u64().unwrap() as usize;
        if i + 1 < n {
            // Each token's text sits at its offset in the answer (the last is `<|end|>`).
            let rest: String = text.chars().skip(offset).collect();
            assert!(rest.starts_with(token), "{token:?} at {offset} of {text:?}");
        }
    }

    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": "The capital of France", "temperature": 0, "logprobs": 0,
               "stream": true}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let events = reply.events();
    let mut tokens = Vec::new();
    let mut offsets = Vec::new();
    let mut text = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        for (token, offset) in choice["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .zip(choice["logprobs"]["text_offset"].as_array().unwrap())
        {
            tokens.push(token.as_str().unwrap().to_string());
            offsets.push(offset.as_u64().unwrap() as usize);
        }
        assert!(choice["logprobs"]["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_object().unwrap().is_empty()));
    }
    assert_eq!(tokens.len(), n);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(tokens[..n - 1].concat(), text);

    for body in [
        json!({"prompt": "x", "logprobs": 6}),
        json!({"prompt": "x", "logprobs": -1}),
        json!({"prompt": "x", "logprobs": true}),
    ] {
        let error = post(&app, "/v1/completions", body.clone())
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], "logprobs", "{body}");
    }
}

#[tokio::test]
async fn invalid_requests_get_openai_errors() {
    let (app, backend) = setup();
    let chat = "/v1/chat/completions";

    let reply = call(&app, json_request(chat, "{\"messages\": [".to_string())).await;
    reply.error(StatusCode::BAD_REQUEST);
    let reply = call(&app, json_request(chat, String::new())).await;
    reply.error(StatusCode::BAD_REQUEST);
    let reply = call(&app, json_request(chat, "[1, 2]".to_string())).await;
    reply.error(StatusCode::BAD_REQUEST);
    let reply = call(
        &app,
        json_request(chat, format!("{} trailing", json!({"messages": hello()}))),
    )
    .await;
    reply.error(StatusCode::BAD_REQUEST);
    let reply = call(
        &app,
        Request::post(chat)
            .body(Body::from(json!({"messages": hello()}).to_string()))
            .unwrap(),
    )
    .await;
    reply.error(StatusCode::UNSUPPORTED_MEDIA_TYPE);

    for (body, param) in [
        (
            json!({"messages": hello(), "temperature": -1}),
            "temperature",
        ),
        (
            json!({"messages": hello(), "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": hello(), "top_p": 0}), "top_p"),
        (json!({"messages": hello(), "top_k": 0}), "top_k"),
        (json!({"messages": hello(), "max_tokens": -5}), "max_tokens"),
        (json!({"messages": hello(), "max_tokens": 0}), "max_tokens"),
        (
            json!({"messages": hello(), "max_tokens": 1.5}),
            "max_tokens",
        ),
        (json!({"messages": hello(), "n": 0}), "n"),
        (json!({"messages": hello(), "n": 17}), "n"),
        (
            json!({"messages": hello(), "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (
            json!({"messages": hello(), "stop": "x".repeat(201)}),
            "stop",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "messages[0].content",
        ),
        (json!({"messages": hello(), "model": 7}), "model"),
        (
            json!({"messages": hello(), "stream_options": [null]}),
            "stream_options",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": 0, "text": "hi"}]}]}),
            "messages[0].content",
        ),
        // top_logprobs needs logprobs: true and is at most 20.
        (
            json!({"messages": hello(), "top_logprobs": 3}),
            "top_logprobs",
        ),
        (
            json!({"messages": hello(), "logprobs": false, "top_logprobs": 3}),
            "top_logprobs",
        ),
        (
            json!({"messages": hello(), "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"messages": hello(), "logprobs": true, "top_logprobs": -1}),
            "top_logprobs",
        ),
        (json!({"messages": hello(), "logprobs": 3}), "logprobs"),
        // response_format: a known type, with a schema object that is a JSON Schema.
        (
            json!({"messages": hello(), "response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"messages": hello(), "response_format": {"type": "json_schema"}}),
            "response_format",
        ),
        (
            json!({"messages": hello(), "response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": [1]}}}),
            "response_format",
        ),
        (
            json!({"messages": hello(), "response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        // Fields philo does not implement are refused, never ignored.
        (
            json!({"messages": hello(), "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"messages": hello(), "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"messages": hello(), "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": hello(), "logit_bias": {"5": 101}}),
            "logit_bias",
        ),
        (
            json!({"messages": hello(), "logit_bias": {"32064": 1}}),
            "logit_bias",
        ),
    ] {
        let reply = post(&app, chat, body.clone()).await;
        let error = reply.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{body}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    // Their "off" values are fine, and logit_bias reaches the sampler, sorted by id.
    let reply = post(
        &app,
        chat,
        json!({"messages": hello(), "logprobs": false, "response_format": {"type": "text"},
               "tools": [], "tool_choice": "none", "logit_bias": {"42": -100, "7": 2.5}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        backend.last_request().sampling.logit_bias,
        [(7, 2.5), (42, -100.0)]
    );
    assert!(backend.last_request().constraint.is_none());
    // JSON answers reach the engine as a grammar.
    for format in [
        json!({"type": "json_object"}),
        json!({"type": "json_schema", "json_schema": {"name": "answer", "strict": true,
               "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                          "required": ["ok"], "additionalProperties": false}}}),
    ] {
        let body = json!({"messages": hello(), "response_format": format});
        let reply = post(&app, chat, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert!(backend.last_request().constraint.is_some(), "{format}");
    }

    let reply = post(&app, chat, json!({"temperature": 1})).await;
    let error = reply.error(StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap().contains("messages"));

    let reply = post(&app, chat, json!({"model": "gpt-4o", "messages": hello()})).await;
    let error = reply.error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");

    let reply = post(&app, chat, json!({"messages": hello(), "max_tokens": 5000})).await;
    let error = reply.error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "context_length_exceeded");
    assert_eq!(error["param"], "max_tokens");
    let long_prompt = "word ".repeat(CONTEXT);
    let reply = post(&app, "/v1/completions", json!({"prompt": long_prompt})).await;
    let error = reply.error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "context_length_exceeded");
    assert_eq!(error["param"], "prompt");

    get(&app, "/v1/nothing").await.error(StatusCode::NOT_FOUND);
    let reply = call(
        &app,
        Request::builder()
            .method(Method::DELETE)
            .uri("/v1/models")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    reply.error(StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.headers.contains_key(header::ALLOW));
}

#[tokio::test]
async fn engine_refusals_map_to_429_and_503() {
    let (app, backend) = setup();
    backend.set_mode(Mode::QueueFull);
    let reply = post(&app, "/v1/chat/completions", json!({"messages": hello()})).await;
    let error = reply.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["code"], "queue_full");
    assert_eq!(reply.headers[header::RETRY_AFTER], "3");

    backend.set_mode(Mode::ShuttingDown);
    let reply = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hi", "stream": true}),
    )
    .await;
    reply.error(StatusCode::SERVICE_UNAVAILABLE);

    let metrics = get(&app, "/metrics").await.text();
    assert!(
        metrics.contains("philo_requests_rejected_queue_full_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn engine_failures_are_500s_or_error_events() {
    let (app, backend) = setup();
    backend.set_mode(Mode::Fail);
    let reply = post(&app, "/v1/chat/completions", json!({"messages": hello()})).await;
    let error = reply.error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("GPU caught fire"));

    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": hello(), "stream": true}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("GPU caught fire"));
}

#[tokio::test]
async fn disconnecting_mid_stream_cancels_the_sequence() {
    let long_reply = "Paris is lovely in the spring. ".repeat(50);
    let (app, _, backend) = setup_with(&long_reply, Duration::from_millis(10), None);
    let response = app
        .clone()
        .oneshot(json_request(
            "/v1/chat/completions",
            json!({"messages": hello(), "stream": true}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"Paris") && !seen.contains("\"content\":\" Paris") {
        let frame = body.frame().await.unwrap().unwrap();
        if let Some(data) = frame.data_ref() {
            seen.push_str(std::str::from_utf8(data).unwrap());
        }
    }
    assert_eq!(backend.cancelled.load(Ordering::SeqCst), 0);
    drop(body);
    backend.wait_for_cancel().await;
}

#[tokio::test]
async fn metrics_expose_http_engine_and_latency_metrics() {
    let (app, _backend) = setup();
    post(&app, "/v1/chat/completions", json!({"messages": hello()})).await;
    post(&app, "/v1/chat/completions", json!({"messages": []})).await;
    let reply = get(&app, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = reply.text();
    for line in [
        "philo_http_requests_total{method=\"POST\",endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "philo_http_requests_total{method=\"POST\",endpoint=\"/v1/chat/completions\",status=\"400\"} 1",
        "philo_queue_depth 1",
        "philo_running_sequences 2",
        "philo_kv_blocks_used 30",
        "philo_kv_blocks_free 70",
        "philo_prompt_tokens_total 123",
        "philo_generation_tokens_total 45",
        "philo_time_to_first_token_seconds_count 1",
        "philo_inter_token_latency_seconds_bucket",
        "philo_request_duration_seconds_count{endpoint=\"/v1/chat/completions\"} 1",
        "philo_requests_rejected_queue_full_total 0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // The GPU gauges come from NVML where it is (the server opens it at the first scrape); on
    // a machine without a GPU they are left out and the rest is as above.
    let gpu_gauges = [
        "philo_gpu_utilization_percent{gpu=\"0\"} ",
        "philo_gpu_memory_used_bytes{gpu=\"0\"} ",
        "philo_gpu_memory_total_bytes{gpu=\"0\"} ",
    ];
    if philo_monitor::Monitor::open().is_ok() {
        for line in gpu_gauges {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    } else {
        assert!(!text.contains("philo_gpu_"), "{text}");
    }
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let (app, _backend) = setup();
    let reply = get(&app, "/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/v1/adapters",
        "/health",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is missing");
    }
    let params = &doc["components"]["schemas"]["GenerationParams"]["properties"];
    assert_eq!(params["temperature"]["maximum"], 2.0);
    assert_eq!(params["n"]["maximum"], 16);
    assert_eq!(params["max_tokens"]["maximum"], CONTEXT - 1);
    let chat = &doc["components"]["schemas"]["ChatInput"];
    assert_eq!(chat["required"], json!(["messages"]));
    assert_eq!(chat["properties"]["top_logprobs"]["maximum"], 20);
    let completion = &doc["components"]["schemas"]["CompletionInput"];
    assert_eq!(completion["properties"]["logprobs"]["maximum"], 5);
    for schema in [
        "ChatLogprobs",
        "ChatTokenLogprob",
        "TopLogprob",
        "CompletionLogprobs",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    assert!(
        params.get("logprobs").is_none(),
        "logprobs is each endpoint's own field"
    );
    assert_eq!(chat["properties"]["messages"]["minItems"], 1);
    assert!(doc["paths"]["/v1/models"]["get"].get("security").is_none());
}

#[tokio::test]
async fn health_and_graceful_shutdown() {
    let (_, state, backend) = setup_with(REPLY, Duration::ZERO, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));

    let response = raw_get(addr, "/health").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"status":"ok"}"#), "{response}");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server shuts down")
        .unwrap()
        .unwrap();
    assert!(backend.shut_down.load(Ordering::SeqCst));
    let reply = get(&router(state), "/health").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["status"], "shutting_down");
}

/// A GET over a plain TCP connection, returning the whole response.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap()
}
