//! Chat templates: turning a conversation into the prompt string a model expects.
//!
//! Templates are the Jinja sources Hugging Face ships in `tokenizer_config.json`,
//! rendered with minijinja set up the way `transformers` sets up Jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, Python
//! string methods), so the same template gives the same prompt.

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::TextError;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` for Phi-3.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// BOS token used when tokenizer_config.json does not name one (Phi-3's).
pub const PHI3_BOS_TOKEN: &str = "<s>";
/// EOS token used when tokenizer_config.json does not name one (Phi-3's).
pub const PHI3_EOS_TOKEN: &str = "<|endoftext|>";

/// philo's built-in Phi-3 chat template, used when tokenizer_config.json has none.
///
/// Same output as the Phi-3-mini-4k-instruct template for `system`, `user` and
/// `assistant` turns: `<|{role}|>\n{content}<|end|>\n` per message, then
/// `<|assistant|>\n` (generation prompt) or the EOS token. Unlike that template
/// it rejects other roles instead of silently dropping them.
pub const PHI3_DEFAULT_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}",
    "{{ raise_exception('Phi-3 only knows the roles system, user and assistant, but a message has role ' ~ message['role'] | tojson) }}",
    "{% endif %}",
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
);

/// The parts of a Hugging Face `tokenizer_config.json` that philo uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// The file this was read from; used in error messages.
    pub path: PathBuf,
    /// The chat template source. When the file holds a list of named
    /// templates this is the one named `default`.
    pub chat_template: Option<String>,
    /// The BOS token text (e.g. `<s>`), if the file names one.
    pub bos_token: Option<String>,
    /// The EOS token text (e.g. `<|endoftext|>`), if the file names one.
    pub eos_token: Option<String>,
    /// Whether the tokenizer should prepend BOS to plain encodes, if the file says.
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads and parses a `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let json = std::fs::read_to_string(path).map_err(|cause| TextError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(&json, path)
    }

    /// Parses the JSON text of a `tokenizer_config.json`; `path` is only used in
    /// error messages.
    pub fn parse(json: &str, path: &Path) -> Result<Self, TextError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| TextError::ConfigParse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let Some(object) = value.as_object() else {
            return Err(TextError::ConfigParse {
                path: path.to_path_buf(),
                message: "expected a JSON object at the top level".to_string(),
            });
        };
        let field_error = |field: &str, message: String| TextError::ConfigField {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };

        let chat_template = match object.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => {
                Some(parse_chat_template(value).map_err(|m| field_error("chat_template", m))?)
            }
        };
        let bos_token = match object.get("bos_token") {
            None => None,
            Some(value) => parse_token(value).map_err(|m| field_error("bos_token", m))?,
        };
        let eos_token = match object.get("eos_token") {
            None => None,
            Some(value) => parse_token(value).map_err(|m| field_error("eos_token", m))?,
        };
        let add_bos_token = match object.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(field_error(
                    "add_bos_token",
                    format!(
                        "expected true or false, found {other}; fix the value or remove the field"
                    ),
                ))
            }
        };

        Ok(TokenizerConfig {
            path: path.to_path_buf(),
            chat_template,
            bos_token,
            eos_token,
            add_bos_token,
        })
    }
}

/// `chat_template` is either a template string or (newer HF files) a list of
/// `{"name": ..., "template": ...}` objects, of which `default` is the chat one.
fn parse_chat_template(value: &serde_json::Value) -> Result<String, String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(entries) => {
            let mut names = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(format!(
                        "entry {i} is not an object with string fields \"name\" and \"template\"; fix or remove that entry"
                    ));
                };
                if name == "default" {
                    return Ok(template.to_string());
                }
                names.push(name.to_string());
            }
            Err(format!(
                "holds a list of templates named {names:?} but none named \"default\"; rename the chat template entry to \"default\""
            ))
        }
        other => Err(format!(
            "expected a template string or a list of {{\"name\", \"template\"}} objects, found {}; fix the field or remove it to use philo's built-in Phi-3 template",
            json_kind(other)
        )),
    }
}

