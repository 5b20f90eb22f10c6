//! The KV cache of a serving engine: per layer, keys and values of every token slot in
//! fixed-size blocks, so a sequence holds only the blocks it has filled (see
//! `philo_kernels::paged_attention` for the layout). Which block belongs to which sequence is
//! the scheduler's business; this type only owns the storage.

use candle_core::{DType, Device, Tensor};

use crate::config::Phi3Config;
use crate::error::Result;

/// Keys and values `[num_blocks, kv_heads, block_size, head_dim]` for each decoder layer.
#[derive(Debug)]
pub struct PagedKvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
}

impl PagedKvCache {
    /// Zeroed storage for `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        config: &Phi3Config,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (
            num_blocks,
            config.num_key_value_heads,
            block_size,
            config.head_dim,
        );
        let mut keys = Vec::with_capacity(config.num_hidden_layers);
        let mut values = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            keys.push(Tensor::zeros(shape, dtype, device)?);
            values.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(PagedKvCache {
            keys,
            values,
            block_size,
            num_blocks,
        })
    }

    /// Bytes one block takes over all layers (keys and values), for sizing the cache.
    pub fn bytes_per_block(config: &Phi3Config, block_size: usize, dtype: DType) -> usize {
        2 * config.num_hidden_layers
            * config.num_key_value_heads
            * block_size
            * config.head_dim
            * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}
