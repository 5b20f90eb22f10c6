//! Constrained decoding for `response_format` `json_object` and `json_schema`: llguidance
//! compiles the schema to a grammar over the tokenizer's token bytes, and each step masks the
//! logits to the tokens that keep the output a prefix of a document the schema accepts. Where
//! the document may end, the sequence's stop tokens are allowed too; a complete document allows
//! nothing else.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// What builds constraints for one tokenizer (its token trie, built once: ~70 ms for Phi-3).
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
}

impl Grammars {
    /// From a tokenizer.json document; `eos` is the token the grammar's "may end here" maps to
    /// (any of a sequence's stop tokens is allowed there, see [`JsonConstraint::mask`]).
    pub fn from_tokenizer_json(tokenizer_json: &Value, eos: u32) -> Result<Self, String> {
        let words = llguidance::token_bytes_from_tokenizer_json(tokenizer_json).map_err(|e| {
            format!("cannot read the tokenizer's tokens for constrained output: {e}")
        })?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory, eos })
    }

    /// A constraint to JSON: any object when `schema` is None (`json_object`), else documents
    /// of the JSON Schema. Whitespace is fixed (`", "` and `": "`, no newlines) unless the
    /// schema's own `x-guidance` options say otherwise: free whitespace lets a model pad
    /// forever.
    pub fn json(&self, schema: Option<&Value>) -> Result<JsonConstraint, String> {
        let mut schema = schema
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        let Some(object) = schema.as_object_mut() else {
            return Err("the JSON schema must be an object".into());
        };
        object.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| format!("the JSON schema cannot be used: {e}"))?;
        let matcher = Box::new(Matcher::new(Ok(parser)));
        if let Some(e) = matcher.get_error() {
            return Err(format!("the JSON schema cannot be used: {e}"));
        }
        Ok(JsonConstraint {
            matcher,
            eos: self.eos,
        })
    }
}

/// One sequence's position in its grammar (boxed: the matcher is large next to the requests
/// that carry it).
pub struct JsonConstraint {
    matcher: Box<Matcher>,
    eos: u32,
}

impl JsonConstraint {
    /// Sets the logits of every token the grammar does not allow next to -inf; `stops` (the
    /// sequence's stop tokens) stay where the document may end. Ids past the tokenizer's
    /// vocabulary (the model's padding rows) are never allowed.
    pub fn mask(&mut self, logits: &mut [f32], stops: &[u32]) -> Result<(), String> {
        // A complete document with nothing that could follow stops the matcher: EOS only.
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let may_end = allowed.is_allowed(self.eos);
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let ok = if stops.contains(&id) {
                may_end
            } else {
                id != self.eos && (id as usize) < allowed.len() && allowed.is_allowed(id)
            };
            if !ok {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves past `token` (not a stop token), which [`JsonConstraint::mask`] allowed.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("the constrained output went off its grammar: {e}"))
    }

    /// Whether the output so far is a complete document.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

impl Clone for JsonConstraint {
    fn clone(&self) -> Self {
        JsonConstraint {
            matcher: Box::new(self.matcher.deep_clone()),
            eos: self.eos,
        }
    }
}

impl std::fmt::Debug for JsonConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonConstraint").finish_non_exhaustive()
    }
}
