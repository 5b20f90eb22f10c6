//! The Phi-3 tokenizer: a thin wrapper over Hugging Face `tokenizers`.

use std::path::Path;
use std::sync::Arc;

use crate::error::TextError;

/// A tokenizer loaded from a Hugging Face `tokenizer.json`.
///
/// Cloning is cheap (the inner tokenizer is shared), so a [`crate::StreamDecoder`]
/// can hold its own handle without borrowing.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    /// Loads a tokenizer from a `tokenizer.json` file.
    ///
    /// A missing or unreadable file gives [`TextError::Read`]; a file that does
    /// not parse gives [`TextError::TokenizerParse`]; both name the path.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TextError> {
        // Read the bytes ourselves so a missing file and a malformed file get
        // different, clearer errors than `tokenizers` gives on its own.
        let bytes = std::fs::read(path).map_err(|cause| TextError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::TokenizerParse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Tokenizer::from(inner))
    }

    /// A tokenizer from the text of a `tokenizer.json` held elsewhere (e.g. inside a GGUF
    /// file); `source` names it in errors.
    pub fn from_json(json: &str, source: &Path) -> Result<Tokenizer, TextError> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            TextError::TokenizerParse {
                path: source.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        Ok(Tokenizer::from(inner))
    }

    /// Turns `text` into token ids.
    ///
    /// `add_special_tokens` runs the tokenizer's post-processor; for Phi-3's
    /// tokenizer.json that adds nothing (no BOS), so chat templates that want a
    /// BOS write `{{ bos_token }}` themselves. Special-token strings in `text`
    /// (e.g. `<|user|>`) are always recognised as single tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TextError::Encode {
                    message: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns token ids back into text.
    ///
    /// With `skip_special_tokens` set, tokens marked special (`<|end|>`,
    /// `<|assistant|>`, ...) are left out of the text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Decode {
                message: e.to_string(),
            })
    }

    /// The id of `token` (a vocabulary entry or added token such as `<|end|>`), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of token `id`, as stored in the vocabulary (e.g. `▁Hello`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids the tokenizer knows, added tokens included
    /// (32011 for Phi-3; the model's embedding table is padded to 32064).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers::Tokenizer`, for anything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl From<tokenizers::Tokenizer> for Tokenizer {
    fn from(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer {
            inner: Arc::new(inner),
        }
    }
}
