//! The text side of philo: the Phi-3 tokenizer, chat templates and streaming
//! detokenisation.
//!
//! - [`Tokenizer`] loads a Hugging Face `tokenizer.json` and encodes/decodes.
//! - [`ChatTemplate`] renders a conversation of [`ChatMessage`]s into a prompt
//!   with the model's Jinja chat template (or philo's built-in Phi-3 one).
//! - [`StreamDecoder`] turns generated ids into text chunks as they arrive.
//!
//! All fallible operations return [`TextError`].
//!
//! ```no_run
//! use std::path::Path;
//! use philo_text::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer};
//!
//! # fn main() -> Result<(), philo_text::TextError> {
//! let dir = Path::new("models/Phi-3-mini-4k-instruct");
//! let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
//! let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
//! let prompt = template.render(&[ChatMessage::user("Hello!")], true)?;
//! let prompt_ids = tokenizer.encode(&prompt, false)?;
//!
//! let mut stream = StreamDecoder::new(&tokenizer);
//! # let generated: Vec<u32> = prompt_ids;
//! for id in generated {
//!     if let Some(text) = stream.push(id)? {
//!         print!("{text}");
//!     }
//! }
//! if let Some(text) = stream.finish()? {
//!     print!("{text}");
//! }
//! # Ok(())
//! # }
//! ```

mod chat_template;
mod error;
mod stream;
mod tokenizer;

pub use chat_template::{
    ChatMessage, ChatTemplate, TokenizerConfig, PHI3_BOS_TOKEN, PHI3_DEFAULT_TEMPLATE,
    PHI3_EOS_TOKEN,
};
pub use error::TextError;
pub use stream::{common_prefix_len, StreamDecoder};
pub use tokenizer::Tokenizer;
