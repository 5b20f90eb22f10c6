//! Streamed answers: a [`Generation`] as OpenAI-style server-sent events.
//!
//! Each event is `data: <chunk JSON>`; the stream ends with `data: [DONE]`. A failure after the
//! response has started (status 200 is already sent) becomes a `data: {"error": ...}` event
//! before `[DONE]`, as OpenAI-compatible servers do.
//!
//! The event stream owns the generation and is polled by the response body, with no task in
//! between: when the client disconnects, hyper drops the body, which drops the generation and
//! with it the engine's receiver, so the engine cancels the sequence at once.

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Serialize;

use super::error::ApiError;
use super::generation::{Generation, Step};
use super::openai::{ChatTokenLogprob, Usage};
use crate::request::FinishReason;

/// How an endpoint shapes its stream chunks.
pub trait ChunkFormat: Send + 'static {
    type Chunk: Serialize;
    /// The chunk sent before any text, if the endpoint has one (chat's `delta.role`).
    fn opening(&self) -> Option<Self::Chunk>;
    /// More text, with the log-probabilities of its tokens (empty unless the request asked).
    fn text(&self, text: String, logprobs: Vec<ChatTokenLogprob>) -> Self::Chunk;
    fn finish(&self, reason: FinishReason) -> Self::Chunk;
    /// The usage chunk (`choices: []`) sent last when `stream_options.include_usage` is set.
    fn usage(&self, usage: Usage) -> Self::Chunk;
}

/// Where a stream is.
enum Phase {
    Opening,
    Generating,
    Usage,
    Done,
    Ended,
}

struct EventStream<F> {
    generation: Generation,
    format: F,
    include_usage: bool,
    phase: Phase,
}

impl<F: ChunkFormat> EventStream<F> {
    /// The next event, or `None` after `[DONE]`.
    async fn next_event(&mut self) -> Option<Result<Event, axum::Error>> {
        loop {
            match self.phase {
                Phase::Opening => {
                    self.phase = Phase::Generating;
                    if let Some(chunk) = self.format.opening() {
                        return Some(json_event(&chunk));
                    }
                }
                Phase::Generating => match self.generation.next().await {
                    Some(Step::Text(text, logprobs)) => {
                        return Some(json_event(&self.format.text(text, logprobs)))
                    }
                    Some(Step::Finished(reason)) => {
                        self.phase = if self.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                        return Some(json_event(&self.format.finish(reason)));
                    }
                    Some(Step::Failed(message)) => {
                        self.phase = Phase::Done;
                        return Some(json_event(&ApiError::internal(message).into_body()));
                    }
                    None => self.phase = Phase::Done,
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(json_event(&self.format.usage(self.generation.usage())));
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

/// The streamed answer of `generation`, as a `text/event-stream` response.
pub fn respond<F: ChunkFormat>(generation: Generation, format: F, include_usage: bool) -> Response {
    let events = EventStream {
        generation,
        format,
        include_usage,
        phase: Phase::Opening,
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
