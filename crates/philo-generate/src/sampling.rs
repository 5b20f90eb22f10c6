//! Next-token sampling over one row of logits.
//!
//! The processors follow Hugging Face transformers' logits processors and are
//! applied in this order:
//!
//! 1. repetition penalty (`RepetitionPenaltyLogitsProcessor`),
//! 2. OpenAI-style frequency and presence penalties,
//! 3. greedy argmax when the temperature is (almost) zero, otherwise
//! 4. temperature, top-k, top-p, min-p and typical-p, then a seeded draw from
//!    the softmax of the surviving logits.
//!
//! Filters work like the Hugging Face ones: they set removed logits to
//! `-inf`, so each filter sees the distribution left by the previous one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Temperatures below this are treated as greedy decoding; dividing by
/// them would overflow the logits.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How often each token occurs in a sequence's context, kept up to date as tokens arrive: the
/// penalties' input for the GPU without a pass over the whole context every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenCounts(std::collections::BTreeMap<u32, u32>);

impl TokenCounts {
    /// The counts of `tokens`.
    pub fn new(tokens: &[u32]) -> TokenCounts {
        let mut counts = TokenCounts::default();
        for &token in tokens {
            counts.push(token);
        }
        counts
    }

    /// Counts one more `token`.
    pub fn push(&mut self, token: u32) {
        *self.0.entry(token).or_insert(0) += 1;
    }
}

/// How the GPU chooses a row's token as the host sampler would: the row's settings, and the
/// logit bias and penalties applied to its logits first.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSampling {
    pub row: philo_model::RowSampling,
    pub adjustments: Vec<philo_kernels::sampling::LogitAdjustment>,
}

impl GpuSampling {
    /// Whether the choice is the plain argmax of the logits (no bias, no penalty).
    pub fn is_argmax(&self) -> bool {
        self.row == philo_model::RowSampling::greedy() && self.adjustments.is_empty()
    }
}

/// Settings for [`Sampler`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (anything below `1e-5`) means greedy decoding.
    pub temperature: f32,
    /// Keep only the `k` highest logits (ties with the k-th are kept too).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities
    /// sum to `top_p`. `1.0` disables it.
    pub top_p: Option<f32>,
    /// Locally typical sampling mass, in `(0, 1]`; `0.2` is a common choice.
    /// `1.0` disables it.
    pub typical_p: Option<f32>,
    /// Drop tokens whose probability is below `min_p` times the largest one.
    pub min_p: Option<f32>,
    /// Divides positive and multiplies negative logits of every token already
    /// seen; `> 1` discourages repeats.
    pub repetition_penalty: Option<f32>,
    /// Subtracted from a logit once per earlier occurrence of its token.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token seen at least once.
    pub presence_penalty: f32,
    /// RNG seed; `None` seeds from the operating system.
    pub seed: Option<u64>,
    /// Added to the logits of these token ids before anything else (OpenAI's `logit_bias`;
    /// -100 bans a token, +100 all but forces it). Ids outside the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report log-probabilities: `Some(k)` asks for the chosen token's and the `k` most likely
    /// tokens' (at most [`MAX_TOP_LOGPROBS`]) log-softmax of the raw logits, see
    /// [`token_logprobs`]. Sampling itself ignores it.
    pub logprobs: Option<usize>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: None,
            top_p: Some(0.9),
            typical_p: None,
            min_p: None,
            repetition_penalty: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the highest logit (after penalties).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            ..Self::default()
        }
    }

    /// Whether these settings decode greedily instead of sampling.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Whether the choice is the argmax of the raw logits: greedy, with no logit bias and no
    /// penalty (so the GPU's argmax can make it).
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy()
            && self.logit_bias.is_empty()
            && self.repetition_penalty.is_none_or(|p| p == 1.0)
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }

    /// Everything the GPU needs to choose as the host sampler does for a row whose context
    /// counts `context`, with `vocab` logits, for draw `counter` (the position sampled for) of a
    /// sequence seeded with `seed`: the decode kernels' settings (`philo_model::RowSampling`)
    /// and the logit bias and penalties to apply first ([`SamplingParams::gpu_adjustments`]).
    /// None where only the host can: log-probabilities, a bias naming a token twice. The GPU
    /// draws its uniform number from a hash of (seed, counter), not from this sampler's RNG: a
    /// seeded request repeats itself on the GPU, but not token for token what the host would
    /// draw.
    pub fn gpu_sampling(
        &self,
        seed: u64,
        counter: u32,
        context: &TokenCounts,
        vocab: usize,
    ) -> Option<GpuSampling> {
        if self.logprobs.is_some() {
            return None;
        }
        Some(GpuSampling {
            row: self.row_sampling(seed, counter),
            adjustments: self.gpu_adjustments(context, vocab)?,
        })
    }

    fn row_sampling(&self, seed: u64, counter: u32) -> philo_model::RowSampling {
        if self.is_greedy() {
            return philo_model::RowSampling::greedy();
        }
        philo_model::RowSampling {
            temperature: self.temperature,
            top_k: self.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            typical_p: self.typical_p.unwrap_or(1.0),
            seed,
            counter,
        }
    }

    /// The logit bias and penalties of these settings for a row whose context counts
    /// `context`, as the GPU applies them before sampling: one entry per token the bias names
    /// or the context holds (ids outside `vocab` skipped, as the host skips them), in id order;
    /// empty when neither applies. None when the bias names a token twice (the host adds the
    /// two one after the other, which one entry cannot round the same way).
    pub fn gpu_adjustments(
        &self,
        context: &TokenCounts,
        vocab: usize,
    ) -> Option<Vec<philo_kernels::sampling::LogitAdjustment>> {
        use philo_kernels::sampling::LogitAdjustment;
        let untouched = |token| LogitAdjustment {
            token,
            bias: -0.0,
            penalty: 1.0,
            subtract: 0.0,
        };
        let mut by_token = std::collections::BTreeMap::new();
        for &(token, bias) in &self.logit_bias {
            if (token as usize) < vocab {
                let entry = LogitAdjustment {
                    bias,
                    ..untouched(token)
                };
                if by_token.insert(token, entry).is_some() {
                    return None;
                }
            }
        }
        let repetition = self.repetition_penalty.filter(|&p| p != 1.0);
        let (frequency, presence) = (self.frequency_penalty, self.presence_penalty);
        if repetition.is_some() || frequency != 0.0 || presence != 0.0 {
            for (&token, &count) in &context.0 {
                if token as usize >= vocab {
                    continue;
                }
                let entry = by_token.entry(token).or_insert_with(|| untouched(token));
                entry.penalty = repetition.unwrap_or(1.0);
                entry.subtract = count as f32 * frequency + presence;
            }
        }
        Some(by_token.into_values().collect())
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(invalid(
                "temperature",
                self.temperature,
                "a finite value >= 0",
            ));
        }
        if self.top_k == Some(0) {
            return Err(invalid("top_k", 0, "at least 1"));
        }
        for (name, value) in [
            ("top_p", self.top_p),
            ("typical_p", self.typical_p),
            ("min_p", self.min_p),
        ] {
            if let Some(v) = value {
                if v.is_nan() || v <= 0.0 || v > 1.0 {
                    return Err(invalid(name, v, "in (0, 1]"));
                }
            }
        }
        if let Some(p) = self.repetition_penalty {
            if !p.is_finite() || p <= 0.0 {
                return Err(invalid("repetition_penalty", p, "a finite value > 0"));
            }
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !value.is_finite() {
                return Err(invalid(name, value, "finite"));
            }
        }
        if let Some(&(_, bias)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(invalid("logit_bias", bias, "finite"));
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid("logprobs", k, "at most 20"));
        }
        Ok(())
    }
}

