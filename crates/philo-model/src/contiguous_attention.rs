//! The attention core of [`crate::Phi3::forward`]: keys and values contiguous per sequence,
//! appended to a [`KvCache`] when there is one. On the GPU (bf16/f16) one kernel splits and
//! rotates q, k and v and flash attention masks on the device; elsewhere composed candle ops with
//! an additive mask.

use candle_core::{DType, Tensor, D};
use philo_kernels::attention::flash_attention;
use philo_kernels::rope::qkv_rope;

use crate::decoder_layer::AttentionCore;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::phi3::{Attention, ForwardContext};
use crate::rope::RotaryEmbedding;

/// Attention over the new positions and what `cache` holds before them.
pub(crate) struct ContiguousAttention<'a> {
    pub(crate) ctx: &'a ForwardContext,
    pub(crate) rotary: &'a RotaryEmbedding,
    pub(crate) cache: Option<&'a mut KvCache>,
}

impl AttentionCore for ContiguousAttention<'_> {
    fn attend(&mut self, layer: usize, heads: &Attention, qkv: &Tensor) -> Result<Tensor> {
        let (b, s, _) = qkv.dims3()?;
        let shape = heads.qkv_shape(self.rotary.rotary_dim());
        let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let ctx = self.ctx;
        if ctx.fused {
            // Fused: split + rotate in one kernel, then flash attention (masks on the device).
            let heads = qkv_rope(qkv, &ctx.cos, &ctx.sin, shape)?;
            let q = heads.narrow(1, 0, h)?;
            let k = heads.narrow(1, h, kvh)?;
            let v = heads.narrow(1, h + kvh, kvh)?;
            let (k, v) = match self.cache.as_deref_mut() {
                Some(cache) => cache.append(layer, &k, &v)?,
                None => (k, v),
            };
            return Ok(flash_attention(&q, &k, &v, &ctx.attention)?.reshape((b, s, h * d))?);
        }
        let split = |offset: usize, heads: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, offset * d, heads * d)?
                .reshape((b, s, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = self.rotary.apply(&split(0, h)?, &ctx.cos, &ctx.sin)?;
        let k = self.rotary.apply(&split(h, kvh)?, &ctx.cos, &ctx.sin)?;
        let v = split(h + kvh, kvh)?;
        let (k, v) = match self.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let t = k.dim(2)?;
        // Grouped-query attention without copying K/V: query head i uses KV head i / n_rep, so the
        // n_rep query heads of one KV head are stacked along the sequence axis.
        let n_rep = h / kvh;
        let q = q.reshape((b, kvh, n_rep * s, d))?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let mut scores = scores.reshape((b, h, s, t))?.to_dtype(DType::F32)?;
        if let Some(mask) = &ctx.mask {
            scores = scores.broadcast_add(mask)?;
        }
        // The fused softmax has no backward; the composed one does, for training.
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = probs.to_dtype(v.dtype())?;
        let out = probs.reshape((b, kvh, n_rep * s, t))?.matmul(&v)?;
        Ok(out
            .reshape((b, h, s, d))?
            .transpose(1, 2)?
            .reshape((b, s, h * d))?)
    }
}
