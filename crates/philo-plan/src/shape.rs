//! Parameter and activation sizes of a Phi-3 model, from its config.

use philo_model::Phi3Config;
use serde::Serialize;

/// One projection of a decoder layer: its name (as `--target_modules` spells it) and shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Projection {
    pub name: &'static str,
    pub in_features: usize,
    pub out_features: usize,
}

impl Projection {
    pub fn params(&self) -> usize {
        self.in_features * self.out_features
    }
}

/// The sizes a plan computes with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    pub max_position_embeddings: usize,
    /// A query sees itself and this many keys minus one behind it (None: all before it).
    pub sliding_window: Option<usize>,
}

impl ModelShape {
    pub fn from_config(config: &Phi3Config) -> Self {
        ModelShape {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            layers: config.num_hidden_layers,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
            tied_embeddings: config.tie_word_embeddings,
            max_position_embeddings: config.max_position_embeddings,
            sliding_window: config.sliding_window,
        }
    }

    /// The four projections of one decoder layer.
    pub fn projections(&self) -> [Projection; 4] {
        let (h, d) = (self.hidden, self.head_dim);
        [
            Projection {
                name: "qkv_proj",
                in_features: h,
                out_features: (self.heads + 2 * self.kv_heads) * d,
            },
            Projection {
                name: "o_proj",
                in_features: self.heads * d,
                out_features: h,
            },
            Projection {
                name: "gate_up_proj",
                in_features: h,
                out_features: 2 * self.intermediate,
            },
            Projection {
                name: "down_proj",
                in_features: self.intermediate,
                out_features: h,
            },
        ]
    }

    /// Weights of the projections of one layer.
    pub fn layer_projection_params(&self) -> usize {
        self.projections().iter().map(Projection::params).sum()
    }

    /// Weights of every layer's projections (what quantisation shrinks).
    pub fn projection_params(&self) -> usize {
        self.layers * self.layer_projection_params()
    }

    /// Embedding and LM head (one matrix when tied).
    pub fn embedding_params(&self) -> usize {
        let one = self.vocab * self.hidden;
        if self.tied_embeddings {
            one
        } else {
            2 * one
        }
    }

    /// Norm weights (two per layer and the final one).
    pub fn norm_params(&self) -> usize {
        (2 * self.layers + 1) * self.hidden
    }

    pub fn total_params(&self) -> usize {
        self.projection_params() + self.embedding_params() + self.norm_params()
    }

    /// LoRA parameters (A and B) of rank `rank` on the projections named in `targets`, all
    /// layers.
    pub fn lora_params(&self, rank: usize, targets: &[String]) -> usize {
        let per_layer: usize = self
            .projections()
            .iter()
            .filter(|p| targets.iter().any(|t| t == p.name))
            .map(|p| rank * (p.in_features + p.out_features))
            .sum();
        self.layers * per_layer
    }

    /// (query, key) pairs causal attention computes over a `seq`-token row.
    pub fn attended_pairs(&self, seq: usize) -> f64 {
        let window = self.sliding_window.unwrap_or(usize::MAX).max(1);
        (1..=seq).map(|i| i.min(window) as f64).sum()
    }

    /// Bytes of keys and values one token occupies in a KV cache of `dtype_bytes` elements.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi3_mini_has_3_8_billion_parameters() {
        let shape = ModelShape::from_config(&Phi3Config::phi3_mini_4k());
        // Phi-3-mini: 3,821,079,552 parameters (the model card's 3.8 B).
        assert_eq!(shape.total_params(), 3_821_079_552);
        let all: Vec<String> = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
            .map(String::from)
            .to_vec();
        // r · (in + out) per projection: 3,145,728 a layer at r 64.
        assert_eq!(shape.lora_params(64, &all), 100_663_296);
        assert_eq!(shape.kv_bytes_per_token(2), 393_216);
        // Its window of 2,047 keys: a 2,048-token row is causal up to the last query.
        assert_eq!(shape.attended_pairs(3), 6.0);
        assert_eq!(shape.attended_pairs(2048), 2047.0 * 2048.0 / 2.0 + 2047.0);
    }
}