/// Special tokens are written either as plain strings or as AddedToken objects
/// `{"content": "<s>", "lstrip": false, ...}`; `null` means "no such token".
fn parse_token(value: &serde_json::Value) -> Result<Option<String>, String> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Object(map) => match map.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err("is an object without a string \"content\"; write the token as a string, e.g. \"<s>\"".to_string()),
        },
        other => Err(format!(
            "expected a string or an object with a \"content\" string, found {}; write the token as a string, e.g. \"<s>\"",
            json_kind(other)
        )),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The message given to `raise_exception`, carried as the source of the
/// minijinja error so `render` can tell it apart from ordinary Jinja errors.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// Name under which the single template is stored in the environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `template_source`, which may use the variables `messages`,
    /// `add_generation_prompt`, `bos_token` and `eos_token`.
    pub fn new(template_source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TextError> {
        Self::compile(template_source, "ChatTemplate::new", bos_token, eos_token)
    }

    /// Reads and compiles a Jinja template file (e.g. a `chat_template.jinja`);
    /// errors name the file.
    pub fn from_jinja_file(
        path: &Path,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TextError> {
        let source = std::fs::read_to_string(path).map_err(|cause| TextError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::compile(&source, &path.display().to_string(), bos_token, eos_token)
    }

    /// philo's built-in Phi-3 template ([`PHI3_DEFAULT_TEMPLATE`]) with Phi-3's
    /// BOS `<s>` and EOS `<|endoftext|>`.
    pub fn phi3_default() -> Self {
        // The source is a constant covered by tests, so compiling cannot fail.
        Self::compile(
            PHI3_DEFAULT_TEMPLATE,
            "philo's built-in Phi-3 template",
            PHI3_BOS_TOKEN,
            PHI3_EOS_TOKEN,
        )
        .expect("built-in Phi-3 chat template compiles")
    }

    /// Reads `tokenizer_config.json` and compiles its `chat_template`, falling back
    /// to [`ChatTemplate::phi3_default`]'s source when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, TextError> {
        Self::from_config(&TokenizerConfig::from_file(path)?)
    }

    /// Compiles the template of an already parsed config (see
    /// [`ChatTemplate::from_tokenizer_config`]). Missing BOS/EOS tokens default to
    /// Phi-3's.
    pub fn from_config(config: &TokenizerConfig) -> Result<Self, TextError> {
        let bos = config.bos_token.as_deref().unwrap_or(PHI3_BOS_TOKEN);
        let eos = config.eos_token.as_deref().unwrap_or(PHI3_EOS_TOKEN);
        match &config.chat_template {
            Some(source) => Self::compile(
                source,
                &format!("{} field chat_template", config.path.display()),
                bos,
                eos,
            ),
            None => Self::compile(
                PHI3_DEFAULT_TEMPLATE,
                &format!(
                    "philo's built-in Phi-3 template ({} has no chat_template)",
                    config.path.display()
                ),
                bos,
                eos,
            ),
        }
    }

    fn compile(
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TextError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with these two options on; without
        // them multi-line templates render with extra newlines and indentation.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: Value| -> Result<Value, minijinja::Error> {
                let message = match message.as_str() {
                    Some(s) => s.to_string(),
                    None => message.to_string(),
                };
                Err(
                    minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception called")
                        .with_source(RaisedException(message)),
                )
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::TemplateCompile {
                origin: origin.to_string(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the conversation into a prompt string.
    ///
    /// With `add_generation_prompt` the prompt ends with the cue for the
    /// assistant's next turn (`<|assistant|>\n` for Phi-3); without it, it ends
    /// the way the template closes a finished conversation (EOS for Phi-3).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        // Looking up the template we added in `compile` cannot fail, but map it
        // anyway rather than panic.
        let render = || -> Result<String, minijinja::Error> {
            let template = self.env.get_template(TEMPLATE_NAME)?;
            template.render(minijinja::context! {
                messages => Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
        };
        render().map_err(|e| match raised_message(&e) {
            Some(message) => TextError::TemplateRaised {
                origin: self.origin.clone(),
                message,
            },
            None => TextError::TemplateRender {
                origin: self.origin.clone(),
                message: describe(&e),
            },
        })
    }

    /// The Jinja source of the template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from, as used in error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The text the template gets as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text the template gets as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// Finds a `raise_exception` message anywhere in the error's source chain (it
/// may be wrapped, e.g. when raised inside a macro).
fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

/// The error with its chain of causes on one line (minijinja puts the line
/// number in the top-level message and details in sources).
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    let mut current = std::error::Error::source(error);
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}
