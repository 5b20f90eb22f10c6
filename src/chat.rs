//! `philo chat`: a conversation loop over any line reader and writer, so it can be tested.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use philo_generate::{GenerateOptions, StopReason};
use philo_text::ChatMessage;

use crate::pipeline::Pipeline;

/// One line typed by the user.
#[derive(Debug, PartialEq, Eq)]
pub enum ChatInput {
    Message(String),
    /// `/system TEXT`: sets the system prompt and starts over.
    System(String),
    /// `/reset`: forgets the conversation (keeps the system prompt).
    Reset,
    /// `/exit` or `/quit`.
    Exit,
    Help,
    Empty,
    Unknown(String),
}

impl ChatInput {
    pub fn parse(line: &str) -> ChatInput {
        let line = line.trim_end_matches(['\n', '\r']);
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return ChatInput::Empty;
        }
        if !trimmed.starts_with('/') {
            return ChatInput::Message(line.to_string());
        }
        let (command, rest) = trimmed
            .split_once(char::is_whitespace)
            .unwrap_or((trimmed, ""));
        match command {
            "/exit" | "/quit" => ChatInput::Exit,
            "/reset" => ChatInput::Reset,
            "/system" => ChatInput::System(rest.trim().to_string()),
            "/help" => ChatInput::Help,
            other => ChatInput::Unknown(other.to_string()),
        }
    }
}

const HELP: &str = "commands: /system TEXT sets the system prompt, /reset starts over, /exit quits; Ctrl-C stops an answer";

/// A conversation with a loaded model.
pub struct ChatSession<'p> {
    pipeline: &'p Pipeline,
    options: GenerateOptions,
    system: Option<String>,
    history: Vec<ChatMessage>,
}

impl<'p> ChatSession<'p> {
    pub fn new(pipeline: &'p Pipeline, options: GenerateOptions, system: Option<String>) -> Self {
        ChatSession {
            pipeline,
            options,
            system,
            history: Vec::new(),
        }
    }

    /// The conversation so far, system prompt first.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut all: Vec<ChatMessage> = self.system.iter().map(ChatMessage::system).collect();
        all.extend(self.history.iter().cloned());
        all
    }

    /// Reads lines until /exit or end of input. `cancel` is set (by a Ctrl-C handler) to stop the
    /// answer being generated; `generating` tells that handler whether an answer is running.
    pub fn run(
        &mut self,
        input: impl BufRead,
        out: &mut impl Write,
        cancel: &AtomicBool,
        generating: &AtomicBool,
    ) -> anyhow::Result<()> {
        writeln!(out, "{HELP}")?;
        write!(out, "> ")?;
        out.flush()?;
        for line in input.lines() {
            match ChatInput::parse(&line?) {
                ChatInput::Exit => break,
                ChatInput::Empty => {}
                ChatInput::Help => writeln!(out, "{HELP}")?,
                ChatInput::Unknown(c) => writeln!(out, "unknown command {c}; {HELP}")?,
                ChatInput::Reset => {
                    self.history.clear();
                    writeln!(out, "(conversation cleared)")?;
                }
                ChatInput::System(text) => {
                    self.system = (!text.is_empty()).then_some(text);
                    self.history.clear();
                    writeln!(out, "(system prompt set; conversation cleared)")?;
                }
                ChatInput::Message(text) => {
                    cancel.store(false, Ordering::SeqCst);
                    generating.store(true, Ordering::SeqCst);
                    let result = self.reply(&text, out, cancel);
                    generating.store(false, Ordering::SeqCst);
                    result?;
                }
            }
            write!(out, "> ")?;
            out.flush()?;
        }
        writeln!(out)?;
        Ok(())
    }

    /// Answers `text`, streaming the answer to `out`; the answer (whole or stopped) joins the history.
    pub fn reply(
        &mut self,
        text: &str,
        out: &mut impl Write,
        cancel: &AtomicBool,
    ) -> anyhow::Result<()> {
        self.history.push(ChatMessage::user(text));
        let prompt = self.fitted_prompt()?;
        let mut write_error = None;
        let (generation, answer) = self.pipeline.stream(prompt, &self.options, |piece| {
            if let Err(e) = write!(out, "{piece}").and_then(|_| out.flush()) {
                write_error = Some(e);
                return ControlFlow::Break(());
            }
            if cancel.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if let Some(e) = write_error {
            return Err(e.into());
        }
        let note = match generation.stop {
            StopReason::Cancelled => " (stopped)",
            StopReason::ContextFull => " (context full)",
            StopReason::MaxTokens => " (max tokens)",
            StopReason::Eos => "",
        };
        writeln!(
            out,
            "\n[{} tokens, {:.1} tok/s{note}]",
            generation.tokens.len(),
            generation.decode_tokens_per_second()
        )?;
        self.history.push(ChatMessage::assistant(answer));
        Ok(())
    }

    /// The prompt of the conversation, dropping the oldest turns while it leaves no room to answer.
    fn fitted_prompt(&mut self) -> anyhow::Result<Vec<u32>> {
        let context = self.pipeline.model.config().max_position_embeddings;
        let room = self.options.max_new_tokens.min(context / 2).max(1);
        loop {
            let prompt = self.pipeline.encode_chat(&self.messages())?;
            if prompt.len() + room <= context || self.history.len() <= 1 {
                return Ok(prompt);
            }
            // Drop the oldest user turn and the answer to it.
            let drop = if self.history.len() >= 2 { 2 } else { 1 };
            self.history.drain(..drop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChatInput;

    #[test]
    fn commands_are_parsed() {
        assert_eq!(ChatInput::parse("/exit\n"), ChatInput::Exit);
        assert_eq!(ChatInput::parse("/quit"), ChatInput::Exit);
        assert_eq!(ChatInput::parse("/reset"), ChatInput::Reset);
        assert_eq!(
            ChatInput::parse("/system Be brief.  "),
            ChatInput::System("Be brief.".into())
        );
        assert_eq!(ChatInput::parse("   \n"), ChatInput::Empty);
        assert_eq!(
            ChatInput::parse("/nope x"),
            ChatInput::Unknown("/nope".into())
        );
        assert_eq!(
            ChatInput::parse("hello /exit"),
            ChatInput::Message("hello /exit".into())
        );
    }
}
