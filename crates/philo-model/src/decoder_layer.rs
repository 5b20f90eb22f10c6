//! The decoder layer's forward, once for every caller: its attention core (where keys and values
//! live: a contiguous [`crate::KvCache`] or none, or the serving engine's paged cache) and how its
//! projections run (each with its own adapter, or per-row adapters) come from the caller.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora_linear::LoraLinear;
use crate::phi3::{Attention, DecoderLayer};

/// What a decoder layer's attention reads and writes its keys and values through.
pub(crate) trait AttentionCore {
    /// The attention output `[b, s, heads · head_dim]` of layer `layer` (its heads as `heads`
    /// lays them out) for its QKV projection `qkv` `[b, s, (heads + 2 · kv_heads) · head_dim]`:
    /// q and k rotated, the new keys and values written to the cache, attended.
    fn attend(&mut self, layer: usize, heads: &Attention, qkv: &Tensor) -> Result<Tensor>;
}

/// How a decoder layer's projections run.
pub(crate) trait Projections {
    /// `linear` (module `module` of layer `layer`) applied to `x` `[b, s, in]`.
    fn project(
        &self,
        layer: usize,
        module: &'static str,
        linear: &LoraLinear,
        x: &Tensor,
    ) -> Result<Tensor>;
}

/// Each projection with the adapter it holds, if any.
pub(crate) struct OwnAdapters;

impl Projections for OwnAdapters {
    fn project(
        &self,
        _: usize,
        _: &'static str,
        linear: &LoraLinear,
        x: &Tensor,
    ) -> Result<Tensor> {
        linear.forward(x)
    }
}

impl DecoderLayer {
    /// Layer `index` over the residual stream `residual` plus the previous layer's MLP output
    /// `pending` (added inside this layer's input norm, one kernel on the GPU): returns the
    /// residual stream after attention and this layer's MLP output, still to be added.
    pub(crate) fn forward(
        &self,
        index: usize,
        residual: &Tensor,
        pending: Option<&Tensor>,
        attention: &mut dyn AttentionCore,
        linears: &dyn Projections,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = self.input_layernorm.forward_after_add(residual, pending)?;
        let qkv = linears.project(index, "qkv_proj", &self.self_attn.qkv_proj, &normed)?;
        let attn = attention.attend(index, &self.self_attn, &qkv)?;
        let attn = linears.project(index, "o_proj", &self.self_attn.o_proj, &attn)?;
        let (x, normed) = self
            .post_attention_layernorm
            .forward_after_add(&x, Some(&attn))?;
        let gate_up = linears.project(index, "gate_up_proj", &self.mlp.gate_up_proj, &normed)?;
        let mlp = linears.project(
            index,
            "down_proj",
            &self.mlp.down_proj,
            &self.mlp.activation(&gate_up)?,
        )?;
        Ok((x, mlp))
    }
}
