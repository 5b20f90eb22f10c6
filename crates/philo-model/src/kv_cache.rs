//! Keys and values of the tokens seen so far, one pair per decoder layer.

use candle_core::Tensor;

use crate::error::Result;

/// The KV cache of a batch of sequences that advance together.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, seq, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            seq_len: 0,
        }
    }

    /// Number of positions cached.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Forgets everything, keeping the layer count.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.seq_len = 0;
    }

    /// Keeps the first `len` positions and forgets the rest (speculative decoding's rollback of
    /// rejected tokens). A `len` beyond what is cached changes nothing.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.seq_len {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        self.seq_len = len;
        Ok(())
    }

    /// Appends new keys/values of `layer` and returns all keys/values of that layer.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // Detached: a cache must not keep an autograd graph alive across steps.
        let (k, v) = (k.detach(), v.detach());
        let merged = match &self.layers[layer] {
            None => (k, v),
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
        };
        if layer + 1 == self.layers.len() {
            self.seq_len = merged.0.dim(2)?;
        }
        self.layers[layer] = Some(merged.clone());
        Ok(merged)
    }
}
