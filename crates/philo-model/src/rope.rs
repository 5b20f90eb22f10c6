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
        matches!(self.long, Some((_, original)) if max_position + 1 > original)
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
        let freqs = match &self.long {
            Some((long_freqs, _)) if long => long_freqs,
            _ => &self.short,
        };
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
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
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
        }
        let rotated = x.narrow(3, 0, self.rotary_dim)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope(&rotated, cos, sin)?;
        let pass = x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?;
        Ok(Tensor::cat(&[&rotated, &pass], 3)?)
    }
}
