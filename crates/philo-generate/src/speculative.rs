//! Speculative decoding by prompt lookup: the tokens that followed the latest earlier occurrence
//! of the sequence's last few tokens are proposed as its continuation, and one forward over them
//! keeps the longest prefix the model agrees with (see [`crate::Sampler::accept_or_resample`]),
//! plus one token of its own. Outputs are those of plain decoding; only the number of forwards
//! changes. How many tokens to propose adapts to how many were kept.

/// The longest n-gram looked up, then shorter ones down to a single token.
const MAX_NGRAM: usize = 3;
/// Verify steps that keep nothing before drafting pauses.
const MISSES_BEFORE_PAUSE: usize = 4;
/// Plain steps a pause lasts.
const PAUSE_STEPS: usize = 16;

/// Up to `k` tokens that followed an earlier occurrence of the last n tokens of `tokens` (n from
/// 3 down to 1; the latest occurrence with k tokens after it, else the earliest), or none.
pub fn prompt_lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (1..=MAX_NGRAM).rev() {
        if len <= n || k == 0 {
            continue;
        }
        let pattern = &tokens[len - n..];
        // Occurrences that end before the last token, latest first: the latest with k tokens
        // after it, else the earliest (the longest continuation).
        let mut starts = (0..len - n).rev().filter(|&i| &tokens[i..i + n] == pattern);
        let mut earliest = None;
        for start in starts.by_ref() {
            if len - (start + n) >= k {
                return tokens[start + n..start + n + k].to_vec();
            }
            earliest = Some(start);
        }
        if let Some(start) = earliest {
            return tokens[start + n..].to_vec();
        }
    }
    Vec::new()
}

/// The adaptive state of one sequence's speculation.
#[derive(Debug, Clone)]
pub struct Speculation {
    max_tokens: usize,
    /// Tokens proposed next time.
    tokens: usize,
    misses: usize,
    paused_for: usize,
    proposed: usize,
    kept: usize,
}

impl Speculation {
    /// Speculation proposing at most `max_tokens` a step.
    pub fn new(max_tokens: usize) -> Self {
        Speculation {
            max_tokens: max_tokens.max(1),
            tokens: max_tokens.max(1),
            misses: 0,
            paused_for: 0,
            proposed: 0,
            kept: 0,
        }
    }

    /// The proposal for the sequence `tokens`, at most `room` long; empty while paused (each
    /// call then counts one plain step).
    pub fn propose(&mut self, tokens: &[u32], room: usize) -> Vec<u32> {
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return Vec::new();
        }
        prompt_lookup(tokens, self.tokens.min(room))
    }

    /// Records that `kept` of `proposed` tokens were accepted: all kept → propose one more next
    /// time (up to the maximum); none → halve; several verify steps in a row keeping nothing
    /// pause drafting, since each costs more than a plain step.
    pub fn record(&mut self, proposed: usize, kept: usize) {
        self.proposed += proposed;
        self.kept += kept;
        if kept == proposed {
            self.tokens = (self.tokens + 1).min(self.max_tokens);
        } else if kept == 0 {
            self.tokens = (self.tokens / 2).max(1);
        }
        if kept == 0 {
            self.misses += 1;
            if self.misses >= MISSES_BEFORE_PAUSE {
                self.misses = 0;
                self.paused_for = PAUSE_STEPS;
            }
        } else {
            self.misses = 0;
        }
    }

    /// Proposed and accepted tokens so far.
    pub fn counts(&self) -> (usize, usize) {
        (self.proposed, self.kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_longest_match() {
        // "1 2 3 4 | 9 2 3 5 | 2 3": the last two tokens (2 3) last occurred before 5.
        let tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3];
        assert_eq!(prompt_lookup(&tokens, 2), vec![5, 7]);
        // A three-token match wins over a later two-token one.
        let tokens = [1, 2, 3, 8, 2, 3, 9, 1, 2, 3];
        assert_eq!(prompt_lookup(&tokens, 1), vec![8]);
        // The continuation stops at the end of the sequence.
        assert_eq!(prompt_lookup(&[4, 5, 4], 3), vec![5, 4]);
        assert!(prompt_lookup(&[1, 2, 3], 4).is_empty());
        assert!(prompt_lookup(&[7], 4).is_empty());
    }

    #[test]
    fn proposals_grow_shrink_and_pause() {
        let tokens = [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1];
        let mut s = Speculation::new(4);
        assert_eq!(s.propose(&tokens, 8).len(), 4);
        s.record(4, 0);
        assert_eq!(s.propose(&tokens, 8).len(), 2);
        s.record(2, 2);
        assert_eq!(s.propose(&tokens, 8).len(), 3);
        assert_eq!(s.propose(&tokens, 1).len(), 1, "room caps the proposal");
        for _ in 0..MISSES_BEFORE_PAUSE {
            s.record(1, 0);
        }
        for _ in 0..PAUSE_STEPS {
            assert!(s.propose(&tokens, 8).is_empty());
        }
        assert!(!s.propose(&tokens, 8).is_empty());
        assert_eq!(s.counts(), (4 + 2 + MISSES_BEFORE_PAUSE, 2));
    }
}
