//! The `n` choices of one request: one engine sequence each, read side by side. Choice i
//! samples with the request's seed + i, so seeded choices differ from one another and are
//! reproducible; greedy choices are identical, as OpenAI's are.
//!
//! Choice 0 goes first; the others are submitted once it has produced its first step, when
//! its prompt's KV blocks are filled and registered as a shared prefix: they reuse them instead
//! of computing the same prompt again (their first token comes a step later).

use futures_util::future::select_all;

use super::error::ApiError;
use super::generation::{Generation, Job, Step};
use super::openai::{ChatTokenLogprob, Usage};
use super::state::ServerState;
use crate::request::FinishReason;

/// Most choices one request may ask for.
pub const MAX_CHOICES: u32 = 16;

/// One request's generations, by choice index.
pub struct Choices {
    state: ServerState,
    generations: Vec<Generation>,
    /// Which choices have sent their last step.
    done: Vec<bool>,
    /// The jobs of choices 1.., until choice 0 has started.
    waiting: Vec<Job>,
}

/// A whole choice: its text, its tokens' log-probabilities (empty unless asked for) and why
/// it ended.
pub type Choice = (String, Vec<ChatTokenLogprob>, FinishReason);

impl Choices {
    /// Submits choice 0 of `job` to the engine and keeps the other `n - 1` for later.
    pub fn start(state: &ServerState, job: Job, n: usize) -> Result<Self, ApiError> {
        let waiting = (1..n)
            .map(|i| {
                let mut job = job.clone();
                let seed = job.settings.sampling.seed;
                job.settings.sampling.seed = seed.map(|s| s.wrapping_add(i as u64));
                job
            })
            .collect();
        Ok(Choices {
            state: state.clone(),
            generations: vec![Generation::start(state, job)?],
            done: vec![false; n],
            waiting,
        })
    }

    /// How many choices there are.
    pub fn count(&self) -> usize {
        self.done.len()
    }

    /// Every choice run to its end (a refused submission keeps its status, e.g. 429).
    pub async fn collect(&mut self) -> Result<Vec<Choice>, ApiError> {
        let mut choices: Vec<(String, Vec<ChatTokenLogprob>, Option<FinishReason>)> =
            (0..self.count()).map(|_| Default::default()).collect();
        while let Some((i, step)) = self.step().await? {
            match step {
                Step::Text(text, logprobs) => {
                    choices[i].0.push_str(&text);
                    choices[i].1.extend(logprobs);
                }
                Step::Finished(reason) => choices[i].2 = Some(reason),
                Step::Failed(message) => return Err(ApiError::internal(message)),
            }
        }
        choices
            .into_iter()
            .map(|(text, logprobs, reason)| match reason {
                Some(reason) => Ok((text, logprobs, reason)),
                None => Err(ApiError::internal(
                    "a choice ended without a result; this is a bug in philo, please report it",
                )),
            })
            .collect()
    }

    /// The next step of whichever choice has one first, with its index; `None` once every
    /// choice has ended. A later choice the engine refuses ends the stream as a failed step.
    pub async fn next(&mut self) -> Option<(usize, Step)> {
        match self.step().await {
            Ok(step) => step,
            Err(e) => Some((
                self.generations.len(),
                Step::Failed(e.into_body().error.message),
            )),
        }
    }

    async fn step(&mut self) -> Result<Option<(usize, Step)>, ApiError> {
        loop {
            if !self.waiting.is_empty() {
                let first = self.generations[0].next().await;
                for job in std::mem::take(&mut self.waiting) {
                    self.generations.push(Generation::start(&self.state, job)?);
                }
                if let Some(step) = self.record(0, first) {
                    return Ok(Some(step));
                }
                continue;
            }
            let pending: Vec<_> = self
                .generations
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| !self.done[*i])
                .map(|(i, g)| Box::pin(async move { (i, g.next().await) }))
                .collect();
            if pending.is_empty() {
                return Ok(None);
            }
            // The futures left unfinished are dropped: a generation's `next` loses nothing
            // when cancelled (what it has read is queued in the generation).
            let ((i, step), _, _) = select_all(pending).await;
            if let Some(step) = self.record(i, step) {
                return Ok(Some(step));
            }
        }
    }

    /// Marks choice `i` done after its last step (or when it has none left).
    fn record(&mut self, i: usize, step: Option<Step>) -> Option<(usize, Step)> {
        match step {
            Some(step @ (Step::Finished(_) | Step::Failed(_))) => {
                self.done[i] = true;
                Some((i, step))
            }
            Some(step) => Some((i, step)),
            None => {
                self.done[i] = true;
                None
            }
        }
    }

    /// The token counts of all choices: the prompt counted once (as OpenAI counts it), the
    /// completions summed.
    pub fn usage(&self) -> Usage {
        let mut usage = self.generations[0].usage();
        usage.completion_tokens = self
            .generations
            .iter()
            .map(|g| g.usage().completion_tokens)
            .sum();
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        usage
    }
}
