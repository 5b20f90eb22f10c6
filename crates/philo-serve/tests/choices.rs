//! `n` choices on the real engine (the tiny random model on the CPU): the later choices reuse
//! the prompt's KV blocks that choice 0 filled instead of computing the prompt again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use candle_core::{DType, Device};
use http_body_util::BodyExt;
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::Phi3;
use philo_serve::engine::{DecodePath, EngineConfig, EngineHandle};
use philo_serve::http::{router, ServerConfig, ServerState};
use philo_serve::request::Backend;
use philo_text::{ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use tower::ServiceExt;

const BLOCK_SIZE: usize = 16;

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/phi-3-early")
}

#[tokio::test(flavor = "multi_thread")]
async fn later_choices_reuse_the_prompt_blocks_of_the_first() {
    let config = tiny_config();
    let weights = random_weights(&config, 0, &Device::Cpu).unwrap();
    let model = Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap();
    let engine_config = EngineConfig {
        model_id: "tiny".into(),
        max_running: 8,
        max_tokens_per_step: 512,
        max_queue: 16,
        block_size: BLOCK_SIZE,
        num_blocks: 64,
        decode_path: DecodePath::default(),
        speculative_tokens: None,
    };
    let engine = Arc::new(EngineHandle::start(model, engine_config, Vec::new()).unwrap());
    let tokenizer = Tokenizer::from_file(&tokenizer_dir().join("tokenizer.json")).unwrap();
    let template =
        ChatTemplate::from_tokenizer_config(&tokenizer_dir().join("tokenizer_config.json"))
            .unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let prompt_tokens = tokenizer.encode(&prompt, true).unwrap().len();
    let stop_token_ids = vec![tokenizer.token_to_id("<|endoftext|>").unwrap()];
    let state = ServerState::new(ServerConfig {
        backend: engine.clone(),
        tokenizer,
        template,
        stop_token_ids,
        api_key: None,
        base_model: "tiny".into(),
    })
    .unwrap();
    let body = json!({"prompt": prompt, "n": 3, "max_tokens": 4, "temperature": 0.8, "seed": 1});
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(answer["choices"].as_array().unwrap().len(), 3, "{answer}");
    // Choices 1 and 2 find every full block of the prompt but the last (the sequence must
    // compute at least its last prompt token) in the prefix cache.
    let full_blocks = (prompt_tokens - 1) / BLOCK_SIZE;
    let cached = engine.stats().cached_prompt_tokens_total as usize;
    assert!(
        cached >= 2 * full_blocks * BLOCK_SIZE,
        "{cached} prompt tokens served from shared blocks; {prompt_tokens} tokens a prompt"
    );
    engine.shutdown();
}
