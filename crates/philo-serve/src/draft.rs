//! The serving engine's draft model (`philo serve --speculative draft`): one smaller model and a
//! few draft states, each the KV cache (on a GPU, a decode graph) of one sequence, lent to the
//! sequences that speculate. A step speculates for at most
//! `DecodeStep::MAX_GEMV_ROWS / 2` sequences (each needs its last token and a proposal), so
//! that many states suffice whatever the batch: a sequence that has none takes the one used
//! least recently. A state keeps what it holds of a sequence's prefix and recomputes the rest,
//! so a state taken over by another sequence starts it again (or reuses a shared prompt).

use philo_generate::speculative::DraftModel;
use philo_model::{DecodeStep, Phi3};

/// The states a server needs: the most sequences one step speculates for.
pub const STATES: usize = DecodeStep::MAX_GEMV_ROWS / 2;

/// The draft model and its states (see the module docs).
pub struct DraftPool {
    model: Phi3,
    states: Vec<DraftState>,
    /// Counts proposals, for "used least recently".
    clock: u64,
}

struct DraftState {
    /// The sequence it follows now.
    owner: Option<u64>,
    /// The clock at its last proposal (0: free).
    used: u64,
    draft: DraftModel,
}

impl DraftPool {
    /// `states` states of `model` (on a GPU each a decode graph with room for `capacity`
    /// tokens, allocated now); `vocab` is the served model's vocabulary, which the draft must
    /// share.
    pub fn new(model: Phi3, states: usize, capacity: usize, vocab: usize) -> anyhow::Result<Self> {
        let draft_vocab = model.config().vocab_size;
        anyhow::ensure!(
            draft_vocab == vocab,
            "the draft model's vocabulary has {draft_vocab} tokens, the served model's {vocab}: a draft must share the model's tokenizer"
        );
        let states = (0..states.max(1))
            .map(|_| {
                let mut draft = DraftModel::new(&model);
                draft.use_decode_graph(&model, capacity)?;
                Ok(DraftState {
                    owner: None,
                    used: 0,
                    draft,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(DraftPool {
            model,
            states,
            clock: 0,
        })
    }

    /// The draft's `k` greedy tokens after `tokens`, the sequence `seq`.
    pub fn propose(&mut self, seq: u64, tokens: &[u32], k: usize) -> anyhow::Result<Vec<u32>> {
        self.clock += 1;
        let index = match self.states.iter().position(|s| s.owner == Some(seq)) {
            Some(i) => i,
            None => {
                let (i, _) = self
                    .states
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.used)
                    .expect("at least one state");
                self.states[i].owner = Some(seq);
                i
            }
        };
        let state = &mut self.states[index];
        state.used = self.clock;
        Ok(state.draft.propose(&self.model, tokens, k)?)
    }

    /// `seq` has ended: its state is the first to be taken next (what it holds stays, for a
    /// sequence that starts the same way).
    pub fn release(&mut self, seq: u64) {
        if let Some(state) = self.states.iter_mut().find(|s| s.owner == Some(seq)) {
            state.owner = None;
            state.used = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use philo_generate::{SamplingParams, TokenStream};
    use philo_model::{Phi3Config, SafetensorsStore};
    use std::path::Path;

    fn model() -> Phi3 {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf-reference/dev/mini4k");
        let config = Phi3Config::from_file(&dir.join("config.json")).unwrap();
        let store = SafetensorsStore::open_dir(&dir).unwrap();
        Phi3::load(&config, &store, DType::F32, &Device::Cpu).unwrap()
    }

    /// Which sequence each state follows.
    fn owners(pool: &DraftPool) -> Vec<Option<u64>> {
        pool.states.iter().map(|s| s.owner).collect()
    }

    /// The model's own greedy continuation of `tokens`, through the plain generation loop.
    fn greedy(model: &Phi3, tokens: &[u32], k: usize) -> Vec<u32> {
        let mut stream =
            TokenStream::new(model, tokens.to_vec(), SamplingParams::greedy()).unwrap();
        (0..k).map(|_| stream.next_token().unwrap()).collect()
    }

    #[test]
    fn states_follow_sequences_and_the_least_recent_is_taken_over() {
        let model = model();
        let vocab = model.config().vocab_size;
        let mut pool = DraftPool::new(model.clone(), 2, 256, vocab).unwrap();
        let a: Vec<u32> = (3..40).collect();
        let b: Vec<u32> = (100..130).collect();
        let c: Vec<u32> = (200..220).collect();
        assert_eq!(pool.propose(1, &a, 3).unwrap(), greedy(&model, &a, 3));
        assert_eq!(pool.propose(2, &b, 3).unwrap(), greedy(&model, &b, 3));
        assert_eq!(owners(&pool), vec![Some(1), Some(2)]);
        // Sequence 1 grows by tokens its state has not seen; its state continues it.
        let a2 = [&a[..], &[7, 8]].concat();
        assert_eq!(pool.propose(1, &a2, 4).unwrap(), greedy(&model, &a2, 4));
        // A third sequence takes the state used least recently (sequence 2's) and proposes
        // from its own tokens, not from what the state held.
        assert_eq!(pool.propose(3, &c, 2).unwrap(), greedy(&model, &c, 2));
        assert_eq!(owners(&pool), vec![Some(1), Some(3)]);
        // Sequence 2 comes back: it takes sequence 1's state (now the least recent) and starts
        // again there.
        assert_eq!(pool.propose(2, &b, 3).unwrap(), greedy(&model, &b, 3));
        assert_eq!(owners(&pool), vec![Some(2), Some(3)]);
        // An ended sequence's state is the next one taken.
        pool.release(3);
        assert_eq!(pool.propose(4, &a, 1).unwrap(), greedy(&model, &a, 1));
        assert_eq!(owners(&pool), vec![Some(2), Some(4)]);
    }

    #[test]
    fn a_draft_with_another_vocabulary_is_refused() {
        let model = model();
        let vocab = model.config().vocab_size;
        let error = DraftPool::new(model, 1, 64, vocab + 1)
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("share the model's tokenizer"), "{error}");
    }
}
