//! The tokenizer as GGUF's `llama` (SentencePiece) vocabulary, and back.
//!
//! Out: every id's piece, a score and a type, from Hugging Face's tokenizer.json (a BPE model
//! converted from SentencePiece, as Phi-3's is). A piece's score is minus the rank of the first
//! merge that makes it (pieces no merge makes score -1e9): llama.cpp's SentencePiece
//! tokenizer, which merges the best-scored piece first, then tokenizes as the BPE merges do. In: a tokenizer.json rebuilt from those
//! three lists, with the merges every piece's two halves make, best score first (what
//! Hugging Face's own SentencePiece converter does).

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::GgufError;

/// GGUF token types (llama.cpp's `llama_token_type`).
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;
pub const BYTE: i32 = 6;

/// A vocabulary as GGUF stores it: index = token id.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

fn is_byte_piece(piece: &str) -> bool {
    piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>')
}

/// The vocabulary of `tokenizer` (tokenizer.json), padded with unused `[PADi]` pieces to
/// `vocab_size` entries (the embedding's rows).
pub fn vocab_from_tokenizer_json(tokenizer: &Value, vocab_size: usize) -> Result<Vocab, GgufError> {
    let bad = |what: &str| GgufError::Tokenizer(format!("tokenizer.json: {what}"));
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        return Err(bad("only BPE tokenizers converted from SentencePiece (Llama / Phi-3) export as GGUF's llama vocabulary"));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?;
    let unk = model["unk_token"].as_str();
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: usize, piece: &str, kind: i32| -> Result<(), GgufError> {
        let slot = tokens.get_mut(id).ok_or_else(|| {
            bad(&format!(
                "token {piece:?} has id {id}, beyond the model's {vocab_size} rows"
            ))
        })?;
        *slot = Some((piece.to_string(), kind));
        Ok(())
    };
    for (piece, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocab id is not a number"))? as usize;
        let kind = if Some(piece.as_str()) == unk {
            UNKNOWN
        } else if is_byte_piece(piece) {
            BYTE
        } else {
            NORMAL
        };
        place(id, piece, kind)?;
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(piece)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad("an added token without id or content"));
        };
        let kind = if Some(piece) == unk {
            UNKNOWN
        } else if added["special"].as_bool().unwrap_or(false) || id < 3 {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id as usize, piece, kind)?;
    }
    // The rank of the first merge making each piece.
    let mut made_at: HashMap<String, usize> = HashMap::new();
    for (rank, merge) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let merged = match merge {
            Value::String(pair) => pair.replacen(' ', "", 1),
            Value::Array(pair) => pair.iter().filter_map(Value::as_str).collect(),
            _ => return Err(bad("a merge is neither \"a b\" nor [a, b]")),
        };
        made_at.entry(merged).or_insert(rank);
    }
    let mut out = Vocab {
        tokens: Vec::with_capacity(vocab_size),
        scores: Vec::with_capacity(vocab_size),
        types: Vec::with_capacity(vocab_size),
    };
    for (id, slot) in tokens.into_iter().enumerate() {
        let (piece, kind) = slot.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        let score = match (kind, made_at.get(&piece)) {
            (NORMAL, Some(&rank)) => -(rank as f32),
            (NORMAL, None) if piece.chars().count() > 1 => -1e9,
            _ => 0.0,
        };
        out.scores.push(score);
        out.tokens.push(piece);
        out.types.push(kind);
    }
    Ok(out)
}

/// A tokenizer.json for `vocab`: BPE with byte fallback and the Llama normaliser and decoder;
/// `add_bos` puts `bos_id` before every encoded text.
pub fn tokenizer_json_from_vocab(vocab: &Vocab, bos_id: Option<u32>, add_bos: bool) -> Value {
    let mut model_vocab = serde_json::Map::new();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut added = Vec::new();
    let mut unk = None;
    for (id, (piece, &kind)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
        if matches!(kind, NORMAL | BYTE | UNKNOWN) || (kind == CONTROL && id < 3) {
            model_vocab.insert(piece.clone(), id.into());
            ids.insert(piece, id);
        }
        if kind == UNKNOWN {
            unk = Some(piece.clone());
        }
        if matches!(kind, CONTROL | USER_DEFINED | UNKNOWN | UNUSED) {
            added.push(json!({
                "id": id, "content": piece, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind != USER_DEFINED,
            }));
        }
    }
    // Every split of a normal piece into two pieces of the vocabulary is a merge; the best
    // score first, then by the halves' ids.
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if vocab.types[id] != NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) else {
                continue;
            };
            if vocab.types[l] == NORMAL && vocab.types[r] == NORMAL {
                merges.push((vocab.scores[id], l, r, format!("{left} {right}")));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<String> = merges.into_iter().map(|m| m.3).collect();
    let post_processor = match (add_bos, bos_id) {
        (true, Some(bos)) => {
            let piece = &vocab.tokens[bos as usize];
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {piece.clone(): {"id": piece, "ids": [bos], "tokens": [piece]}},
            })
        }
        _ => Value::Null,
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]},
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "vocab": model_vocab, "merges": merges,
        },
    })
}
