//! Sampling the next token on the GPU (`cuda/sampling.cu`, launched by
//! `decode::DecodeKernels::sample`): greedy, or temperature, top-k, top-p, min-p and typical-p
//! in Hugging Face's order (as philo-generate's host sampler applies them), then one draw whose uniform
//! number is a hash of the row's seed and draw counter, so a seeded request repeats itself.
//! [`reference`] is the plain version the kernel is tested against.

/// Temperatures below this decode greedily (philo-generate's threshold).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The largest vocabulary the kernel takes (32 logits per thread, 1,024 threads).
pub const MAX_VOCAB: usize = 32 * 1024;

/// One row's sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// Below [`GREEDY_TEMPERATURE`]: the argmax (lowest id among equals).
    pub temperature: f32,
    /// Keep the `top_k` largest logits and their ties (0: off).
    pub top_k: u32,
    /// Nucleus mass (1: off).
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability (0: off).
    pub min_p: f32,
    /// Locally typical sampling's mass (1: off): keep the tokens whose surprisal is closest to
    /// the entropy, up to this much probability (Hugging Face's `TypicalLogitsWarper`).
    pub typical_p: f32,
    pub seed: u64,
    /// Which draw of the row this is (the position it samples for).
    pub counter: u32,
}

impl RowSampling {
    /// The argmax.
    pub fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
            seed: 0,
            counter: 0,
        }
    }

    /// Words of the row in the kernel's parameter block (see [`RowSampling::write`]).
    pub const WORDS: usize = 8;

    /// Writes the row's settings into `params`, `WORDS` arrays of `stride` u32 words, at `row`.
    pub fn write(&self, params: &mut [u32], stride: usize, row: usize) {
        let words = [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.counter,
            self.typical_p.to_bits(),
        ];
        for (i, w) in words.into_iter().enumerate() {
            params[i * stride + row] = w;
        }
    }
}

/// One logit's change before a row is sampled: the logit bias and the penalties of that token,
/// as philo-generate's host sampler applies them (`adjust_logits` in cuda/sampling.cu):
/// `x + bias`, then divided by `penalty` when not negative and multiplied by it otherwise,
/// then minus `subtract`. A token without a bias adds -0.0 (x + -0.0 is x for every x, -0.0
/// included), one the row has not seen has penalty 1 and subtracts 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitAdjustment {
    pub token: u32,
    pub bias: f32,
    /// The repetition penalty (1: none).
    pub penalty: f32,
    /// count · frequency penalty + presence penalty (0 for a token not seen).
    pub subtract: f32,
}

impl LogitAdjustment {
    /// Words of one adjustment in the kernel's list.
    pub const WORDS: usize = 4;

    /// The kernel's words for this adjustment of row `row` of `vocab` logits: the logit's
    /// index, then bias, penalty and subtract as f32 bits.
    pub fn words(&self, row: usize, vocab: usize) -> [u32; 4] {
        [
            (row * vocab) as u32 + self.token,
            self.bias.to_bits(),
            self.penalty.to_bits(),
            self.subtract.to_bits(),
        ]
    }

    /// `x` adjusted, as the kernel rounds it.
    pub fn apply(&self, x: f32) -> f32 {
        let x = x + self.bias;
        let x = if x < 0.0 {
            x * self.penalty
        } else {
            x / self.penalty
        };
        x - self.subtract
    }
}