/// A rejected [`SamplingParams`] value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// `parameter` has a value outside its allowed range.
    #[error("invalid sampling parameter `{parameter}` = {value}: must be {expected}")]
    InvalidParameter {
        /// Field name in [`SamplingParams`].
        parameter: &'static str,
        /// The rejected value, as written by `Display`.
        value: String,
        /// The allowed range.
        expected: &'static str,
    },
}

fn invalid(
    parameter: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> SamplingError {
    SamplingError::InvalidParameter {
        parameter,
        value: value.to_string(),
        expected,
    }
}

/// Draws token ids from logits with fixed [`SamplingParams`] and its own RNG.
///
/// With a seed, the same sequence of `sample` calls on the same inputs gives
/// the same tokens.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// Validates `params` and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// The settings this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of `logits` (vocabulary size).
    ///
    /// `previous_tokens` feed the penalties (ids outside the vocabulary are
    /// ignored). NaN logits are treated as `-inf`. If no token has a finite
    /// logit, the draw is uniform (greedy returns token 0).
    ///
    /// # Panics
    ///
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], previous_tokens: &[u32]) -> u32 {
        match self.distribution(logits, previous_tokens) {
            Distribution::Argmax(token) => token,
            Distribution::Probabilities(probs) => draw(&probs, self.rng.random::<f64>()),
        }
    }

    /// [`Sampler::sample`] with its uniform draw `u` in [0, 1) given instead of taken from the
    /// sampler's RNG: what any other sampler with these settings (the GPU's) must pick for `u`.
    pub fn sample_with_uniform(&self, logits: &[f32], previous_tokens: &[u32], u: f64) -> u32 {
        match self.distribution(logits, previous_tokens) {
            Distribution::Argmax(token) => token,
            Distribution::Probabilities(probs) => draw(&probs, u),
        }
    }

    /// Speculative decoding's check of a `proposed` token (from a proposer that is not random,
    /// such as prompt lookup): accepted with the probability [`Sampler::sample`] would give it,
    /// else replaced by a draw from the rest of the distribution. The result is distributed
    /// exactly as `sample`'s: P(y) = p(x)·[y = x] + (1 − p(x))·p(y)/(1 − p(x))·[y ≠ x] = p(y).
    /// Returns whether `proposed` was kept, and the token.
    pub fn accept_or_resample(
        &mut self,
        logits: &[f32],
        previous_tokens: &[u32],
        proposed: u32,
    ) -> (bool, u32) {
        match self.distribution(logits, previous_tokens) {
            Distribution::Argmax(token) => (token == proposed, token),
            Distribution::Probabilities(mut probs) => {
                let p = probs.get(proposed as usize).copied().unwrap_or(0.0);
                if f64::from(p) > self.rng.random::<f64>() {
                    return (true, proposed);
                }
                if let Some(x) = probs.get_mut(proposed as usize) {
                    *x = 0.0;
                }
                (false, draw(&probs, self.rng.random::<f64>()))
            }
        }
    }

    /// Speculative decoding's verify step, given the model's logits after the last token and
    /// after each of `proposal` (`rows`, one more than proposals): appends to `tokens` the
    /// proposals [`Sampler::accept_or_resample`] keeps in order, then one token of the model's
    /// own (the replacement of the first rejected one, or a draw after all), and returns how
    /// many proposals were kept.
    pub fn verify_proposal<'r>(
        &mut self,
        proposal: &[u32],
        rows: impl Iterator<Item = &'r [f32]>,
        tokens: &mut Vec<u32>,
    ) -> usize {
        let mut kept = 0;
        for (i, row) in rows.enumerate() {
            let Some(&proposed) = proposal.get(i) else {
                let token = self.sample(row, tokens);
                tokens.push(token);
                break;
            };
            let (accepted, token) = self.accept_or_resample(row, tokens, proposed);
            tokens.push(token);
            if !accepted {
                break;
            }
            kept += 1;
        }
        kept
    }

    /// What [`Sampler::sample`] draws from: the argmax when greedy, else the probabilities after
    /// bias, penalties, temperature and the filters (summing to 1).
    /// The logits the filters start from: NaN as `-inf`, the logit bias added, the penalties
    /// applied for `previous_tokens`.
    pub fn adjusted_logits(&self, logits: &[f32], previous_tokens: &[u32]) -> Vec<f32> {
        let mut scores: Vec<f32> = logits
            .iter()
            .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
            .collect();
        for &(id, bias) in &self.params.logit_bias {
            if let Some(x) = scores.get_mut(id as usize) {
                *x += bias;
            }
        }
        apply_penalties(&mut scores, previous_tokens, &self.params);
        scores
    }

    fn distribution(&self, logits: &[f32], previous_tokens: &[u32]) -> Distribution {
        assert!(!logits.is_empty(), "cannot sample from an empty logits row");
        let p = &self.params;
        let mut scores = self.adjusted_logits(logits, previous_tokens);
        if p.is_greedy() {
            return Distribution::Argmax(argmax(&scores));
        }
        if p.temperature != 1.0 {
            // Divide (not multiply by the inverse) to round like HF.
            scores.iter_mut().for_each(|x| *x /= p.temperature);
        }
        if let Some(k) = p.top_k {
            top_k_filter(&mut scores, k);
        }
        // At 1.0 these filters only remove tokens through rounding error
        // (HF skips them there too).
        if let Some(top_p) = p.top_p.filter(|&v| v < 1.0) {
            top_p_filter(&mut scores, top_p);
        }
        if let Some(min_p) = p.min_p {
            min_p_filter(&mut scores, min_p);
        }
        if let Some(mass) = p.typical_p.filter(|&v| v < 1.0) {
            typical_p_filter(&mut scores, mass);
        }
        softmax_in_place(&mut scores);
        Distribution::Probabilities(scores)
    }
}

