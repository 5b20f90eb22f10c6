//! config.json in both layouts, the real Phi-3 configs, and refusals that name the field.

use std::path::{Path, PathBuf};

use philo_model::{ModelError, Phi3Config, RopeScaling};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn parse(value: &serde_json::Value) -> Result<Phi3Config, ModelError> {
    Phi3Config::from_json_str(&value.to_string(), Path::new("config.json"))
}

fn read(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

#[test]
fn real_128k_config_has_longrope() {
    let config =
        Phi3Config::from_file(&fixture("configs/phi-3-mini-128k-instruct.config.json")).unwrap();
    assert_eq!(config.head_dim, 96);
    assert_eq!(config.rope.rotary_dim, 96);
    assert_eq!(config.sliding_window, Some(262144));
    match &config.rope.scaling {
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            assert_eq!(long_factor.len(), 48);
            assert_eq!(short_factor.len(), 48);
            assert_eq!(*original_max_position_embeddings, 4096);
            assert!(
                (attention_factor - 1.1902).abs() <= 1e-4,
                "attention factor {attention_factor}"
            );
        }
        other => panic!("expected LongRoPE, got {other:?}"),
    }
}

#[test]
fn real_4k_config_has_plain_rope_and_window() {
    let config =
        Phi3Config::from_file(&fixture("configs/phi-3-mini-4k-instruct.config.json")).unwrap();
    assert_eq!(config.rope.scaling, RopeScaling::None);
    assert_eq!(config.sliding_window, Some(2047));
    assert_eq!(
        (
            config.hidden_size,
            config.num_hidden_layers,
            config.vocab_size
        ),
        (3072, 32, 32064)
    );
    let shape = Phi3Config::phi3_mini_4k();
    assert_eq!(
        (shape.hidden_size, shape.intermediate_size, shape.head_dim),
        (3072, 8192, 96)
    );
}

/// The transformers-5 layout of the longrope fixture and its classic-layout equivalent agree.
#[test]
fn both_layouts_resolve_to_the_same_config() {
    let new_layout = read("hf-reference/dev/longrope/config.json");
    let params = new_layout["rope_parameters"].clone();
    let mut classic = new_layout.clone();
    let object = classic.as_object_mut().unwrap();
    object.remove("rope_parameters");
    object.remove("dtype");
    object.insert("torch_dtype".into(), "float32".into());
    object.insert("rope_theta".into(), params["rope_theta"].clone());
    object.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "longrope", "short_factor": params["short_factor"], "long_factor": params["long_factor"]}),
    );
    let a = parse(&new_layout).unwrap();
    let b = parse(&classic).unwrap();
    assert_eq!(a, b);
    // The legacy name "su" means LongRoPE too.
    classic["rope_scaling"]["type"] = "su".into();
    assert_eq!(parse(&classic).unwrap(), a);
    // to_json writes the classic layout, which reads back to the same config.
    assert_eq!(parse(&a.to_json()).unwrap(), a);
    // Unknown fields are ignored.
    classic["some_future_field"] = serde_json::json!({"x": 1});
    assert_eq!(parse(&classic).unwrap(), a);
}

#[test]
fn partial_rotary_factor_is_read() {
    let mut config = read("hf-reference/dev/mini4k/config.json");
    config["rope_parameters"]["partial_rotary_factor"] = 0.5.into();
    assert_eq!(parse(&config).unwrap().rope.rotary_dim, 8);
}

fn refusal(config: &serde_json::Value) -> String {
    let err = parse(config).expect_err("config should be refused");
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err}");
    err.to_string()
}

#[test]
fn unsupported_configs_are_refused_naming_the_field() {
    let base = read("hf-reference/dev/longrope/config.json");

    let mut c = base.clone();
    c["model_type"] = "llama".into();
    let message = refusal(&c);
    assert!(
        message.contains("model_type") && message.contains("llama"),
        "{message}"
    );

    let mut c = base.clone();
    c["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0, 3.0]);
    let message = refusal(&c);
    assert!(
        message.contains("long_factor") && message.contains("3 entries") && message.contains("8"),
        "{message}"
    );

    let mut c = base.clone();
    c["hidden_size"] = 66.into();
    let message = refusal(&c);
    assert!(
        message.contains("hidden_size") && message.contains("num_attention_heads"),
        "{message}"
    );

    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("vocab_size");
    assert!(refusal(&c).contains("vocab_size"));

    let mut c = base.clone();
    c["rope_parameters"]["rope_type"] = "yarn".into();
    assert!(refusal(&c).contains("rope_type"));

    let mut c = base;
    c["num_key_value_heads"] = 3.into();
    assert!(refusal(&c).contains("num_key_value_heads"));
}

#[test]
fn invalid_json_names_the_file() {
    let err =
        Phi3Config::from_json_str("{ \"vocab_size\": ", Path::new("/m/config.json")).unwrap_err();
    assert!(matches!(err, ModelError::Json { .. }));
    assert!(err.to_string().contains("/m/config.json"), "{err}");
}
