//! llama.cpp's `phi3` metadata keys, from a config and back to config.json's fields.

use candle_core::quantized::gguf_file::Value;
use philo_model::{Phi3Config, RopeScaling};
use serde_json::{json, Value as Json};

/// The architecture's keys for `config`, `(key, value)`.
pub fn architecture_keys(config: &Phi3Config) -> Vec<(String, Value)> {
    let k = |name: &str| format!("phi3.{name}");
    let u = |v: usize| Value::U32(v as u32);
    let mut keys = vec![
        (
            "general.architecture".to_string(),
            Value::String("phi3".into()),
        ),
        (k("context_length"), u(config.max_position_embeddings)),
        (k("embedding_length"), u(config.hidden_size)),
        (k("feed_forward_length"), u(config.intermediate_size)),
        (k("block_count"), u(config.num_hidden_layers)),
        (k("attention.head_count"), u(config.num_attention_heads)),
        (k("attention.head_count_kv"), u(config.num_key_value_heads)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (k("rope.dimension_count"), u(config.rope.rotary_dim)),
        (k("rope.freq_base"), Value::F32(config.rope.theta as f32)),
    ];
    if let Some(window) = config.sliding_window {
        keys.push((k("attention.sliding_window"), u(window)));
    }
    if let RopeScaling::LongRope {
        original_max_position_embeddings,
        attention_factor,
        ..
    } = &config.rope.scaling
    {
        keys.push((
            k("rope.scaling.original_context_length"),
            u(*original_max_position_embeddings),
        ));
        keys.push((
            k("rope.scaling.attn_factor"),
            Value::F32(*attention_factor as f32),
        ));
    }
    keys
}

/// Reads key `name` as an unsigned number.
pub fn get_u64(metadata: &std::collections::HashMap<String, Value>, name: &str) -> Option<u64> {
    match metadata.get(name)? {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I32(v) if *v >= 0 => Some(*v as u64),
        Value::I64(v) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

/// Reads key `name` as a float.
pub fn get_f64(metadata: &std::collections::HashMap<String, Value>, name: &str) -> Option<f64> {
    match metadata.get(name)? {
        // The f32's shortest decimal form: 1e-5 stored as f32 reads back as 1e-5.
        Value::F32(v) => v.to_string().parse().ok(),
        Value::F64(v) => Some(*v),
        _ => get_u64(metadata, name).map(|v| v as f64),
    }
}

/// config.json's fields (classic layout) from `metadata`, with the vocabulary's rows, whether
/// an output matrix exists, the token ids and the LongRoPE factors read from the tensors.
/// Missing required keys are named.
pub fn config_json(
    metadata: &std::collections::HashMap<String, Value>,
    vocab_rows: usize,
    tied: bool,
    rope_factors: Option<(Vec<f32>, Vec<f32>)>,
) -> std::result::Result<Json, String> {
    let need = |name: &str| {
        get_u64(metadata, &format!("phi3.{name}"))
            .ok_or_else(|| format!("metadata key phi3.{name} is missing"))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let head_dim = hidden / heads.max(1);
    let rotary = get_u64(metadata, "phi3.rope.dimension_count").unwrap_or(head_dim);
    let context = need("context_length")?;
    let token = |name: &str| get_u64(metadata, &format!("tokenizer.ggml.{name}"));
    let mut config = json!({
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_act": "silu",
        "vocab_size": vocab_rows,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": get_u64(metadata, "phi3.attention.head_count_kv").unwrap_or(heads),
        "rms_norm_eps": get_f64(metadata, "phi3.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "max_position_embeddings": context,
        "original_max_position_embeddings": get_u64(metadata, "phi3.rope.scaling.original_context_length").unwrap_or(context),
        "rope_theta": get_f64(metadata, "phi3.rope.freq_base").unwrap_or(10_000.0),
        "partial_rotary_factor": rotary as f64 / head_dim as f64,
        "sliding_window": get_u64(metadata, "phi3.attention.sliding_window"),
        "tie_word_embeddings": tied,
        "bos_token_id": token("bos_token_id"),
        "eos_token_id": token("eos_token_id"),
        "pad_token_id": token("padding_token_id"),
        "rope_scaling": null,
    });
    if let Some((short, long)) = rope_factors {
        config["rope_scaling"] =
            json!({"type": "longrope", "short_factor": short, "long_factor": long});
    }
    Ok(config)
}
