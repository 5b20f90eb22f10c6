//! Constrained output (`response_format`): the token masks of JSON grammars over the real
//! Phi-3 tokenizer, and the engine generating schema documents with the tiny random model
//! (whose sampling, unconstrained, produces no JSON at all).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use philo_generate::SamplingParams;
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::Phi3;
use philo_serve::constraint::{Grammars, JsonConstraint};
use philo_serve::engine::{DecodePath, EngineConfig, EngineHandle};
use philo_serve::request::{Backend, FinishReason, GenerationEvent, GenerationRequest};
use philo_text::Tokenizer;
use serde_json::{json, Value};

fn tokenizer() -> Tokenizer {
    let dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/phi-3-early");
    Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
}

fn id(tokenizer: &Tokenizer, token: &str) -> u32 {
    tokenizer.token_to_id(token).unwrap()
}

/// The stop tokens of a Phi-3 chat: `<|end|>` and `<|endoftext|>`.
fn stops(tokenizer: &Tokenizer) -> Vec<u32> {
    vec![id(tokenizer, "<|end|>"), id(tokenizer, "<|endoftext|>")]
}

fn grammars(tokenizer: &Tokenizer) -> Grammars {
    let json = serde_json::to_value(tokenizer.inner()).unwrap();
    Grammars::from_tokenizer_json(&json, id(tokenizer, "<|end|>")).unwrap()
}

const VOCAB: usize = 32064;

/// The ids `constraint` allows next.
fn allowed(constraint: &mut JsonConstraint, stops: &[u32]) -> Vec<u32> {
    let mut logits = vec![0.0f32; VOCAB];
    constraint.mask(&mut logits, stops).unwrap();
    (0..VOCAB as u32)
        .filter(|&i| logits[i as usize] == 0.0)
        .collect()
}

/// The text of token `id` as it continues an answer ("▁" is a space, `<0xNN>` an ASCII byte;
/// other byte tokens are empty here).
fn piece(tokenizer: &Tokenizer, id: u32) -> String {
    let token = tokenizer.id_to_token(id).unwrap();
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        let byte = u8::from_str_radix(hex, 16).unwrap();
        return if byte.is_ascii() {
            char::from(byte).to_string()
        } else {
            String::new()
        };
    }
    token.replace('▁', " ")
}

/// Feeds `text` to `constraint` token by token, each time the allowed token that covers the
/// most of what is left; returns how many tokens it took.
fn walk(
    constraint: &mut JsonConstraint,
    tokenizer: &Tokenizer,
    stops: &[u32],
    text: &str,
) -> usize {
    let mut rest = text;
    let mut steps = 0;
    while !rest.is_empty() {
        let best = allowed(constraint, stops)
            .into_iter()
            .filter(|&i| !stops.contains(&i))
            .map(|i| (i, piece(tokenizer, i)))
            .filter(|(_, p)| !p.is_empty() && rest.starts_with(p.as_str()))
            .max_by_key(|(_, p)| p.len())
            .unwrap_or_else(|| panic!("no allowed token continues {rest:?}"));
        constraint.advance(best.0).unwrap();
        rest = &rest[best.1.len()..];
        steps += 1;
    }
    steps
}

#[test]
fn a_json_object_starts_with_a_brace_and_ends_only_when_closed() {
    let tokenizer = tokenizer();
    let stops = stops(&tokenizer);
    let grammars = grammars(&tokenizer);
    let mut object = grammars.json(None).unwrap();
    let first = allowed(&mut object, &stops);
    assert!(!first.is_empty());
    for &i in &first {
        assert!(
            piece(&tokenizer, i).starts_with('{'),
            "token {i} {:?} may start a JSON object",
            piece(&tokenizer, i)
        );
    }
    assert!(
        first.iter().all(|i| !stops.contains(i)),
        "an empty answer is no object"
    );
    walk(&mut object, &tokenizer, &stops, "{\"a\": [1, 2]");
    assert!(!object.is_complete());
    assert!(allowed(&mut object, &stops)
        .iter()
        .all(|i| !stops.contains(i)));
    walk(&mut object, &tokenizer, &stops, "}");
    assert!(object.is_complete());
    // A closed object allows the stop tokens and nothing else.
    let mut sorted = stops.clone();
    sorted.sort();
    assert_eq!(allowed(&mut object, &stops), sorted);
}

