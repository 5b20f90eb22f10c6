//! PEFT adapters in the layouts other tools write: split q/k/v and gate/up names, and adapters
//! on only some modules, checked against the reference adapter logits.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::*;
use philo_model::adapter::{peft_name, save_adapter};
use philo_model::{Adapter, ModelError};

fn fixture_adapter_tensors() -> HashMap<String, Tensor> {
    let path = case_dir("mini4k").join("adapter/adapter_model.safetensors");
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn write_adapter(dir: &std::path::Path, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        case_dir("mini4k").join("adapter/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join("adapter_model.safetensors")).unwrap();
}

/// The fixture's fused adapter rewritten with split q/k/v and gate/up names (each part keeps A and
/// takes its rows of B) gives the reference adapter logits once fused on load.
#[test]
fn split_projection_names_fuse_to_the_reference() {
    let dir = case_dir("mini4k");
    let fused = fixture_adapter_tensors();
    let mut split = HashMap::new();
    for (name, tensor) in &fused {
        let parts: &[(&str, &str)] = if name.contains("qkv_proj") {
            &[
                ("qkv_proj", "q_proj"),
                ("qkv_proj", "k_proj"),
                ("qkv_proj", "v_proj"),
            ]
        } else if name.contains("gate_up_proj") {
            &[("gate_up_proj", "gate_proj"), ("gate_up_proj", "up_proj")]
        } else {
            split.insert(name.clone(), tensor.clone());
            continue;
        };
        let rows = if name.contains("lora_B") {
            tensor.dim(0).unwrap() / parts.len()
        } else {
            0
        };
        for (i, (from, to)) in parts.iter().enumerate() {
            let part = if name.contains("lora_B") {
                tensor.narrow(0, i * rows, rows).unwrap()
            } else {
                tensor.clone()
            };
            split.insert(name.replace(from, to), part);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), &split);
    let adapter = Adapter::load(tmp.path()).unwrap();
    let mut model = load_model(&dir, DType::F32);
    adapter.attach(&mut model).unwrap();
    let ids = input(&reference(&dir), "in0");
    let logits = model
        .forward(&row(&ids), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = relative_diff(&logits, &reference_tensor(&dir, "lora.logits.in0"));
    assert!(diff < 1e-4, "split adapter logits differ by {diff:e}");
}

/// An adapter on o_proj and down_proj only attaches to those, round-trips through save, and its
/// merge gives the same logits as running it unmerged.
#[test]
fn adapter_on_some_modules() {
    let dir = case_dir("mini4k");
    let partial: HashMap<String, Tensor> = fixture_adapter_tensors()
        .into_iter()
        .filter(|(n, _)| n.contains("o_proj") || n.contains("down_proj"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), &partial);
    let adapter = Adapter::load(tmp.path()).unwrap();
    let mut model = load_model(&dir, DType::F32);
    adapter.attach(&mut model).unwrap();
    let with_lora: Vec<&str> = model
        .linears_mut()
        .into_iter()
        .filter(|(_, _, l)| l.lora.is_some())
        .map(|(_, m, _)| m)
        .collect();
    assert_eq!(with_lora, ["o_proj", "down_proj", "o_proj", "down_proj"]);

    let ids = input(&reference(&dir), "in0");
    let base = load_model(&dir, DType::F32)
        .forward(&row(&ids), None, None)
        .unwrap();
    let adapted = model.forward(&row(&ids), None, None).unwrap();
    assert!(
        relative_diff(&adapted, &base) > 1e-3,
        "the partial adapter must change the logits"
    );

    let saved = tmp.path().join("saved");
    save_adapter(&saved, &adapter.config, &mut model).unwrap();
    let names: Vec<String> = candle_core::safetensors::load(
        saved.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_keys()
    .collect();
    assert_eq!(names.len(), 8);
    assert!(names.contains(&peft_name(1, "down_proj", "B")));

    let mut merged = model.clone();
    merged.merge_lora().unwrap();
    let merged_logits = merged.forward(&row(&ids), None, None).unwrap();
    let diff = relative_diff(&merged_logits, &adapted);
    assert!(diff < 1e-5, "merged logits differ by {diff:e}");
}

/// An adapter for another shape is refused before anything on the model changes.
#[test]
fn mismatched_adapter_is_refused_and_leaves_the_model_untouched() {
    let dir = case_dir("mini4k");
    let mut tensors = fixture_adapter_tensors();
    let name = peft_name(1, "down_proj", "A");
    tensors.insert(
        name.clone(),
        Tensor::zeros((4, 95), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), &tensors);
    let adapter = Adapter::load(tmp.path()).unwrap();
    let mut model = load_model(&dir, DType::F32);
    let err = adapter.attach(&mut model).unwrap_err();
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("down_proj") && message.contains("[4, 95]") && message.contains("[r, 96]"),
        "{message}"
    );
    assert!(model.linears_mut().iter().all(|(_, _, l)| l.lora.is_none()));
}