/// What a sampler draws the next token from.
enum Distribution {
    Argmax(u32),
    Probabilities(Vec<f32>),
}

/// Applies the repetition penalty, then the frequency and presence penalties
/// of `params` to the tokens in `previous_tokens`.
///
/// Repetition penalty (HF): each distinct seen token's logit is divided by the
/// penalty when positive and multiplied by it otherwise. Frequency/presence
/// (OpenAI): `logit -= count * frequency_penalty + presence_penalty` for every
/// token with `count > 0`. Ids outside `logits` are ignored.
pub fn apply_penalties(logits: &mut [f32], previous_tokens: &[u32], params: &SamplingParams) {
    let repetition = params.repetition_penalty.filter(|&p| p != 1.0);
    let (frequency, presence) = (params.frequency_penalty, params.presence_penalty);
    if previous_tokens.is_empty() || (repetition.is_none() && frequency == 0.0 && presence == 0.0) {
        return;
    }
    // Sorting groups equal ids, giving each distinct token and its count in
    // O(n log n) without a hash map.
    let mut seen = previous_tokens.to_vec();
    seen.sort_unstable();
    for run in seen.chunk_by(|a, b| a == b) {
        let Some(logit) = logits.get_mut(run[0] as usize) else {
            continue;
        };
        if let Some(penalty) = repetition {
            *logit = if *logit < 0.0 {
                *logit * penalty
            } else {
                *logit / penalty
            };
        }
        *logit -= run.len() as f32 * frequency + presence;
    }
}

/// Index of the largest logit; the lowest index wins ties and NaN is
/// ignored. Returns 0 when no value is above `-inf`.
pub fn argmax(logits: &[f32]) -> u32 {
    let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        // Strict `>` keeps the first of equal values and skips NaN.
        if x > best_value {
            (best, best_value) = (i, x);
        }
    }
    best as u32
}

