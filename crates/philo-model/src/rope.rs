//! Rotary position embeddings (NeoX "rotate half" layout), plain and LongRoPE.

use candle_core::{DType, Device, Tensor};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;

/// Inverse frequencies of one RoPE variant and the factor applied to cos and sin.
#[derive(Debug, Clone)]
struct Frequencies {
    inv_freq: Vec<f32>,
    scale: f32,
}

impl Frequencies {
    /// inv_freq[i] = 1 / (factor[i] · theta^(2i/dim)), in f32 as the reference computes it.
    fn new(theta: f64, rotary_dim: usize, factors: Option<&[f64]>, scale: f32) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                let factor = factors.map_or(1.0, |f| f[i] as f32);
                1.0 / (factor * (theta as f32).powf(exponent))
            })
            .collect();
        Frequencies { inv_freq, scale }
    }
}

/// Computes cos/sin for arbitrary positions; the variant (short or long factors) is chosen per call.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    rotary_dim: usize,
    short: Frequencies,
    /// LongRoPE only: the long factors and the length above which they apply.
    long: Option<(Frequencies, usize)>,
}

impl RotaryEmbedding {
    pub fn new(config: &RopeConfig) -> Self {
        let dim = config.rotary_dim;
        match &config.scaling {
            RopeScaling::None => RotaryEmbedding {
                rotary_dim: dim,
                short: Frequencies::new(config.theta, dim, None, 1.0),
                long: None,
            },
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let scale = *attention_factor as f32;
                RotaryEmbedding {
                    rotary_dim: dim,
                    short: Frequencies::new(config.theta, dim, Some(short_factor), scale),
                    long: Some((
                        Frequencies::new(config.theta, dim, Some(long_factor), scale),
                        *original_max_position_embeddings,
                    )),
                }
            }
        }
    }

    /// Number of leading head dimensions that rotate.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Whether a forward whose highest position is `max_position` uses the long factors, as the
    /// reference decides it: max_position + 1 > original_max_position_embeddings.
    pub fn uses_long_factors(&self, max_position: usize) -> bool {
        self.long_factors_above()
            .is_some_and(|original| max_position + 1 > original)
    }

    /// The sequence length above which the long factors apply (LongRoPE's
    /// original_max_position_embeddings), None without LongRoPE.
    pub fn long_factors_above(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, original)| *original)
    }

    /// Whether LongRoPE's switch lies between positions `before` and `after`: keys cached up to
    /// `before` were rotated with the short factors, and a forward reaching `after` needs the
    /// long ones, so the sequence must be recomputed.
    pub fn switches_between(&self, before: usize, after: usize) -> bool {
        self.uses_long_factors(after) && !self.uses_long_factors(before)
    }

    /// cos and sin of shape `[positions.len(), rotary_dim / 2]`, computed with the factors chosen
    /// by `long` (see [`RotaryEmbedding::uses_long_factors`]).
    pub fn cos_sin(
        &self,
        positions: &[u32],
        long: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.cos_sin_per_token(positions, &vec![long; positions.len()], dtype, device)
    }

    /// Like [`RotaryEmbedding::cos_sin`] with the factors chosen per position: a batch of
    /// independent sequences, some of which use the long factors.
    pub fn cos_sin_per_token(
        &self,
        positions: &[u32],
        long: &[bool],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for (&p, &long) in positions.iter().zip(long) {
            let freqs = match &self.long {
                Some((long_freqs, _)) if long => long_freqs,
                _ => &self.short,
            };
            for &f in &freqs.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * freqs.scale);
                sin.push(angle.sin() * freqs.scale);
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates the first `rotary_dim` dimensions of `x` `[batch, heads, seq, head_dim]`;
    /// `cos`/`sin` are `[batch, seq, rotary_dim / 2]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        if self.rotary_dim == head_dim {
            return rotate(x, cos, sin);
        }
        let rotated = rotate(&x.narrow(3, 0, self.rotary_dim)?, cos, sin)?;
        let pass = x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?;
        Ok(Tensor::cat(&[&rotated, &pass], 3)?)
    }
}

/// x·cos + rotate_half(x)·sin. The fused kernel has no backward, so a tensor that carries
/// gradients (training) goes through the composed form.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let half = x.dim(3)? / 2;
    // [b, s, half] → [b, 1, s, 2·half], as the rotate-half layout pairs i with i + half.
    let cos = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}
