//! Streamed answers: a request's [`Choices`] as OpenAI-style server-sent events.
//!
//! Each event is `data: <chunk JSON>`, each chunk about one choice (its `index`), in the order
//! the choices' text arrives; the stream ends with `data: [DONE]`. A failure after the
//! response has started (status 200 is already sent) becomes a `data: {"error": ...}` event
//! before `[DONE]`, as OpenAI-compatible servers do.
//!
//! The event stream owns the generations and is polled by the response body, with no task in
//! between: when the client disconnects, hyper drops the body, which drops the generations and
//! with them the engine's receivers, so the engine cancels the sequences at once.

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Serialize;

use super::choices::Choices;
use super::error::ApiError;
use super::generation::Step;
use super::openai::{ChatTokenLogprob, Usage};
use crate::request::FinishReason;

/// How an endpoint shapes its stream chunks.
pub trait ChunkFormat: Send + 'static {
    type Chunk: Serialize;
    /// The chunk sent before any text of choice `index`, if the endpoint has one (chat's
    /// `delta.role`).
    fn opening(&self, index: usize) -> Option<Self::Chunk>;
    /// More text of choice `index`, with the log-probabilities of its tokens (empty unless the
    /// request asked).
    fn text(&self, index: usize, text: String, logprobs: Vec<ChatTokenLogprob>) -> Self::Chunk;
    fn finish(&self, index: usize, reason: FinishReason) -> Self::Chunk;
    /// The usage chunk (`choices: []`) sent last when `stream_options.include_usage` is set.
    fn usage(&self, usage: Usage) -> Self::Chunk;
}

/// Where a stream is.
enum Phase {
    /// The opening chunk of the choice with this index is next.
    Opening(usize),
    Generating,
    Usage,
    Done,
    Ended,
}

struct EventStream<F> {
    choices: Choices,
    format: F,
    include_usage: bool,
    phase: Phase,
}

impl<F: ChunkFormat> EventStream<F> {
    /// The next event, or `None` after `[DONE]`.
    async fn next_event(&mut self) -> Option<Result<Event, axum::Error>> {
        loop {
            match self.phase {
                Phase::Opening(index) => {
                    self.phase = if index + 1 < self.choices.count() {
                        Phase::Opening(index + 1)
                    } else {
                        Phase::Generating
                    };
                    if let Some(chunk) = self.format.opening(index) {
                        return Some(json_event(&chunk));
                    }
                }
                Phase::Generating => match self.choices.next().await {
                    Some((index, Step::Text(text, logprobs))) => {
                        return Some(json_event(&self.format.text(index, text, logprobs)))
                    }
                    Some((index, Step::Finished(reason))) => {
                        return Some(json_event(&self.format.finish(index, reason)));
                    }
                    Some((_, Step::Failed(message))) => {
                        self.phase = Phase::Done;
                        return Some(json_event(&ApiError::internal(message).into_body()));
                    }
                    None => {
                        self.phase = if self.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(json_event(&self.format.usage(self.choices.usage())));
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    return Some(Ok(Event::default().data("[DONE]")));
                }
                Phase::Ended => return None,
            }
        }
    }
}

fn json_event(chunk: &impl Serialize) -> Result<Event, axum::Error> {
    Event::default().json_data(chunk)
}

/// The streamed answer of `choices`, as a `text/event-stream` response.
pub fn respond<F: ChunkFormat>(choices: Choices, format: F, include_usage: bool) -> Response {
    let events = EventStream {
        choices,
        format,
        include_usage,
        phase: Phase::Opening(0),
    };
    Sse::new(into_stream(events))
        // Comments every 15 s keep proxies from closing a stream that waits in the queue.
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn into_stream<F: ChunkFormat>(
    events: EventStream<F>,
) -> impl Stream<Item = Result<Event, axum::Error>> + Send {
    stream::unfold(events, |mut events| async move {
        let event = events.next_event().await?;
        Some((event, events))
    })
}
