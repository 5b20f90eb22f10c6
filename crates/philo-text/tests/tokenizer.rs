//! Tokenizer tests: llama.cpp's Phi-3 vectors and error messages.

use std::path::Path;

use philo_text::{TextError, Tokenizer};

const PHI3_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer.json"
);
const VECTORS_INP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/llama.cpp-vectors/ggml-vocab-phi-3.gguf.inp"
);
const VECTORS_OUT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/llama.cpp-vectors/ggml-vocab-phi-3.gguf.out"
);

/// Reads the vector files the way llama.cpp's test-tokenizer-0 does: every
/// input is followed by "\n__ggml_vocab_test__\n" (so the file ends with the
/// separator, and an input may itself be empty or consist of newlines), and
/// the .out file has one line of space-separated ids per input.
fn read_vectors() -> Vec<(String, Vec<u32>)> {
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let raw = std::fs::read_to_string(VECTORS_INP).expect("read .inp");
    let mut inputs = Vec::new();
    let mut rest = raw.as_str();
    while !rest.is_empty() {
        match rest.find(SEP) {
            Some(at) => {
                inputs.push(rest[..at].to_string());
                rest = &rest[at + SEP.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                rest = "";
            }
        }
    }

    let out = std::fs::read_to_string(VECTORS_OUT).expect("read .out");
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| id.parse().expect("id is a number"))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        expected.len(),
        ".inp and .out disagree on the number of tests"
    );
    inputs.into_iter().zip(expected).collect()
}

fn phi3() -> Tokenizer {
    Tokenizer::from_file(Path::new(PHI3_TOKENIZER)).expect("load Phi-3 tokenizer")
}

/// `tokenizer` encodes every llama.cpp vector to its ids and decodes the ids back.
fn assert_vectors_round_trip(tokenizer: &Tokenizer) {
    let vectors = read_vectors();
    assert_eq!(vectors.len(), 46);
    let mut failures = Vec::new();
    for (input, expected) in &vectors {
        let ids = tokenizer.encode(input, false).expect("encode");
        if &ids != expected {
            failures.push(format!("{input:?}: got {ids:?}, expected {expected:?}"));
        }
        let text = tokenizer.decode(expected, true).expect("decode");
        if &text != input {
            failures.push(format!("{input:?}: decoded to {text:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures over 46 vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_cpp_vectors_encode_to_expected_ids_and_back() {
    assert_vectors_round_trip(&phi3());
}

/// The tokenizer philo rebuilds from a GGUF file's llama vocabulary (pieces, scores, types:
/// what llama.cpp's converter writes, and philo's export) tokenizes like the original.
#[test]
fn tokenizer_rebuilt_from_the_gguf_vocabulary_matches_the_vectors() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(PHI3_TOKENIZER).unwrap()).unwrap();
    let vocab = philo_gguf::vocab::vocab_from_tokenizer_json(&json, 32064).unwrap();
    assert_eq!(vocab.tokens[32063], "[PAD32063]");
    assert_eq!(vocab.types[0x0A + 3], philo_gguf::vocab::BYTE);
    let rebuilt = philo_gguf::vocab::tokenizer_json_from_vocab(&vocab, Some(1), false);
    let tokenizer = Tokenizer::from_json(&rebuilt.to_string(), Path::new("rebuilt")).unwrap();
    assert_vectors_round_trip(&tokenizer);
    assert_eq!(tokenizer.token_to_id("<|end|>"), Some(32007));
}

#[test]
fn special_tokens_and_vocab_size() {
    let tokenizer = phi3();
    assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(32000));
    assert_eq!(tokenizer.token_to_id("<|assistant|>"), Some(32001));
    assert_eq!(tokenizer.token_to_id("<|end|>"), Some(32007));
    assert_eq!(tokenizer.token_to_id("<|user|>"), Some(32010));
    assert_eq!(tokenizer.token_to_id("no such token"), None);
    assert_eq!(tokenizer.id_to_token(32006).as_deref(), Some("<|system|>"));
    // 32000 SentencePiece pieces plus the 11 added tokens 32000..=32010.
    assert_eq!(tokenizer.vocab_size(), 32011);
    assert_eq!(tokenizer.inner().get_vocab_size(false), 32000);
}

#[test]
fn decode_skips_special_tokens_only_when_asked() {
    let tokenizer = phi3();
    let ids = tokenizer.encode("Hi<|end|>", false).unwrap();
    assert_eq!(ids.last(), Some(&32007));
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "Hi");
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "Hi<|end|>");
}

#[test]
fn decoding_a_slice_drops_its_leading_space() {
    // The SentencePiece decoder strips one leading space from whatever it is
    // given, because encoding prepends one. Decoding a slice from the middle
    // of a text therefore loses the space between words; this is why
    // StreamDecoder decodes with context instead of token by token.
    let tokenizer = phi3();
    let ids = tokenizer.encode("Hello world", false).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(tokenizer.decode(&ids[1..], true).unwrap(), "world");
}

#[test]
fn unparsable_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, r#"{"version": "1.0", "model": "#).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, TextError::TokenizerParse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("tokenizer.json"), "{message}");
    assert!(message.contains("re-download"), "{message}");
}

#[test]
fn valid_json_that_is_not_a_tokenizer_is_a_parse_error() {
    // A tokenizer_config.json handed in by mistake must not load as a tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, r#"{"bos_token": "<s>"}"#).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, TextError::TokenizerParse { .. }), "{err:?}");
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, TextError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}