#[test]
fn a_schema_allows_its_keys_and_enum_values_only() {
    let tokenizer = tokenizer();
    let stops = stops(&tokenizer);
    let schema = json!({
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer"}},
        "required": ["color", "n"],
        "additionalProperties": false,
    });
    let mut constraint = grammars(&tokenizer).json(Some(&schema)).unwrap();
    walk(&mut constraint, &tokenizer, &stops, "{\"color\": \"");
    let next: Vec<String> = allowed(&mut constraint, &stops)
        .into_iter()
        .map(|i| piece(&tokenizer, i))
        .collect();
    assert!(next.iter().any(|p| p.starts_with('r')) && next.iter().any(|p| p.starts_with('g')));
    assert!(
        next.iter()
            .all(|p| "red".starts_with(p.as_str()) || "green".starts_with(p.as_str())),
        "only prefixes of the enum values: {next:?}"
    );
    walk(&mut constraint, &tokenizer, &stops, "green\", \"n\": 12");
    let after_number: Vec<String> = allowed(&mut constraint, &stops)
        .into_iter()
        .map(|i| piece(&tokenizer, i))
        .collect();
    assert!(after_number.iter().any(|p| p == "}"));
    assert!(
        after_number
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_digit() || c == '}')),
        "more digits or the end: {after_number:?}"
    );
}

#[test]
fn a_schema_that_is_not_one_is_refused() {
    let tokenizer = tokenizer();
    let grammars = grammars(&tokenizer);
    let error = grammars
        .json(Some(&json!({"type": "nonsense"})))
        .unwrap_err();
    assert!(error.contains("JSON schema"), "{error}");
    assert!(grammars.json(Some(&json!([1, 2]))).is_err());
}

/// The tiny model of `philo new-tiny` (seed 0), in memory.
fn model() -> Phi3 {
    let config = tiny_config();
    let weights = random_weights(&config, 0, &Device::Cpu).unwrap();
    Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn the_engine_answers_with_documents_of_the_schema() {
    let tokenizer = tokenizer();
    let stops = stops(&tokenizer);
    let grammars = grammars(&tokenizer);
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["ok", "color"],
        "additionalProperties": false,
    });
    let config = EngineConfig {
        model_id: "tiny".into(),
        max_running: 4,
        max_tokens_per_step: 64,
        max_queue: 16,
        block_size: 16,
        num_blocks: 64,
        decode_path: DecodePath::default(),
        speculative_tokens: None,
    };
    let engine = EngineHandle::start(model(), config, Vec::new()).unwrap();
    let prompt = tokenizer
        .encode("<|user|>\nReply in JSON.<|end|>\n<|assistant|>\n", false)
        .unwrap();
    let mut sampled = SamplingParams::greedy();
    sampled.temperature = 0.9;
    sampled.seed = Some(5);
    let mut streams = Vec::new();
    for sampling in [SamplingParams::greedy(), sampled] {
        let request = GenerationRequest {
            model: "tiny".into(),
            prompt: prompt.clone(),
            max_tokens: 40,
            sampling,
            stop_token_ids: stops.clone(),
            constraint: Some(grammars.json(Some(&schema)).unwrap()),
        };
        streams.push(engine.submit(request).unwrap());
    }
    for mut rx in streams {
        let mut tokens = Vec::new();
        let reason = loop {
            match rx.blocking_recv().expect("the stream ends with Finished") {
                GenerationEvent::Token(t) => tokens.push(t.id),
                GenerationEvent::Finished(reason) => break reason,
                GenerationEvent::Failed(e) => panic!("request failed: {e}"),
                GenerationEvent::Started { .. } => {}
            }
        };
        assert_eq!(
            reason,
            FinishReason::Stop,
            "the document closes before max_tokens"
        );
        let last = tokens.pop().unwrap();
        assert!(stops.contains(&last));
        let text = tokenizer.decode(&tokens, true).unwrap();
        let value: Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        assert!(value["ok"].is_boolean(), "{value}");
        assert!(
            ["red", "green", "blue"].contains(&value["color"].as_str().unwrap()),
            "{value}"
        );
        assert_eq!(value.as_object().unwrap().len(), 2, "{value}");
    }
    engine.shutdown();
    engine.join();
}