/// `logits` (rows of `vocab`) after `adjustments[row]` (distinct tokens within a row).
pub fn adjust_reference(logits: &mut [f32], vocab: usize, adjustments: &[Vec<LogitAdjustment>]) {
    for (row, list) in adjustments.iter().enumerate() {
        for a in list {
            let x = &mut logits[row * vocab + a.token as usize];
            *x = a.apply(*x);
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The uniform number in [0, 1) of draw `counter` of a row seeded with `seed` (24 bits), as
/// the kernel computes it.
pub fn uniform(seed: u64, counter: u32) -> f32 {
    let h = splitmix64(seed ^ splitmix64(u64::from(counter)));
    (h >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// The token the kernel draws from one row of `logits`.
pub fn reference(logits: &[f32], s: &RowSampling) -> u32 {
    match draw_weights(logits, s) {
        None => argmax(logits),
        Some(weights) => pick(&weights, f64::from(uniform(s.seed, s.counter))),
    }
}

/// The largest logit's id (lowest among equals, NaN ignored), 0 when none is above -inf.
fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x > best.map_or(f32::NEG_INFINITY, |(_, b)| b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// What a sampled row draws from: one weight per token after temperature and the filters,
/// unnormalised (the largest logit weighs 1, removed tokens 0); None for a greedy row.
pub fn draw_weights(logits: &[f32], s: &RowSampling) -> Option<Vec<f32>> {
    if s.temperature < GREEDY_TEMPERATURE {
        return None;
    }
    let mut v: Vec<f32> = logits
        .iter()
        .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
        .collect();
    if s.temperature != 1.0 {
        v.iter_mut().for_each(|x| *x /= s.temperature);
    }
    if s.top_k > 0 && (s.top_k as usize) < v.len() {
        let mut sorted = v.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k as usize - 1];
        v.iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = v
        .iter()
        .map(|&x| {
            if x == max || max == f32::NEG_INFINITY {
                1.0
            } else {
                (x - max).exp()
            }
        })
        .collect();
    if s.top_p < 1.0 {
        // Larger logits first, lower id first among equals; a token stays while the mass
        // before it is below top_p.
        let target = f64::from(s.top_p) * e.iter().map(|&w| f64::from(w)).sum::<f64>();
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        let mut before = 0.0f64;
        for i in order {
            let weight = e[i];
            if before >= target {
                e[i] = 0.0;
            }
            before += f64::from(weight);
        }
    }
    if s.min_p > 0.0 {
        e.iter_mut()
            .filter(|x| **x < s.min_p)
            .for_each(|x| *x = 0.0);
    }
    if s.typical_p < 1.0 && max > f32::NEG_INFINITY {
        typical(&v, max, &mut e, s.typical_p);
    }
    Some(e)
}

/// Locally typical sampling over the tokens still possible (weight > 0): their log-probability
/// lp in f64 (from the logits `v` and their largest, `max`), the entropy H, and each token's
/// distance |−lp − H|; the kept tokens are those within the smallest distance whose tokens
/// weigh at least `mass` (all when rounding leaves even the whole set short of it). The kernel
/// finds that distance by binary search over the distances' bits.
fn typical(v: &[f32], max: f32, e: &mut [f32], mass: f32) {
    let possible: Vec<usize> = (0..v.len()).filter(|&i| e[i] > 0.0).collect();
    if possible.len() <= 1 {
        return;
    }
    let shifted = |i: usize| f64::from(v[i]) - f64::from(max);
    let log_z = possible.iter().map(|&i| shifted(i).exp()).sum::<f64>().ln();
    let lp = |i: usize| shifted(i) - log_z;
    let entropy: f64 = -possible.iter().map(|&i| lp(i).exp() * lp(i)).sum::<f64>();
    let distance = |i: usize| (-lp(i) - entropy).abs();
    let mut by_distance = possible.clone();
    by_distance.sort_by(|&a, &b| distance(a).total_cmp(&distance(b)));
    // The smallest distance whose tokens at or below it weigh at least `mass`.
    let mut cutoff = f64::INFINITY;
    let mut weight = 0.0f64;
    for (j, &i) in by_distance.iter().enumerate() {
        weight += lp(i).exp();
        let last_of_equals = by_distance
            .get(j + 1)
            .is_none_or(|&next| distance(next) != distance(i));
        if last_of_equals && weight >= f64::from(mass) {
            cutoff = distance(i);
            break;
        }
    }
    for &i in &possible {
        if distance(i) > cutoff {
            e[i] = 0.0;
        }
    }
}

/// The first token whose running sum (f64) passes `u` (in [0, 1)) times the total weight; the
/// last possible one if rounding puts the target at the very top. philo-generate's host
/// sampler draws with it too.
pub fn pick(weights: &[f32], u: f64) -> u32 {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += f64::from(w);
            last = i;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Whether tokens `a` and `b` are both what [`pick`] gives for `u` up to rounding: both
/// possible, and the running sum up to the first of them lies within `tolerance` (relative to
/// the total) of the target. Two samplers that sum in different orders may differ there.
pub fn same_up_to_rounding(weights: &[f32], u: f64, a: u32, b: u32, tolerance: f64) -> bool {
    let (lo, hi) = (a.min(b) as usize, a.max(b) as usize);
    if hi >= weights.len() || weights[lo] <= 0.0 || weights[hi] <= 0.0 {
        return false;
    }
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let through_lo: f64 = weights[..=lo].iter().map(|&w| f64::from(w)).sum();
    let between: f64 = weights[lo + 1..hi].iter().map(|&w| f64::from(w)).sum();
    // Only zero-weight tokens may lie between them, and the boundary must be at the target.
    between == 0.0 && (through_lo - u * total).abs() <= tolerance * total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_spread_over_the_unit_interval() {
        let n = 20_000;
        let mut buckets = [0usize; 10];
        for c in 0..n {
            let u = uniform(42, c);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 2_000.0).abs() < 200.0, "{buckets:?}");
        }
        assert_ne!(uniform(1, 0), uniform(2, 0));
    }

    #[test]
    fn greedy_takes_the_first_largest_and_filters_keep_the_top() {
        let logits = [1.0, 3.0, f32::NAN, 3.0, -2.0];
        assert_eq!(reference(&logits, &RowSampling::greedy()), 1);
        // top_k 1 and a tiny top_p both leave only the two tied largest (top-k keeps ties,
        // top-p the first of them).
        for counter in 0..50 {
            let mut s = RowSampling {
                temperature: 0.7,
                top_k: 1,
                top_p: 1.0,
                min_p: 0.0,
                typical_p: 1.0,
                seed: 9,
                counter,
            };
            assert!([1, 3].contains(&reference(&logits, &s)));
            s.top_k = 0;
            s.top_p = 0.01;
            assert_eq!(reference(&logits, &s), 1);
        }
    }
}
