//! Tensor names: Hugging Face's Phi-3 names and llama.cpp's `phi3` architecture's.

/// The GGUF name of Hugging Face tensor `name`, None for a tensor llama.cpp's phi3 has no
/// place for.
pub fn gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = LAYER_NAMES
        .iter()
        .find(|(hf, _)| *hf == module)
        .map(|(_, gguf)| *gguf)?;
    Some(format!("blk.{layer}.{module}"))
}

/// The Hugging Face name of GGUF tensor `name` (the inverse of [`gguf_name`]).
pub fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = LAYER_NAMES
        .iter()
        .find(|(_, gguf)| *gguf == module)
        .map(|(hf, _)| *hf)?;
    Some(format!("model.layers.{layer}.{module}"))
}

/// Per-layer tensors: (Hugging Face suffix, GGUF suffix). The fused projections keep their
/// layout: llama.cpp's phi3 splits `attn_qkv` into q, k, v and `ffn_up` into gate then up, as
/// transformers does.
const LAYER_NAMES: [(&str, &str); 6] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.31.mlp.gate_up_proj.weight",
            "model.layers.7.post_attention_layernorm.weight",
        ] {
            let gguf = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&gguf).as_deref(), Some(hf), "{gguf}");
        }
        assert_eq!(
            gguf_name("model.layers.3.mlp.gate_up_proj.weight").as_deref(),
            Some("blk.3.ffn_up.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(hf_name("blk.0.ffn_gate.weight"), None);
    }
}
