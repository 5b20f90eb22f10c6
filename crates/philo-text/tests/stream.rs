//! StreamDecoder tests: streamed text must equal the full decode, and never
//! contain half a character.

use std::path::Path;

use philo_text::{StreamDecoder, Tokenizer};

const PHI3_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer.json"
);
const EARLY_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/phi-3-early/tokenizer.json"
);
const VECTORS_INP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/llama.cpp-vectors/ggml-vocab-phi-3.gguf.inp"
);

fn phi3() -> Tokenizer {
    Tokenizer::from_file(Path::new(PHI3_TOKENIZER)).expect("load Phi-3 tokenizer")
}

/// Streams `ids` one at a time; returns every chunk emitted, the `finish` one last.
fn stream(decoder: &mut StreamDecoder, ids: &[u32]) -> Vec<String> {
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(chunk) = decoder.push(id).expect("push") {
            chunks.push(chunk);
        }
    }
    if let Some(rest) = decoder.finish().expect("finish") {
        chunks.push(rest);
    }
    chunks
}

#[test]
fn multibyte_text_streams_to_the_full_decode() {
    let tokenizer = phi3();
    let text = "héllo wörld 日本語 🙂 emoji";
    let ids = tokenizer.encode(text, false).unwrap();
    let full = tokenizer.decode(&ids, true).unwrap();
    assert_eq!(full, text);

    let mut decoder = StreamDecoder::new(&tokenizer);
    let chunks = stream(&mut decoder, &ids);
    for chunk in &chunks {
        assert!(
            !chunk.contains('\u{FFFD}'),
            "chunk {chunk:?} holds a replacement char"
        );
    }
    assert_eq!(chunks.concat(), full);
    // The emoji is four byte-fallback tokens (after a lone "▁"), emitted as
    // one chunk once its last byte arrives.
    assert!(chunks.len() < ids.len(), "{chunks:?}");
    assert!(chunks.contains(&"🙂".to_string()), "{chunks:?}");
}

#[test]
fn words_keep_their_spaces() {
    let tokenizer = phi3();
    let ids = tokenizer.encode("Hello big world", false).unwrap();
    let mut decoder = StreamDecoder::new(&tokenizer);
    assert_eq!(stream(&mut decoder, &ids), ["Hello", " big", " world"]);
}

#[test]
fn every_llama_cpp_vector_streams_to_the_full_decode() {
    // Whitespace-only inputs, leading spaces, newlines, tabs and many scripts.
    let raw = std::fs::read_to_string(VECTORS_INP).unwrap();
    let inputs: Vec<&str> = raw.split_terminator("\n__ggml_vocab_test__\n").collect();
    assert_eq!(inputs.len(), 46);
    for path in [PHI3_TOKENIZER, EARLY_TOKENIZER] {
        let tokenizer = Tokenizer::from_file(Path::new(path)).unwrap();
        let mut decoder = StreamDecoder::new(&tokenizer);
        for input in &inputs {
            let ids = tokenizer.encode(input, false).unwrap();
            let full = tokenizer.decode(&ids, true).unwrap();
            let chunks = stream(&mut decoder, &ids);
            assert_eq!(chunks.concat(), full, "input {input:?} with {path}");
            if !full.contains('\u{FFFD}') {
                assert!(
                    chunks.iter().all(|c| !c.contains('\u{FFFD}')),
                    "{input:?}: {chunks:?}"
                );
            }
        }
    }
}

#[test]
fn special_tokens_are_skipped_or_kept() {
    let tokenizer = phi3();
    let ids = tokenizer
        .encode("Hi there<|end|><|endoftext|>", false)
        .unwrap();

    let mut skipping = StreamDecoder::new(&tokenizer);
    assert_eq!(stream(&mut skipping, &ids).concat(), "Hi there");

    let mut keeping = StreamDecoder::with_skip_special_tokens(&tokenizer, false);
    let kept = stream(&mut keeping, &ids).concat();
    assert_eq!(kept, tokenizer.decode(&ids, false).unwrap());
    assert_eq!(kept, "Hi there<|end|><|endoftext|>");
}

#[test]
fn finish_flushes_an_incomplete_character_like_decode_does() {
    let tokenizer = phi3();
    let ids = tokenizer.encode("ok 🙂", false).unwrap();
    // Cut the stream in the middle of the emoji's byte-fallback tokens.
    let cut = &ids[..ids.len() - 2];
    let mut decoder = StreamDecoder::new(&tokenizer);
    let mut emitted = String::new();
    for &id in cut {
        if let Some(chunk) = decoder.push(id).unwrap() {
            emitted.push_str(&chunk);
        }
    }
    // The space before the emoji is its own "▁" token, so it is already out.
    assert_eq!(emitted, "ok ");
    assert_eq!(decoder.ids(), cut);
    let rest = decoder
        .finish()
        .unwrap()
        .expect("held-back bytes are flushed");
    assert!(rest.contains('\u{FFFD}'), "{rest:?}");
    assert_eq!(emitted + &rest, tokenizer.decode(cut, true).unwrap());
    // finish resets, so the decoder can be reused.
    assert!(decoder.ids().is_empty());
    assert_eq!(decoder.push_all(&ids).unwrap(), "ok 🙂");
}