/// Largest value, ignoring NaN; `-inf` for an empty or all-NaN slice.
fn max_value(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Replaces logits by their softmax probabilities.
///
/// Sums in f64 to keep the large vocabulary's rounding error small. `+inf`
/// logits share all the mass; if every logit is `-inf` the result is uniform.
pub fn softmax_in_place(xs: &mut [f32]) {
    let max = max_value(xs);
    let mut sum = 0.0f64;
    for x in xs.iter_mut() {
        // `x == max` avoids `inf - inf = NaN` when the max is infinite.
        *x = if *x == max { 1.0 } else { (*x - max).exp() };
        sum += f64::from(*x);
    }
    for x in xs.iter_mut() {
        *x = (f64::from(*x) / sum) as f32;
    }
}

/// The log-probabilities of one sampled token, as OpenAI's `logprobs` reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (lower id first
    /// among equals).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `chosen` and at the `k` largest logits.
///
/// This is the model's own distribution (OpenAI's and vLLM's convention): pass the raw logits,
/// before temperature, filters, penalties and biases. The normaliser is summed in f64; NaN
/// counts as `-inf`. An id outside `logits` gets `-inf`.
pub fn token_logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = max_value(logits);
    let log_norm = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .map(|&x| (f64::from(clean(x)) - f64::from(max)).exp())
            .sum();
        f64::from(max) + sum.ln()
    } else {
        // All -inf (or NaN): nothing is possible. An infinite max takes all the mass.
        f64::from(max)
    };
    let logprob = |x: f32| -> f32 {
        let x = clean(x);
        if x == max && max.is_infinite() {
            // `inf - inf`: the +inf logits share the mass; treat each as certain.
            if max > 0.0 {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        } else {
            (f64::from(x) - log_norm) as f32
        }
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        clean(logits[*b as usize])
            .total_cmp(&clean(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let k = k.min(logits.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_unstable_by(by_logit);
    TokenLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&x| logprob(x)),
        top: order
            .into_iter()
            .map(|id| (id, logprob(logits[id as usize])))
            .collect(),
    }
}

/// Samples an index from `probs` given a uniform `u` in `[0, 1)`: the GPU sampler's draw
/// (the first index whose running sum passes `u` times the total).
fn draw(probs: &[f32], u: f64) -> u32 {
    philo_kernels::sampling::pick(probs, u)
}

/// Top-k (HF `TopKLogitsWarper`): sets to `-inf` every logit below the k-th
/// largest, so values tied with the k-th survive.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut values = logits.to_vec();
    // Linear-time selection of the k-th largest value.
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for x in logits.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Top-p / nucleus (HF `TopPLogitsWarper`): sorts ascending, and removes the
/// tokens whose cumulative probability is `<= 1 - top_p`, always keeping the
/// most likely one.
///
/// Among equal logits the higher id is removed first.
pub fn top_p_filter(logits: &mut [f32], top_p: f32) {
    // One u64 per token, ordered as (logit ascending, higher id first): sorting plain integers
    // is several times faster than a comparator that looks the logits up, and top-p sorts the
    // whole vocabulary for every sampled row.
    let mut order: Vec<u64> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x > f32::NEG_INFINITY)
        .map(|(i, &x)| (u64::from(ascending_key(x)) << 32) | u64::from(u32::MAX - i as u32))
        .collect();
    if order.len() <= 1 {
        return;
    }
    order.sort_unstable();
    let mut probs = logits.to_vec();
    softmax_in_place(&mut probs);
    let threshold = 1.0 - f64::from(top_p);
    let mut cumulative = 0.0f64;
    // The last (most likely) token is never removed.
    for &key in &order[..order.len() - 1] {
        let i = (u32::MAX - key as u32) as usize;
        cumulative += f64::from(probs[i]);
        if cumulative > threshold {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

/// `x`'s bits as an integer that orders like [`f32::total_cmp`].
fn ascending_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Min-p (HF `MinPLogitsWarper`): removes tokens whose probability is below
/// `min_p` times the top probability. The top token always survives.
pub fn min_p_filter(logits: &mut [f32], min_p: f32) {
    let mut probs = logits.to_vec();
    softmax_in_place(&mut probs);
    let threshold = min_p * max_value(&probs);
    for (x, &p) in logits.iter_mut().zip(&probs) {
        if p < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Locally typical sampling (HF `TypicalLogitsWarper`).
///
/// Tokens are ranked by how close their surprisal `-ln p` is to the entropy
/// of the distribution. Walking that ranking, tokens are kept up to and
/// including the first one where the cumulative probability reaches `mass`
/// (HF counts the tokens with cumulative probability `< mass`), plus any
/// token exactly as typical as that last one. At least one token survives.
pub fn typical_p_filter(logits: &mut [f32], mass: f32) {
    let order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect();
    if order.len() <= 1 {
        return;
    }
    // Log-softmax in f64 over the finite logits (the rest have p = 0).
    let max = max_value(logits);
    let shifted = |i: usize| {
        if logits[i] == max {
            0.0
        } else {
            f64::from(logits[i]) - f64::from(max)
        }
    };
    let log_sum = order.iter().map(|&i| shifted(i).exp()).sum::<f64>().ln();
    let log_p: Vec<f64> = order.iter().map(|&i| shifted(i) - log_sum).collect();
    // Entropy; zero-probability terms are skipped (HF uses nansum).
    let entropy: f64 = -log_p
        .iter()
        .map(|&lp| lp.exp() * lp)
        .filter(|t| t.is_finite())
        .sum::<f64>();
    let distance: Vec<f64> = log_p.iter().map(|&lp| (-lp - entropy).abs()).collect();
    // Rank positions within `order` by typicality.
    let mut rank: Vec<usize> = (0..order.len()).collect();
    rank.sort_unstable_by(|&a, &b| {
        distance[a]
            .total_cmp(&distance[b])
            .then(order[a].cmp(&order[b]))
    });
    let mut cumulative = 0.0f64;
    let mut below = 0;
    for &r in &rank {
        cumulative += log_p[r].exp();
        if cumulative >= f64::from(mass) {
            break;
        }
        below += 1;
    }
    let last = rank[below.min(rank.len() - 1)];
    let cutoff = distance[last];
    for (pos, &i) in order.iter().enumerate() {
        if distance[pos] > cutoff {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain sampling at T = 1 with no filters, as a base for tests.
    fn plain(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_p: None,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn ln_probs(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Ids whose logit is still finite after a filter.
    fn kept(logits: &[f32]) -> Vec<usize> {
        (0..logits.len())
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .collect()
    }

    fn counts(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params).unwrap();
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, &[]) as usize] += 1;
        }
        counts
    }

    #[test]
    fn logit_bias_forces_and_bans_tokens() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        let greedy = |bias: Vec<(u32, f32)>| {
            Sampler::new(SamplingParams {
                logit_bias: bias,
                ..SamplingParams::greedy()
            })
            .unwrap()
            .sample(&logits, &[])
        };
        assert_eq!(greedy(vec![]), 1);
        assert_eq!(greedy(vec![(1, -100.0)]), 2, "-100 bans the best token");
        assert_eq!(greedy(vec![(3, 100.0)]), 3, "+100 forces a token");
        assert_eq!(
            greedy(vec![(99, 100.0)]),
            1,
            "ids past the logits do nothing"
        );
        // Sampling at temperature 1 draws only the forced token.
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: None,
            seed: Some(5),
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::default()
        })
        .unwrap();
        assert!((0..50).all(|_| sampler.sample(&logits, &[]) == 0));
        let bad = SamplingParams {
            logit_bias: vec![(0, f32::NAN)],
            ..SamplingParams::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn token_logprobs_match_a_hand_computed_log_softmax() {
        // ln(e^1 + e^2 + e^3 + e^0 + 0) = 3.4401897; NaN counts as -inf.
        let logits = [1.0, 2.0, 3.0, 0.0, f32::NEG_INFINITY, f32::NAN];
        let got = token_logprobs(&logits, 1, 3);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-5;
        assert!(close(got.logprob, -1.440_189_7), "{got:?}");
        let ids: Vec<u32> = got.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [2, 1, 0]);
        for (&(_, lp), want) in got
            .top
            .iter()
            .zip([-0.440_189_7, -1.440_189_7, -2.440_189_7])
        {
            assert!(close(lp, want), "{got:?}");
        }
        // The chosen token need not be among the top ones.
        let low = token_logprobs(&logits, 3, 1);
        assert!(close(low.logprob, -3.440_189_7), "{low:?}");
        assert_eq!(low.top.len(), 1);
        assert_eq!(token_logprobs(&logits, 4, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(token_logprobs(&logits, 5, 0).top, []);
        // Ties: lower id first; k beyond the vocabulary gives every token.
        let tie = token_logprobs(&[0.5, 0.5], 1, 9);
        assert_eq!(tie.top.len(), 2);
        assert_eq!((tie.top[0].0, tie.top[1].0), (0, 1));
        assert!(close(tie.logprob, -std::f32::consts::LN_2));
    }

    #[test]
    fn logprobs_beyond_twenty_are_invalid() {
        let ok = SamplingParams {
            logprobs: Some(MAX_TOP_LOGPROBS),
            ..SamplingParams::default()
        };
        assert!(ok.validate().is_ok());
        let bad = SamplingParams {
            logprobs: Some(21),
            ..SamplingParams::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn accept_or_resample_keeps_the_sampling_distribution() {
        // Whatever is proposed, the kept-or-resampled token is distributed as a plain draw.
        let logits = [2.0f32, 1.0, 0.5, -1.0, 0.0];
        let mut probs = logits.to_vec();
        softmax_in_place(&mut probs);
        let draws = 200_000;
        for proposed in [0u32, 3] {
            let mut sampler = Sampler::new(plain(7)).unwrap();
            let mut counts = [0usize; 5];
            let mut kept = 0;
            for _ in 0..draws {
                let (accepted, token) = sampler.accept_or_resample(&logits, &[], proposed);
                kept += accepted as usize;
                counts[token as usize] += 1;
            }
            for (count, p) in counts.iter().zip(&probs) {
                let freq = *count as f32 / draws as f32;
                assert!(
                    (freq - p).abs() < 0.005,
                    "proposed {proposed}: {freq} vs {p}"
                );
            }
            let kept = kept as f32 / draws as f32;
            assert!((kept - probs[proposed as usize]).abs() < 0.005);
        }
        // Greedy: kept only when the proposal is the argmax.
        let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(greedy.accept_or_resample(&logits, &[], 0), (true, 0));
        assert_eq!(greedy.accept_or_resample(&logits, &[], 2), (false, 0));
    }

    #[test]
    fn plain_greedy_only_without_bias_or_penalties() {
        assert!(SamplingParams::greedy().is_plain_greedy());
        assert!(!SamplingParams::default().is_plain_greedy());
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::greedy();
            f(&mut p);
            p.is_plain_greedy()
        };
        assert!(with(|p| p.repetition_penalty = Some(1.0)));
        assert!(!with(|p| p.repetition_penalty = Some(1.1)));
        assert!(!with(|p| p.frequency_penalty = 0.5));
        assert!(!with(|p| p.presence_penalty = 0.5));
        assert!(!with(|p| p.logit_bias = vec![(3, 1.0)]));
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, -5.0, f32::NAN], &[]), 1);
    }

    #[test]
    fn argmax_ignores_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[-3.0, -2.0, -2.0]), 1);
    }

    #[test]
    fn tiny_temperature_matches_greedy() {
        let logits = [0.3, 1.2, 1.0, -0.4, 1.1];
        let greedy = Sampler::new(SamplingParams::greedy())
            .unwrap()
            .sample(&logits, &[]);
        assert_eq!(greedy, 1);
        // 1e-3 is above the greedy cutoff, so this really samples; the gap
        // of 0.1 becomes 100 nats, leaving the others ~e^-100.
        for seed in 0..50 {
            let params = SamplingParams {
                temperature: 1e-3,
                ..plain(seed)
            };
            assert!(!params.is_greedy());
            let mut s = Sampler::new(params).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), greedy);
            }
        }
    }

    #[test]
    fn top_k_one_always_returns_argmax() {
        let logits = [0.5, 0.4, 0.6, 0.55];
        for seed in 0..200 {
            let params = SamplingParams {
                top_k: Some(1),
                ..plain(seed)
            };
            assert_eq!(Sampler::new(params).unwrap().sample(&logits, &[]), 2);
        }
    }

    #[test]
    fn top_k_two_never_returns_third_token() {
        let logits = ln_probs(&[0.5, 0.3, 0.2]);
        let params = SamplingParams {
            top_k: Some(2),
            ..plain(7)
        };
        let c = counts(params, &logits, 5_000);
        assert_eq!(c[2], 0);
        // Both survivors are reachable, at roughly 5:3.
        assert!(c[0] > 2_800 && c[1] > 1_600, "{c:?}");
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let mut logits = [3.0, 2.0, 2.0, 1.0];
        top_k_filter(&mut logits, 2);
        assert_eq!(kept(&logits), [0, 1, 2]);
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // Ascending cumulative: 0.2, 0.5, 1.0; remove cum <= 0.25 -> only 2.
        let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
        top_p_filter(&mut logits, 0.75);
        assert_eq!(kept(&logits), [0, 1]);

        // 1 - 0.6 = 0.4: still only token 2 falls at or below it.
        let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
        top_p_filter(&mut logits, 0.6);
        assert_eq!(kept(&logits), [0, 1]);

        // 1 - 0.4 = 0.6: 0.2 and 0.5 fall below, the top token remains.
        let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
        top_p_filter(&mut logits, 0.4);
        assert_eq!(kept(&logits), [0]);
    }

    #[test]
    fn top_p_removes_tokens_at_exactly_one_minus_p() {
        // Four exact quarters: cumulative 0.25, 0.5, 0.75, 1.0. HF removes
        // cum <= 1 - top_p, so the equality at 0.5 is removed too.
        let mut logits = [0.0; 4];
        top_p_filter(&mut logits, 0.5);
        assert_eq!(kept(&logits).len(), 2);
        // Ties go to the lower ids.
        assert_eq!(kept(&logits), [0, 1]);

        let mut logits = [0.0; 4];
        top_p_filter(&mut logits, 0.75);
        assert_eq!(kept(&logits), [0, 1, 2]);
    }

    #[test]
    fn top_p_matches_the_comparator_sorted_reference_on_rows_with_ties() {
        // The reference: the order spelled out with total_cmp and the ids, as HF sorts.
        fn reference(logits: &mut [f32], top_p: f32) {
            let mut order: Vec<usize> = (0..logits.len())
                .filter(|&i| logits[i] > f32::NEG_INFINITY)
                .collect();
            if order.len() <= 1 {
                return;
            }
            order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
            let mut probs = logits.to_vec();
            softmax_in_place(&mut probs);
            let mut cumulative = 0.0f64;
            for &i in &order[..order.len() - 1] {
                cumulative += f64::from(probs[i]);
                if cumulative > 1.0 - f64::from(top_p) {
                    break;
                }
                logits[i] = f32::NEG_INFINITY;
            }
        }
        let mut rng = StdRng::seed_from_u64(7);
        for row in 0..200 {
            // Coarse values so that ties are common; some -inf, negative and positive zeros.
            let logits: Vec<f32> = (0..257)
                .map(|_| match rng.random_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    1 => -0.0,
                    _ => rng.random_range(-8..8) as f32 * 0.5,
                })
                .collect();
            for top_p in [0.1, 0.5, 0.9, 0.99] {
                let (mut fast, mut slow) = (logits.clone(), logits.clone());
                top_p_filter(&mut fast, top_p);
                reference(&mut slow, top_p);
                assert_eq!(kept(&fast), kept(&slow), "row {row}, top_p {top_p}");
            }
        }
    }

    #[test]
    fn ascending_key_orders_like_total_cmp() {
        let values = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for a in values {
            for b in values {
                assert_eq!(
                    ascending_key(a).cmp(&ascending_key(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn top_p_always_keeps_the_top_token() {
        let mut logits = ln_probs(&[0.2, 0.5, 0.3]);
        top_p_filter(&mut logits, 0.01);
        assert_eq!(kept(&logits), [1]);
    }

    #[test]
    fn min_p_removes_tokens_below_fraction_of_max() {
        // Threshold 0.5 * 0.5 = 0.25: 0.3 stays, 0.2 goes.
        let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
        min_p_filter(&mut logits, 0.5);
        assert_eq!(kept(&logits), [0, 1]);

        // Threshold 0.7 * 0.5 = 0.35 also removes 0.3.
        let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
        min_p_filter(&mut logits, 0.7);
        assert_eq!(kept(&logits), [0]);
    }

    #[test]
    fn min_p_keeps_probabilities_equal_to_threshold() {
        // min_p = 1 keeps exactly the tokens tied for the top probability.
        let mut logits = [1.0, 0.0, 1.0];
        min_p_filter(&mut logits, 1.0);
        assert_eq!(kept(&logits), [0, 2]);
    }

    #[test]
    fn typical_p_prefers_tokens_near_the_entropy() {
        // p = [0.5, 0.3, 0.2]: H = 1.0297 nats; |-ln p - H| =
        // [0.3365, 0.1743, 0.5798], so the ranking is 1, 0, 2 with
        // cumulative probabilities 0.3, 0.8, 1.0.
        let cases: [(f32, &[usize]); 4] = [
            // 0.3 >= 0.2 already: only token 1, the argmax is removed.
            (0.2, &[1]),
            // 0.3 < 0.5, 0.8 >= 0.5: keep through the crossing token.
            (0.5, &[0, 1]),
            (0.7, &[0, 1]),
            (0.9, &[0, 1, 2]),
        ];
        for (mass, expected) in cases {
            let mut logits = ln_probs(&[0.5, 0.3, 0.2]);
            typical_p_filter(&mut logits, mass);
            assert_eq!(kept(&logits), expected, "mass {mass}");
        }
    }

    #[test]
    fn typical_p_keeps_equally_typical_tokens() {
        // p = [0.4, 0.3, 0.3]: H = 1.0889; distances [0.1726, 0.1151, 0.1151].
        // With mass 0.2 the first ranked token already reaches it, but its
        // twin is just as typical and HF keeps both.
        let mut logits = ln_probs(&[0.4, 0.3, 0.3]);
        typical_p_filter(&mut logits, 0.2);
        assert_eq!(kept(&logits), [1, 2]);
    }

    #[test]
    fn typical_p_through_sampler_excludes_atypical_argmax() {
        let logits = ln_probs(&[0.5, 0.3, 0.2]);
        for seed in 0..100 {
            let params = SamplingParams {
                typical_p: Some(0.2),
                ..plain(seed)
            };
            assert_eq!(Sampler::new(params).unwrap().sample(&logits, &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let params = SamplingParams {
            repetition_penalty: Some(2.0),
            ..SamplingParams::greedy()
        };
        // Token 0 appears three times but is penalised once.
        let mut logits = [3.0, 1.5, -1.0, -0.5];
        apply_penalties(&mut logits, &[0, 2, 0, 0, 99], &params);
        assert_eq!(logits, [1.5, 1.5, -2.0, -0.5]);

        let mut s = Sampler::new(params).unwrap();
        // Positive: 3 / 2 = 1.5 < 2 moves the argmax to token 1.
        assert_eq!(s.sample(&[3.0, 2.0], &[]), 0);
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
        // Negative: -1 * 2 = -2 < -1.5 moves the argmax to token 1.
        assert_eq!(s.sample(&[-1.0, -1.5], &[]), 0);
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
    }

    #[test]
    fn frequency_and_presence_penalties() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        // Token 0: 2 - 3 * 0.5 - 0.25 = 0.25; token 1: 1 - 0.5 - 0.25 = 0.25;
        // token 2 unseen.
        let mut logits = [2.0, 1.0, 0.5];
        apply_penalties(&mut logits, &[0, 1, 0, 0], &params);
        assert_eq!(logits, [0.25, 0.25, 0.5]);
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&[2.0, 1.0, 0.5], &[]), 0);
        assert_eq!(s.sample(&[2.0, 1.0, 0.5], &[0, 1, 0, 0]), 2);

        // Presence alone is flat: 2 - 1.25 = 0.75 < 1 whether seen once or
        // many times.
        let presence = SamplingParams {
            presence_penalty: 1.25,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(presence).unwrap();
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1);
        assert_eq!(s.sample(&[2.0, 1.0], &[0, 0, 0, 0]), 1);
        assert_eq!(s.sample(&[2.0, 1.25], &[0, 0, 0, 0]), 1);
        assert_eq!(s.sample(&[2.0, 0.7], &[0, 0, 0, 0]), 0);
    }

    #[test]
    fn empirical_frequencies_match_tempered_softmax() {
        let logits = [1.0, 0.5, 0.0, -1.0];
        let temperature = 0.7;
        let mut expected: Vec<f32> = logits.iter().map(|x| x / temperature).collect();
        softmax_in_place(&mut expected);
        // Hand check of softmax(l / 0.7): [0.5597, 0.2740, 0.1341, 0.0322].
        for (e, hand) in expected.iter().zip([0.5597, 0.2740, 0.1341, 0.0322]) {
            assert!((e - hand).abs() < 1e-3, "{expected:?}");
        }
        let draws = 20_000;
        let params = SamplingParams {
            temperature,
            ..plain(1234)
        };
        let c = counts(params, &logits, draws);
        for (i, (&n, &p)) in c.iter().zip(&expected).enumerate() {
            let freq = n as f32 / draws as f32;
            // ~3 standard deviations at p = 0.5; T = 1 would be off by > 0.08.
            assert!((freq - p).abs() < 0.01, "token {i}: {freq} vs {p}");
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            })
            .unwrap();
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn unseeded_sampler_works() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..SamplingParams::default()
        })
        .unwrap();
        assert_eq!(s.sample(&[0.0, 5.0, 1.0], &[]), 1);
    }

    #[test]
    fn softmax_handles_infinities() {
        let mut xs = [f32::INFINITY, 0.0, f32::INFINITY, f32::NEG_INFINITY];
        softmax_in_place(&mut xs);
        assert_eq!(xs, [0.5, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn defaults_and_greedy_are_valid() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 0.7);
        assert_eq!(d.top_p, Some(0.9));
        assert!(d.validate().is_ok());
        assert!(!d.is_greedy());
        let g = SamplingParams::greedy();
        assert!(g.validate().is_ok());
        assert!(g.is_greedy());
    }

    #[test]
    fn validation_errors_name_the_parameter() {
        let d = SamplingParams::default();
        let bad = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..d.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..d.clone()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..d.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: Some(1.01),
                    ..d.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: Some(f32::NAN),
                    ..d.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    typical_p: Some(0.0),
                    ..d.clone()
                },
                "typical_p",
            ),
            (
                SamplingParams {
                    typical_p: Some(-0.2),
                    ..d.clone()
                },
                "typical_p",
            ),
            (
                SamplingParams {
                    min_p: Some(1.5),
                    ..d.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(0.0),
                    ..d.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(-1.0),
                    ..d.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(f32::INFINITY),
                    ..d.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..d.clone()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NEG_INFINITY,
                    ..d.clone()
                },
                "presence_penalty",
            ),
        ];
        for (params, name) in bad {
            let err = Sampler::new(params).unwrap_err();
            let SamplingError::InvalidParameter { parameter, .. } = &err;
            assert_eq!(*parameter, name);
            assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
        }
        // Edges that are allowed.
        let ok = [
            SamplingParams {
                top_p: Some(1.0),
                typical_p: Some(1.0),
                min_p: Some(1.0),
                ..d.clone()
            },
            SamplingParams {
                frequency_penalty: -2.0,
                presence_penalty: 2.0,
                ..d.clone()
            },
            SamplingParams {
                repetition_penalty: Some(0.5),
                top_k: Some(1),
                ..d.clone()
            },
        ];
        for params in ok {
            assert!(params.validate().is_ok(), "{params:?}");
        }
    }

    /// The GPU's logit adjustments (`gpu_adjustments`, applied by philo-kernels' reference as
    /// `adjust_logits` applies them) give the host's adjusted logits bit for bit: bias,
    /// repetition, frequency and presence penalties alone and together, ids outside the
    /// vocabulary, signed zeros, NaN.
    #[test]
    fn gpu_adjustments_match_the_host_bit_for_bit() {
        use philo_kernels::sampling::adjust_reference;
        let mut rng = StdRng::seed_from_u64(8);
        let vocab = 300;
        let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        logits[0] = -0.0;
        logits[1] = 0.0;
        logits[2] = f32::NAN;
        logits[3] = f32::NEG_INFINITY;
        let previous: Vec<u32> = (0..400)
            .map(|i| {
                if i % 50 == 0 {
                    7_000
                } else {
                    rng.random_range(0..60u32)
                }
            })
            .chain([0, 0, 1, 2, 3])
            .collect();
        let bias = vec![(5, 2.5), (0, 0.0), (10, -100.0), (9_999, 1.0), (2, 1.0)];
        let cases = [
            (None, 0.0, 0.0, bias.clone()),
            (Some(1.3), 0.0, 0.0, Vec::new()),
            (None, 0.4, 0.0, Vec::new()),
            (None, 0.0, -0.7, Vec::new()),
            (Some(0.8), 0.25, 0.5, bias.clone()),
            (Some(1.0), 0.0, 0.0, Vec::new()),
        ];
        for (repetition_penalty, frequency_penalty, presence_penalty, logit_bias) in cases {
            let params = SamplingParams {
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                logit_bias,
                ..SamplingParams::default()
            };
            let sampler = Sampler::new(params.clone()).unwrap();
            let want = sampler.adjusted_logits(&logits, &previous);
            let entries = params
                .gpu_adjustments(&TokenCounts::new(&previous), vocab)
                .unwrap();
            let mut got: Vec<f32> = logits
                .iter()
                .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
                .collect();
            adjust_reference(&mut got, vocab, &[entries]);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{params:?}");
        }
        // Nothing to adjust: no entries; a bias naming a token twice: the host's job.
        assert_eq!(
            SamplingParams::default().gpu_adjustments(&TokenCounts::new(&previous), vocab),
            Some(Vec::new())
        );
        let twice = SamplingParams {
            logit_bias: vec![(4, 1.0), (4, 2.0)],
            ..SamplingParams::default()
        };
        assert_eq!(
            twice.gpu_adjustments(&TokenCounts::new(&previous), vocab),
            None
        );
    }

    /// The GPU sampler's reference (philo-kernels, what `sample_rows` is tested against) picks
    /// what this sampler picks for the same uniform number, over temperature, top-k, top-p,
    /// min-p, typical-p and their mix, on logits with and without ties and NaN.
    #[test]
    fn gpu_sampling_reference_draws_as_the_host_sampler() {
        use philo_kernels::sampling::{draw_weights, reference, same_up_to_rounding};
        use philo_kernels::sampling::{uniform, RowSampling};
        let mut rng = StdRng::seed_from_u64(5);
        let settings = [
            (1.0, None, None, None, None),
            (0.7, None, None, None, None),
            (0.7, Some(40), None, None, None),
            (0.7, None, Some(0.9), None, None),
            (1.3, None, Some(0.5), None, None),
            (0.8, None, None, Some(0.05), None),
            (0.6, Some(50), Some(0.95), Some(0.02), None),
            (0.0, None, None, None, None),
            (1.0, None, None, None, Some(0.2)),
            (0.7, None, None, None, Some(0.9)),
            (0.8, Some(100), Some(0.9), None, Some(0.5)),
        ];
        let (mut draws, mut rounded) = (0, 0);
        for row in 0..16 {
            let mut logits: Vec<f32> = (0..2_000)
                .map(|_| rng.random_range(-1.0f32..1.0) * (2.0 + row as f32))
                .collect();
            if row % 2 == 1 {
                // Coarse values: many ties, also at the thresholds.
                logits
                    .iter_mut()
                    .for_each(|x| *x = (*x * 4.0).round() / 4.0);
            }
            logits[7] = f32::NAN;
            for (i, &(temperature, top_k, top_p, min_p, typical_p)) in settings.iter().enumerate() {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    typical_p,
                    seed: Some(1),
                    ..SamplingParams::default()
                };
                let sampler = Sampler::new(params).unwrap();
                for counter in 0..40u32 {
                    let gpu = RowSampling {
                        temperature,
                        top_k: top_k.map_or(0, |k| k as u32),
                        top_p: top_p.unwrap_or(1.0),
                        min_p: min_p.unwrap_or(0.0),
                        typical_p: typical_p.unwrap_or(1.0),
                        seed: (row * 100 + i) as u64,
                        counter,
                    };
                    // The settings map to the GPU's as `gpu_sampling` maps them (greedy: the
                    // argmax), with nothing to adjust.
                    let mapped = sampler
                        .params()
                        .gpu_sampling(gpu.seed, counter, &TokenCounts::default(), logits.len())
                        .unwrap();
                    assert!(mapped.adjustments.is_empty());
                    let mapped = mapped.row;
                    if temperature > 0.0 {
                        assert_eq!(mapped, gpu);
                    } else {
                        assert_eq!(mapped, RowSampling::greedy());
                    }
                    let u = uniform(gpu.seed, counter);
                    let host = sampler.sample_with_uniform(&logits, &[], f64::from(u));
                    let want = reference(&logits, &gpu);
                    // The host normalises in f32 before its f64 running sum: at a boundary
                    // between two tokens the two may round apart.
                    let rounding = || {
                        let weights = draw_weights(&logits, &gpu).unwrap();
                        same_up_to_rounding(&weights, f64::from(u), want, host, 1e-6)
                    };
                    assert!(
                        want == host || rounding(),
                        "row {row} {gpu:?}: {want} vs {host}"
                    );
                    rounded += usize::from(want != host);
                    draws += 1;
                }
            }
        }
        assert_eq!(draws, 16 * settings.len() * 40);
        assert!(rounded <= 2, "{rounded} draws differ by rounding");
    }
}
