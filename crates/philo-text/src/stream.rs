//! Streaming detokenisation: text out as tokens come in.
//!
//! Decoding one token at a time does not work for SentencePiece-style
//! tokenizers: a character may span several byte-fallback tokens (`<0xF0>`
//! `<0x9F>` ...), and the decoder strips the leading space of whatever it is
//! given, so `decode([▁world])` is `world`, not ` world`. Instead we keep the
//! ids of the whole stream and decode a small window twice: the tokens already
//! emitted (for context) and the same tokens plus the new ones. The difference
//! is the new text. It is held back while it ends in U+FFFD, the replacement
//! character the decoder produces for an incomplete UTF-8 sequence.

use crate::error::TextError;
use crate::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a stream of token ids into a stream of text chunks.
///
/// The concatenation of everything [`push`](Self::push) and
/// [`finish`](Self::finish) return equals `tokenizer.decode(all_ids, skip)`.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the context window: the ids from here to `read_offset` were
    /// already emitted and are decoded only so the new text joins on correctly.
    prefix_offset: usize,
    /// Ids before this offset have been emitted as text.
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder that leaves special tokens (`<|end|>`, ...) out of the text.
    pub fn new(tokenizer: &Tokenizer) -> Self {
        Self::with_skip_special_tokens(tokenizer, true)
    }

    /// A decoder that keeps special tokens in the text when
    /// `skip_special_tokens` is false.
    pub fn with_skip_special_tokens(tokenizer: &Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer: tokenizer.clone(),
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token id; returns the text it completes, if any.
    ///
    /// `None` means the token did not finish any text yet (part of a multi-byte
    /// character, a lone `▁`, or a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        let (prefix_len, text) = self.decode_window()?;
        if text.len() <= prefix_len || text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let new_text = suffix_after(&text, prefix_len);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new_text))
    }

    /// Adds several ids; returns the text they complete (possibly empty).
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String, TextError> {
        let mut out = String::new();
        for &id in ids {
            if let Some(chunk) = self.push(id)? {
                out.push_str(&chunk);
            }
        }
        Ok(out)
    }

    /// Ends the stream: returns any text still held back (e.g. an incomplete
    /// character, as U+FFFD, exactly as a full decode would show it) and resets
    /// the decoder for a new stream.
    pub fn finish(&mut self) -> Result<Option<String>, TextError> {
        let (prefix_len, text) = self.decode_window()?;
        let rest = if text.len() > prefix_len {
            Some(suffix_after(&text, prefix_len))
        } else {
            None
        };
        self.reset();
        Ok(rest)
    }

    /// Forgets the stream so far without emitting anything.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    /// All ids pushed since the stream started (or was last reset).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Decodes the window: returns the byte length of the already-emitted
    /// context and the text of context plus pending ids.
    fn decode_window(&self) -> Result<(usize, String), TextError> {
        let skip = self.skip_special_tokens;
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], skip)?;
        // Normally `prefix` is a prefix of `text`. If the decoder ever rewrote
        // the context, emit from where the two diverge rather than cut a
        // character in half.
        let prefix_len = if text.starts_with(&prefix) {
            prefix.len()
        } else {
            common_prefix_len(&prefix, &text)
        };
        Ok((prefix_len, text))
    }
}

/// `text` from byte `at` on; `at` is always a char boundary here.
fn suffix_after(text: &str, at: usize) -> String {
    text.get(at..).unwrap_or_default().to_string()
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
pub fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}
